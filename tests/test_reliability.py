"""What the library guarantees when things go wrong: non-finite values never reach the weights, no run overwrites
another, fp16 and bf16 train, and every bad input gets one clear error (docs/reliability.md)."""

import hashlib
import json
import math
import os
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import cat_prompt, tiny_config
from safetensors.torch import load_file

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.checkpointing import CheckpointError, list_checkpoints
from tdpo_trl.commands.cli import entry_point
from tdpo_trl.rewards import call_reward_function
from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion
from tdpo_trl.validation import check_prompt_output


def new_pipeline():
    return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)


def brightness_trainer(tmp_path, **overrides) -> TDPOTrainer:
    """A trainer of the tiny pipeline on mean brightness, `tiny_config` with `overrides`."""
    return TDPOTrainer(tiny_config(tmp_path, **overrides), mean_brightness, cat_prompt, new_pipeline())


def trained_tensors(trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer._named_weights() if ".state." not in name}


def folder_digest(folder) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(folder)
        for name in names
    }


# ---------------------------------------------------------------- non-finite values never reach the weights


def brightness_with_a_bad_sample(bad_value):
    def reward(images, prompts, metadata):
        rewards = images.mean(dim=(1, 2, 3))
        rewards[0] = bad_value  # one sample of every batch
        return rewards, {}

    return reward


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("per_prompt", [True, False], ids=["per_prompt", "batch"])
@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_non_finite_rewards_never_reach_the_weights(tmp_path, use_critic, per_prompt, bad_value):
    config = tiny_config(
        tmp_path, use_critic=use_critic, per_prompt_stat_tracking=per_prompt, per_prompt_stat_tracking_min_count=2,
        save_freq=1,
    )  # fmt: skip
    trainer = TDPOTrainer(config, brightness_with_a_bad_sample(bad_value), cat_prompt, new_pipeline())
    before = trained_tensors(trainer)
    trainer.train()

    for name, tensor in trained_tensors(trainer).items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite"
        assert not torch.equal(tensor, before[name]), f"{name} did not train"
    for record in trainer.log_history:
        assert record["reward/invalid_count"] == 2  # one per sampled batch of 4, 2 batches per epoch
        assert math.isfinite(record["reward/mean"]) and math.isfinite(record["advantage/std"])
        assert record["policy/skipped_steps"] == 0
    for checkpoint in list_checkpoints(trainer.checkpoint_dir):
        lora = load_file(os.path.join(checkpoint, "pytorch_lora_weights.safetensors"))
        assert all(torch.isfinite(t).all() for t in lora.values())


def test_a_failed_reward_gets_advantage_zero_in_every_normalization(tmp_path):
    trainer = TDPOTrainer(
        tiny_config(tmp_path, per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=2),
        mean_brightness,
        cat_prompt,
        new_pipeline(),
    )
    prompt_ids = trainer.sd_pipeline.tokenize(["a cat", "a dog", "a cat", "a dog", "a cat"])
    normalized = trainer._normalized_rewards(np.array([1.0, 10.0, np.nan, 30.0, 3.0]), prompt_ids, epoch=0)
    # the NaN is out of the statistics: "a cat" has rewards 1 and 3 (mean 2, std 1), "a dog" 10 and 30 (mean 20)
    np.testing.assert_allclose(normalized, [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-5)
    assert list(trainer.stat_tracker.stats["a cat"]) == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"every reward of epoch 7 is NaN or infinite \(2 samples"):
        trainer._normalized_rewards(np.array([np.nan, np.inf]), prompt_ids[:2], epoch=7)


def test_a_whole_batch_of_failed_rewards_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    calls = []

    def fails_after_the_first_epoch(images, prompts, metadata):
        calls.append(1)
        rewards = images.mean(dim=(1, 2, 3))
        return (rewards if len(calls) <= 2 else torch.full_like(rewards, float("nan"))), {}

    trainer = TDPOTrainer(tiny_config(tmp_path, save_freq=1), fails_after_the_first_epoch, cat_prompt, new_pipeline())
    with pytest.raises(
        ValueError, match="every reward of epoch 1 is NaN or infinite .* 'fails_after_the_first_epoch'"
    ):
        trainer.train()
    assert [os.path.basename(c) for c in list_checkpoints(trainer.checkpoint_dir)] == ["checkpoint_0"]


