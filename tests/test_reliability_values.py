"""Bad values never pass quietly, and the command line does what its flags say (issue: reliability, second round):
non-finite or out-of-range config values, prompt templates, NaN attribute readings, guard judges, `--push_to_hub`,
`metrics.jsonl` after a resume, and epochs left out of checkpoints."""

import json
import logging
import math
import os
import sys

import pytest
import torch
from conftest import cat_prompt, tiny_config
from datasets import Dataset
from test_saving import FakeHub

from tdpo_trl import OverOptimizationGuard, StatisticalParity, TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.commands.cli import entry_point
from tdpo_trl.prompts import DatasetPromptSource, PromptSource
from tdpo_trl.rewards import get_reward_function
from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion
from tdpo_trl.trainer_callback import JSONLinesLoggerCallback


SMALL = ["--sample_batch_size", "4", "--sample_num_batches_per_epoch", "1", "--train_batch_size", "4"]


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        entry_point(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train_learning_rate", math.inf, "`train_learning_rate` must be a finite number, got inf"),
        ("kl_coef", math.nan, "`kl_coef` must be a finite number, got nan"),
        ("pretrain_loss_coef", math.inf, "`pretrain_loss_coef` must be a finite number, got inf"),
        ("train_max_grad_norm", math.nan, "`train_max_grad_norm` must be a finite number, got nan"),
        ("num_checkpoint_limit", -1, "`num_checkpoint_limit` must be None (keep every checkpoint) or >= 1, got -1"),
        ("num_checkpoint_limit", 0, "`num_checkpoint_limit` must be None (keep every checkpoint) or >= 1, got 0"),
    ],
)
def test_non_finite_and_out_of_range_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError) as error:
        TDPOConfig(mixed_precision="no", **{field: value})
    assert str(error.value) == message
    TDPOConfig(mixed_precision="no", num_checkpoint_limit=None)  # None keeps every checkpoint


def test_num_checkpoint_limit_minus_one_is_refused_on_the_command_line(capsys):
    assert "--num_checkpoint_limit must be None (keep every checkpoint) or >= 1, got -1" in cli_error(
        ["train", "--num_checkpoint_limit", "-1"], capsys
    )


@pytest.mark.parametrize(
    "template, found",
    [("{{}}", "it has no '{}' field(s)"), ("{} {x}", "it names ['x']"), ("{}{}", "it has 2 '{}' field(s)")],
)
def test_a_template_must_have_exactly_one_empty_field(template, found):
    expected = f"`template` must be a str with exactly one '{{}}' (e.g. 'a photo of a {{}}'; '{{}}' uses the prompts as they are), got {template!r}: {found}"  # noqa: E501
    with pytest.raises(ValueError) as error:
        PromptSource(["cat"], template=template)
    assert str(error.value) == expected
    with pytest.raises(ValueError, match="exactly one"):
        DatasetPromptSource("unused", "prompt", template=template, dataset=Dataset.from_dict({"prompt": ["a cat"]}))
    with pytest.raises(ValueError, match="is not a valid format string"):
        PromptSource(["cat"], template="a {")
    assert PromptSource(["cat"], template="{{braces}} {}")()[0] == "{braces} cat"


def test_a_bad_template_is_one_line_on_the_command_line(capsys):
    error = cli_error(["train", "--pretrained_model", "tiny", "--prompt_template", "{} {x}"], capsys)
    assert "error: --prompt_template must be a str with exactly one '{}'" in error and "it names ['x']" in error


def readings(rows: list[list[float]]):
    return lambda images: torch.tensor(rows)


