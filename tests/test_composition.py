"""The composition reward (GenEval-style): parsing, and scoring on synthetic scenes whose boxes are known, read by
stand-ins that read them exactly; then the real code path on tiny random OWLv2 and CLIP checkpoints."""

import pytest
import torch
from composition_scenes import detect_shapes, read_palette_colors, scene

from tdpo_trl.rewards import (
    CompositionReward,
    Detection,
    composition_prompts,
    get_reward_function,
    parse_composition,
    score_composition,
)
from tdpo_trl.rewards.composition import non_max_suppression, relation_credit
from tdpo_trl.rewards.composition_prompts import TEMPLATES, Wanted, builtin_sets


@pytest.mark.parametrize(
    "prompt, objects, relation",
    [
        ("a photo of a cat", [Wanted("cat")], None),
        ("a photo of an orange", [Wanted("orange")], None),
        ("a photo of a red orange", [Wanted("orange", color="red")], None),
        ("a photo of three teddy bears", [Wanted("teddy bear", 3, exact=True)], None),
        ("a photo of four people", [Wanted("person", 4, exact=True)], None),
        ("a photo of two red boxes", [Wanted("box", 2, "red", True)], None),
        ("A photo of a cat and a dog.", [Wanted("cat"), Wanted("dog")], None),
        ("a photo of a yellow cube and a sphere", [Wanted("cube", color="yellow"), Wanted("sphere")], None),
        ("a cube left of a sphere", [Wanted("cube"), Wanted("sphere")], "left of"),
        ("a photo of a dog to the right of a teddy bear", [Wanted("dog"), Wanted("teddy bear")], "right of"),
        ("a photo of a red cube above a cone", [Wanted("cube", color="red"), Wanted("cone")], "above"),
        ("a photo of a cone below two spheres", [Wanted("cone"), Wanted("sphere", 2, exact=True)], "below"),
    ],
)  # fmt: skip
def test_prompts_parse_into_objects_counts_colours_and_relations(prompt, objects, relation):
    parsed = parse_composition(prompt)
    assert list(parsed.objects) == objects and parsed.relation == relation


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a photo of a cat and a dog and a bird", "names 3 objects"),
        ("a photo of a cat, a dog and a bird", "names more than one thing"),
        ("a photo of zero cats", "starts with 'zero'"),
        ("many cats", "starts with 'many'"),
        ("a photo of a cat left of a dog and a bird", "a relation and an 'and'"),
        ("cat", "cannot read the object 'cat'"),
    ],
)
def test_an_unreadable_prompt_is_an_error_that_quotes_it(prompt, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_composition(prompt)
    assert repr(prompt) in str(error.value) and "expected" in str(error.value)


def test_the_builtin_prompt_sets_are_the_seeded_templates_disjoint_and_readable():
    from importlib import resources

    for name, prompts in builtin_sets().items():
        shipped = resources.files("tdpo_trl").joinpath("prompt_sets", f"{name}.txt").read_text().splitlines()
        assert [line for line in shipped if line and not line.startswith("#")] == prompts, name
    sets = builtin_sets()
    assert len(sets["composition"]) == 3000 and len(sets["composition_heldout"]) == 300
    assert not set(sets["composition"]) & set(sets["composition_heldout"])
    for prompt in sets["composition"][:600] + sets["composition_heldout"]:
        parse_composition(prompt)
    assert composition_prompts(12, seed=3) == composition_prompts(12, seed=3) != composition_prompts(12, seed=4)
    kinds = [parse_composition(p) for p in composition_prompts(len(TEMPLATES) * 20)]
    assert any(k.relation for k in kinds) and any(o.exact for k in kinds for o in k.objects)
    assert any(o.color for k in kinds for o in k.objects) and any(len(k.objects) == 2 for k in kinds)


def score(prompt: str, objects) -> tuple[float, bool]:
    """The dense score and the strict verdict of `prompt` on the synthetic scene of `objects`."""
    image = scene(objects)
    wanted = parse_composition(prompt)
    detections = detect_shapes(image[None], [wanted.nouns])[0]

    def colors(counted, noun):
        from tdpo_trl.rewards.composition import crop_boxes

        return read_palette_colors(crop_boxes(image, counted), noun)

    return score_composition(wanted, detections, colors)


LEFT, RIGHT, TOP, BOTTOM = (4, 24, 20, 40), (40, 24, 56, 40), (24, 4, 40, 20), (24, 40, 40, 56)


def test_the_stand_ins_read_the_scenes_exactly():
    image = scene([("cube", "red", LEFT), ("sphere", "blue", RIGHT), ("cone", "green", TOP)])
    found = detect_shapes(image[None], [["cube", "sphere", "cone"]])[0]
    assert {d.noun: d.box for d in found} == {
        "cube": (4 / 64, 24 / 64, 20 / 64, 40 / 64), "sphere": (40 / 64, 24 / 64, 56 / 64, 40 / 64),
        "cone": (24 / 64, 4 / 64, 40 / 64, 20 / 64),
    }  # fmt: skip


def test_presence():
    assert score("a photo of a cube", [("cube", "red", LEFT)]) == (1.0, True)
    assert score("a photo of a cube", [("sphere", "red", LEFT)]) == (0.0, False)
    assert score("a photo of a cube", [("cube", "red", LEFT), ("cube", "red", RIGHT)]) == (1.0, True)  # "a": >= 1
    assert score("a photo of a cube and a sphere", [("cube", "red", LEFT)]) == (0.5, False)  # partial credit


def test_counts_are_exact_with_partial_credit():
    cubes = [("cube", "red", box) for box in (LEFT, RIGHT, TOP, BOTTOM)]
    assert score("a photo of three cubes", cubes[:3]) == (1.0, True)
    assert score("a photo of three cubes", cubes[:2]) == (pytest.approx(2 / 3), False)
    assert score("a photo of three cubes", cubes) == (pytest.approx(2 / 3), False)  # one too many
    assert score("a photo of two cubes", []) == (0.0, False)


def test_colours_with_partial_credit():
    assert score("a photo of a red cube", [("cube", "red", LEFT)]) == (1.0, True)
    assert score("a photo of a red cube", [("cube", "blue", LEFT)]) == (0.5, False)  # right object, wrong colour
    assert score("a photo of a purple cube and a yellow cone", [("cube", "purple", LEFT), ("cone", "yellow", RIGHT)]) \
        == (1.0, True)  # fmt: skip
    assert score("a photo of a purple cube and a yellow cone", [("cube", "yellow", LEFT), ("cone", "yellow", RIGHT)]) \
        == (0.75, False)  # fmt: skip
    two = [("cube", "green", LEFT), ("cube", "white", RIGHT)]
    dense, correct = score("a photo of two green cubes", two)
    assert dense == pytest.approx((1 + 0.5) / 2) and not correct  # count right, one of two counted boxes green


@pytest.mark.parametrize(
    "relation, holds, fails",
    [("left of", (LEFT, RIGHT), (RIGHT, LEFT)), ("right of", (RIGHT, LEFT), (LEFT, RIGHT)),
     ("above", (TOP, BOTTOM), (BOTTOM, TOP)), ("below", (BOTTOM, TOP), (TOP, BOTTOM))],
)  # fmt: skip
def test_each_relation(relation, holds, fails):
    prompt = f"a photo of a cube {relation} a sphere"
    assert score(prompt, [("cube", "red", holds[0]), ("sphere", "blue", holds[1])]) == (1.0, True)
    assert score(prompt, [("cube", "red", fails[0]), ("sphere", "blue", fails[1])]) == (pytest.approx(2 / 3), False)
    assert score(prompt, [("cube", "red", holds[0])]) == (pytest.approx(1 / 3), False)  # no sphere: no relation


def test_relation_credit_margin_and_partial_credit():
    a, b = (0.0, 0.0, 0.2, 0.2), (0.3, 0.0, 0.5, 0.2)  # a's centre 0.3 left of b's, boxes 0.2 wide
    assert relation_credit(a, b, "left of") == 1.0 and relation_credit(a, b, "right of") == 0.0
    near = (0.05, 0.0, 0.25, 0.2)  # centres 0.05 apart, inside the margin 0.1 x (0.2 + 0.2)
    assert 0 < relation_credit(a, near, "left of") <= 0.5
    diagonal = (0.3, 0.3, 0.5, 0.5)  # as far down as right: a is both left of and above it (as GenEval reads it)
    assert relation_credit(a, diagonal, "left of") == relation_credit(a, diagonal, "above") == 1.0
    assert relation_credit(a, diagonal, "right of") == relation_credit(a, diagonal, "below") == 0.0
    assert relation_credit(a, a, "left of") == 0.0


def test_non_max_suppression_keeps_one_box_per_object():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.52, 0.5], [0.6, 0.6, 1.0, 1.0]])
    assert non_max_suppression(boxes, torch.tensor([0.3, 0.9, 0.5]), iou=0.5) == [1, 2]
    assert non_max_suppression(boxes, torch.tensor([0.3, 0.9, 0.5]), iou=1.0) == [1, 2, 0]


