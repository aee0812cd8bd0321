"""Reward over-optimization on the shipped digits model: the frontier of target gain against what it costs.

Every run fine-tunes the digits base with LoRA on the learned ink reward (`digit_ink`) for the same number of epochs,
so every variant makes the same number of reward queries. Every `--eval_freq` epochs (and once before training) a
fixed, seeded held-out set is sampled and scored by the target and by judges the policy never trained on:
prompted-digit accuracy by the project's classifier and by an independent scikit-learn judge that shares no weights
and no code with the reward or the critic (`tdpo_trl.digits.independent_judge`), realism (log-likelihood under a
Gaussian fit to real digits) and the true stroke mass the ink reward approximates. Each run is a subprocess (peak
memory per run) whose history is saved as JSON, so an interrupted benchmark resumes where it stopped.

A variant is a method and optional settings joined by `+`, on the demo's settings (`DIGITS_DEFAULTS`) with the
regularizers off unless the variant names them:

    DDPO | TDPO | TDPO-R | TDPO-R(cls)       (cls: the critic reads the digit classifier's features)
    pretrain=<beta>   kl=<coef>   klr=<coef> (KL as a per-step reward penalty)   lr=<rate>   clip=<range>

e.g. `TDPO-R+pretrain=0.3`, `DDPO+kl=0.05+lr=2e-3`. The over-optimization guard is replayed on every run's recorded
held-out path (`OverOptimizationGuard.assess`; stopping only truncates a run, so a guarded run is the same run up to
the evaluation the guard keeps) and reported as `<variant> [guard]`.

Reported per variant (mean +- std over seeds): held-out ink and stroke-mass gain, the judges at the end, the
independent accuracy at matched ink gains (each run's path interpolated), the frontier figure (ink gain x, judge y,
one curve per variant) and, at each matched gain, the variants ranked by each judge.

    python benchmarks/overoptimization.py --output_dir outputs/overoptimization                 # the default grid
    python benchmarks/overoptimization.py --seeds 0 --num_epochs 4 --variants DDPO TDPO-R --output_dir /tmp/oo
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


METHODS = {
    "DDPO": dict(use_critic=False),
    "TDPO": dict(use_critic=True, neuron_reset=False),
    "TDPO-R": dict(use_critic=True, neuron_reset=True),
    "TDPO-R(cls)": dict(use_critic=True, neuron_reset=True, critic_encoder="digit_classifier"),
}
SETTINGS = {  # variant token -> TDPOConfig fields
    "pretrain": lambda v: dict(pretrain_loss_coef=float(v), pretrain_dataset="digits"),
    "kl": lambda v: dict(kl_coef=float(v), kl_penalty="loss"),
    "klr": lambda v: dict(kl_coef=float(v), kl_penalty="reward"),
    "lr": lambda v: dict(train_learning_rate=float(v)),
    "clip": lambda v: dict(train_clip_range=float(v)),
    "pbs": lambda v: dict(pretrain_batch_size=int(v)),
}
DEFAULT_VARIANTS = ["DDPO", "TDPO-R", "DDPO+pretrain=1", "TDPO-R+pretrain=1"]
JUDGES = {
    "digit_accuracy_independent": "prompted-digit accuracy (independent sklearn judge)",
    "digit_accuracy": "prompted-digit accuracy (project classifier)",
    "digit_realism": "realism",
    "digit_stroke_mass": "true stroke mass",
}
GUARD_TOLERANCES = {"digit_accuracy": 0.05}  # the guard watches the project's judge; the independent one checks it


def parse_variant(variant: str) -> dict:
    """`"TDPO-R+pretrain=0.3+lr=2e-3"` -> the TDPOConfig fields it sets; a clear error for anything else."""
    method, *tokens = variant.split("+")
    if method not in METHODS:
        raise ValueError(f"variant {variant!r}: unknown method {method!r}; expected one of {list(METHODS)}")
    fields = dict(METHODS[method])
    for token in tokens:
        name, _, value = token.partition("=")
        if name not in SETTINGS or not value:
            raise ValueError(
                f"variant {variant!r}: bad setting {token!r}; expected <name>=<value>, names {list(SETTINGS)}"
            )
        fields.update(SETTINGS[name](value))
    return fields


def run_one(variant: str, seed: int, args) -> dict:
    """Train one variant (in this process) and return its held-out path, timings and peak memory."""
    import torch

    from tdpo_trl.commands.train import ScriptArguments, build_trainer, default_config

    regularizers_off = dict(pretrain_loss_coef=0.0, kl_coef=0.0)  # the demo's defaults turn the pretraining loss on
    fields = {**regularizers_off, **parse_variant(variant), **json.loads(args.overrides)}
    config = default_config(
        "digits", **fields, seed=seed, num_epochs=args.num_epochs,
        eval_freq=args.eval_freq, eval_num_prompts=args.eval_num_prompts, eval_seed=1234, save_freq=10**6,
        eval_reward_functions=list(JUDGES), logdir=os.path.join(args.output_dir, "runs"),
        run_name=f"{slug(variant)}-seed{seed}",
    )  # fmt: skip
    script_args = ScriptArguments(
        pretrained_model="digits", reward="digit_ink", prompts="digits", prompt_template="{}"
    )
    trainer = build_trainer(script_args, config)
    initial = trainer.evaluate_heldout()
    trainer.train()
    samples_per_epoch = config.sample_batch_size * config.sample_num_batches_per_epoch
    evaluated = [r for r in trainer.log_history if "heldout/target/mean" in r]
    points = [{"epoch": -1, "queries": 0, **initial}] + [
        {"epoch": r["epoch"], "queries": (r["epoch"] + 1) * samples_per_epoch, **r} for r in evaluated
    ]
    keys = ["heldout/target/mean", *(f"heldout/{name}/mean" for name in JUDGES)]
    epoch_times = [r["time/epoch_s"] - r["time/heldout_s"] for r in trainer.log_history[1:]]  # first epoch warms up
    return {
        "variant": variant,
        "seed": seed,
        "config": parse_variant(variant),
        "path": [
            {"epoch": p["epoch"], "queries": p["queries"], **{k.split("/")[1]: p[k] for k in keys}} for p in points
        ],
        "train_reward": [r["reward/mean"] for r in trainer.log_history],
        "clipfrac": statistics.fmean(r["policy/clipfrac"] for r in trainer.log_history),
        "explained_variance": statistics.fmean(
            r.get("critic/explained_variance", math.nan) for r in trainer.log_history
        ),
        "epoch_s": statistics.fmean(epoch_times) if epoch_times else math.nan,
        "minutes": sum(r["time/epoch_s"] for r in trainer.log_history) / 60,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------- analysis (pure functions, tested)


def guarded(run: dict, tolerances: dict[str, float]) -> dict:
    """The run as the over-optimization guard would leave it: its path up to the evaluation the guard keeps."""
    from tdpo_trl.guard import OverOptimizationGuard

    guard = OverOptimizationGuard(tolerances)
    path = run["path"]
    guard.start = {"target": path[0]["target"], **{name: path[0][name] for name in tolerances}}
    guard.kept_epoch, guard.kept_target = -1, path[0]["target"]
    for point in path[1:]:
        guard.assess(
            point["epoch"],
            {f"heldout/{k}/mean": v for k, v in point.items() if k not in ("epoch", "queries")}
            | {"heldout/target/mean": point["target"]},
        )
    kept = next(i for i, p in enumerate(path) if p["epoch"] == guard.kept_epoch)
    return {**run, "variant": run["variant"] + " [guard]", "path": path[: kept + 1], "guard_epoch": guard.kept_epoch}


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


def gain(run: dict, key: str = "target") -> float:
    return run["path"][-1][key] - run["path"][0][key]


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "not reached"
    text = f"{statistics.fmean(finite):.3f} ± {statistics.pstdev(finite):.3f}"
    return text + (f" ({len(finite)}/{len(values)})" if len(finite) < len(values) else "")


def mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def group(runs: list[dict]) -> dict[str, list[dict]]:
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    return {v: [r for r in runs if r["variant"] == v] for v in variants}


def summarize(runs: list[dict], gains: list[float]) -> str:
    """Two tables, one row per variant: the end of the budget, and the judges at matched ink gains."""
    judge = "digit_accuracy_independent"
    header = ["variant", "seeds", "ink gain", "stroke-mass gain", "accuracy (sklearn)", "accuracy (project)",
              "realism", "epoch s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for variant, rs in group(runs).items():
        cells = [variant, str(len(rs)), mean_std([gain(r) for r in rs])]
        cells.append(mean_std([gain(r, "digit_stroke_mass") for r in rs]))
        cells += [mean_std([r["path"][-1][name] for r in rs]) for name in (judge, "digit_accuracy", "digit_realism")]
        cells.append(mean_std([r["epoch_s"] for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    accuracy, realism = (mean([r["path"][0][key] for r in runs]) for key in (judge, "digit_realism"))
    lines.append(f"\nBefore training: sklearn accuracy {accuracy:.3f}, realism {realism:.3f}.\n")
    header = ["variant", *(f"sklearn acc. at ink +{g:.3f}" for g in gains), *(f"realism at +{g:.3f}" for g in gains)]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for variant, rs in group(runs).items():
        cells = [variant]
        for key in (judge, "digit_realism"):
            cells += [mean_std([interpolate_at_gain(r["path"], g, key) for r in rs]) for g in gains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_at_gains(runs: list[dict], gains: list[float], key: str) -> list[str]:
    """At each ink gain, the variants ranked by their mean `key` there (only variants every seed of which reaches it):
    the upper envelope of the frontier figure."""
    lines = []
    for g in gains:
        values = {v: [interpolate_at_gain(r["path"], g, key) for r in rs] for v, rs in group(runs).items()}
        reached = {v: statistics.fmean(x) for v, x in values.items() if all(math.isfinite(y) for y in x)}
        ranked = sorted(reached.items(), key=lambda item: -item[1])
        lines.append(f"ink +{g:.3f}: " + (", ".join(f"{v} {m:.3f}" for v, m in ranked) or "no variant reaches it"))
    return lines


def mean_path(rs: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """Per evaluation (the same epochs in every seed): mean ink gain, mean `key`, std of `key`."""
    length = min(len(r["path"]) for r in rs)
    gains = [mean([r["path"][i]["target"] - r["path"][0]["target"] for r in rs]) for i in range(length)]
    values = [[r["path"][i][key] for r in rs] for i in range(length)]
    return gains, [statistics.fmean(v) for v in values], [statistics.pstdev(v) for v in values]


def plot(runs: list[dict], guarded_runs: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["digit_accuracy_independent", "digit_realism", "digit_stroke_mass"]
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.6))
    cmap = plt.get_cmap("tab10")
    for k, (variant, rs) in enumerate(group(runs).items()):
        color = cmap(k % 10)
        guards = [g for g in guarded_runs if g["variant"] == variant + " [guard]"]
        for ax, key in zip(axes, keys):
            x, y, err = mean_path(rs, key)
            ax.errorbar(x, y, yerr=err, color=color, marker="o", markersize=3, capsize=2, linewidth=1.3, label=variant)
            if guards:
                gx = mean([gain(g) for g in guards])
                gy = mean([g["path"][-1][key] for g in guards])
                ax.plot([gx], [gy], marker="*", markersize=12, color=color, markeredgecolor="black")
    for ax, key in zip(axes, keys):
        ax.set_xlabel("held-out ink gain (target)")
        ax.set_ylabel(f"{JUDGES[key]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="mean ± std over seeds; ★ = with the guard", title_fontsize=7)
    figure.suptitle("Over-optimization frontier on the digits: target gain against judges not trained on")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(runs: list[dict], output_dir: str, gains: list[float]) -> str:
    guarded_runs = [guarded(r, GUARD_TOLERANCES) for r in runs]
    everything = runs + guarded_runs
    text = summarize(everything, gains)
    for key in ("digit_accuracy_independent", "digit_realism"):
        text += f"\n\nBest {JUDGES[key]} at matched ink gain (mean over seeds; runs that reach it):\n"
        text += "\n".join(best_at_gains(everything, gains, key))
    text += f"\n\nGuard: {GUARD_TOLERANCES} (project classifier), replayed on each run's held-out path."
    plot(runs, guarded_runs, os.path.join(output_dir, "overoptimization.png"))
    with open(os.path.join(output_dir, "overoptimization.md"), "w") as f:
        f.write(text + "\n")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/overoptimization")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_epochs", type=int, default=80)
    parser.add_argument("--eval_freq", type=int, default=8)
    parser.add_argument("--eval_num_prompts", type=int, default=100)
    parser.add_argument("--overrides", default="{}", help="JSON of TDPOConfig fields applied to every run")
    parser.add_argument("--gains", nargs="+", type=float, default=[0.05, 0.1, 0.15], help="ink gains to compare at")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with 2 / jobs CPU threads)")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    for variant in args.variants:
        try:
            parse_variant(variant)
        except ValueError as err:
            parser.error(str(err))
    os.makedirs(args.output_dir, exist_ok=True)

    if args.run:
        variant, seed = args.run[0], int(args.run[1])
        result = run_one(variant, seed, args)
        with open(run_file(args.output_dir, variant, seed), "w") as f:
            json.dump(result, f, indent=1)
        return

    todo = [(v, s) for s in args.seeds for v in args.variants if not os.path.isfile(run_file(args.output_dir, v, s))]
    threads = str(max(1, (os.cpu_count() or 2) // args.jobs))

    def launch(item):
        variant, seed = item
        print(f"running {variant}, seed {seed}", flush=True)
        forwarded = [a for a in sys.argv[1:] if a != "--run"]
        child = [sys.executable, __file__, "--run", variant, str(seed), *forwarded]
        subprocess.run(child, check=True, env={**os.environ, "OMP_NUM_THREADS": threads})

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, todo))
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            with open(run_file(args.output_dir, variant, seed)) as f:
                runs.append(json.load(f))
    print(report(runs, args.output_dir, args.gains))
    print(f"\nfigure: {args.output_dir}/overoptimization.png\ntable:  {args.output_dir}/overoptimization.md")


def slug(variant: str) -> str:
    keep = "".join(c if c.isalnum() or c in "=." else "_" for c in variant.lower())
    return keep.replace("=", "").strip("_")


def run_file(output_dir: str, variant: str, seed: int) -> str:
    return os.path.join(output_dir, f"run_{slug(variant)}_seed{seed}.json")


if __name__ == "__main__":
    main()
