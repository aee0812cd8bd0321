"""Object composition, GenEval-style: does the image show the objects, counts, colours and relation its prompt asks
for? A zero-shot detector (OWLv2 by default) finds the boxes, CLIP reads each found object's colour, and
`score_composition` turns them into a dense score in [0, 1] with partial credit and a strict 0/1 "correct".

    composition = CompositionReward()                       # `--reward composition`
    correct = CompositionReward(strict=True)                # `--eval_rewards composition_correct`

Both read the same detector and CLIP weights (loaded once per process). Prompts are parsed by
`composition_prompts.parse_composition`; a prompt of another form is a `ValueError` that quotes it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..loading import check_hub_file
from .composition_prompts import COLORS, Composition, parse_composition
from .models import _LazyModelReward, _to_pil
from .zero_shot import DEFAULT_CLIP, ZeroShotClassifier


DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
THRESHOLD = 0.2  # a box counts as the object at this detector score (OWLv2's scores are low: HF's examples use 0.1)
NMS_IOU = 0.5  # boxes of one noun overlapping more than this are one object
POSITION_MARGIN = 0.1  # centres closer than this x (size of both boxes) along an axis are not "left of" etc.
COLOR_CROP = 64  # each found object's box is resized to this square before its colour is read


@dataclass(frozen=True)
class Detection:
    """One found object: its `noun`, the detector's `score`, and its `box` (x0, y0, x1, y1) in [0, 1] of the image."""

    noun: str
    score: float
    box: tuple[float, float, float, float]