def test_a_nan_attribute_reading_counts_as_no_sample():
    prompts = ["p"] * 4
    with_nan = StatisticalParity(readings([[1.0, 0.0], [0.0, 1.0], [math.nan, math.nan], [1.0, 0.0]]))
    rewards, info = with_nan(torch.zeros(4, 3, 2, 2), prompts)
    assert math.isnan(rewards[2]) and torch.isfinite(rewards[[0, 1, 3]]).all()
    without = StatisticalParity(readings([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    expected, expected_info = without(torch.zeros(3, 3, 2, 2), prompts[:3])
    torch.testing.assert_close(rewards[[0, 1, 3]], expected)  # the group is scored on the readable samples
    assert info["group_score"] == expected_info["group_score"]
    all_nan = StatisticalParity(readings([[math.nan, 0.5]] * 4))
    rewards, info = all_nan(torch.zeros(4, 3, 2, 2), prompts)
    assert torch.isnan(rewards).all() and math.isnan(info["group_score"])  # the trainer refuses an all-NaN epoch
    with pytest.raises(ValueError, match=r"`target` must be a 1-d distribution .* got \[nan, 1.0\]"):
        StatisticalParity(readings([[1.0, 0.0]]), target=[math.nan, 1.0])


def test_a_guard_judge_typo_in_lower_is_better_is_refused(capsys):
    with pytest.raises(ValueError, match=r"`lower_is_better` names \['digit_nearest_rel'\], which the guard does not"):
        OverOptimizationGuard({"digit_nearest_real": 0.01}, lower_is_better=("digit_nearest_rel",))
    guard = ["--guard", '{"digit_nearest_real": 0.01}', "--eval_freq", "1"]
    error = cli_error(["train", *guard, "--guard_lower_is_better", "digit_nearest_rel"], capsys)
    assert "--guard_lower_is_better names ['digit_nearest_rel'], which --guard does not watch" in error


def test_push_to_hub_on_the_command_line_needs_a_repo_and_pushes(tmp_path, capsys):
    base = ["train", "--pretrained_model", "tiny", "--use_lora", "true", "--num_epochs", "1", *SMALL]
    base += ["--logdir", str(tmp_path / "logs")]
    assert "--push_to_hub is true but no --hub_model_id names the repo" in cli_error(
        [*base, "--push_to_hub", "true"], capsys
    )
    assert "--hub_model_id is 'me/x' but --push_to_hub is false" in cli_error(
        [*base, "--hub_model_id", "me/x"], capsys
    )
    assert "is not a valid Hub repo id" in cli_error(
        [*base, "--push_to_hub", "true", "--hub_model_id", "bad id!!"], capsys
    )
    with FakeHub() as hub:
        entry_point([*base, "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--save_dir", str(tmp_path / "out")])
    assert "pytorch_lora_weights.safetensors" in hub.files and "README.md" in hub.files
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    capsys.readouterr()
    with FakeHub(fail=True), pytest.raises(SystemExit) as exit_info:  # trains, saves, then the push fails
        entry_point([*base, "--run_name", "again", "--push_to_hub", "true", "--hub_model_id", "me/tiny"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert exit_info.value.code == 2 and error.startswith("tdpo-trl train: error: ")
    assert "Network is unreachable" in error and "again/hub/tiny" in error  # where the saved files are
    assert (tmp_path / "logs" / "again" / "hub" / "tiny" / "pytorch_lora_weights.safetensors").exists()


def test_a_resumed_run_logs_each_epoch_once(tmp_path):
    def run(epochs, resume):
        config = tiny_config(
            tmp_path, num_epochs=epochs, save_freq=1, resume_from=str(tmp_path / "logs" / "test") if resume else ""
        )
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0))
        callback = JSONLinesLoggerCallback(str(tmp_path / "metrics.jsonl"))
        TDPOTrainer(config, mean_brightness, cat_prompt, pipeline, callbacks=[callback]).train()

    run(2, resume=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # epoch 2 logged, then killed before its checkpoint
        f.write(json.dumps({"epoch": 2, "reward/mean": 0.0}) + "\n")
    run(3, resume=True)
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")]
    assert epochs == [0, 1, 2]


def test_epochs_left_out_of_checkpoints_are_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    config = tiny_config(tmp_path, num_epochs=3, save_freq=2)
    TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion())).train()
    assert "num_epochs 3 is not a multiple of save_freq 2: the last 1 epoch(s) are not checkpointed" in caplog.text


def test_resume_on_the_digits_model_is_bit_exact(tmp_path, monkeypatch):
    """The digit judges are built on their first call and draw their initial weights from the global RNG: a resumed
    run builds them before the RNG state is restored, as an uninterrupted run had before its checkpoint."""
    from tdpo_trl.digits import judges, load_digits_pipeline
    from tdpo_trl.rewards import get_reward_function

    def run(name, epochs, resume=False):
        monkeypatch.setattr(judges, "_SHARED", {})  # a new process: the judges are not loaded yet
        config = tiny_config(
            tmp_path, run_name=name, num_epochs=epochs, save_freq=1, sample_num_steps=3,
            resume_from=str(tmp_path / "logs" / name) if resume else "",
            eval_reward_functions=["digit_accuracy"],
        )  # fmt: skip
        pipeline = TDPOStableDiffusionPipeline(load_digits_pipeline())
        prompts = lambda: ("a handwritten digit three", {})  # noqa: E731
        trainer = TDPOTrainer(config, get_reward_function("digit_ink"), prompts, pipeline)
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer._named_weights()}

    straight = run("straight", 3)
    run("resumed", 2)
    resumed = run("resumed", 3, resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), [
        k for k in straight if not torch.equal(straight[k], resumed[k])
    ][:3]


GUARD = ["--eval_freq", "1", "--eval_reward_functions", "jpeg_compressibility", "--eval_num_prompts", "2"]
GUARD += ["--guard", '{"jpeg_compressibility": 1000}', "--save_freq", "1"]


def guarded_run(tmp_path, name, epochs, resume=False):
    from tdpo_trl.commands import train

    argv = ["--pretrained_model", "tiny", "--use_lora", "true", *SMALL, *GUARD, "--logdir", str(tmp_path / "logs")]
    argv += ["--num_epochs", str(epochs)]
    argv += ["--resume_from", str(tmp_path / "logs" / name)] if resume else ["--run_name", name]
    return train.cli(argv)


def test_a_guarded_run_resumes_bit_exactly_from_the_command_line(tmp_path):
    straight = guarded_run(tmp_path, "straight", 3)
    guarded_run(tmp_path, "resumed", 2)
    resumed = guarded_run(tmp_path, "resumed", 3, resume=True)
    assert resumed.first_epoch == 2 and resumed._guard().start == straight._guard().start
    a, b = dict(straight._named_weights()), dict(resumed._named_weights())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed._guard().kept_epoch == straight._guard().kept_epoch


def test_a_guarded_run_resumes_from_python_with_the_guard_in_the_constructor(tmp_path):
    from tdpo_trl.commands import train

    guarded_run(tmp_path, "cli", 2)  # the guard was added after construction, after the JSONL logger
    argv = ["--pretrained_model", "tiny", "--use_lora", "true", *SMALL, *GUARD, "--logdir", str(tmp_path / "logs")]
    script_args, config = train.parse_args(
        [*argv, "--num_epochs", "3", "--resume_from", str(tmp_path / "logs" / "cli")]
    )
    guard = script_args.over_optimization_guard()
    prompts = train.get_prompt_function(script_args.prompts, template=script_args.prompt_template, seed=config.seed)
    pipeline = train.load_pipeline(script_args, config)
    trainer = TDPOTrainer(config, get_reward_function(script_args.reward), prompts, pipeline, callbacks=[guard])
    assert trainer.first_epoch == 2 and guard.start is not None  # its state came back by name, not by position
    trainer.train()
    assert len(trainer.log_history) == 3


def resume_args(tmp_path, name, epochs, *extra):
    from tdpo_trl.commands import train

    argv = ["--pretrained_model", "tiny", "--use_lora", "true", *SMALL, *extra, "--logdir", str(tmp_path / "logs")]
    return train.parse_args([*argv, "--num_epochs", str(epochs), "--resume_from", str(tmp_path / "logs" / name)])


def test_resuming_with_other_stateful_callbacks_is_refused_naming_them(tmp_path):
    from tdpo_trl.checkpointing import CheckpointError
    from tdpo_trl.commands import train

    guarded_run(tmp_path, "guarded", 1)  # the neuron reset and the guard hold state
    script_args, config = resume_args(tmp_path, "guarded", 2, *GUARD)
    config.neuron_reset = False  # no reset callback this time: its state waits for one that never comes
    trainer = train.build_trainer(script_args, config)
    with pytest.raises(CheckpointError, match=r"holds state for \['callback/ActiveNeuronResetCallback'\], which"):
        trainer.train()

    argv = ["--pretrained_model", "tiny", "--use_lora", "true", *SMALL, "--save_freq", "1", "--num_epochs", "1"]
    train.cli([*argv, "--logdir", str(tmp_path / "logs"), "--run_name", "plain"])  # no guard
    script_args, config = resume_args(tmp_path, "plain", 2, *GUARD)
    pipeline, guard = train.load_pipeline(script_args, config), script_args.over_optimization_guard()
    with pytest.raises(CheckpointError, match=r"holds no state for \['callback/OverOptimizationGuard'\]"):
        TDPOTrainer(config, mean_brightness, cat_prompt, pipeline, callbacks=[guard])


def test_save_pretrained_replaces_a_previous_save_whole_and_never_mixes(tmp_path, monkeypatch):
    from tdpo_trl import saving

    def trainer_of(**overrides):
        config = tiny_config(tmp_path, run_name=str(len(overrides)), num_epochs=1, **overrides)
        return TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))

    out = tmp_path / "out"
    trainer_of(use_lora=False).save_pretrained(out)  # a full UNet and a critic head
    assert (out / "unet").is_dir() and (out / "critic_head.safetensors").exists()
    trainer_of(use_lora=True, use_critic=False, train_learning_rate=1e-3).save_pretrained(out)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "unet").exists() and not (out / "critic_head.safetensors").exists(), "no stale part remains"
    assert json.loads((out / "tdpo_config.json").read_text())["use_critic"] is False
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_training_config", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer_of(use_lora=True).save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "a failed save changes nothing"
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files that are not a tdpo-trl save \(\['notes.txt'\]\)"):
        trainer_of(use_lora=True).save_pretrained(other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_streamed_prompt_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# animals\na cat\n\n   \na dog\n# the end\n")
    source = DatasetPromptSource("text", "text", streaming=True, data_files=str(path), seed=0)
    prompts = {source()[0] for _ in range(12)}  # three passes over the file
    assert prompts == {"a cat", "a dog"}
    path.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="yields no prompts"):
        DatasetPromptSource("text", "text", streaming=True, data_files=str(path), seed=0)()


