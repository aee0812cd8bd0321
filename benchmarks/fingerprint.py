"""Bit-identity of training between this checkout and another: a fingerprint of trained tensors and logged metrics.

Each case trains a tiny model for 2 epochs through the public API (families, modes, regularizers, tasks, a
distribution-level reward) and records a hash of every trained tensor and every logged metric but the timings. With
`--compare_src`, the same cases run under the other source tree (a fresh process each side) and the two are compared.

    python benchmarks/fingerprint.py --compare_src ../before/src       # 1.1 min on 2 CPU cores (2026-12-05)
    python benchmarks/fingerprint.py --cases sd-tdpo sd3-tdpo --compare_src ../before/src
"""

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile

import torch


PROMPTS = ["a photo of a cat", "a photo of a dog"]
BASE = dict(
    num_epochs=2, sample_num_steps=4, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=2,
    train_learning_rate=3e-3, mixed_precision="no", critic_encoder="latents", critic_hidden_sizes=[32, 8],
    critic_dropout=[0.0, 0.0], critic_learning_rate=1e-3, save_freq=1000, seed=0,
)  # fmt: skip
CASES = {  # name -> (family, config overrides or a special mode)
    "sd-tdpo": (
        "sd",
        dict(
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=16,
            per_prompt_stat_tracking_min_count=2,
            neuron_reset_frequency=1,
        ),
    ),  # fmt: skip
    "sd-ddpo": ("sd", dict(use_critic=False)),
    "sd-half": ("sd", dict(train_timestep_fraction=0.5)),
    "sd-half-2inner": ("sd", dict(train_timestep_fraction=0.5, train_num_inner_epochs=2)),
    "sd-unguided": ("sd", dict(sample_guidance_scale=1.0)),
    "sd-kl-loss": ("sd", dict(kl_coef=0.1, kl_penalty="loss")),
    "sd-kl-reward": ("sd", dict(kl_coef=0.1, kl_penalty="reward")),
    "sd-full-kl": ("sd-full", dict(kl_coef=0.1)),
    "sd-ddpo-kl": ("sd", dict(use_critic=False, kl_coef=0.1, kl_penalty="reward")),
    "sdxl-tdpo": ("sdxl", dict()),
    "sdxl-ddpo": ("sdxl", dict(use_critic=False)),
    "sd3-tdpo": ("sd3", dict(sample_eta=0.7)),
    "sd3-ddpo-kl": ("sd3", dict(sample_eta=0.7, use_critic=False, kl_coef=0.1)),
    "sd-pretrain": ("sd", dict(pretrain_loss_coef=0.1, pretrain_dataset="digits", pretrain_batch_size=2)),
    "sd-eval": ("sd", dict(eval_freq=1, eval_prompts=PROMPTS, eval_reward_functions=["jpeg_compressibility"])),
    "sd-adv-clip": ("sd", dict(train_adv_clip_max=0.5, gamma=0.9, normalize_temporal_advantages=True)),
    "sd-tasks": ("sd", "tasks"),
    "sd-tasks-seq": ("sd", "tasks-seq"),
    "sd-diversity": ("sd", "diversity"),
}


def prompt():
    return random.choice(PROMPTS), {}


def pipeline_of(family: str):
    from tdpo_trl import TDPOStableDiffusion3Pipeline, TDPOStableDiffusionPipeline, TDPOStableDiffusionXLPipeline
    from tdpo_trl.tiny_models import tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl

    if family == "sdxl":
        return TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl(seed=0), use_lora=True)
    if family == "sd3":
        return TDPOStableDiffusion3Pipeline(tiny_stable_diffusion_3(seed=0), max_sequence_length=16, use_lora=True)
    return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=family != "sd-full")


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_case(name: str, logdir: str) -> dict:
    from tdpo_trl import Diversity, Task, TDPOConfig, TDPOTrainer
    from tdpo_trl.tiny_models import left_minus_right_brightness, mean_brightness

    family, mode = CASES[name]
    overrides, reward, prompt_fn, tasks = {}, left_minus_right_brightness, prompt, None
    if mode in ("tasks", "tasks-seq"):
        tasks = [
            Task("left", left_minus_right_brightness, prompt),
            Task("bright", mean_brightness, prompt, weight=0.5),
        ]
        reward = prompt_fn = None
        overrides = {"multi_task_update": "sequential"} if mode == "tasks-seq" else {}
    elif mode == "diversity":

        class PixelDiversity(Diversity):
            def features(self, images, prompts, metadata=None):
                return images.flatten(1)

        reward, overrides = PixelDiversity(), {"prompt_repeats": 4}
    else:
        overrides = mode
    config = TDPOConfig(**{**BASE, **overrides}, logdir=logdir, run_name=name)
    trainer = TDPOTrainer(config, reward, prompt_fn, pipeline_of(family), tasks=tasks)
    trainer.train()
    denoiser = trainer.accelerator.unwrap_model(trainer.unet)
    state = {n: digest(p) for n, p in denoiser.named_parameters() if p.requires_grad}
    if trainer.critic is not None:
        state.update({f"critic.{n}": digest(p) for n, p in trainer.critic.head.named_parameters()})
    logs = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in trainer.log_history]
    return {"state": state, "logs": logs}


def differences(a: dict, b: dict) -> list[str]:
    found = [f"tensor {k}" for k in set(a["state"]) | set(b["state"]) if a["state"].get(k) != b["state"].get(k)]
    for epoch, (ra, rb) in enumerate(zip(a["logs"], b["logs"])):
        for k in set(ra) | set(rb):
            va, vb = ra.get(k), rb.get(k)
            both_nan = isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb)
            if va != vb and not both_nan:
                found.append(f"epoch {epoch} {k}: {va} vs {vb}")
    return found + (["number of epochs"] if len(a["logs"]) != len(b["logs"]) else [])


def fingerprints(cases: list[str], src: str = "") -> dict:
    """Run `cases` in a fresh process (importing `tdpo_trl` from `src` if given) and return their fingerprints."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)} if src else None
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "fingerprints.json")
        command = [sys.executable, __file__, "--child", out, "--cases", *cases]
        subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare_src", help="another checkout's src/ folder")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)  # the same reduction order in both trees
        with tempfile.TemporaryDirectory() as logdir:
            results = {case: run_case(case, logdir) for case in args.cases}
        with open(args.child, "w") as f:
            json.dump(results, f)
        return
    here = fingerprints(args.cases)
    if not args.compare_src:
        for case, result in here.items():
            print(f"{case:<16} {len(result['state'])} tensors, {sum(len(r) for r in result['logs'])} metrics")
        return
    other = fingerprints(args.cases, args.compare_src)
    print(f"this checkout vs {args.compare_src}: {len(args.cases)} cases, 2 epochs each, 1 thread")
    identical = 0
    for case in args.cases:
        found = differences(here[case], other[case])
        identical += not found
        tensors, metrics = len(here[case]["state"]), sum(len(r) for r in here[case]["logs"])
        verdict = "identical" if not found else f"DIFFERS ({len(found)}): {found[:3]}"
        print(f"{case:<16} {tensors:>4} tensors {metrics:>4} metrics  {verdict}")
    print(f"{identical} of {len(args.cases)} cases bit-identical")


if __name__ == "__main__":
    main()
