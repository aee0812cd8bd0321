"""Tiny, seeded, randomly initialized models for tests, examples and CPU benchmarks (no downloads).

Sizes follow diffusers' `get_dummy_components()`: a UNet with `block_out_channels=(32, 64)`, a two-block VAE and a
two-layer CLIP text encoder of width 32. Latents are 4x8x8 and images 16x16, so one DDIM step costs milliseconds.
"""

import json
import os
import string
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)


TINY_PROMPT_LENGTH = 16
TINY_T5_LENGTH = 16  # T5 tokens per prompt of the tiny FLUX (its `max_sequence_length`)
# The transformer towers of every tiny CLIP model (text and image): two layers, width 32.
_TINY_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def tiny_tokenizer(max_length: int = TINY_PROMPT_LENGTH, leading: tuple[str, ...] = ()) -> CLIPTokenizer:
    """A character-level `CLIPTokenizer` (BPE with no merges) over lowercase letters, digits and punctuation.
    `leading`: tokens given the first ids, before the start and end tokens."""
    vocab = {token: i for i, token in enumerate(leading)}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    for char in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """A seeded Stable-Diffusion-shaped pipeline: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, DDIM."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **_TINY_TOWER,
            layer_norm_eps=1e-5,
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_PROMPT_LENGTH,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
    )


def _tiny_text_config(**extra) -> CLIPTextConfig:
    """The tiny GELU CLIP text tower of SDXL, SD3 and FLUX, over the character-level tokenizer's vocabulary."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **_TINY_TOWER,
        layer_norm_eps=1e-5,
        vocab_size=len(tiny_tokenizer()),
        max_position_embeddings=TINY_PROMPT_LENGTH,
        hidden_act="gelu",
        **extra,
    )


def tiny_stable_diffusion_xl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded SDXL-shaped pipeline (sizes of diffusers' SDXL `get_dummy_components`, at 8x8 latents): a UNet with
    `text_time` added conditioning, two CLIP text encoders of width 32 (the second with a 32-d projection), DDIM."""
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of width 8, and the pooled text embedding
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated
    )
    text_config = _tiny_text_config(projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_stable_diffusion_3(seed: int = 0):
    """A seeded SD3-shaped pipeline (sizes of diffusers' SD3 `get_dummy_components` at 8x8 latents, but two
    transformer layers: one barely responds to a reward, docs/model_families.md): an `SD3Transformer2DModel`, two
    CLIP text encoders with 32-d projections, no T5 (its conditioning is zeros), a VAE with SD3's latent shift and
    scale, and the flow-matching Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # the two CLIP encoders' hidden states, concatenated
        pooled_projection_dim=64,  # and their pooled projections
    )
    text_config = _tiny_text_config(projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    vae = _tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE statistics
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux(seed: int = 0):
    """A seeded FLUX.1-shaped pipeline (sizes of diffusers' FLUX `get_dummy_components`, at 16x16 images, with two
    double-stream layers): a `FluxTransformer2DModel` with a guidance embedding (as FLUX.1-dev), a CLIP text encoder
    (pooled, 32-d) and a T5 encoder of width 32 (both on the character-level tokenizer), the tiny VAE with FLUX's
    latent shift and scale, and the flow-matching scheduler with FLUX's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # the VAE's 4 latent channels x a 2x2 patch
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's pooled output
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )
    tokenizer, text_config = tiny_tokenizer(), _tiny_text_config()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    t5_config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    text_encoder_2 = T5EncoderModel(t5_config)
    vae = _tiny_vae(seed)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE statistics
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(TINY_T5_LENGTH),
        transformer=transformer,
    )


def tiny_autoencoder_tiny(seed: int = 0):
    """A seeded `AutoencoderTiny` (TAESD's architecture, two blocks of width 32) that decodes the tiny models' 4x8x8
    latents to 16x16 images: a stand-in for madebyollin/taesd as `critic_decoder`."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(32, 32),
        decoder_block_out_channels=(32, 32),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )


def tiny_clip_vision_model(seed: int = 0, image_size: int = 16) -> CLIPVisionModelWithProjection:
    """A seeded two-layer CLIP image encoder with a 16-d projection (a stand-in for ViT-L/14 in tests)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**_TINY_TOWER, image_size=image_size, patch_size=4, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_clip_model(seed: int = 0, image_size: int = 16):
    """A seeded two-layer `CLIPModel` (text and image towers, 16-d projections; a stand-in for PickScore / CLIP-L in
    tests) and its character-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            **_TINY_TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_PROMPT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=4,
        ),  # fmt: skip
        projection_dim=16,
    )
    return CLIPModel(config).eval(), tokenizer


