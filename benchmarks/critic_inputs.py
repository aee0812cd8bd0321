"""Does a cheaper critic input cost the critic its accuracy? Explained variance of TDPO-R's critic on digits.

The image critic (the paper's: frozen features of what the reward reads) decodes every x_t it embeds. Two savings
make it affordable (docs/benchmarks.md, throughput): decoding with a TAESD-shaped `AutoencoderTiny` instead of the
VAE (`critic_decoder`), and embedding only the x_t that will be trained (`train_timestep_fraction < 1`). This script
measures what each does to the critic, side by side in one run, on the digits model (no download):

1. It distills a TAESD-shaped decoder for the digits VAE, as TAESD is for SD's: an `AutoencoderTiny` whose decoder is
   trained (seeded, a few minutes on 2 cores) to reproduce the VAE decoder on *clean* latents of the training digits
   (TAESD, too, never sees noisy latents); it reports the decoders' disagreement on clean latents and on the noisy
   x_t that the critic actually decodes.
2. It trains TDPO-R on the ink reward (the demo's recipe) with the critic reading the ink reward's classifier
   features (`critic_encoder="digit_classifier"`) of x_t decoded by the VAE, or by the distilled decoder, and, for
   reference, the latent critic; each with all steps trained and with 2 of 10; a few seeds. `critic/explained_variance`
   is the fraction of the return's variance the critic's value explains, on each epoch's fresh samples before the
   update (out of sample).

    python benchmarks/critic_inputs.py --seeds 0 1 --num_epochs 40
"""

import argparse
import json
import os
import statistics
import time


VARIANTS = {  # name -> TDPOConfig fields (the decoder path is filled in at run time)
    "latents": dict(critic_encoder="latents"),
    "classifier+vae": dict(critic_encoder="digit_classifier"),
    "classifier+taesd": dict(critic_encoder="digit_classifier", critic_decoder="<distilled>"),
}


def distill_decoder(path: str, steps: int, seed: int = 0, fit_samples: int = 16) -> dict:
    """Train a TAESD-shaped decoder on the digits VAE's clean latents, save it to `path`; return its fit (on
    `fit_samples` sampled trajectories for the noisy x_t)."""
    import torch

    from tdpo_trl.digits import load_digits, load_digits_pipeline
    from tdpo_trl.tiny_models import tiny_autoencoder_tiny

    vae = load_digits_pipeline().vae.eval()
    images, _ = load_digits()  # (N, 3, 16, 16) in [-1, 1]
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor  # x_0 as the pipeline scales it
        targets = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    decoder = tiny_autoencoder_tiny(seed)  # decodes 4x8x8 latents to 16x16 images, like the digits VAE
    optimizer = torch.optim.Adam(decoder.decoder.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(latents), (64,), generator=generator)
        loss = torch.nn.functional.mse_loss(decoder.decode(latents[index]).sample, targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.save_pretrained(path)

    # how far apart the two decoders are on x_0 and on the noisy x_t the critic decodes (base model, DDIM 10, eta 1)
    from tdpo_trl import TDPOStableDiffusionPipeline

    pipeline = TDPOStableDiffusionPipeline(load_digits_pipeline())
    torch.manual_seed(seed)
    _, conditioning = pipeline.encode_prompts(["the digit 3", "a handwritten seven"] * (fit_samples // 2), "cpu")
    negative = pipeline.encode_negative_prompt("", "cpu")
    negative = {k: v.expand(2 * (fit_samples // 2), *v.shape[1:]) for k, v in negative.items()}
    fit = {}
    with torch.no_grad():
        out = pipeline.sample_with_log_probs(
            conditioning, negative, num_inference_steps=10, guidance_scale=5.0, eta=1.0
        )
        for name, x in (
            ("x_0 (training digits)", latents[:256]),
            ("x_t (sampled, all steps)", out.latents.flatten(0, 1)),
        ):
            reference = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
            fit[name] = (decoder.decode(x).sample.clamp(-1, 1) - reference).abs().mean().item() / 2  # in [0, 1] units
    return fit


def run_one(variant: str, fraction: float, seed: int, args, decoder_path: str) -> dict:
    from tdpo_trl.commands.train import ScriptArguments, build_trainer, default_config

    fields = {k: (decoder_path if v == "<distilled>" else v) for k, v in VARIANTS[variant].items()}
    config = default_config(
        "digits", **fields, seed=seed, num_epochs=args.num_epochs, train_timestep_fraction=fraction,
        eval_freq=10**6, save_freq=10**6, logdir=os.path.join(args.output_dir, "runs"),
        run_name=f"{variant}-f{fraction}-seed{seed}",
    )  # fmt: skip
    script_args = ScriptArguments(
        pretrained_model="digits", reward="digit_ink", prompts="digits", prompt_template="{}"
    )
    trainer = build_trainer(script_args, config)
    start = time.perf_counter()
    trainer.train()
    history = trainer.log_history
    late = history[len(history) // 2 :]
    return {
        "variant": variant,
        "fraction": fraction,
        "seed": seed,
        "explained_variance": statistics.fmean(r["critic/explained_variance"] for r in late),
        "explained_variance_first_10": statistics.fmean(r["critic/explained_variance"] for r in history[:10]),
        "reward_gain": statistics.fmean(r["reward/mean"] for r in history[-5:]) - history[0]["reward/mean"],
        "epoch_s": (time.perf_counter() - start) / len(history),
    }


def report(runs: list[dict], fit: dict) -> str:
    lines = ["decoder disagreement, mean |TAESD - VAE| in [0, 1] pixel units: "
             + ", ".join(f"{k} {v:.4f}" for k, v in fit.items()), "",
             "| critic input | steps trained | explained variance (2nd half) | first 10 epochs | ink gain | s/epoch |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for variant in VARIANTS:
        for fraction in sorted({r["fraction"] for r in runs}, reverse=True):
            rs = [r for r in runs if r["variant"] == variant and r["fraction"] == fraction]
            if not rs:
                continue

            def ms(key, digits=3):
                values = [r[key] for r in rs]
                std = statistics.pstdev(values) if len(values) > 1 else 0.0
                return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"

            lines.append(
                f"| {variant} | {fraction:g} | {ms('explained_variance')} | {ms('explained_variance_first_10')} "
                f"| {ms('reward_gain')} | {ms('epoch_s', 2)} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num_epochs", type=int, default=40)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--distill_steps", type=int, default=3000)
    parser.add_argument("--output_dir", default="outputs/critic_inputs")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    decoder_path = os.path.join(args.output_dir, "digits-taesd")
    start = time.perf_counter()
    fit = distill_decoder(decoder_path, args.distill_steps)
    print(f"distilled the digits TAESD in {time.perf_counter() - start:.0f} s: {fit}", flush=True)
    runs = []
    for seed in args.seeds:
        for fraction in args.fractions:
            for variant in args.variants:
                runs.append(run_one(variant, fraction, seed, args, decoder_path))
                print(json.dumps(runs[-1]), flush=True)
    with open(os.path.join(args.output_dir, "runs.json"), "w") as f:
        json.dump({"fit": fit, "runs": runs}, f, indent=2)
    table = report(runs, fit)
    print(table)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