def test_tasks_file_mistakes_are_one_error_naming_the_entry(tmp_path):
    from tdpo_trl.tasks import load_tasks

    def tasks_file(text):
        path = tmp_path / "tasks.yaml"
        path.write_text(text)
        return str(path)

    entry = "- name: bright\n  reward: brightness\n  prompts: simple_animals\n"
    assert load_tasks(tasks_file(entry))[0].reward_function is mean_brightness  # the tiny rewards have names
    with pytest.raises(ValueError, match=r"entry 0 \('bright'\): `reward_kwargs` must be a mapping, got list"):
        load_tasks(tasks_file(entry + "  reward_kwargs: [1, 2]\n"))
    with pytest.raises(ValueError, match=r"entry 0 \('bright'\): `template` must be a str .* got 5"):
        load_tasks(tasks_file(entry + "  template: 5\n"))
    with pytest.raises(ValueError, match=r"tasks file .* is not valid YAML \(while parsing"):
        load_tasks(tasks_file(entry + "  weight: [1\n"))
    with pytest.raises(ValueError, match=r"entry 0 \('bright'\): unknown reward 'brightnes'"):
        load_tasks(tasks_file(entry.replace("brightness", "brightnes")))


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    def trainer_of(epochs, resume_from="", **overrides):
        config = tiny_config(tmp_path, run_name="", num_epochs=epochs, save_freq=1, num_checkpoint_limit=None,
                             resume_from=resume_from, **overrides)  # fmt: skip
        return TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))

    run = tmp_path / "logs" / "run"
    config = tiny_config(tmp_path, run_name="run", num_epochs=3, save_freq=1, num_checkpoint_limit=None)
    TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion())).train()
    assert sorted(os.listdir(run / "checkpoints")) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    branch = trainer_of(3, str(run / "checkpoints" / "checkpoint_0"), train_learning_rate=1e-2)  # another setting
    assert sorted(os.listdir(run / "checkpoints")) == ["checkpoint_0"]  # the abandoned branch is set aside, kept
    assert sorted(name.rsplit("_", 2)[0] for name in os.listdir(run / "abandoned")) == ["checkpoint_1", "checkpoint_2"]
    assert branch.first_epoch == 1
    later = trainer_of(3, str(run))  # resuming the run continues the live branch, not the abandoned one
    assert later.first_epoch == 1


