"""Resuming from a checkpoint continues exactly: same weights and metrics as a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.checkpointing import list_checkpoints
from tdpo_trl.tiny_models import left_minus_right_brightness, tiny_stable_diffusion


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_for_resume.py")
PROMPTS = ["a photo of a cat", "a photo of a dog"]


def random_prompt():
    return random.choice(PROMPTS), {}  # Python's RNG: its state must travel with the checkpoint


MODES = {
    # per-prompt reward statistics, neuron reset after every epoch, critic dropout: every piece of state is exercised
    "tdpo": dict(
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=16,
        per_prompt_stat_tracking_min_count=2,
        neuron_reset_frequency=1,
        critic_dropout=[0.2, 0.0],
    ),
    "ddpo": dict(use_critic=False),
    # half the steps trained: the critic embeds only those, chosen at sampling time from the same RNG
    "tdpo-half-steps": dict(train_timestep_fraction=0.5, neuron_reset_frequency=1),
    # the whole UNet trained: its weights and Adam moments travel in the checkpoint instead of the LoRA's
    "tdpo-full-unet": dict(use_lora=False, train_learning_rate=1e-4),
}


def train(tmp_path, run_name, epochs, mode, resume=False):
    config = tiny_config(
        tmp_path,
        run_name=run_name,
        num_epochs=epochs,
        save_freq=1,
        num_checkpoint_limit=2,
        resume_from=str(tmp_path / "logs" / run_name) if resume else "",
        **MODES[mode],
    )
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=MODES[mode].get("use_lora", True))
    trainer = TDPOTrainer(config, left_minus_right_brightness, random_prompt, pipeline)
    trainer.train()
    return trainer


def trained_state(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    state = {f"unet.{n}": p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    if trainer.critic is not None:
        state.update({f"critic.{n}": p.detach().clone() for n, p in trainer.critic.head.named_parameters()})
    return state


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.mark.parametrize("mode", list(MODES))
def test_two_plus_two_epochs_equal_four(tmp_path, mode):
    reference = train(tmp_path, "straight", 4, mode)
    train(tmp_path, "interrupted", 2, mode)
    resumed = train(tmp_path, "interrupted", 4, mode, resume=True)

    assert resumed.first_epoch == 2
    assert_identical(trained_state(reference), trained_state(resumed))
    assert [r["reward/mean"] for r in resumed.log_history] == [r["reward/mean"] for r in reference.log_history]
    assert len(resumed.log_history) == 4, "the log history of the first two epochs travels with the checkpoint"
    checkpoints = [os.path.basename(p) for p in list_checkpoints(tmp_path / "logs" / "interrupted" / "checkpoints")]
    assert checkpoints == ["checkpoint_2", "checkpoint_3"]  # numbering continues; rotated to num_checkpoint_limit


def test_resume_from_a_specific_checkpoint_and_bad_paths(tmp_path):
    train(tmp_path, "run", 2, "ddpo")
    first = tmp_path / "logs" / "run" / "checkpoints" / "checkpoint_0"
    config = tiny_config(tmp_path, run_name="run", use_critic=False, save_freq=1, resume_from=str(first))
    trainer = TDPOTrainer(
        config, left_minus_right_brightness, random_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion())
    )
    assert trainer.first_epoch == 1
    for bad, message in [(tmp_path / "nowhere", "is not a directory"), (tmp_path, "holds no complete checkpoint")]:
        config = tiny_config(tmp_path, run_name="other", resume_from=str(bad))
        with pytest.raises(ValueError, match=message):
            TDPOTrainer(
                config,
                left_minus_right_brightness,
                random_prompt,
                TDPOStableDiffusionPipeline(tiny_stable_diffusion()),
            )


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path):
    train(tmp_path, "run", 1, "ddpo")
    folder = tmp_path / "logs" / "run" / "checkpoints"
    (folder / ".checkpoint_1.partial").mkdir()  # what a process killed while saving leaves behind
    (folder / ".checkpoint_1.partial" / "optimizer.bin").write_bytes(b"truncated")
    config = tiny_config(
        tmp_path, run_name="run", use_critic=False, save_freq=1, num_epochs=2, resume_from=str(folder.parent)
    )
    trainer = TDPOTrainer(
        config, left_minus_right_brightness, random_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion())
    )
    assert trainer.first_epoch == 1
    trainer.train()
    assert sorted(os.listdir(folder)) == ["checkpoint_0", "checkpoint_1"]  # the partial folder was replaced


def test_sigkill_mid_epoch_then_resume_ends_identical(tmp_path):
    """A training process killed with SIGKILL during epoch 2 and resumed ends with the uninterrupted run's weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "straight", "4"], env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    process = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), "killed", "4"], env=env, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "logs" / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint_1").exists():  # killed after two complete epochs, inside the third
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (checkpoints / "checkpoint_3").exists()

    resumed = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "killed", "4", "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "killed.pt"))


def test_learning_rate_schedule_per_epoch_and_bit_exact_resume(tmp_path):
    """`train_lr_scheduler`: epoch e trains at train_learning_rate x transformers' schedule(e), logged, and a resumed
    run trains at the rates (and to the weights) of an uninterrupted one."""
    from transformers import get_scheduler

    settings = dict(num_epochs=4, save_freq=1, train_lr_scheduler="cosine", train_lr_warmup_epochs=1)

    def run(name, stop_at, resume=False):
        resume_from = str(tmp_path / "logs" / name) if resume else ""
        config = tiny_config(tmp_path, run_name=name, resume_from=resume_from, **settings)
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
        trainer = TDPOTrainer(config, left_minus_right_brightness, random_prompt, pipeline)
        trainer.initial_state = trained_state(trainer)
        trainer.train(stop_at)
        return trainer

    straight = run("straight", 4)
    interrupted = run("interrupted", 2)
    resumed = run("interrupted", 4, resume=True)

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = get_scheduler("cosine", dummy, num_warmup_steps=1, num_training_steps=4).lr_lambdas[0]
    expected = [3e-3 * schedule(epoch) for epoch in range(4)]  # 0 (warmup), 3e-3, 2.25e-3, 0.75e-3
    logged = [record["policy/learning_rate"] for record in straight.log_history]
    assert logged == pytest.approx(expected) and len(set(logged)) == 4
    assert [record["policy/learning_rate"] for record in resumed.log_history] == logged
    assert_identical(trained_state(straight), trained_state(resumed))
    # the rate reaches the optimizer: at rate 0 (the warmup epoch) Adam leaves the policy's LoRA where it started
    one_epoch = run("warmup_only", 1)
    policy = [name for name in one_epoch.initial_state if name.startswith("unet.")]
    assert all(torch.equal(one_epoch.initial_state[n], trained_state(one_epoch)[n]) for n in policy)
    assert not all(torch.equal(interrupted.initial_state[n], trained_state(interrupted)[n]) for n in policy)
    # past num_epochs the cosine factor would rise again (a second period): refused before anything is trained
    with pytest.raises(ValueError, match=r"train\(epochs=5\) goes past num_epochs=4, where the 'cosine'"):
        straight.train(5)
    assert len(straight.log_history) == 4