def test_the_reward_scores_images_and_the_strict_judge_counts_them_correct():
    prompts = ["a photo of a red cube left of a blue sphere", "a photo of two cones", "a photo of a red cube"]
    images = torch.stack([
        scene([("cube", "red", LEFT), ("sphere", "blue", RIGHT)]),
        scene([("cone", "green", LEFT)]),
        scene([("cube", "blue", LEFT)]),
    ])  # fmt: skip
    dense = CompositionReward(detector=detect_shapes, color_reader=read_palette_colors, batch_size=2)
    strict = get_reward_function("composition_correct", detector=detect_shapes, color_reader=read_palette_colors)
    rewards, _ = dense(images, prompts)
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert strict(images, prompts)[0].tolist() == [1.0, 0.0, 0.0] and strict.name == "composition_correct"
    with pytest.raises(ValueError, match="'a cube, a sphere'"):
        dense(images[:1], ["a cube, a sphere"])


def test_detections_of_other_nouns_do_not_count():
    wanted = parse_composition("a photo of a cat")
    assert score_composition(wanted, [Detection("dog", 0.9, (0, 0, 1, 1))], lambda d, n: None) == (0.0, False)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from tdpo_trl.tiny_models import save_tiny_clip, save_tiny_owlv2

    folder = tmp_path_factory.mktemp("composition")
    return str(save_tiny_owlv2(folder / "owlv2")), str(save_tiny_clip(folder / "clip"))


