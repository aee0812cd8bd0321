"""Train the embedded digits text-to-image model and its judges from scikit-learn's digits (seeded, CPU).

Writes into `--output_dir` (by default the package's `tdpo_trl/digits/assets/`, which ships with the project):
- `pipeline/`: a diffusers `StableDiffusionPipeline` (word-level tokenizer, frozen random 2-layer CLIP text encoder,
  2-block AutoencoderKL with 4x8x8 latents, UNet2DConditionModel (32, 64) with cross attention, DDIM), 16x16 RGB;
- `judges.safetensors`: digit classifier, ink regressor (MLP on the classifier's features), Gaussian (PPCA) realism,
  and the real training digits for the nearest-real distance (see `tdpo_trl.digits.judges`);
- `digits.safetensors`: scikit-learn's 1,797 digits (uint8 8x8) and labels, so the package needs no scikit-learn;
- `base_metrics.json`: what the script measured (judges' held-out accuracy and R^2, prompted-digit accuracy).

    python maintainer_scripts/train_digits_base.py            # ~25 min on 2 CPU cores; needs scikit-learn
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tdpo_trl.digits.data import ASSETS, MAX_PROMPT_LENGTH, NUM_TRAIN, load_digits, prompt_for, train_test_split
from tdpo_trl.digits.judges import DigitClassifier, DigitJudges, InkRegressor, grayscale, stroke_mass, vary_strokes
from tdpo_trl.digits.model import (
    build_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
    prompted_accuracy,
    word_tokenizer,
)


def train_classifier(images, labels, train_idx, test_idx, epochs=30):
    """A CNN on grayscale digits, with small pixel noise so generated digits stay in its domain."""
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gray = grayscale((images + 1) / 2)
    for _ in tqdm(range(epochs), desc="classifier"):
        for batch in torch.randperm(len(train_idx)).split(64):
            idx = train_idx[batch]
            noisy = gray[idx] + 0.1 * torch.randn_like(gray[idx])
            loss = F.cross_entropy(model(noisy), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    accuracy = (model(gray[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return model, accuracy


def r_squared(prediction, target):
    return (1 - ((prediction - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()).item()


def train_ink_regressor(classifier, images, train_idx, test_idx, epochs=300):
    """Stroke mass from the frozen classifier's features, on real digits with varied stroke width."""
    real01 = (images + 1) / 2
    train = torch.cat([real01[train_idx], vary_strokes(real01[train_idx]), vary_strokes(real01[train_idx])])
    test = torch.cat([real01[test_idx], vary_strokes(real01[test_idx])])
    features = classifier.features(grayscale(train))
    target = stroke_mass(train)
    model = InkRegressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="ink regressor"):
        for batch in torch.randperm(len(train)).split(256):
            loss = F.mse_loss(model(features[batch]), target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    return model, r_squared(model(classifier.features(grayscale(test))), stroke_mass(test))


def fit_realism(judges, images, train_idx, n_components):
    """Probabilistic PCA on flattened real training digits (scikit-learn), stored as mean and precision."""
    from sklearn.decomposition import PCA

    real = ((images[train_idx] + 1) / 2).mean(1).flatten(1).double().numpy()  # (N, 256) in [0, 1]
    pca = PCA(n_components=n_components, random_state=0).fit(real)
    precision = torch.tensor(pca.get_precision())
    judges.realism.mean.copy_(torch.tensor(pca.mean_))
    judges.realism.precision.copy_(precision)
    judges.realism.logdet_precision.copy_(torch.linalg.slogdet(precision).logabsdet)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=ASSETS)
    parser.add_argument("--vae_steps", type=int, default=400)
    parser.add_argument("--unet_steps", type=int, default=3000)
    parser.add_argument("--realism_components", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    images, labels = load_digits("sklearn")
    from sklearn.datasets import load_digits as sklearn_digits

    save_file(
        {"pixels": torch.tensor(sklearn_digits().images, dtype=torch.uint8), "labels": labels.to(torch.uint8)},
        os.path.join(args.output_dir, "digits.safetensors"),
    )
    train_idx, test_idx = train_test_split(len(images))
    metrics = {"seed": args.seed, "num_train": NUM_TRAIN, "num_test": len(test_idx)}
    metrics["realism_components"] = args.realism_components

    judges = DigitJudges(images)
    judges.classifier, metrics["classifier_test_accuracy"] = train_classifier(images, labels, train_idx, test_idx)
    judges.ink, metrics["ink_test_r2"] = train_ink_regressor(judges.classifier, images, train_idx, test_idx)
    fit_realism(judges, images, train_idx, args.realism_components)
    real_test = judges.score((images[test_idx] + 1) / 2)
    metrics["real_test_realism"] = real_test["realism"].mean().item()
    metrics["real_test_nearest_real"] = real_test["nearest_real"].mean().item()
    judges.save(os.path.join(args.output_dir, "judges.safetensors"))
    print(json.dumps(metrics), flush=True)

    tokenizer, text_encoder = word_tokenizer(), build_text_encoder()
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in tqdm(range(args.vae_steps), desc="vae"):
        batch = images[train_idx[torch.randint(len(train_idx), (64,))]]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean  # (N, 4, 8, 8)
        metrics["vae_test_mse"] = F.mse_loss(vae.decode(latents[test_idx]).sample, images[test_idx]).item()
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)

    unet = build_unet()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    start = time.time()
    progress = tqdm(range(args.unet_steps), desc="unet")
    for step in progress:
        idx = train_idx[torch.randint(len(train_idx), (64,))]
        x0 = latents[idx] * scaling
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),))
        prompts = [prompt_for(int(label), rng) for label in labels[idx]]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_PROMPT_LENGTH, return_tensors="pt").input_ids
        with torch.no_grad():
            text = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(0.995).add_(v, alpha=0.005) if v.dtype.is_floating_point else ema[k].copy_(v)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    metrics["unet_steps"], metrics["unet_minutes"] = args.unet_steps, (time.time() - start) / 60
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)

    pipeline = build_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler)
    metrics["prompted_accuracy"] = prompted_accuracy(pipeline, judges)
    pipeline.save_pretrained(os.path.join(args.output_dir, "pipeline"))
    with open(os.path.join(args.output_dir, "base_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2), flush=True)


if __name__ == "__main__":
    main()
