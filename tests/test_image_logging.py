"""Samples in the tracker: `tdpo-trl train --log_with tensorboard` logs each epoch's captioned samples and the
held-out grid, read back from the event file under the documented tags."""

import glob

import pytest
import torch
from test_reliability_values import SMALL, cli_error

from tdpo_trl.image_logging import TrackerImageLogger, captioned_grid


def logged_images(folder) -> dict[str, list[tuple[int, int, int]]]:
    """`{tag: [(step, width, height), ...]}` of every image in the tensorboard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for path in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path, size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            images.setdefault(tag, []).extend((e.step, e.width, e.height) for e in events.Images(tag))
    return images


@pytest.mark.parametrize("every, sampled_epochs", [(1, [0, 1, 2]), (2, [0, 2])])
def test_the_command_line_logs_samples_and_the_heldout_grid_to_tensorboard(tmp_path, every, sampled_epochs):
    from tdpo_trl.commands import train

    trainer = train.cli(["--pretrained_model", "tiny", "--num_epochs", "3", *SMALL, "--log_with", "tensorboard",
                         "--eval_freq", "2", "--eval_num_prompts", "2", "--log_images_every", str(every),
                         "--logdir", str(tmp_path / "logs"), "--run_name", "run"])  # fmt: skip
    steps = [record["step"] for record in trainer.log_history]  # the step each epoch's metrics were logged at
    images = logged_images(tmp_path / "logs" / "run")
    assert sorted(images) == ["heldout", "samples"]
    assert [step for step, _, _ in images["samples"]] == [steps[e] for e in sampled_epochs]
    assert all(width >= 4 * 128 and height > 128 for _, width, height in images["samples"])  # 4 captioned samples
    assert [step for step, _, _ in images["heldout"]] == [steps[1]]  # held-out evaluation ran after epoch 1 only
    assert images["heldout"][0][1] >= 128, "the 16 px held-out grid is enlarged"


def test_the_grid_holds_each_sample_with_its_caption():
    images = torch.zeros(3, 3, 16, 16)
    grid = captioned_grid(images, ["0.5 | a cat", "0.25 | a dog", "-1 | a long prompt " * 5], columns=2)
    assert grid.shape[1] == 2 * (128 + 2) and grid.shape[0] > 2 * 128 and grid.dtype.name == "uint8"  # 2 px borders
    assert (grid[:128, :128] == 0).all(), "the image, enlarged to 128 px"
    assert (grid[130:145, :128] < 128).any(), "a caption is drawn below it"
    assert (grid[128:130, :128] == 255).all(), "on white"
    with pytest.raises(ValueError, match="`every` and `max_images` must be >= 1, got 0 and 16"):
        TrackerImageLogger(every=0)


def test_a_negative_log_images_every_is_one_line(capsys):
    assert "--log_images_every must be >= 0 (0: no images), got -1" in cli_error(
        ["train", "--log_images_every", "-1"], capsys
    )


def test_the_command_line_logs_samples_and_the_heldout_grid_to_wandb_offline(tmp_path, monkeypatch):
    """The same through wandb in offline mode (no account, no network): the images land in the offline run's media
    folder under the documented keys, at the steps of the epochs they belong to."""
    pytest.importorskip("wandb")
    import os

    from tdpo_trl.commands import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = train.cli(["--pretrained_model", "tiny", "--num_epochs", "2", *SMALL, "--log_with", "wandb",
                         "--eval_freq", "2", "--eval_num_prompts", "2", "--logdir", str(tmp_path / "logs"),
                         "--run_name", "run"])  # fmt: skip
    steps = [record["step"] for record in trainer.log_history]
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    names = [os.path.basename(p).split("_")[:2] for p in glob.glob(f"{run}/files/media/images/*.png")]  # key, step
    logged = sorted((key, int(step)) for key, step in names)
    assert logged == [("heldout", steps[1]), ("samples", steps[0]), ("samples", steps[1])], logged