def test_the_owlv2_and_clip_code_path_on_tiny_random_checkpoints(tiny_checkpoints):
    owl, clip = tiny_checkpoints
    reward = get_reward_function("composition", detector=owl, color_reader=clip, threshold=0.05)
    judge = get_reward_function("composition_correct", detector=owl, color_reader=clip, threshold=0.05)
    reward.check_available()
    images = torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a red cat", "a photo of two dogs", "a photo of a cat left of a dog", "a photo of a cup"]
    rewards, _ = reward(images, prompts)
    assert rewards.shape == (4,) and ((rewards >= 0) & (rewards <= 1)).all()
    correct, _ = judge(images, prompts)
    assert set(correct.tolist()) <= {0.0, 1.0}
    assert judge.detector is reward.detector and judge.color_reader is reward.color_reader  # loaded once
    detections = reward.detector(images, [["cat", "dog"]] * 4)
    assert any(detections) and all(0 <= v <= 1 for found in detections for d in found for v in d.box)
    assert all(d.score > 0.05 for found in detections for d in found)
    assert reward.image_features(clip) is not None and reward.image_features("another/clip") is None


def test_a_bad_detector_setting_is_refused_when_built():
    with pytest.raises(ValueError, match="`threshold` must be in"):
        CompositionReward(threshold=1.5)


