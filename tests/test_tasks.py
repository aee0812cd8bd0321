"""Multi-task joint training: per-task metrics, both tasks train the LoRA, bad tasks refused, resume bit-exact."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.prompts import PromptSource
from tdpo_trl.tasks import Task, check_tasks, load_tasks
from tdpo_trl.tiny_models import left_minus_right_brightness, mean_brightness, tiny_stable_diffusion
from tdpo_trl.trainer_callback import TDPOCallback


def two_tasks(weights=(1.0, 1.0)):
    return [
        Task("bright", mean_brightness, PromptSource(["a cat", "a dog"], seed=1), weight=weights[0]),
        Task("left", left_minus_right_brightness, PromptSource(["a cow", "a pig"], seed=2), weight=weights[1]),
    ]


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


class RecordTrainingTask(TDPOCallback):
    """After every optimizer step: which task was being trained, and the LoRA weights."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, **kwargs):
        self.steps.append((trainer.training_task, lora_weights(trainer)))


def test_a_task_with_pretrain_loss_weight_zero_skips_the_pretraining_batches(tmp_path, tiny_pipeline):
    from datasets import Dataset

    folder = str(tmp_path / "pretrain-data")
    images = list(
        (torch.rand(16, 16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    )
    Dataset.from_dict({"image": images, "text": ["a photo of a cat"] * 16}).save_to_disk(folder)
    config = tiny_config(
        tmp_path, num_epochs=1, pretrain_loss_coef=1.0, pretrain_dataset=folder, pretrain_batch_size=2
    )
    tasks = two_tasks()
    tasks[1].pretrain_loss_weight = 0.0

    class RecordPretrainingDraws(TDPOCallback):
        draws = []

        def on_step_end(self, trainer, **kwargs):
            self.draws.append((trainer.training_task, trainer.pretraining.epoch * 16 + trainer.pretraining.position))

    recorder = RecordPretrainingDraws()
    TDPOTrainer(config, None, None, tiny_pipeline, tasks=tasks, callbacks=[recorder]).train()
    draws = recorder.draws
    steps = {name: [b - a for (_, a), (task, b) in zip([(None, 0)] + draws, draws) if task == name]
             for name in ("bright", "left")}  # fmt: skip
    assert steps["bright"] and all(n > 0 for n in steps["bright"]), steps
    assert steps["left"] and all(n == 0 for n in steps["left"]), f"weight 0 drew pretraining batches: {steps}"


@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_two_tasks_log_both_and_both_change_the_lora(tmp_path, tiny_pipeline, use_critic):
    config = tiny_config(tmp_path, num_epochs=1, use_critic=use_critic, eval_freq=1, eval_num_prompts=2)
    recorder = RecordTrainingTask()
    trainer = TDPOTrainer(config, None, None, tiny_pipeline, tasks=two_tasks(), callbacks=[recorder])
    before = lora_weights(trainer)
    trainer.train()

    record = trainer.log_history[-1]
    for name in ("bright", "left"):
        for key in ("reward/mean", "advantage/std", "heldout/target/mean"):
            assert f"task/{name}/{key}" in record, f"task/{name}/{key} missing"
    assert "reward/mean" not in record, "with several tasks the rewards are logged per task only"
    # sequential updates: all of task "bright"'s steps, then all of "left"'s; each moves the LoRA
    tasks = [task for task, _ in recorder.steps]
    half = len(tasks) // 2
    assert tasks == ["bright"] * half + ["left"] * half
    changed = lambda a, b: any(not torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert changed(before, recorder.steps[half - 1][1]), "task 'bright' did not change the LoRA"
    assert changed(recorder.steps[half - 1][1], recorder.steps[-1][1]), "task 'left' did not change the LoRA"
    if use_critic:
        assert trainer.critic.head.num_outputs == 2  # one critic, one value output per task
    assert trainer.reward_names() == ["bright: mean_brightness", "left: left_minus_right_brightness"]


@pytest.mark.parametrize("mode", ["sequential", "weighted"])
def test_sequential_samples_each_task_just_before_its_update(tmp_path, tiny_pipeline, mode):
    trainer = TDPOTrainer(
        tiny_config(tmp_path, num_epochs=1, multi_task_update=mode), None, None, tiny_pipeline, tasks=two_tasks()
    )
    events = []
    collect, update = trainer._collect, trainer._update
    trainer._collect = lambda index, *a: events.append(f"sample {index}") or collect(index, *a)
    trainer._update = lambda samples, *a: events.append(f"update {len(samples['advantages'])}") or update(samples, *a)
    trainer.train()
    n = trainer.config.sample_batch_size * trainer.config.sample_num_batches_per_epoch
    if mode == "sequential":  # on-policy: task 1 is sampled by the model task 0's update left
        assert events == ["sample 0", f"update {n}", "sample 1", f"update {n}"]
    else:
        assert events == ["sample 0", "sample 1", f"update {2 * n}"]


def test_weighted_update_trains_all_tasks_at_once(tmp_path, tiny_pipeline):
    config = tiny_config(tmp_path, num_epochs=1, multi_task_update="weighted")
    recorder = RecordTrainingTask()
    trainer = TDPOTrainer(config, None, None, tiny_pipeline, tasks=two_tasks((1.0, 0.5)), callbacks=[recorder])
    trainer.train()
    assert {task for task, _ in recorder.steps} == {None}  # every minibatch mixes the tasks
    assert "task/left/advantage/mean" in trainer.log_history[-1]


def test_bad_tasks_are_refused_with_the_value(tmp_path, tiny_pipeline):
    with pytest.raises(ValueError, match="task 'a' has no prompts"):
        Task("a", mean_brightness, None)
    with pytest.raises(ValueError, match="`weight` must be a finite number > 0, got 0"):
        Task("a", mean_brightness, lambda: ("x", {}), weight=0)
    with pytest.raises(ValueError, match="got -1.5"):
        Task("a", mean_brightness, lambda: ("x", {}), weight=-1.5)
    with pytest.raises(ValueError, match=r"pretrain_loss_weight.*-1"):
        Task("a", mean_brightness, lambda: ("x", {}), pretrain_loss_weight=-1)
    with pytest.raises(ValueError, match="non-empty string without '/', got 'a/b'"):
        Task("a/b", mean_brightness, lambda: ("x", {}))
    with pytest.raises(ValueError, match=r"\['x'\] appear more than once"):
        check_tasks([Task("x", mean_brightness, lambda: ("p", {})), Task("x", mean_brightness, lambda: ("q", {}))])
    with pytest.raises(ValueError, match="`tasks` is empty"):
        check_tasks([])
    with pytest.raises(ValueError, match="either `tasks` or"):
        TDPOTrainer(tiny_config(tmp_path), mean_brightness, None, tiny_pipeline, tasks=two_tasks())
    with pytest.raises(ValueError, match="`multi_task_update` must be one of .* got 'mixed'"):
        tiny_config(tmp_path, multi_task_update="mixed")


def test_load_tasks_from_json_and_yaml(tmp_path):
    entries = [
        {"name": "ink", "reward": "digit_ink", "prompts": "digits", "weight": 2.0},
        {"name": "parity", "reward": "digit_parity", "prompts": "digits", "eval_prompts": ["a handwritten digit"]},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": entries}))
    tasks = load_tasks(str(tmp_path / "tasks.json"))
    assert [t.name for t in tasks] == ["ink", "parity"] and tasks[0].weight == 2.0
    assert tasks[1].eval_prompts == ["a handwritten digit"]
    yaml = "- {name: ink, reward: digit_ink, prompts: digits}\n" * 2  # the same name twice
    (tmp_path / "tasks.yaml").write_text(yaml)
    with pytest.raises(ValueError, match=r"\['ink'\] appear more than once"):
        load_tasks(str(tmp_path / "tasks.yaml"))
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "reward": "digit_ink"}]))
    with pytest.raises(ValueError, match="entry 0 \\('x'\\) has no 'prompts'"):
        load_tasks(str(tmp_path / "bad.json"))
    (tmp_path / "typo.json").write_text(json.dumps([{"name": "x", "reward": "digit_ink", "prompt": "digits"}]))
    with pytest.raises(ValueError, match=r"unknown keys \['prompt'\]"):
        load_tasks(str(tmp_path / "typo.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tasks(str(tmp_path / "nope.json"))


def test_tasks_file_reads_prompt_files_beside_it(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "unnamed.txt").write_text("a handwritten digit\n")
    entry = {"name": "parity", "reward": "digit_parity", "prompts": "unnamed.txt", "eval_prompts": "unnamed.txt"}
    (tmp_path / "configs" / "tasks.json").write_text(json.dumps([entry]))
    monkeypatch.chdir(tmp_path)  # the prompts file is not in the working directory
    (task,) = load_tasks("configs/tasks.json")
    assert task.prompt_function()[0] == "a handwritten digit"
    assert task.eval_prompts == str(tmp_path / "configs" / "unnamed.txt")


def train_two_tasks(tmp_path, run_name, epochs, resume=False):
    config = tiny_config(
        tmp_path,
        run_name=run_name,
        num_epochs=epochs,
        save_freq=1,
        per_prompt_stat_tracking=True,  # per-task trackers, and per-task prompt streams, travel with checkpoints
        per_prompt_stat_tracking_buffer_size=16,
        per_prompt_stat_tracking_min_count=2,
        neuron_reset_frequency=1,
        resume_from=str(tmp_path / "logs" / run_name) if resume else "",
    )
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
    trainer = TDPOTrainer(config, None, None, pipeline, tasks=two_tasks((1.0, 0.5)))
    trainer.train()
    return trainer


def test_resume_in_the_middle_of_a_multi_task_run_is_bit_exact(tmp_path):
    straight = train_two_tasks(tmp_path, "straight", 3)
    train_two_tasks(tmp_path, "interrupted", 1)
    resumed = train_two_tasks(tmp_path, "interrupted", 3, resume=True)
    assert resumed.first_epoch == 1
    a, b = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(straight.critic.head[0].weight, resumed.critic.head[0].weight)
    for name in ("bright", "left"):
        key = f"task/{name}/reward/mean"
        assert [r[key] for r in straight.log_history] == [r[key] for r in resumed.log_history]


def test_train_command_reads_a_tasks_file(tmp_path):
    from tdpo_trl.commands import train

    tasks = [
        {"name": "bright", "reward": "tdpo_trl.tiny_models:mean_brightness", "prompts": "simple_animals"},
        {"name": "left", "reward": "tdpo_trl.tiny_models:left_minus_right_brightness", "prompts": "simple_animals"},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    trainer = train.cli(["--tasks", str(tmp_path / "tasks.json"), "--num_epochs", "1", "--logdir", str(tmp_path)])
    assert [t.name for t in trainer.tasks] == ["bright", "left"]
    lines = (tmp_path / trainer.accelerator.project_dir / "metrics.jsonl").read_text().splitlines()
    assert {"task/bright/reward/mean", "task/left/reward/mean"} <= set(json.loads(lines[-1]))

    guarded = ["--tasks", str(tmp_path / "tasks.json"), "--logdir", str(tmp_path), "--eval_freq", "1"]
    guarded += ["--eval_reward_functions", "jpeg_compressibility", "--guard", '{"jpeg_compressibility": 1000}']
    with pytest.raises(ValueError, match=r"set --guard_task to one of \['bright', 'left'\], got None"):
        train.build_trainer(*train.parse_args(guarded))
    trainer = train.build_trainer(*train.parse_args([*guarded, "--guard_task", "left"]))
    assert trainer._guard().task == "left"


def test_shipped_digits_tasks_file_loads():
    root = Path(__file__).resolve().parent.parent
    tasks = load_tasks(str(root / "examples" / "digits" / "tasks.yaml"))
    assert [t.name for t in tasks] == ["ink", "parity", "accuracy"]
    assert tasks[1].prompt_function()[0] == "a handwritten digit"
    assert tasks[1].reward_function.is_distribution_level and tasks[1].reward_function.min_confidence == 0.9
