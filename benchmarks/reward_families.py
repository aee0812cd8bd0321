"""The large-scale paper's reward families on stand-ins: what the composition scoring gives right and wrong scenes,
and what each reward costs per image on this machine.

1. Scoring. For every GenEval template, seeded random prompts; for each, a synthetic scene of coloured shapes that
   satisfies it and one with a single thing wrong (an object missing, a count off by one, a colour or the relation
   swapped), read by the exact stand-ins of tests/composition_scenes.py. Prints the mean dense score and the share
   scored correct, per template, for right and wrong scenes.
2. Cost. Seconds per image of `composition` (detector + colour reader), `attribute_parity` and `pickscore` on tiny
   random checkpoints, and of the detector at OWLv2 base's real size (random weights, 960 px) on the CPU.

    python benchmarks/reward_families.py            # 33 s on 2 CPU cores
"""

import argparse
import os
import random
import sys
import tempfile
import time

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from composition_scenes import detect_shapes, read_palette_colors, scene  # noqa: E402

from tdpo_trl.rewards import AttributeParity, CompositionReward, get_reward_function  # noqa: E402
from tdpo_trl.rewards.composition import OWLDetector  # noqa: E402
from tdpo_trl.rewards.composition_prompts import COLORS, RELATIONS  # noqa: E402


SHAPES = ("cube", "sphere", "cone")
SLOTS = {"left of": ((4, 24, 20, 40), (40, 24, 56, 40)), "right of": ((40, 24, 56, 40), (4, 24, 20, 40)),
         "above": ((24, 4, 40, 20), (24, 40, 40, 56)), "below": ((24, 40, 40, 56), (24, 4, 40, 20))}  # fmt: skip
GRID = [(4 + 20 * (i % 3), 4 + 20 * (i // 3), 18 + 20 * (i % 3), 18 + 20 * (i // 3)) for i in range(9)]


def case(template: str, rng: random.Random) -> tuple[str, list, list]:
    """A prompt of `template`, a scene that satisfies it, and one with one thing wrong."""
    a, b = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(COLORS, 2)
    wrong_color = rng.choice([c for c in COLORS if c != c1])
    if template == "single_object":
        return f"a photo of a {a}", [(a, c1, GRID[4])], [(b, c1, GRID[4])]
    if template == "two_object":
        return f"a photo of a {a} and a {b}", [(a, c1, GRID[0]), (b, c2, GRID[8])], [(a, c1, GRID[0])]
    if template == "counting":
        n = rng.choice((2, 3, 4))
        right = [(a, c1, GRID[i]) for i in range(0, 2 * n, 2)]
        return f"a photo of {['', '', 'two', 'three', 'four'][n]} {a}s", right, right[: n - 1]
    if template == "colors":
        return f"a photo of a {c1} {a}", [(a, c1, GRID[4])], [(a, wrong_color, GRID[4])]
    if template == "position":
        relation = rng.choice(RELATIONS)
        first, second = SLOTS[relation]
        return (f"a photo of a {a} {relation} a {b}", [(a, c1, first), (b, c2, second)],
                [(a, c1, second), (b, c2, first)])  # fmt: skip
    right, other = [(a, c1, GRID[0]), (b, c2, GRID[8])], rng.choice([c for c in COLORS if c != c2])
    return f"a photo of a {c1} {a} and a {c2} {b}", right, [(a, c1, GRID[0]), (b, other, GRID[8])]


def scoring_table(per_template: int, seed: int):
    rng = random.Random(seed)
    dense = CompositionReward(detector=detect_shapes, color_reader=read_palette_colors)
    strict = CompositionReward(detector=detect_shapes, color_reader=read_palette_colors, strict=True)
    print(f"{'template':<15}{'right: dense':>14}{'correct':>9}{'wrong: dense':>14}{'correct':>9}   e.g. (wrong)")
    for template in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        cases = [case(template, rng) for _ in range(per_template)]
        prompts = [c[0] for c in cases]
        cells = []
        for which in (1, 2):
            images = torch.stack([scene(c[which]) for c in cases])
            cells += [dense(images, prompts)[0].mean().item(), strict(images, prompts)[0].mean().item()]
        print(f"{template:<15}{cells[0]:>14.3f}{cells[1]:>9.2f}{cells[2]:>14.3f}{cells[3]:>9.2f}   {prompts[0]!r}")


def seconds_per_image(function, images, prompts, repeats: int = 3) -> float:
    function(images[:1], prompts[:1])  # loads the models
    start = time.perf_counter()
    for _ in range(repeats):
        function(images, prompts)
    return (time.perf_counter() - start) / (repeats * len(images))


def cost_table():
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from tdpo_trl.tiny_models import save_tiny_clip, save_tiny_owlv2

    folder = tempfile.mkdtemp()
    owl, clip = save_tiny_owlv2(os.path.join(folder, "owl")), save_tiny_clip(os.path.join(folder, "clip"))
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a red cube left of a blue sphere"] * 8
    rows = {
        "composition (tiny OWLv2 + tiny CLIP)": CompositionReward(detector=owl, color_reader=clip, threshold=0.05),
        "attribute_parity (tiny CLIP)": AttributeParity(["a dark photo", "a bright photo"], clip_model=clip),
        "pickscore (tiny CLIP)": get_reward_function("pickscore", model=clip, tokenizer=clip),
    }
    for name, function in rows.items():
        print(f"{name:<48}{seconds_per_image(function, images, prompts) * 1000:>9.1f} ms per image (64 px)")
    torch.manual_seed(0)
    detector = OWLDetector(owl)  # the tiny checkpoint's processor; the model swapped for OWLv2 base's size
    detector.load()
    config = Owlv2Config(vision_config={"image_size": 960})  # as google/owlv2-base-patch16-ensemble: ViT-B/16
    detector.model = Owlv2ForObjectDetection(config).eval()  # 960 px: 3,600 patches
    detector.processor.image_processor.size = {"height": 960, "width": 960}
    big = torch.rand(2, 3, 512, 512)
    seconds = seconds_per_image(lambda x, p: detector(x, [["cube", "sphere"]] * len(x)), big, ["-"] * 2, repeats=1)
    parameters = sum(p.numel() for p in detector.model.parameters()) / 1e6
    print(
        f"{'OWLv2 base size, random weights (' + f'{parameters:.0f}M params, 960 px)':<48}{seconds:>9.2f} s per image"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per_template", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"Composition scoring on synthetic scenes ({args.per_template} per template, exact stand-in reader):")
    scoring_table(args.per_template, args.seed)
    print(f"\nCost on this machine ({torch.get_num_threads()} threads):")
    cost_table()


if __name__ == "__main__":
    main()
