"""Epoch wall time and peak memory: TDPOTrainer (TDPO), TDPOTrainer in DDPO mode, and TRL's DDPOTrainer.

All three train a LoRA on the same tiny Stable-Diffusion-shaped model with the same sampling and training sizes.
Each variant runs in a fresh process (so its peak RSS is its own), after one warm-up epoch.

    python benchmarks/epoch_time.py                     # 16 samples x 10 steps per epoch, 3 timed epochs
    python benchmarks/epoch_time.py --epochs 5 --threads 2

    # this checkout against another one (e.g. `git worktree add ../before <commit>`), side by side in one run: the
    # TDPO variants alternate between the two source trees for --rounds rounds, each in a fresh process
    python benchmarks/epoch_time.py --compare_src ../before/src --rounds 5
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from tdpo_trl.tiny_models import mean_brightness


VARIANTS = ("tdpo", "tdpo-ddpo-mode", "trl-ddpo")
SIZES = dict(
    sample_num_steps=10,
    sample_batch_size=8,
    sample_num_batches_per_epoch=2,
    train_batch_size=4,
    train_learning_rate=3e-3,
    mixed_precision="no",
    save_freq=10_000,
    seed=0,
)


def prompt():
    return "a photo of a cat", {}


def build_trainer(variant: str, workdir: str):
    from tdpo_trl.tiny_models import tiny_stable_diffusion

    if variant == "trl-ddpo":
        from accelerate import PartialState
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

        PartialState()  # TRL's pipeline logs through accelerate before any Accelerator exists
        model_dir = os.path.join(workdir, "tiny-sd")
        tiny_stable_diffusion().save_pretrained(model_dir)  # TRL's pipeline only loads from a path
        pipeline = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)
        config = DDPOConfig(**SIZES, project_kwargs={"project_dir": workdir})
        return DDPOTrainer(config, mean_brightness, prompt, pipeline)

    from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer

    config = TDPOConfig(
        **SIZES,
        use_critic=variant == "tdpo",
        critic_encoder="latents",
        critic_hidden_sizes=[1024, 128, 64, 16],  # the paper's head, on 256-d latent features
        logdir=workdir,
        run_name=variant,
    )
    return TDPOTrainer(
        config, mean_brightness, prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True)
    )


def measure(variant: str, epochs: int, threads: int) -> dict:
    """Runs in the child process."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_trainer(variant, workdir)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        global_step = trainer.step(0, 0)  # warm-up
        times = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "epoch_s_median": statistics.median(times),
        "epoch_s_all": times,
        "peak_rss_mb": peak / 1024,
        "train_rss_mb": (peak - rss_before) / 1024,
        "optimizer_steps_per_epoch": global_step // (epochs + 1),
    }


def run_child(variant: str, args, src: str = "") -> dict:
    """One variant in a fresh process; `src`: a source tree to import `tdpo_trl` from instead of the installed one."""
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)} if src else None
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare_sources(args):
    """Median epoch time of each TDPO variant under this checkout and under `--compare_src`, alternating runs."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    trees = {"this": here, "other": args.compare_src}
    times = {(variant, tree): [] for variant in VARIANTS[:2] for tree in trees}
    for _ in range(args.rounds):
        for variant in VARIANTS[:2]:
            for tree, src in trees.items():
                times[(variant, tree)].append(run_child(variant, args, src)["epoch_s_median"])
    print(
        f"epoch time, this checkout vs {args.compare_src}: {args.rounds} alternating rounds x {args.epochs} timed "
        f"epochs; {args.threads} thread(s); torch {torch.__version__}"
    )
    header = (
        f"{'variant':<16} {'this s (median)':>16} {'other s (median)':>17} {'this / other':>13}  rounds (this/other)"
    )
    print(header)
    print("-" * len(header))
    for variant in VARIANTS[:2]:
        this, other = (statistics.median(times[(variant, tree)]) for tree in trees)
        rounds = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(times[(variant, "this")], times[(variant, "other")]))
        print(f"{variant:<16} {this:>16.3f} {other:>17.3f} {this / other:>13.3f}  {rounds}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--compare_src", help="another checkout's src/ folder: time its TDPO variants against these")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per source tree (--compare_src)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.epochs, args.threads)))
        return
    if args.compare_src:
        return compare_sources(args)

    results = {}
    for variant in VARIANTS:
        results[variant] = run_child(variant, args)

    base = results["trl-ddpo"]
    print(
        f"tiny SD-shaped model, LoRA r=4; {SIZES['sample_batch_size'] * SIZES['sample_num_batches_per_epoch']} "
        f"samples x {SIZES['sample_num_steps']} DDIM steps per epoch; {args.epochs} timed epochs; "
        f"{args.threads} thread(s); torch {torch.__version__}"
    )
    header = (
        f"{'variant':<16} {'epoch s (median)':>17} {'x TRL':>7} {'opt steps/epoch':>16} "
        f"{'peak RSS MB':>12} {'x TRL':>7}"
    )
    print(header)
    print("-" * len(header))
    for variant, r in results.items():
        print(
            f"{variant:<16} {r['epoch_s_median']:>17.3f} {r['epoch_s_median'] / base['epoch_s_median']:>7.2f} "
            f"{r['optimizer_steps_per_epoch']:>16} {r['peak_rss_mb']:>12.0f} "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:>7.2f}"
        )


if __name__ == "__main__":
    main()