def test_a_run_folder_is_owned_by_one_live_process(tmp_path, monkeypatch):
    import subprocess
    import sys

    from tdpo_trl.run_folder import RunFolderInUse

    def trainer_of(run_name, **overrides):
        config = tiny_config(tmp_path, run_name=run_name, **overrides)
        return TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))

    folder = tmp_path / "logs" / "held"
    folder.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".lock").write_text(f"{other.pid} {__import__('socket').gethostname()}")
        with pytest.raises(RunFolderInUse, match=rf"'.*held' is in use by process '{other.pid} "):
            trainer_of("held")
    finally:
        other.kill()
        other.wait()
    trainer = trainer_of("held")  # the holder is gone: its lock is taken over
    assert (folder / ".lock").read_text().split()[0] == str(os.getpid())
    trainer.train()
    assert not (folder / ".lock").exists(), "released when training ends"

    import types

    from tdpo_trl import run_folder

    frozen = types.SimpleNamespace(strftime=lambda fmt: "2026-12-05_10-00-00")  # two runs started in the same second
    monkeypatch.setattr(run_folder, "time", frozen)
    first, second = trainer_of("", exp_name="same"), trainer_of("", exp_name="same")
    assert os.path.basename(first.accelerator.project_dir) == "same_2026-12-05_10-00-00"
    assert os.path.basename(second.accelerator.project_dir) == "same_2026-12-05_10-00-00_2"
    assert second.checkpoint_dir == os.path.join(second.accelerator.project_dir, "checkpoints")