def test_composition_and_its_judge_run_in_tdpo_trl_evaluate(tiny_checkpoints, tmp_path):
    """The reward as the target and its strict judge plus `attribute_parity` as out-of-domain judges, on the built-in
    held-out compositional prompts, with each reward's checkpoints given by `--reward_kwargs`."""
    import json

    from conftest import cat_prompt, tiny_config

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
    from tdpo_trl.commands import cli
    from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion

    config = tiny_config(tmp_path, num_epochs=1, save_freq=1)
    TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion())).train()
    owl, clip = tiny_checkpoints
    kwargs = {
        "composition": {"detector": owl, "color_reader": clip, "threshold": 0.05},
        "composition_correct": {"detector": owl, "color_reader": clip, "threshold": 0.05},
        "attribute_parity": {"attributes": ["a dark photo", "a bright photo"], "clip_model": clip},
    }
    argv = [
        "evaluate", "--base", "tiny", "--runs", f"run={tmp_path / 'logs' / 'test'}", "--target_reward", "composition",
        "--eval_rewards", "composition_correct", "attribute_parity", "--prompts", "composition_heldout",
        "--num_prompts", "4", "--num_steps", "2", "--reward_kwargs", json.dumps(kwargs),
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    records = cli.main(argv)["results"]["run"]
    assert [r["checkpoint"] for r in records] == ["base", "checkpoint_0"]
    for record in records:
        assert 0 <= record["target"] <= 1 and 0 <= record["composition_correct"] <= 1
        assert -1 <= record["attribute_parity"] <= 0  # the group score: minus the total variation to uniform
    prompts = json.loads((tmp_path / "eval" / "cross_reward.json").read_text())["prompts"]
    assert all(p.startswith("a photo of") for p in prompts)
    with pytest.raises(ValueError, match=r"names \['clip_score'\], which are not among the rewards given"):
        cli.main([*argv[:-4], "--reward_kwargs", '{"clip_score": {}}', *argv[-2:]])


def test_the_papers_joint_tasks_file_trains_on_tiny_models(tiny_checkpoints, tmp_path):
    """examples/large_scale/tasks.yaml as shipped (preference, composition, fairness), with every reward's checkpoint
    swapped for a tiny random one: two epochs of TDPO-R, each task scored and logged under its name."""
    import os

    import yaml
    from conftest import tiny_config

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
    from tdpo_trl.tasks import load_tasks
    from tdpo_trl.tiny_models import tiny_stable_diffusion

    shipped = os.path.join(os.path.dirname(__file__), "..", "examples", "large_scale")
    entries = yaml.safe_load(open(os.path.join(shipped, "tasks.yaml")))
    assert [(e["name"], e["reward"]) for e in entries] == [
        ("preference", "pickscore"), ("composition", "composition"), ("fairness", "attribute_parity")
    ]  # fmt: skip
    owl, clip = tiny_checkpoints
    tiny = {
        "pickscore": {"model": clip, "tokenizer": clip},
        "composition": {"detector": owl, "color_reader": clip, "threshold": 0.05},
        "attribute_parity": {"clip_model": clip},
    }
    for entry in entries:
        entry["reward_kwargs"] = {**entry.get("reward_kwargs", {}), **tiny[entry["reward"]]}
        for key in ("prompts", "eval_prompts"):
            if entry.get(key, "").endswith(".txt"):
                entry[key] = os.path.join(shipped, entry[key])
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(entries))
    tasks = load_tasks(str(tmp_path / "tasks.yaml"))
    config = tiny_config(tmp_path, num_epochs=2, sample_batch_size=8, sample_num_batches_per_epoch=1,
                         train_batch_size=4)  # fmt: skip
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
    trainer = TDPOTrainer(config, None, None, pipeline, tasks=tasks)
    trainer.train()
    last = trainer.log_history[-1]
    for name in ("preference", "composition", "fairness"):
        assert any(k.startswith(f"task/{name}/reward") for k in last), (name, sorted(last))
    assert 0 <= last["task/composition/reward/mean"] <= 1
    assert -1 <= last["task/fairness/reward/group_score"] <= 0


def test_composition_correct_judges_training_and_held_out_samples(tiny_checkpoints, tmp_path):
    """As an `eval_reward_functions` judge: every epoch's samples and the held-out compositional prompts."""
    from conftest import cat_prompt, tiny_config

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
    from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion

    owl, clip = tiny_checkpoints
    judge = get_reward_function("composition_correct", detector=owl, color_reader=clip, threshold=0.05)
    config = tiny_config(tmp_path, num_epochs=1, eval_freq=1, eval_prompts="composition_heldout", eval_num_prompts=4)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion())
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, pipeline, eval_reward_functions={"composition": judge})
    trainer.train()
    record = trainer.log_history[-1]
    assert 0 <= record["eval/composition/mean"] <= 1 and 0 <= record["heldout/composition/mean"] <= 1


def test_attribute_parity_reads_by_name_shares_clip_and_checks_its_settings(tiny_checkpoints):
    _, clip = tiny_checkpoints
    parity = get_reward_function("attribute_parity", attributes=["a dark photo", "a bright photo"], clip_model=clip)
    clip_score = get_reward_function("clip_score", model=clip)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images[:4] *= 0.1
    probabilities = parity.classifier(images)
    assert probabilities.shape == (8, 2) and torch.allclose(probabilities.sum(1), torch.ones(8))
    rewards, info = parity(images, ["a photo of a doctor"] * 8)
    assert rewards.shape == (8,) and -1 <= info["group_score"] <= 0 and parity.default_prompt_repeats == 8
    clip_score(images, ["a photo of a doctor"] * 8)
    assert clip_score.model is parity.classifier.clip  # one CLIP for both readers of the checkpoint
    assert parity.image_features(clip) is not None and parity.image_features("another/clip") is None
    with pytest.raises(ValueError, match="at least 2 non-empty texts, got \\['a photo of a man'\\]"):
        get_reward_function("attribute_parity", attributes=["a photo of a man"])
    with pytest.raises(ValueError, match="`target` has 3 classes but `attributes` 2"):
        get_reward_function("attribute_parity", attributes=["a", "b"], target=[0.2, 0.3, 0.5])
