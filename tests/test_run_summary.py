"""The end of a run: `train()` writes `<run>/summary.json` and prints it (rewards and held-out judges first -> last,
the guard's verdict, time and memory, where the weights are, how to load and share them)."""

import json
import os

import torch
from conftest import cat_prompt, tiny_config

from tdpo_trl import OverOptimizationGuard, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.pipelines import LORA_WEIGHT_NAME
from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion


def test_train_writes_and_prints_the_run_summary(tmp_path, capsys):
    config = tiny_config(tmp_path, num_epochs=2, save_freq=1, eval_freq=1, eval_num_prompts=2,
                         eval_reward_functions=["jpeg_compressibility"])  # fmt: skip
    guard = OverOptimizationGuard({"jpeg_compressibility": 1000.0})
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, pipeline, callbacks=[guard])
    trainer.train()

    summary = json.load(open(os.path.join(trainer.accelerator.project_dir, "summary.json")))
    history = trainer.log_history
    assert summary["epochs"] == [0, 1]
    assert summary["reward"] == {"reward/mean": [history[0]["reward/mean"], history[-1]["reward/mean"]]}
    judge = "heldout/jpeg_compressibility/mean"
    assert summary["heldout"][judge] == [history[0][judge], history[-1][judge]]
    assert summary["guard"]["flagged"] is None and summary["guard"]["kept_epoch"] == guard.kept_epoch
    assert summary["epoch_seconds_median"] > 0 and summary["peak_memory_mib"] > 0
    assert summary["latest_checkpoint"].endswith("checkpoint_1")
    assert summary["lora_file"] == os.path.join(summary["latest_checkpoint"], LORA_WEIGHT_NAME)
    assert 'pipe.load_lora_weights("' in summary["load_in_diffusers"] and "push_to_hub" in summary["push"]

    printed = capsys.readouterr().out
    assert f"reward/mean: {history[0]['reward/mean']:.4g} -> {history[-1]['reward/mean']:.4g}" in printed
    assert "guard: no over-optimization flagged" in printed and f"LoRA: {summary['lora_file']}" in printed

    # the file the summary points to is the LoRA diffusers loads
    loaded = tiny_stable_diffusion()
    loaded.load_lora_weights(os.path.dirname(summary["lora_file"]), weight_name=LORA_WEIGHT_NAME)
    assert loaded.unet.peft_config
    trained = {n: p for n, p in trainer.accelerator.unwrap_model(trainer.unet).named_parameters() if "lora_B" in n}
    in_diffusers = {n: p for n, p in loaded.unet.named_parameters() if "lora_B" in n}  # adapter "default_0"
    assert len(trained) == len(in_diffusers) > 0
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(trained.values(), in_diffusers.values()))
