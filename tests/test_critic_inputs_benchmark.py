"""`benchmarks/critic_inputs.py`: the distilled TAESD-shaped decoder fits the digits VAE, a short critic run reports
its explained variance, and the report tables the runs."""

import importlib.util
import os

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "critic_inputs.py")
spec = importlib.util.spec_from_file_location("critic_inputs", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    untrained = benchmark.distill_decoder(str(tmp_path_factory.mktemp("untrained")), steps=0, fit_samples=2)
    path = str(tmp_path_factory.mktemp("distilled"))
    return path, untrained, benchmark.distill_decoder(path, steps=60, fit_samples=2)


def test_distillation_brings_the_decoder_to_the_vae(distilled):
    path, untrained, fit = distilled
    clean, noisy = "x_0 (training digits)", "x_t (sampled, all steps)"
    assert fit[clean] < 0.5 * untrained[clean], (untrained, fit)
    assert fit[noisy] < untrained[noisy], (untrained, fit)
    assert os.path.exists(os.path.join(path, "config.json"))


def test_a_short_run_reports_the_critics_explained_variance(distilled, tmp_path):
    path, _, fit = distilled

    class Args:
        num_epochs, output_dir = 2, str(tmp_path)

    run = benchmark.run_one("classifier+taesd", 0.2, 0, Args, path)
    assert run["variant"] == "classifier+taesd" and run["fraction"] == 0.2 and run["epoch_s"] > 0
    assert -10 < run["explained_variance"] <= 1 and -10 < run["explained_variance_first_10"] <= 1
    table = benchmark.report([run, {**run, "seed": 1, "explained_variance": run["explained_variance"] - 0.2}], fit)
    row = next(line for line in table.splitlines() if line.startswith("| classifier+taesd | 0.2 |"))
    assert f"{run['explained_variance'] - 0.1:.3f} ± 0.100" in row  # mean ± std over the two seeds
    assert "x_0 (training digits)" in table.splitlines()[0]