def test_a_second_command_line_run_into_a_held_folder_exits_2(tmp_path):
    import subprocess
    import sys
    import time

    argv = ["-m", "tdpo_trl.commands.cli", "train", "--pretrained_model", "tiny", "--num_epochs", "200", *SMALL,
            "--save_freq", "1000", "--logdir", str(tmp_path / "logs"), "--run_name", "shared"]  # fmt: skip
    first = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "logs" / "shared" / ".lock"
        for _ in range(600):
            if lock.exists():
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"is in use by process '{first.pid} " in second.stderr.strip().splitlines()[-1]


def test_resuming_with_the_pretraining_loss_or_the_tasks_changed_names_the_difference(tmp_path):
    """Issue case 16: these ended in accelerate's "registered objects" or a critic size-mismatch traceback."""
    from test_regularizers import smooth_images
    from test_tasks import two_tasks

    from tdpo_trl.checkpointing import CheckpointError

    folder = str(tmp_path / "pretrain-data")
    Dataset.from_dict({"image": smooth_images(8), "text": ["a photo of a cat"] * 8}).save_to_disk(folder)
    pretraining = dict(pretrain_loss_coef=1.0, pretrain_dataset=folder, pretrain_batch_size=4)

    def trainer(name, tasks=None, resume=False, **overrides):
        config = tiny_config(tmp_path, run_name=name, num_epochs=1 + resume, save_freq=1, **overrides)
        config.resume_from = str(tmp_path / "logs" / name) if resume else None
        functions = (None, None) if tasks else (mean_brightness, cat_prompt)
        return TDPOTrainer(config, *functions, TDPOStableDiffusionPipeline(tiny_stable_diffusion()), tasks=tasks)

    cases = [
        ("pretraining_off", dict(first=pretraining), "pretrain_loss_coef > 0: checkpoint True, now False"),
        ("pretraining_on", dict(second=pretraining), "pretrain_loss_coef > 0: checkpoint False, now True"),
        ("single_to_multi", dict(second_tasks=True), r"tasks: checkpoint \['default'\], now \['bright', 'left'\]"),
        ("multi_to_single", dict(first_tasks=True), r"tasks: checkpoint \['bright', 'left'\], now \['default'\]"),
    ]
    for name, change, message in cases:
        trainer(name, two_tasks() if change.get("first_tasks") else None, **change.get("first", {})).train()
        with pytest.raises(CheckpointError, match=r"differently shaped model; nothing was loaded\. .*" + message):
            trainer(name, two_tasks() if change.get("second_tasks") else None, True, **change.get("second", {}))
    resumed = trainer("pretraining_on", resume=True)  # the settings it was written with still resume it
    assert resumed.first_epoch == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs (a tiny checkpoint is ~390 KiB): a real full disk. Needs the right to mount (root)."""
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_named_and_keeps_what_was_written(small_disk):
    """Issue case 15: a checkpoint ended in `basic_ios::clear: iostream error`, a save in a `SafetensorError`."""
    from test_reliability import folder_digest

    from tdpo_trl.checkpointing import checkpoint_problem, list_checkpoints
    from tdpo_trl.disk_space import DiskFullError

    def trainer(epochs, resume=False):
        config = tiny_config(small_disk, run_name="run", num_epochs=epochs, save_freq=1)
        config.resume_from = str(small_disk / "logs" / "run") if resume else None
        return TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))

    first = trainer(1)
    first.train()  # checkpoint_0 fits
    first.save_pretrained(small_disk / "saved")
    saved = folder_digest(small_disk / "saved")
    with pytest.raises(DiskFullError, match=r"no space left on the device of .* while writing checkpoint_1 .*the "
                       r"newest checkpoint, '.*checkpoint_0', is intact; the partial one is removed"):  # fmt: skip
        trainer(3, resume=True).train()
    checkpoints = small_disk / "logs" / "run" / "checkpoints"
    assert (
        sorted(os.listdir(checkpoints)) == ["checkpoint_0"]
        and checkpoint_problem(str(checkpoints / "checkpoint_0")) is None
    )

    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave less than a save needs
        f.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 16 * 1024))
    with pytest.raises(DiskFullError, match=r"while writing a save to '.*saved' .*'.*saved' is as it was"):
        first.save_pretrained(small_disk / "saved")
    assert folder_digest(small_disk / "saved") == saved, "the previous save is untouched"
    assert sorted(os.listdir(small_disk)) == ["filler", "logs", "saved"], "no partial save left behind"

    filler.unlink()  # space freed: the run resumes from the checkpoint kept
    resumed = trainer(2, resume=True)
    assert resumed.first_epoch == 1
    assert [os.path.basename(c) for c in list_checkpoints(str(checkpoints))] == ["checkpoint_0"]


def test_a_full_disk_is_told_as_such_whatever_the_writer_raises(tmp_path, monkeypatch):
    """Without a small disk to mount: torch's own words for ENOSPC, with the disk reported full."""
    from tdpo_trl import disk_space
    from tdpo_trl.disk_space import DiskFullError

    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1, save_freq=1), mean_brightness, cat_prompt,
                          TDPOStableDiffusionPipeline(tiny_stable_diffusion()))  # fmt: skip

    def no_space(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", no_space)
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: 1024)
    with pytest.raises(DiskFullError, match=r"\(0\.0 MiB free\) while writing checkpoint_0 \(RuntimeError: basic_ios"):
        trainer.train()
    assert os.listdir(trainer.checkpoint_dir) == []
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: 10 * 2**30)  # plenty of space: not a full disk
    with pytest.raises(RuntimeError, match="basic_ios::clear") as error:
        trainer.save_checkpoint()
    assert not isinstance(error.value, DiskFullError)


