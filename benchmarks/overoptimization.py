"""Reward over-optimization on the shipped digits model: TDPO-R vs TDPO without neuron reset vs DDPO.

Every run fine-tunes the digits base with LoRA on the learned ink reward (`digit_ink`) for the same number of epochs,
so every variant makes the same number of reward queries. Every `--eval_freq` epochs (and once before training) a
fixed, seeded held-out set is sampled and scored by the target and by judges the policy never trained on:
prompted-digit accuracy (does the image still show the digit the prompt names?) and realism (log-likelihood under a
Gaussian fit to real digits). Each run is a subprocess (peak memory per run) whose history is saved as JSON, so an
interrupted benchmark resumes where it stopped.

Reported per variant (mean +- std over seeds):
- target gain: held-out ink reward at the end minus before training;
- accuracy and realism at matched target gain: each run's held-out path interpolated at the same gains;
- sample efficiency: reward queries until the held-out ink gain first reaches a fixed level;
- epoch time (without held-out evaluation) and peak memory, as ratios to DDPO.

    python benchmarks/overoptimization.py --output_dir outputs/overoptimization      # 3 variants x 3 seeds
    python benchmarks/overoptimization.py --seeds 0 --num_epochs 4 --output_dir /tmp/oo  # a quick check
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys


VARIANTS = {
    "TDPO-R": dict(use_critic=True, neuron_reset=True),
    "TDPO (no reset)": dict(use_critic=True, neuron_reset=False),
    "DDPO": dict(use_critic=False),
}
JUDGES = {"digit_accuracy": "prompted-digit accuracy", "digit_realism": "realism"}


def run_one(variant: str, seed: int, args) -> dict:
    """Train one variant (in this process) and return its held-out path, timings and peak memory."""
    import torch

    from tdpo_trl.scripts.train import ScriptArguments, build_trainer, default_config

    config = default_config(
        "digits", **VARIANTS[variant], **json.loads(args.overrides), seed=seed, num_epochs=args.num_epochs,
        eval_freq=args.eval_freq, eval_num_prompts=args.eval_num_prompts, eval_seed=1234, save_freq=10**6,
        logdir=os.path.join(args.output_dir, "runs"), run_name=f"{slug(variant)}-seed{seed}",
    )  # fmt: skip
    script_args = ScriptArguments(
        pretrained_model="digits", reward="digit_ink", prompts="digits", prompt_template="{}"
    )
    trainer = build_trainer(script_args, config)
    initial = trainer.evaluate_heldout()
    trainer.train()
    samples_per_epoch = config.sample_batch_size * config.sample_num_batches_per_epoch
    evaluated = [r for r in trainer.log_history if "heldout/target/mean" in r]
    points = [{"queries": 0, **initial}] + [{"queries": (r["epoch"] + 1) * samples_per_epoch, **r} for r in evaluated]
    keys = ["heldout/target/mean", *(f"heldout/{name}/mean" for name in JUDGES)]
    epoch_times = [r["time/epoch_s"] - r["time/heldout_s"] for r in trainer.log_history[1:]]  # first epoch warms up
    return {
        "variant": variant,
        "seed": seed,
        "path": [{"queries": p["queries"], **{k.split("/")[1]: p[k] for k in keys}} for p in points],
        "train_reward": [r["reward/mean"] for r in trainer.log_history],
        "epoch_s": statistics.fmean(epoch_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def interpolate_at_gain(path: list[dict], gain: float, key: str) -> float:
    """`key` where the run's target gain first reaches `gain` (linear between evaluations); NaN if never."""
    if gain <= 0:
        return path[0][key]
    base = path[0]["target"]
    for previous, current in zip(path, path[1:]):
        g0, g1 = previous["target"] - base, current["target"] - base
        if g0 < gain <= g1:
            w = (gain - g0) / (g1 - g0)
            return (1 - w) * previous[key] + w * current[key]
    return float("nan")


def final_gain(run: dict) -> float:
    return run["path"][-1]["target"] - run["path"][0]["target"]


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "not reached"
    text = f"{statistics.fmean(finite):.3f} ± {statistics.pstdev(finite):.3f}"
    return text + (f" ({len(finite)}/{len(values)} runs)" if len(finite) < len(values) else "")