def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Indices of the boxes kept, best first: each box overlapping a kept one by IoU > `iou` is dropped."""
    order, kept = scores.argsort(descending=True).tolist(), []
    areas = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    for i in order:
        lo, hi = torch.maximum(boxes[i, :2], boxes[kept, :2]), torch.minimum(boxes[i, 2:], boxes[kept, 2:])
        overlap = (hi - lo).clamp_min(0).prod(-1)  # (len(kept),)
        if not kept or (overlap / (areas[i] + areas[kept] - overlap).clamp_min(1e-9)).max() <= iou:
            kept.append(i)
    return kept


def relation_credit(a: Sequence[float], b: Sequence[float], relation: str, margin: float = POSITION_MARGIN) -> float:
    """How well box `a` stands in `relation` to box `b` (boxes x0, y0, x1, y1; y grows downwards): 1 when the offset
    of their centres, less `margin` x both boxes' sizes, points mostly (> 0.5 of its length) the asked way; up to 0.5
    when it points that way but less clearly or within the margin; 0 when it points the other way."""
    axis, sign = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}[relation]
    centre = [((a[k] + a[k + 2]) - (b[k] + b[k + 2])) / 2 for k in (0, 1)]  # centre of a minus centre of b
    size = [(a[k + 2] - a[k]) + (b[k + 2] - b[k]) for k in (0, 1)]
    length = (centre[0] ** 2 + centre[1] ** 2) ** 0.5
    if length < 1e-9:
        return 0.0
    beyond = [max(abs(c) - margin * s, 0.0) * (1 if c > 0 else -1) for c, s in zip(centre, size)]
    if sign * beyond[axis] / length > 0.5:
        return 1.0
    return 0.5 * max(sign * centre[axis] / length, 0.0)


def score_composition(
    wanted: Composition,
    detections: list[Detection],
    color_probabilities: Callable[[list[Detection], str], torch.Tensor],
) -> tuple[float, bool]:
    """`(dense score in [0, 1], correct)` of one image that asks for `wanted` and shows `detections` (thresholded,
    suppressed, best first). `color_probabilities(detections, noun)` -> `(n, len(COLORS))`.

    The dense score is the mean of one credit per thing asked: per object its count (1 - |found - asked| / asked for
    an exact count, else 1 if found at all), its colour (the mean probability of the asked colour over the boxes
    counted), and the relation (`relation_credit` of the best box of each object). Correct: every credit is full,
    i.e. exact counts, every counted box of the asked colour by the reader's top choice, and the relation holding.
    """
    credits, correct, best = [], True, []
    for item in wanted.objects:
        found = [d for d in detections if d.noun == item.noun]
        best.append(found[0] if found else None)
        if item.exact:
            credits.append(max(0.0, 1 - abs(len(found) - item.count) / item.count))
            correct &= len(found) == item.count
        else:
            credits.append(float(bool(found)))
            correct &= bool(found)
        if item.color is not None:
            counted = found[: item.count]
            if counted:
                probabilities = color_probabilities(counted, item.noun)  # (n, len(COLORS))
                target = COLORS.index(item.color)
                credits.append(probabilities[:, target].mean().item())
                correct &= bool((probabilities.argmax(-1) == target).all())
            else:
                credits.append(0.0)
                correct = False
    if wanted.relation is not None:
        a, b = best[0], best[1]
        credit = relation_credit(a.box, b.box, wanted.relation) if a is not None and b is not None else 0.0
        credits.append(credit)
        correct &= credit == 1.0
    return sum(credits) / len(credits), correct


def check_detector_settings(threshold: float, nms_iou: float):
    if not 0 <= threshold < 1 or not 0 < nms_iou <= 1:
        raise ValueError(f"`threshold` must be in [0, 1) and `nms_iou` in (0, 1], got {threshold!r}, {nms_iou!r}")


class OWLDetector:
    """`detector(images, nouns_per_image) -> [[Detection, ...] per image]` with a zero-shot detector of transformers
    (`AutoModelForZeroShotObjectDetection`: OWLv2, OWL-ViT, ...), queried with "a photo of a <noun>"; boxes above
    `threshold`, suppressed per noun at IoU `nms_iou`, best first."""

    def __init__(self, model: str = DEFAULT_DETECTOR, threshold: float = THRESHOLD, nms_iou: float = NMS_IOU,
                 batch_size: int = 8, device: Optional[str] = None, dtype: torch.dtype = torch.float32):  # fmt: skip
        check_detector_settings(threshold, nms_iou)
        self.model_name, self.threshold, self.nms_iou, self.batch_size = model, threshold, nms_iou, batch_size
        self.device, self.dtype = device, dtype  # device None: the images' device
        self.model = self.processor = None

    def load(self):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.model_name)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_name).eval()

    def check_available(self):
        check_hub_file(self.model_name, "config.json", f"the composition reward's detector {self.model_name!r}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, nouns: list[list[str]]) -> list[list[Detection]]:
        if self.model is None:
            self.load()
        self.model.to(device=torch.device(self.device) if self.device else images.device, dtype=self.dtype)
        height, width = images.shape[-2:]
        side = max(height, width)  # OWLv2 pads to a square: its boxes are relative to the padded image
        found = []
        for start in range(0, len(images), self.batch_size):
            chunk = nouns[start : start + self.batch_size]
            queries = [
                [f"a photo of {'an' if n[0] in 'aeiou' else 'a'} {n}" for n in image_nouns] for image_nouns in chunk
            ]
            pil = _to_pil(images[start : start + len(chunk)])
            inputs = self.processor(
                text=queries, images=pil, padding="max_length", truncation=True, return_tensors="pt"
            )
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            outputs = self.model(**inputs.to(self.model.device))
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=[(side, side)] * len(chunk)
            )
            for image_nouns, result in zip(chunk, results):
                found.append(self._per_noun(image_nouns, result, width, height))
        return found

    def _per_noun(self, nouns: list[str], result: dict, width: int, height: int) -> list[Detection]:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes, scores, labels = (
            (result["boxes"].float().cpu() / scale).clamp(0, 1),
            result["scores"].float().cpu(),
            result["labels"].cpu(),
        )
        detections = []
        for index, noun in enumerate(nouns):  # labels index the image's queries (padded queries are never kept)
            mine = (labels == index).nonzero().flatten()
            for i in mine[non_max_suppression(boxes[mine], scores[mine], self.nms_iou)] if len(mine) else []:
                detections.append(Detection(noun, scores[i].item(), tuple(boxes[i].tolist())))
        return sorted(detections, key=lambda d: -d.score)


class CLIPColorReader:
    """`reader(crops (n, 3, s, s), noun) -> (n, len(COLORS))`: CLIP zero-shot over "a photo of a <colour> <noun>"
    (GenEval reads colours the same way), on a `ZeroShotClassifier` shared with any reward on the same checkpoint."""

    def __init__(self, model: str = DEFAULT_CLIP, **kwargs):
        self.classifier = ZeroShotClassifier(model=model, **kwargs)

    def __call__(self, crops: torch.Tensor, noun: str) -> torch.Tensor:
        return self.classifier.probabilities(crops, [f"a photo of a {color} {noun}" for color in COLORS])


def crop_boxes(image: torch.Tensor, detections: list[Detection], size: int = COLOR_CROP) -> torch.Tensor:
    """`(3, H, W)` image -> `(n, 3, size, size)`: each detection's box, at least one pixel, resized."""
    height, width = image.shape[-2:]
    crops = []
    for d in detections:
        x0, y0 = min(int(d.box[0] * width), width - 1), min(int(d.box[1] * height), height - 1)
        x1, y1 = max(int(round(d.box[2] * width)), x0 + 1), max(int(round(d.box[3] * height)), y0 + 1)
        crops.append(F.interpolate(image[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bilinear"))
    return torch.cat(crops)


_SHARED: dict[tuple, object] = {}  # loaded detectors and colour readers, one per checkpoint and settings


def _shared(key: tuple, build: Callable):
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


class CompositionReward(_LazyModelReward):
    """`composition`: the GenEval-style dense score in [0, 1] of each image against its prompt (`score_composition`);
    `strict=True` (`composition_correct`): 1 if everything asked is right, else 0.

    Args:
        detector: a checkpoint of `AutoModelForZeroShotObjectDetection` (default OWLv2 base, 0.6 GB), or a callable
            `(images, nouns per image) -> [[Detection, ...] per image]`.
        color_reader: a CLIP checkpoint read zero-shot (default CLIP ViT-L/14) or a callable
            `(crops (n, 3, s, s), noun) -> (n, len(COLORS))` probabilities.
        threshold, nms_iou: the detector's box threshold and per-noun suppression (see the module constants).
        device, dtype, batch_size: as the other model rewards.
    """

    name = "composition"

    def __init__(
        self,
        detector=DEFAULT_DETECTOR,
        color_reader=DEFAULT_CLIP,
        threshold: float = THRESHOLD,
        nms_iou: float = NMS_IOU,
        strict: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.detector_spec, self.color_spec, self.strict = detector, color_reader, strict
        self.threshold, self.nms_iou = threshold, nms_iou
        if strict:
            self.name = "composition_correct"
        check_detector_settings(threshold, nms_iou)

    def load(self):
        spec = self.detector_spec
        self.detector = (
            _shared(
                ("detector", spec, self.threshold, self.nms_iou, self.device, self.dtype),
                lambda: OWLDetector(spec, self.threshold, self.nms_iou, self.batch_size, self.device, self.dtype),
            )
            if isinstance(spec, str)
            else spec
        )
        color = self.color_spec
        self.color_reader = (
            _shared(
                ("color", color, self.device, self.dtype),
                lambda: CLIPColorReader(color, device=self.device, dtype=self.dtype),
            )
            if isinstance(color, str)
            else color
        )

    def hub_files(self):
        return [(spec, "config.json") for spec in (self.detector_spec, self.color_spec) if isinstance(spec, str)]

    def modules(self):
        return []  # the detector and the colour reader keep their own devices

    def image_features(self, name_or_path):
        if self.color_spec != name_or_path:
            return None
        self._load_once()
        return self.color_reader.classifier.image_features(name_or_path)

    def parse(self, prompts: list[str]) -> list[Composition]:
        return [parse_composition(prompt) for prompt in prompts]

    def __call__(self, images, prompts=None, metadata=None):
        self.parse(list(prompts) if prompts is not None else [""])  # a prompt of another form fails before loading
        return super().__call__(images, prompts, metadata)

    def score(self, images, prompts):
        wanted = self.parse(prompts)
        detections = self.detector(images, [w.nouns for w in wanted])
        scores = []
        for image, w, found in zip(images, wanted, detections):

            def colors(counted, noun, image=image):
                return self.color_reader(crop_boxes(image, counted), noun).float().cpu()

            dense, correct = score_composition(w, found, colors)
            scores.append(float(correct) if self.strict else dense)
        return torch.tensor(scores, dtype=torch.float32)
