"""The copyable examples run end to end on the tiny model of their family (`--tiny`), exactly as their docstrings
show, and leave a LoRA that diffusers loads and a run summary."""

import json
import os
import subprocess
import sys

import pytest


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def run_example(name: str, *args) -> str:
    command = [sys.executable, os.path.join(EXAMPLES, name), "--tiny", "--num_epochs", "2", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}  # nothing may be downloaded
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(
    "name, args, run, pipeline",
    [
        ("sd_aesthetic.py", [], "sd-aesthetic", "StableDiffusionPipeline"),
        ("sd3_pickscore.py", [], "sd3-pickscore", "StableDiffusion3Pipeline"),
        ("sd3_pickscore.py", ["--family", "flux"], "flux-pickscore", "FluxPipeline"),
        ("sdxl_pickscore.py", [], "sdxl-pickscore", "StableDiffusionXLPipeline"),
        ("fairness.py", [], "fairness", "StableDiffusionPipeline"),
        ("multi_task.py", [], "multi-task", "StableDiffusionPipeline"),
    ],
    ids=["sd_aesthetic", "sd3_pickscore", "sd3_pickscore-flux", "sdxl_pickscore", "fairness", "multi_task"],
)
def test_an_example_trains_saves_and_summarizes_its_tiny_run(tmp_path, name, args, run, pipeline):
    printed = run_example(name, *args, "--output_dir", tmp_path)
    summary = json.load(open(tmp_path / "runs" / run / "summary.json"))
    assert summary["epochs"] == [0, 1] and summary["lora_file"] and os.path.isfile(summary["lora_file"])
    assert f"LoRA saved to {tmp_path / 'lora'}" in printed and "reward/" in printed
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert f"{pipeline}.from_pretrained(" in (tmp_path / "lora" / "README.md").read_text()
    if name == "sd_aesthetic.py":  # the held-out judges and the guard ran
        assert summary["heldout"]["heldout/clip_score/mean"] is not None and summary["guard"] is not None
    if name == "fairness.py":  # the group score of the distribution-level reward is what the summary shows
        assert (
            list(summary["reward"]) == ["reward/group_score"] and -1 <= summary["reward"]["reward/group_score"][1] <= 0
        )
    if name == "multi_task.py":  # one line per task
        assert list(summary["reward"]) == ["task/bright/reward/mean", "task/left/reward/mean"]
