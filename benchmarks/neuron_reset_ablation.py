"""Neuron-reset ablation on the tiny model: which critic neurons to reset (active / dormant / all / none).

Trains the embedded tiny pipeline (full UNet, left-minus-right brightness, latent critic features) once per target
and seed, for two critic heads: the paper's head (no nonlinearity; ReLU applied only when scoring) at threshold 0,
and a ReLU head at threshold 0.1 (ReDo's setting). Prints a markdown table and, with --plot, draws the per-epoch
curves.

    python benchmarks/neuron_reset_ablation.py                    # 12 epochs, reset every 3, seeds 0 and 1
    python benchmarks/neuron_reset_ablation.py --epochs 6 --seeds 0 --plot ablation.png
    python benchmarks/neuron_reset_ablation.py --load runs.json --plot ablation.png   # re-summarize saved runs
"""

import argparse
import json
import statistics

import torch

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.tiny_models import TINY_TRAINING_DEFAULTS, left_minus_right_brightness, tiny_stable_diffusion


TARGETS = ("active", "dormant", "all", "none")
HEADS = {"paper head, tau=0": dict(critic_activation="none", neuron_reset_threshold=0.0),
         "relu head, tau=0.1": dict(critic_activation="relu", neuron_reset_threshold=0.1)}  # fmt: skip


def run(head_overrides: dict, target: str, seed: int, epochs: int, frequency: int, logdir: str) -> list[dict]:
    config = TDPOConfig(
        **{**TINY_TRAINING_DEFAULTS, **head_overrides},
        num_epochs=epochs,
        neuron_reset_target=target,
        neuron_reset_frequency=frequency,
        seed=seed,
        logdir=logdir,
        save_freq=10_000,
    )
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=seed), use_lora=False)
    trainer = TDPOTrainer(config, left_minus_right_brightness, lambda: ("a photo of a cat", {}), pipeline)
    trainer.train()
    return trainer.log_history


def summarize(histories: list[list[dict]], frequency: int) -> dict[str, float]:
    def mean(values):
        return statistics.fmean(values) if values else float("nan")

    after_first_reset = [h[frequency:] for h in histories]
    return {
        "final reward": mean([statistics.fmean(r["reward/mean"] for r in h[-2:]) for h in histories]),
        "reward gain": mean([h[-1]["reward/mean"] - h[0]["reward/mean"] for h in histories]),
        "explained var. after 1st reset": mean([r["critic/explained_variance"] for h in after_first_reset for r in h]),
        "dormant fraction": mean([r["neurons/dormant_fraction"] for h in histories for r in h]),
        "neurons reset / reset": mean(
            [r["neurons/reset_neurons"] for h in histories for r in h if r["neurons/reset_neurons"]]
        ),
        "callback share of epoch": mean([r["time/callbacks_s"] / r["time/epoch_s"] for h in histories for r in h]),
    }


def plot(results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("reward/mean", "critic/explained_variance", "neurons/dormant_fraction")
    fig, axes = plt.subplots(len(HEADS), len(metrics), figsize=(4 * len(metrics), 3.2 * len(HEADS)), squeeze=False)
    for row, head in enumerate(HEADS):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for target in TARGETS:
                histories = results[head][target]
                curve = [statistics.fmean(h[e][metric] for h in histories) for e in range(len(histories[0]))]
                ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=target)
            ax.set_title(f"{head}: {metric}", fontsize=9)
            ax.set_xlabel("epoch")
    axes[0][0].legend(title="reset target", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--frequency", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logdir", default="/tmp/tdpo-neuron-ablation")
    parser.add_argument("--plot", help="write the per-epoch curves to this PNG")
    parser.add_argument("--json", help="write every run's log history to this JSON file")
    parser.add_argument("--load", help="summarize the runs of a JSON file written by --json instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        results, args.frequency, args.seeds = saved["runs"], saved["frequency"], saved["seeds"]
        args.epochs = len(next(iter(next(iter(results.values())).values()))[0])
    else:
        results = {head: {t: [] for t in TARGETS} for head in HEADS}
        for head, overrides in HEADS.items():
            for target in TARGETS:
                for seed in args.seeds:
                    results[head][target].append(
                        run(overrides, target, seed, args.epochs, args.frequency, args.logdir)
                    )

    print(f"\n{args.epochs} epochs, reset every {args.frequency}, seeds {args.seeds} (means over seeds)\n")
    columns = list(summarize(results[next(iter(HEADS))][TARGETS[0]], args.frequency))
    print("| critic head | reset target | " + " | ".join(columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    for head in HEADS:
        for target in TARGETS:
            summary = summarize(results[head][target], args.frequency)
            cells = [f"{summary[c]:.3f}" if summary[c] == summary[c] else "–" for c in columns]  # NaN: no reset
            print(f"| {head} | {target} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frequency": args.frequency, "seeds": args.seeds, "runs": results}, f)
    if args.plot:
        plot(results, args.plot)
        print(f"\nfigure: {args.plot}")


if __name__ == "__main__":
    main()