def test_a_reward_model_missing_offline_fails_before_training(tmp_path, capsys, monkeypatch, tiny_clip_path):
    """Issue case 19: `--reward diversity` offline failed after the first epoch's sampling with an OSError."""
    import huggingface_hub

    from tdpo_trl.rewards import AestheticScore, CLIPScore, Diversity, WeightedSum

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    line = cli_error(["train", "--pretrained_model", "tiny", "--reward", "diversity", *SMALL,
                      "--logdir", str(tmp_path / "logs")], capsys)  # fmt: skip
    assert "reward 'diversity' (its default encoder) needs 'config.json' of the Hub repo " in line
    assert "'openai/clip-vit-large-patch14', which is not in the local Hub cache and cannot be reached" in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.jsonl")), "nothing was sampled"

    def trainer(reward, **config):
        return TDPOTrainer(tiny_config(tmp_path, **config), reward, cat_prompt,
                           TDPOStableDiffusionPipeline(tiny_stable_diffusion()))  # fmt: skip

    head = AestheticScore(clip_model=tiny_clip_path, head_repo="no-such-org/no-head")
    with pytest.raises(ValueError, match=r"reward 'aesthetic' needs 'aesthetic-model.pth' of the Hub repo "
                       "'no-such-org/no-head', which is not in the local Hub cache"):  # fmt: skip
        trainer(WeightedSum({"brightness": (mean_brightness, 1.0), "aesthetic": (head, 0.1)}))
    with pytest.raises(ValueError, match=r"reward 'clip_score' needs 'config.json' of the Hub repo 'openai/clip-"):
        trainer(mean_brightness, eval_reward_functions=["clip_score"])  # an eval reward is checked as well
    trainer(CLIPScore(model=tiny_clip_path))  # a local folder is available
    trainer(Diversity(encoder=lambda images: images.flatten(1)))  # so is an encoder given in Python

    class PixelDiversity(Diversity):  # and a subclass with its own features never loads the default encoder
        def features(self, images, prompts=None, metadata=None):
            return images.flatten(1)

    trainer(PixelDiversity())