def test_a_non_finite_loss_skips_the_optimizer_step(tmp_path, caplog):
    trainer = brightness_trainer(tmp_path, num_epochs=1)
    step_loss = trainer._step_loss

    def nan_policy_loss(*args, **kwargs):
        loss, approx_kl, clipfrac, terms = step_loss(*args, **kwargs)
        return loss * float("nan"), approx_kl, clipfrac, terms

    trainer._step_loss = nan_policy_loss
    before = trained_tensors(trainer)
    trainer.train()

    after = trained_tensors(trainer)
    (record,) = trainer.log_history
    assert record["policy/skipped_steps"] == 16  # every step: 4 timestep positions x 4 minibatches
    assert record["critic/skipped_steps"] == 0  # the critic's own loss is finite: it keeps training
    for name, tensor in after.items():
        if name.startswith("unet."):
            assert torch.equal(tensor, before[name]), f"{name} changed although every policy step was skipped"
        else:
            assert torch.isfinite(tensor).all() and not torch.equal(tensor, before[name])
    assert "skipped 16 of 16 policy optimizer steps" in caplog.text


def test_nothing_non_finite_is_written(tmp_path):
    trainer = brightness_trainer(tmp_path, num_epochs=1)
    trainer.train()
    name, parameter = next((n, p) for n, p in trainer.sd_pipeline.unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        parameter[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"refusing to write a checkpoint .*unet\.{name}"):
        trainer.save_checkpoint()
    assert not os.path.exists(trainer.checkpoint_dir) or os.listdir(trainer.checkpoint_dir) == []
    with pytest.raises(FloatingPointError, match="refusing to write the trained weights .* Nothing was written"):
        trainer.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# ---------------------------------------------------------------- what reward and prompt functions return

GOOD = torch.tensor([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    "returned, message",
    [
        (GOOD, r"returned Tensor of shape \(4,\), dtype torch.float32, first values \[0.1.*must return `\(rewards, metadata\)`"),
        ((GOOD[:3], {}), r"returned rewards Tensor of shape \(3,\), dtype torch.float32, first values \[0.1, 0.2, 0.3\] for a batch of 4 images; expected shape \(4,\)"),
        ((GOOD[:, None], {}), r"returned rewards Tensor of shape \(4, 1\).*expected shape \(4,\): one reward per image \(squeeze"),
        ((torch.tensor(0.5), {}), r"returned rewards Tensor of shape \(\).*expected shape \(4,\)"),
        ((["a", "b", "c", "d"], {}), r"returned rewards list of length 4: \['a', 'b'.*not numbers"),
        ((None, {}), r"returned tuple of length 2: \[None, \{\}\]"),
        (None, r"returned NoneType None"),
        ([0.1, 0.2], r"returned list of length 2: \[0.1, 0.2\]"),
        ((GOOD, {}, "extra"), r"returned tuple of length 3"),
    ],
    ids=["bare tensor", "wrong length", "2-D", "0-d", "strings", "None rewards", "None", "bare list", "3-tuple"],
)  # fmt: skip
def test_bad_reward_outputs_are_described(returned, message):
    def my_reward(images, prompts, metadata):
        return returned

    with pytest.raises(ValueError, match="reward function 'my_reward' " + message):
        call_reward_function(my_reward, torch.zeros(4, 3, 8, 8), ["p"] * 4, [{}] * 4)


def test_good_reward_outputs_are_accepted():
    for rewards in (GOOD, GOOD.numpy(), GOOD.tolist(), torch.tensor([1, 2, 3, 4]), GOOD.double()):
        values, metadata = call_reward_function(lambda *a, r=rewards: (r, {"x": 1}), torch.zeros(4, 3, 8, 8), [], [])
        assert values.dtype == torch.float32 and values.shape == (4,) and metadata == {"x": 1}
    values, _ = call_reward_function(lambda *a: (torch.tensor([1.0, float("nan"), 2.0, 3.0]), {}), GOOD, [], [])
    assert math.isnan(values[1])  # non-finite rewards pass here; the trainer drops and counts them


@pytest.mark.parametrize("async_rewards", [False, True], ids=["sync", "async"])
def test_the_trainer_checks_what_the_reward_returns(tmp_path, async_rewards):
    def two_d_reward(images, prompts, metadata):
        return images.mean(dim=(2, 3)), {}  # (B, 3): forgot the channel dimension

    trainer = TDPOTrainer(
        tiny_config(tmp_path, async_reward_computation=async_rewards), two_d_reward, cat_prompt, new_pipeline()
    )
    with pytest.raises(ValueError, match=r"'two_d_reward' returned rewards Tensor of shape \(4, 3\)"):
        trainer.train()


@pytest.mark.parametrize(
    "returned, message",
    [
        ("ab", r"returned the bare str 'ab'; .* e.g. `\('ab', \{\}\)`"),
        ("a cat", r"returned the bare str 'a cat'"),
        (None, r"returned NoneType None"),
        (("a cat",), r"returned tuple of length 1"),
        ((3, {}), r"returned a prompt that is int 3, not a str"),
    ],
)
def test_bad_prompt_outputs_are_described(tmp_path, returned, message):
    with pytest.raises(ValueError, match=message):
        check_prompt_output(returned)
    trainer = TDPOTrainer(tiny_config(tmp_path), mean_brightness, lambda: returned, new_pipeline())
    with pytest.raises(ValueError, match="prompt function '<lambda>' " + message):
        trainer.train()
    assert check_prompt_output(("a cat", {"k": 1})) == ("a cat", {"k": 1})


# ---------------------------------------------------------------- checkpoints: runs, damage, structure


def train_run(tmp_path, run_name, epochs=2, **overrides):
    config = tiny_config(tmp_path, run_name=run_name, num_epochs=epochs, save_freq=1, **overrides)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())
    trainer.train()
    return trainer


def test_a_resume_never_writes_into_another_runs_folder(tmp_path):
    train_run(tmp_path, "A", epochs=1)
    train_run(tmp_path, "B", epochs=1)
    run_a, run_b = tmp_path / "logs" / "A", tmp_path / "logs" / "B"
    digest_a = folder_digest(run_a)

    with pytest.raises(ValueError, match=r"continues the run in .*B'.* would write to .*A'.*resume_as_new_run=True"):
        brightness_trainer(tmp_path, run_name="A", resume_from=str(run_b))
    used = r"logs/A/checkpoints' already holds checkpoints \(checkpoint_0 is the latest\) of another run"
    with pytest.raises(ValueError, match=used):
        brightness_trainer(tmp_path, run_name="A", resume_from=str(run_b), resume_as_new_run=True)
    assert folder_digest(run_a) == digest_a

    # no run name: the run continues in its own folder
    continued = brightness_trainer(tmp_path, run_name="", num_epochs=2, save_freq=1, resume_from=str(run_b))
    assert os.path.realpath(continued.accelerator.project_dir) == os.path.realpath(run_b)
    continued.train()
    assert sorted(os.listdir(run_b / "checkpoints")) == ["checkpoint_0", "checkpoint_1"]

    # asked for explicitly: a new run that starts from B's checkpoint
    start = str(run_b / "checkpoints" / "checkpoint_0")
    forked = brightness_trainer(
        tmp_path, run_name="C", num_epochs=2, save_freq=1, resume_from=start, resume_as_new_run=True
    )
    digest_b = folder_digest(run_b)
    forked.train()
    assert sorted(os.listdir(tmp_path / "logs" / "C" / "checkpoints")) == ["checkpoint_1"]
    assert folder_digest(run_b) == digest_b and folder_digest(run_a) == digest_a


def test_every_checkpoint_has_a_manifest_of_its_files(tmp_path):
    trainer = train_run(tmp_path, "run", epochs=1)
    checkpoint = trainer.checkpoint_dir + "/checkpoint_0"
    manifest = json.load(open(os.path.join(checkpoint, "manifest.json")))
    on_disk = folder_digest(checkpoint)
    del on_disk["manifest.json"]
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == on_disk
    assert {"pytorch_lora_weights.safetensors", "model.safetensors", "random_states_0.pkl"} <= set(on_disk)
    assert manifest["structure"] == {
        "use_lora": True, "use_critic": True, "lora_rank": 4, "lora_alpha": 4.0,
        "lora_target_modules": ["to_k", "to_out.0", "to_q", "to_v"], "critic_encoder": "latents",
        "critic_input_dim": 256, "critic_hidden_sizes": [32, 8], "critic_activation": "none",
        "tasks": ["default"], "pretrain_loss_coef > 0": False,
    }  # fmt: skip


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: truncate(os.path.join(c, "model.safetensors")), r"model.safetensors has \d+ bytes, the manifest says \d+"),
        (lambda c: os.remove(os.path.join(c, "random_states_0.pkl")), "random_states_0.pkl is missing"),
        (lambda c: open(os.path.join(c, "optimizer.bin"), "r+b").write(b"\0"), "optimizer.bin does not match its SHA-256"),
    ],
    ids=["truncated", "missing", "corrupted"],
)  # fmt: skip
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(tmp_path, damage, message):
    trainer = train_run(tmp_path, "run", epochs=2)
    newest = os.path.join(trainer.checkpoint_dir, "checkpoint_1")
    damage(newest)
    expected = (
        rf"checkpoint_1' is damaged: {message}.*; resume from the newest intact one: resume_from='.*checkpoint_0'"
    )
    for resume_from in (tmp_path / "logs" / "run", newest):  # the run folder picks the newest: it is damaged
        with pytest.raises(CheckpointError, match=expected):
            brightness_trainer(tmp_path, run_name="run", resume_from=str(resume_from))
    intact = os.path.join(trainer.checkpoint_dir, "checkpoint_0")
    resumed = brightness_trainer(tmp_path, run_name="run", num_epochs=2, save_freq=1, resume_from=intact)
    assert resumed.first_epoch == 1
    resumed.train()  # replaces the damaged checkpoint_1 with an intact one
    assert list_checkpoints(trainer.checkpoint_dir)[-1] == newest
    again = brightness_trainer(tmp_path, run_name="run", resume_from=str(tmp_path / "logs" / "run"))
    assert again.first_epoch == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lora_rank=8), "lora_rank: checkpoint 4, now 8"),
        (dict(lora_alpha=8.0), "lora_alpha: checkpoint 4.0, now 8.0"),
        (dict(lora_target_modules=["to_q", "to_v"]), r"lora_target_modules: checkpoint \['to_k', 'to_out.0', 'to_q', 'to_v'\], now \['to_q', 'to_v'\]"),
        (dict(critic_hidden_sizes=[16, 8, 4], critic_dropout=[0.0] * 3), r"critic_hidden_sizes: checkpoint \[32, 8\], now \[16, 8, 4\]"),
        (dict(use_critic=False), "use_critic: checkpoint True, now False"),
        (dict(lora_rank=2, critic_hidden_sizes=[64, 8]), r"lora_rank: checkpoint 4, now 2; critic_hidden_sizes: checkpoint \[32, 8\], now \[64, 8\]"),
    ],
)  # fmt: skip
def test_a_checkpoint_of_another_shape_is_named_field_by_field(tmp_path, overrides, message):
    train_run(tmp_path, "run", epochs=1)
    config = tiny_config(tmp_path, run_name="run", resume_from=str(tmp_path / "logs" / "run"), **overrides)
    with pytest.raises(CheckpointError, match=r"differently shaped model; nothing was loaded\. .*" + message):
        TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())