def tiny_owlv2(seed: int = 0):
    """A seeded two-layer `Owlv2ForObjectDetection` (32 px images, 16 patches) and its `Owlv2Processor`: a stand-in
    for `google/owlv2-base-patch16-ensemble` in tests. Its tokenizer gives "!" id 0, as CLIP's does: OWL reads a
    query starting with token 0 as padding."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(leading=("!",))
    text = dict(**_TINY_TOWER, vocab_size=len(tokenizer), max_position_embeddings=TINY_PROMPT_LENGTH)
    config = Owlv2Config(
        text_config=dict(**text, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(**_TINY_TOWER, image_size=32, patch_size=8),
        projection_dim=_TINY_TOWER["hidden_size"],  # OWL's class head compares image and text at the text width
    )
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    return Owlv2ForObjectDetection(config).eval(), processor


def save_tiny_owlv2(folder: str) -> str:
    """`tiny_owlv2()` saved to `folder` as a Hub checkpoint is laid out (model and processor); returns `folder`."""
    model, processor = tiny_owlv2()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str) -> str:
    """`tiny_clip_model()` and its tokenizer saved to `folder`, as a Hub CLIP checkpoint is laid out; returns `folder`
    (for rewards, judges and critics that take a model id or folder)."""
    model, tokenizer = tiny_clip_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# TDPO-R settings under which the tiny pipeline learns `left_minus_right_brightness` in a few CPU epochs: 64 samples x
# 4 DDIM steps per epoch in fp32, and the critic on flattened latents. Use with full-UNet training (`use_lora=False`):
# LoRA on this random 1M-parameter UNet learns too slowly to show in a minute. Measured (seed 0, 8 epochs): the reward
# mean rose 0.0003 -> 0.066 against a first-epoch spread of 0.025.
TINY_TRAINING_DEFAULTS = dict(
    sample_num_steps=4,
    sample_batch_size=16,
    sample_num_batches_per_epoch=4,
    train_batch_size=16,
    train_learning_rate=1e-3,
    train_clip_range=0.1,
    mixed_precision="no",
    critic_encoder="latents",
    critic_hidden_sizes=[32, 8],
    critic_dropout=[0.0, 0.0],
    critic_learning_rate=1e-3,
)


def mean_brightness(images, prompts=None, metadata=None):
    """Mean pixel value of each image, in [0, 1]. DDPO signature: `(images, prompts, metadata) -> (rewards, {})`."""
    return images.float().mean(dim=(1, 2, 3)), {}


def left_minus_right_brightness(images, prompts=None, metadata=None):
    """A reward the tiny pipeline can learn: mean brightness of the left half minus the right half.

    Plain mean brightness barely responds to the tiny policy, because the random VAE decoder's GroupNorms erase a
    uniform latent shift; a left/right latent pattern of +-0.5 moves this reward by about two of its standard
    deviations across samples.
    DDPO signature: `(images (B, 3, H, W) in [0, 1], prompts, metadata) -> (rewards (B,), {})`.
    """
    half = images.shape[-1] // 2
    return images[..., :half].float().mean(dim=(1, 2, 3)) - images[..., half:].float().mean(dim=(1, 2, 3)), {}