def test_inputs_that_ended_in_a_traceback_are_one_line(tmp_path, capsys):
    """Issue case 19: a 20 MB one-line prompt file, a stream without the column, bad accelerator_kwargs, a fake
    checkpoint folder."""
    big = tmp_path / "one-line.txt"
    big.write_text("a " * 10_000_000)  # 20 MB, no newline: tokenizing it took minutes
    line = cli_error(["train", "--pretrained_model", "tiny", "--prompts", str(big)], capsys)
    assert "line 1 of the prompt file" in line and "is 19,999,999 characters long" in line
    assert "a prompt may have at most 10,000" in line
    from tdpo_trl.validation import CheckedPromptFunction

    def long_prompt():
        return "x" * 20_001, {}

    with pytest.raises(ValueError, match=r"a prompt of prompt function 'long_prompt' is 20,001 characters long"):
        CheckedPromptFunction(long_prompt)()  # a prompt function's prompt is checked as well

    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"text": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(ValueError, match=r"the dataset 'json' has no column 'prompt'; its columns are \['text'\]"):
        DatasetPromptSource("json", data_files=str(rows), streaming=True)  # a stream of unknown features
    assert DatasetPromptSource("json", "text", data_files=str(rows), streaming=True)()[0] in ("a cat", "a dog")

    with pytest.raises(
        ValueError, match=r"`accelerator_kwargs` has 'bad', which accelerate.Accelerator does not take"
    ):
        TDPOConfig(mixed_precision="no", accelerator_kwargs={"bad": 1})
    with pytest.raises(ValueError, match=r"`accelerator_kwargs` sets 'mixed_precision'; set `mixed_precision` inst"):
        TDPOConfig(mixed_precision="no", accelerator_kwargs='{"mixed_precision": "fp16"}')
    assert "--accelerator_kwargs has 'bad'" in cli_error(["train", "--accelerator_kwargs", '{"bad": 1}'], capsys)

    (tmp_path / "fake" / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    line = cli_error(["train", "--pretrained_model", "tiny", "--resume_from", str(tmp_path / "fake"),
                      "--logdir", str(tmp_path / "logs")], capsys)  # fmt: skip
    assert "checkpoint_0' is damaged: it holds neither a manifest.json nor accelerate's files (found [])" in line


def test_an_undecodable_pretraining_image_is_skipped_with_a_warning(tmp_path, caplog):
    from PIL import Image

    from tdpo_trl.regularizers import PretrainingData, load_pretraining_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
        with open(folder / "metadata.jsonl", "a") as f:
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"red {i}"}) + "\n")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    data = PretrainingData(load_pretraining_dataset(f"imagefolder:{folder}"), batch_size=2, resolution=16)
    with caplog.at_level(logging.WARNING, logger="tdpo_trl.regularizers"):
        captions = [caption for _ in range(3) for caption in data.next_batch()[1]]
    assert sorted(set(captions)) == ["red 0", "red 1", "red 3"] and len(captions) == 6
    assert "pretraining dataset row 2: its image cannot be decoded" in caplog.text
    for i in (0, 1, 3):
        (folder / f"{i}.png").write_bytes(b"broken")
    broken = PretrainingData(load_pretraining_dataset(f"imagefolder:{folder}"), batch_size=2, resolution=16)
    with pytest.raises(ValueError, match="no image of the pretraining dataset can be decoded"):
        broken.next_batch()


