"""Train a tiny Stable-Diffusion-shaped text-to-image model on scikit-learn's digits (work in progress, issue 6).

Writes a diffusers `StableDiffusionPipeline` folder (word-level tokenizer, frozen random 2-layer CLIP text encoder,
2-block AutoencoderKL, UNet2DConditionModel (32, 64) with cross attention, DDIM) and a digit classifier, and prints
the prompted-digit accuracy of generated samples under that classifier.

    python scripts/train_digits_base.py --output_dir digits-base --unet_minutes 16
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {word}", "a drawing of the number {n}", "the digit {word}"]
MAX_LENGTH = 8


def digits_dataset():
    """Images (N, 3, 16, 16) in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return (images * 2 - 1).repeat(1, 3, 1, 1), torch.tensor(digits.target)


def word_tokenizer(folder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "handwritten", "digit", "drawing", "of", "the", "number"]
    vocab += WORDS + [str(n) for n in range(10)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=MAX_LENGTH,
    )  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def prompt_for(label: int, rng: np.random.Generator) -> str:
    if rng.random() < 0.1:
        return ""  # for classifier-free guidance
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(word=WORDS[label], n=label)


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 grayscale digits in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, images):  # (B, 3 or 1, 16, 16) in [-1, 1]
        return self.head(self.features(images.mean(1, keepdim=True)))


def train_classifier(images, labels, train_idx, test_idx, epochs=30):
    torch.manual_seed(0)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_idx)).split(64):
            idx = train_idx[batch]
            noisy = images[idx] + 0.1 * torch.randn_like(images[idx])  # robust to generator noise
            loss = F.cross_entropy(model(noisy), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return model, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="digits-base")
    parser.add_argument("--vae_minutes", type=float, default=1.5)
    parser.add_argument("--unet_minutes", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    images, labels = digits_dataset()
    order = torch.randperm(len(images))
    train_idx, test_idx = order[:1500], order[1500:]

    classifier, accuracy = train_classifier(images, labels, train_idx, test_idx)
    print(f"classifier held-out accuracy {accuracy:.4f}", flush=True)
    torch.save(classifier.state_dict(), os.path.join(args.output_dir, "digit_classifier.pt"))

    tokenizer = word_tokenizer(os.path.join(args.output_dir, "tokenizer"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH, pad_token_id=0, bos_token_id=2,
            eos_token_id=3,
        )
    ).eval().requires_grad_(False)  # fmt: skip

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), latent_channels=4,
        norm_num_groups=16, sample_size=16,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    start, step = time.time(), 0
    while time.time() - start < args.vae_minutes * 60:
        batch = images[train_idx[torch.randint(len(train_idx), (64,))]]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean  # (N, 4, 8, 8)
        recon_mse = F.mse_loss(vae.decode(latents).sample[test_idx], images[test_idx]).item()
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: {step} steps, held-out reconstruction MSE {recon_mse:.2e}, scaling factor {scaling:.3f}", flush=True)

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)

    def encode_prompts(batch_labels):
        prompts = [prompt_for(int(label), rng) for label in batch_labels]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return text_encoder(ids.input_ids)[0]

    start, step = time.time(), 0
    while time.time() - start < args.unet_minutes * 60:
        idx = train_idx[torch.randint(len(train_idx), (64,))]
        x0 = latents[idx] * scaling
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),))
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, encode_prompts(labels[idx])).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(0.995).add_(v.detach(), alpha=0.005) if v.dtype.is_floating_point else ema[k].copy_(v)
        step += 1
        if step % 500 == 0:
            print(f"unet step {step}, loss {loss.item():.4f}, {time.time() - start:.0f} s", flush=True)
    unet.load_state_dict(ema)
    unet.eval()

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1, clip_sample=False,
                                            set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    eval_labels = [n for n in range(10) for _ in range(10)]
    prompts = [TEMPLATES[0].format(word=WORDS[n], n=n) for n in eval_labels]
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        samples = pipeline(prompts, num_inference_steps=20, guidance_scale=5.0, generator=generator, output_type="pt")
        predicted = classifier(samples.images * 2 - 1).argmax(1)
    prompted_accuracy = (predicted == torch.tensor(eval_labels)).float().mean().item()
    print(f"prompted-digit accuracy of 100 samples (DDIM 20, CFG 5): {prompted_accuracy:.3f}", flush=True)
    pipeline.save_pretrained(os.path.join(args.output_dir, "pipeline"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(
            {"classifier_accuracy": accuracy, "vae_recon_mse": recon_mse, "unet_steps": step,
             "prompted_digit_accuracy": prompted_accuracy},
            f,
        )  # fmt: skip


if __name__ == "__main__":
    main()
