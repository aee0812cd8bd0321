"""`benchmarks/overoptimization.py`: matched-gain interpolation, the summary table, and a short real run."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "overoptimization.py")
spec = importlib.util.spec_from_file_location("overoptimization", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def path(*points):
    return [
        {"queries": 32 * i, "target": t, "digit_accuracy": a, "digit_realism": 1.0} for i, (t, a) in enumerate(points)
    ]


def test_interpolation_at_matched_gain():
    run = path((0.30, 0.9), (0.32, 0.8), (0.34, 0.6), (0.33, 0.5))
    assert benchmark.interpolate_at_gain(run, 0.0, "digit_accuracy") == 0.9
    assert benchmark.interpolate_at_gain(run, 0.01, "digit_accuracy") == pytest.approx(0.85)
    assert benchmark.interpolate_at_gain(run, 0.03, "digit_accuracy") == pytest.approx(0.7)  # first crossing
    assert benchmark.interpolate_at_gain(run, 0.03, "queries") == pytest.approx(48)
    assert math.isnan(benchmark.interpolate_at_gain(run, 0.05, "digit_accuracy"))  # never reached


def test_summary_table_compares_variants_at_the_same_gains():
    runs = [
        {"variant": "TDPO-R", "seed": 0, "path": path((0.3, 0.9), (0.34, 0.85)), "epoch_s": 2.0, "peak_rss_mb": 600},
        {"variant": "DDPO", "seed": 0, "path": path((0.3, 0.9), (0.32, 0.7), (0.36, 0.5)), "epoch_s": 1.6,
         "peak_rss_mb": 500},
    ]  # fmt: skip
    table = benchmark.summarize(runs, gains=[0.02, 0.04], efficiency_gain=0.02).splitlines()
    assert table[0] == "| | TDPO-R | DDPO |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table[2:]}
    assert rows["prompted-digit accuracy at ink gain +0.020"] == ["0.875 ± 0.000", "0.700 ± 0.000 |"]
    assert rows["prompted-digit accuracy at ink gain +0.040"][0] == "0.850 ± 0.000"
    assert rows["reward queries to ink gain +0.020"] == ["16.000 ± 0.000", "32.000 ± 0.000 |"]
    assert rows["epoch time / DDPO"][0] == "1.250 ± 0.000"
    assert rows["peak RSS / DDPO"][0] == "1.200 ± 0.000"


@pytest.mark.slow
def test_short_benchmark_run_writes_table_figure_and_runs(tmp_path):
    command = [sys.executable, SCRIPT, "--output_dir", str(tmp_path), "--seeds", "0", "--num_epochs", "2",
               "--eval_freq", "1", "--eval_num_prompts", "10", "--variants", "TDPO-R", "DDPO",
               "--overrides",
               '{"sample_batch_size": 8, "train_batch_size": 8, "sample_num_batches_per_epoch": 1}']  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("overoptimization.md", "overoptimization.png", "run_tdpor_seed0.json", "run_ddpo_seed0.json"):
        assert (tmp_path / name).exists(), name
    run = json.loads((tmp_path / "run_tdpor_seed0.json").read_text())
    assert [p["queries"] for p in run["path"]] == [0, 8, 16]
    assert all(math.isfinite(v) for p in run["path"] for v in p.values())
    assert "target gain" in result.stdout and "| | TDPO-R | DDPO |" in result.stdout