# ---------------------------------------------------------------- mixed precision


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; these tests change it and restore it after."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def enable_fp16_loss_scaling(trainer, init_scale: float):
    """What accelerate builds for fp16 on a GPU, on CPU: a GradScaler used by `backward` and the optimizers."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator = trainer.accelerator
    accelerator.scaler, accelerator.native_amp = scaler, True
    for optimizer in accelerator._optimizers:
        optimizer.scaler = scaler
        optimizer.__setstate__(optimizer.__dict__)  # installs accelerate's patched step, as for a GPU scaler
    return scaler


@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_fp16_trains_with_loss_scaling(tmp_path, use_critic, fresh_accelerator_state):
    config = tiny_config(tmp_path, mixed_precision="fp16", use_critic=use_critic)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())
    scaler = enable_fp16_loss_scaling(trainer, init_scale=2.0**4)
    before = trained_tensors(trainer)
    trainer.train()  # before the fix: "unscale_() has already been called on this optimizer" at the first step
    assert trainer.sd_pipeline.unet.dtype == torch.float16
    assert scaler.get_scale() == 2.0**4  # no overflow: no step skipped, the scale held
    assert all(record["policy/skipped_steps"] == 0 for record in trainer.log_history)
    for name, tensor in trained_tensors(trainer).items():
        assert tensor.dtype == torch.float32, name  # trained weights stay fp32
        assert torch.isfinite(tensor).all() and not torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_loss_scaling_unscales_once_and_clips_each_model_with_its_own_norm(tmp_path, use_critic):
    """In fp32, scaling the loss by a power of two and unscaling the gradients once is exact: the weights must equal
    those of the unscaled run bit for bit. Unscaling twice (or clipping still-scaled gradients) would not."""

    def train(scale):
        config = tiny_config(tmp_path, run_name=f"scale_{scale}", use_critic=use_critic, train_max_grad_norm=0.05)
        trainer = TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())
        if scale:
            enable_fp16_loss_scaling(trainer, scale)
        trainer.train()
        return trainer

    scaled, plain = train(2.0**10), train(None)
    plain_tensors = trained_tensors(plain)
    for name, tensor in trained_tensors(scaled).items():
        assert torch.equal(tensor, plain_tensors[name]), name
    keys = [k for k in plain.log_history[-1] if k.endswith("/grad_norm")]
    assert len(keys) == (2 if use_critic else 1)
    assert [scaled.log_history[-1][k] for k in keys] == [plain.log_history[-1][k] for k in keys]  # unscaled norms


def test_fp16_overflow_skips_steps_lowers_the_scale_and_trains_on(tmp_path, fresh_accelerator_state):
    trainer = brightness_trainer(tmp_path, mixed_precision="fp16")
    scaler = enable_fp16_loss_scaling(trainer, init_scale=2.0**40)  # scaled fp16 gradients overflow at first
    before = trained_tensors(trainer)
    trainer.train()
    skipped = sum(record["policy/skipped_steps"] for record in trainer.log_history)
    assert 1 <= skipped < 32 and scaler.get_scale() < 2.0**40
    for name, tensor in trained_tensors(trainer).items():
        assert torch.isfinite(tensor).all() and not torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_bf16_trains(tmp_path, use_critic, fresh_accelerator_state):
    config = tiny_config(tmp_path, mixed_precision="bf16", use_critic=use_critic, num_epochs=1)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())
    before = trained_tensors(trainer)
    trainer.train()
    assert trainer.sd_pipeline.unet.dtype == torch.bfloat16 and trainer.sd_pipeline.vae.dtype == torch.bfloat16
    for name, tensor in trained_tensors(trainer).items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        assert not torch.equal(tensor, before[name]), name
    assert all(math.isfinite(v) for k, v in trainer.log_history[-1].items() if isinstance(v, float))


# ---------------------------------------------------------------- ids and paths


@pytest.mark.parametrize(
    "value, message",
    [
        ("latent", r"`critic_encoder` 'latent' is no local folder and looks like a typo; did you mean 'latents'\?"),
        ("a/b/c", r"`critic_encoder` 'a/b/c' is neither one of \['latents', 'digit_classifier'\], a local folder .* nor a valid Hugging Face Hub model id"),
        ("bad id!", "is neither one of"),
        ("", "`critic_encoder` must be a model id or a local folder, got ''"),
    ],
)  # fmt: skip
def test_critic_encoder_is_checked_by_the_config(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, critic_encoder=value)
    tiny_config(tmp_path, critic_encoder=value, use_critic=False)  # DDPO mode reads no critic encoder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network waits in tests


def test_an_unloadable_critic_encoder_names_the_field_and_what_was_tried(tmp_path, offline):
    config = tiny_config(tmp_path, critic_encoder="no-such-org/no-such-clip")
    hub_id = (
        r"`critic_encoder` 'no-such-org/no-such-clip' could not be loaded: there is no local folder .* the Hub id .* "
        "neither in the local cache nor downloadable"
    )
    with pytest.raises(ValueError, match=hub_id):
        TDPOTrainer(config, mean_brightness, cat_prompt, new_pipeline())
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = r"`critic_encoder` '.*empty' could not be loaded: the local folder .* holds no loadable model"
    with pytest.raises(ValueError, match=folder):
        brightness_trainer(tmp_path, critic_encoder=str(empty))


def test_an_unloadable_model_names_the_field_and_what_was_tried(tmp_path, offline):
    expected = r"`pretrained_model_name` 'does/not-exist' could not be loaded: there is no local folder 'does/not-e"
    with pytest.raises(ValueError, match=expected):
        TDPOStableDiffusionPipeline("does/not-exist")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"`pretrained_model_name` '.*model.safetensors' is a file"):
        TDPOStableDiffusionPipeline(str(weights))
    with pytest.raises(ValueError, match="nor a valid Hugging Face Hub model id"):
        TDPOStableDiffusionPipeline("./no/such/folder")


def test_a_bad_repo_id_is_refused_before_anything_is_written(tmp_path):
    trainer = brightness_trainer(tmp_path, num_epochs=1)
    with pytest.raises(ValueError, match=r"`repo_id` 'bad id!!' is not a valid Hub repo id like 'user/name'"):
        trainer.push_to_hub("bad id!!")  # nothing is saved under <project_dir>/hub/bad id!!/
    assert not os.path.exists(os.path.join(trainer.accelerator.project_dir, "hub"))


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--num_epochs", "0"], "tdpo-trl train: error: --num_epochs must be >= 1, got 0"),
        (["train", "--num_epochs", "abc"], "tdpo-trl train: error: argument --num_epochs/--num-epochs: invalid int value: 'abc'"),
        (["train", "--lora_init", "bogus"], "invalid choice: 'bogus'"),
        (["train", "--prompts", "/no/such/prompts.txt"], "tdpo-trl train: error: --prompts: prompts '/no/such/prompts.txt': not a built-in set ('simple_animals', 'digits', 'composition', 'composition_heldout'), not an existing file"),
        (["train", "--reward", "no_such_reward"], "tdpo-trl train: error: --reward: unknown reward 'no_such_reward'"),
        (["train", "--pretrained_model", "digit"], "--pretrained_model 'digit' is no local folder and looks like a typo; did you mean 'digits'?"),
        (["train", "--critic_encoder", "latent"], "--critic_encoder 'latent' is no local folder and looks like a typo"),
        (["demo", "--output_dir", "/proc/nope"], "tdpo-trl demo: error: --output_dir '/proc/nope' cannot be created or written to"),
        (["evaluate", "--base", "tiny", "--runs", "/no/run", "--target_reward", "digit_ink", "--eval_rewards", "digit_accuracy"], "tdpo-trl evaluate: error: --runs: '/no/run' (run 'run') does not exist"),
        (["evaluate", "--base", "tiny"], "the following arguments are required: --runs"),
    ],
)  # fmt: skip
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("TDPO_TRL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        entry_point(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0]


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("TDPO_TRL_DEBUG", raising=False)
    with pytest.raises(ValueError, match="`num_epochs` must be >= 1, got 0"):
        entry_point(["train", "--num_epochs", "0", "--debug"])
    monkeypatch.setenv("TDPO_TRL_DEBUG", "1")
    with pytest.raises(ValueError, match="`num_epochs` must be >= 1, got 0"):
        entry_point(["train", "--num_epochs", "0"])


def test_the_console_command_exits_2_with_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TDPO_TRL_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "tdpo_trl.commands.cli", "demo", "--output_dir", "/proc/nope"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [
        "tdpo-trl demo: error: --output_dir '/proc/nope' cannot be created or written to: No such file or directory "
        "(--debug shows the traceback)"
    ]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_full_denoiser_training_keeps_fp32_master_weights_under_mixed_precision(
    tmp_path, precision, fresh_accelerator_state
):
    """Trained whole in fp16 weights, Adam's eps (1e-8) underflows and the first step turns most of the UNet NaN;
    the denoiser keeps fp32 weights and computes under autocast, and the run checkpoints."""
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=False)
    config = tiny_config(tmp_path, mixed_precision=precision, use_lora=False, save_freq=1, num_epochs=1)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, pipeline)
    if precision == "fp16":
        enable_fp16_loss_scaling(trainer, init_scale=2.0**4)
    before = trained_tensors(trainer)
    trainer.train()
    assert pipeline.denoiser.dtype == torch.float32 and pipeline.vae.dtype != torch.float32
    for name, tensor in trained_tensors(trainer).items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert any(not torch.equal(tensor, before[name]) for name, tensor in trained_tensors(trainer).items())
    assert list_checkpoints(tmp_path / "logs" / "test" / "checkpoints")