def summarize(runs: list[dict], gains: list[float], efficiency_gain: float) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    reference = by_variant.get("DDPO") or by_variant[variants[0]]
    ref_time = statistics.fmean(r["epoch_s"] for r in reference)
    ref_memory = statistics.fmean(r["peak_rss_mb"] for r in reference)
    lines = ["| | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]

    def row(label, values_of):
        lines.append(f"| {label} | " + " | ".join(mean_std(values_of(by_variant[v])) for v in variants) + " |")

    row("held-out ink before", lambda rs: [r["path"][0]["target"] for r in rs])
    row("target gain (held-out ink, end − start)", lambda rs: [final_gain(r) for r in rs])
    for name, label in JUDGES.items():
        row(f"{label} before", lambda rs, n=name: [r["path"][0][n] for r in rs])
        row(f"{label} at the end", lambda rs, n=name: [r["path"][-1][n] for r in rs])
        for gain in gains:
            at_gain = lambda rs, n=name, g=gain: [interpolate_at_gain(r["path"], g, n) for r in rs]  # noqa: E731
            row(f"{label} at ink gain +{gain:.3f}", at_gain)
    row(
        f"reward queries to ink gain +{efficiency_gain:.3f}",
        lambda rs: [interpolate_at_gain(r["path"], efficiency_gain, "queries") for r in rs],
    )
    row("epoch time (s, without held-out eval)", lambda rs: [r["epoch_s"] for r in rs])
    row("epoch time / DDPO", lambda rs: [r["epoch_s"] / ref_time for r in rs])
    row("peak RSS / DDPO", lambda rs: [r["peak_rss_mb"] / ref_memory for r in rs])
    return "\n".join(lines)


def plot(runs: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = dict(zip(VARIANTS, ("tab:green", "tab:orange", "tab:red")))
    for run in runs:
        base = run["path"][0]["target"]
        gain = [p["target"] - base for p in run["path"]]
        first_seed = min(r["seed"] for r in runs if r["variant"] == run["variant"])
        label = run["variant"] if run["seed"] == first_seed else None
        style = dict(color=colors[run["variant"]], marker="o", markersize=3, alpha=0.8, label=label)
        axes[0].plot([p["queries"] for p in run["path"]], gain, **style)
        for ax, name in zip(axes[1:], JUDGES):
            ax.plot(gain, [p[name] for p in run["path"]], **style)
    axes[0].set_xlabel("reward queries")
    axes[0].set_ylabel("held-out ink gain (target)")
    for ax, label in zip(axes[1:], JUDGES.values()):
        ax.set_xlabel("held-out ink gain (target)")
        ax.set_ylabel(f"{label} (not trained on)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Over-optimization of the learned ink reward (one line per run)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/overoptimization")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_epochs", type=int, default=80)
    parser.add_argument("--eval_freq", type=int, default=8)
    parser.add_argument("--eval_num_prompts", type=int, default=100)
    parser.add_argument("--overrides", default="{}", help="JSON of TDPOConfig fields applied to every run")
    parser.add_argument("--gains", nargs="+", type=float, default=None, help="ink gains to compare at")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)

    if args.run:
        variant, seed = args.run[0], int(args.run[1])
        result = run_one(variant, seed, args)
        with open(run_file(args.output_dir, variant, seed), "w") as f:
            json.dump(result, f, indent=1)
        return

    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            path = run_file(args.output_dir, variant, seed)
            if not os.path.isfile(path):
                print(f"running {variant}, seed {seed}", flush=True)
                child = [sys.executable, __file__, "--run", variant, str(seed)] + [
                    a for a in sys.argv[1:] if a != "--run"
                ]
                subprocess.run(child, check=True)
            with open(path) as f:
                runs.append(json.load(f))

    top = max(min(final_gain(r) for r in runs), 1e-6)
    gains = args.gains or [round(top * f, 4) for f in (0.25, 0.5, 0.75, 1.0)]
    table = summarize(runs, gains, efficiency_gain=gains[1])
    plot(runs, os.path.join(args.output_dir, "overoptimization.png"))
    with open(os.path.join(args.output_dir, "overoptimization.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nfigure: {args.output_dir}/overoptimization.png\ntable:  {args.output_dir}/overoptimization.md")


def slug(variant: str) -> str:
    return variant.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("-", "")


def run_file(output_dir: str, variant: str, seed: int) -> str:
    return os.path.join(output_dir, f"run_{slug(variant)}_seed{seed}.json")


if __name__ == "__main__":
    main()