def test_evaluate_refuses_what_it_cannot_load_or_what_does_not_fit_the_base_model(tmp_path):
    """Issue case 19: a corrupt, truncated or empty `unet/` ended in tracebacks; a LoRA of another base model was
    silently evaluated as the base model."""
    from tdpo_trl.checkpointing import CheckpointError
    from tdpo_trl.digits.model import load_digits_pipeline
    from tdpo_trl.evaluation import evaluate_checkpoints

    saved = {}
    for use_lora in (True, False):
        config = tiny_config(tmp_path, run_name=f"lora_{use_lora}", num_epochs=1, use_lora=use_lora)
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=use_lora)
        trainer = TDPOTrainer(config, mean_brightness, cat_prompt, pipeline)
        trainer.train()
        saved[use_lora] = tmp_path / f"saved_{use_lora}"
        trainer.save_pretrained(saved[use_lora])

    def evaluate(pipeline, folder):
        runs = {"run": str(folder)}
        return evaluate_checkpoints(pipeline, runs, mean_brightness, {}, ["a cat"], num_inference_steps=2,
                                    include_base=False)  # fmt: skip

    tiny, digits = tiny_stable_diffusion(), load_digits_pipeline()
    assert len(evaluate(tiny, saved[True])["run"]) == 1 and len(evaluate(tiny, saved[False])["run"]) == 1
    with pytest.raises(CheckpointError, match=r"its LoRA does not fit this base model \('unet.down_blocks.1.*names "
                       r"no module of the base unet.*trained on another base model\?"):  # fmt: skip
        evaluate(digits, saved[True])
    with pytest.raises(CheckpointError, match=r"its unet is another architecture than the base model's \(down_block"):
        evaluate(digits, saved[False])

    weights = next((saved[False] / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot be evaluated: its unet/ weights cannot be loaded \(OSError"):
        evaluate(tiny, saved[False])
    weights.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match=r"cannot be evaluated: its unet/ weights cannot be loaded"):
        evaluate(tiny, saved[False])
    for file in (saved[False] / "unet").iterdir():
        file.unlink()
    with pytest.raises(CheckpointError, match=r"its unet/ folder holds no loadable config.json"):
        evaluate(tiny, saved[False])
    lora = saved[True] / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"its pytorch_lora_weights.safetensors cannot be read \(SafetensorErr"):
        evaluate(tiny, saved[True])


def test_an_auto_named_run_is_named_after_the_whole_script():
    """TRL's default cut 3 characters off the name, for ".py": `tdpo-trl train` runs were named "tdpo-_<time>"."""
    from tdpo_trl.tdpo_config import script_name

    assert script_name("/usr/local/bin/tdpo-trl") == "tdpo-trl" and script_name("examples/tdpo.py") == "tdpo"
    assert script_name("") == "tdpo"
    assert TDPOConfig().exp_name == script_name(sys.argv[0])
