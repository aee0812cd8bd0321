"""Synthetic scenes of coloured shapes whose boxes are known, and stand-ins that read them exactly: a detector
(connected components; the shape names the object: a square is a "cube", a disk a "sphere", a triangle a "cone")
and a colour reader (the nearest of `COLORS`' palette to a crop's non-background pixels)."""

import torch
from scipy import ndimage

from tdpo_trl.rewards.composition import Detection
from tdpo_trl.rewards.composition_prompts import COLORS


BACKGROUND = 0.5  # mid-grey, far from every palette colour
PALETTE = {
    "red": (1.0, 0.0, 0.0), "orange": (1.0, 0.55, 0.0), "yellow": (1.0, 1.0, 0.0), "green": (0.0, 0.7, 0.0),
    "blue": (0.0, 0.0, 1.0), "purple": (0.55, 0.0, 0.8), "pink": (1.0, 0.6, 0.8), "brown": (0.45, 0.25, 0.05),
    "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
}  # fmt: skip


def scene(objects: list[tuple[str, str, tuple[int, int, int, int]]], size: int = 64) -> torch.Tensor:
    """`(3, size, size)` image in [0, 1]: each `(shape, colour, (x0, y0, x1, y1) in pixels)` drawn on grey."""
    image = torch.full((3, size, size), BACKGROUND)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for shape, color, (x0, y0, x1, y1) in objects:
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        if shape == "sphere":
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            inside &= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        elif shape == "cone":  # apex at the top centre
            inside &= (xs - (x0 + x1) / 2).abs() <= (ys - y0 + 0.5) / (y1 - y0) * (x1 - x0) / 2
        image[:, inside] = torch.tensor(PALETTE[color])[:, None]
    return image


def shape_of(fill: float) -> str:
    """The shape whose share of its bounding box is `fill`: square 1, disk pi/4, triangle 1/2."""
    return "cube" if fill > 0.92 else "sphere" if fill > 0.65 else "cone"


def detect_shapes(images: torch.Tensor, nouns: list[list[str]]) -> list[list[Detection]]:
    """The detector stand-in: every connected non-grey region is one object, named by its shape, box exact."""
    found = []
    for image, wanted in zip(images, nouns):
        size = image.shape[-1]
        mask = ((image - BACKGROUND).abs().amax(0) > 0.05).numpy()
        labels, count = ndimage.label(mask)
        detections = []
        for index, region in enumerate(ndimage.find_objects(labels), 1):
            ys, xs = region
            fill = (labels[region] == index).sum() / ((ys.stop - ys.start) * (xs.stop - xs.start))
            noun = shape_of(fill)
            if noun in wanted:
                box = (xs.start / size, ys.start / size, xs.stop / size, ys.stop / size)
                detections.append(Detection(noun, 1.0, box))
        found.append(detections)
    return found


def read_palette_colors(crops: torch.Tensor, noun: str) -> torch.Tensor:
    """The colour-reader stand-in: one-hot of the palette colour nearest the crop's mean non-grey pixel."""
    palette = torch.tensor([PALETTE[c] for c in COLORS])  # (10, 3)
    rows = []
    for crop in crops:
        pixels = crop.flatten(1).T  # (pixels, 3)
        pixels = pixels[(pixels - BACKGROUND).abs().amax(1) > 0.2]
        mean = pixels.mean(0) if len(pixels) else torch.full((3,), BACKGROUND)
        rows.append(torch.nn.functional.one_hot(((palette - mean) ** 2).sum(1).argmin(), len(COLORS)).float())
    return torch.stack(rows)
