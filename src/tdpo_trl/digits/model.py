"""The embedded digits text-to-image model: a Stable-Diffusion-shaped diffusers pipeline, 16x16 RGB, ~1.3M params."""

import os
from typing import Optional

from .data import ASSETS, MAX_PROMPT_LENGTH, TEMPLATES, WORDS


PIPELINE_PATH = os.path.join(ASSETS, "pipeline")
VOCABULARY = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "handwritten", "digit", "drawing", "of", "the", "number"]
VOCABULARY += WORDS + [str(n) for n in range(10)]


def word_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the prompts' 31 words (CLIP's BPE vocabulary would be 1.6 MB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=MAX_PROMPT_LENGTH,
    )  # fmt: skip


def build_text_encoder():
    """A random 2-layer CLIP text encoder (32-d), frozen: the UNet learns to read its embeddings."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(VOCABULARY), max_position_embeddings=MAX_PROMPT_LENGTH, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )  # fmt: skip
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae():
    """A 2-block AutoencoderKL: 16x16 RGB <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), latent_channels=4,
        norm_num_groups=16, sample_size=16,
    )  # fmt: skip


def build_unet():
    """A UNet2DConditionModel (32, 64) with cross attention to the 32-d text embeddings (1.06M params)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip


def build_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler):
    """A `StableDiffusionPipeline` of the parts, sampling with DDIM (no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(
        noise_scheduler.config, steps_offset=1, clip_sample=False, set_alpha_to_one=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_digits_pipeline(path: Optional[str] = None):
    """The shipped digits base (`assets/pipeline`), or a folder that `maintainer_scripts/train_digits_base.py`
    wrote."""
    from diffusers import StableDiffusionPipeline

    path = path or PIPELINE_PATH
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no diffusers pipeline at {path!r} (expected {path}/model_index.json)")
    pipeline = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def eval_prompts(per_digit: int = 10, template: str = TEMPLATES[0]) -> list[str]:
    """`per_digit` prompts for each digit 0..9, in order: `["a handwritten digit zero", ...]`."""
    return [template.format(word=WORDS[n], n=n) for n in range(10) for _ in range(per_digit)]


def prompted_accuracy(pipeline, judges, per_digit: int = 10, seed: int = 1234, num_inference_steps: int = 20,
                      guidance_scale: float = 5.0, batch_size: int = 100) -> float:  # fmt: skip
    """The fraction of seeded samples (DDIM, eta 0) that the judges' classifier reads as the digit their prompt
    names."""
    from ..evaluation import sample_images

    prompts = eval_prompts(per_digit)
    images = sample_images(
        pipeline, prompts, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        eta=0.0, batch_size=batch_size,
    )  # fmt: skip
    return judges.score(images, prompts, names=("accuracy",))["accuracy"].mean().item()
