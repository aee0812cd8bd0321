"""The README's main job, `examples/tdpo.py`, runs end to end (shortened) and prints its per-epoch table."""

import os
import subprocess
import sys


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tdpo.py")


def test_example_main_job_runs_and_prints_the_table(tmp_path):
    command = [
        sys.executable, EXAMPLE, "--num_epochs", "2", "--sample_num_batches_per_epoch", "1",
        "--neuron_reset_frequency", "1", "--save_freq", "1", "--logdir", str(tmp_path), "--run_name", "example",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "reward/mean"])
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in rows] == ["0", "1"]
    assert [row[-1] for row in rows] == ["1", "2"]  # resets after both epochs
    assert all(0.0 <= float(row[-2]) <= 1.0 for row in rows)  # dormant fraction
    assert os.path.isdir(tmp_path / "example" / "checkpoints")
