"""Training throughput of one model family at a chosen size: samples/s for sampling, for training and for the whole
epoch, the share of the epoch spent inside denoiser passes, and peak memory.

The models are random-initialized with the real architectures (no download): `sd15` (SD 1.5's 860M UNet, CLIP
ViT-L/14 text tower, SD VAE), `sdxl` (SDXL base's 2.6B UNet, CLIP ViT-L and OpenCLIP ViT-bigG text towers, VAE), or
the tiny test-sized ones (`--model tiny-sd15`, `tiny-sdxl`). Each critic mode runs in a fresh process, after one
warm-up epoch, so peak memory is its own and the modes are compared side by side in one run.

    python benchmarks/throughput.py --model tiny-sd15                          # seconds, CPU
    python benchmarks/throughput.py --model sd15 --resolution 128 --steps 10 --batch_size 2 --modes ddpo tdpo-latent
    python benchmarks/throughput.py --model sd15 --resolution 128 --steps 10 --timestep_fraction 0.2 \\
        --modes ddpo tdpo-clip-taesd                                          # the critic embeds 2 of 10 x_t
    python benchmarks/throughput.py --model sd15 --device cuda --dtype bf16 --resolution 512 --steps 50 \\
        --batch_size 8 --batches 4 --train_batch_size 4                       # the GPU report (H100 class)
    python benchmarks/throughput.py --model flux-small --resolution 256 --steps 4 --modes ddpo tdpo-latent
    python benchmarks/throughput.py --model flux --device cuda --dtype bf16 --resolution 1024 --steps 28 \\
        --batch_size 1 --train_batch_size 1 --guidance_scale 3.5 --gradient_checkpointing \\
        --offload_text_encoders --modes ddpo tdpo-clip                         # FLUX.1-dev's size, one 80 GB GPU

Modes: `ddpo` (no critic), `tdpo-latent` (TDPO-R, critic on latents), `tdpo-clip` (TDPO-R, critic on CLIP ViT-L/14
image embeddings of every x_t decoded by the VAE: the paper's critic; a random ViT-L/14 of the real shape),
`tdpo-clip-taesd` (the same critic, x_t decoded by a TAESD-shaped `AutoencoderTiny`: `critic_decoder`).
Rewards: `--reward brightness` (free; a clip critic brings its own ViT-L/14) or `--reward aesthetic` (the paper's
reward, LAION aesthetic score of the real shape, in every mode; a clip critic shares the reward's ViT-L/14).
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


MODES = ("ddpo", "tdpo-latent", "tdpo-clip", "tdpo-clip-taesd")
MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-flux", "sd15", "sdxl", "flux-small", "flux")


def clip_text_config(hidden: int, layers: int, heads: int, intermediate: int, projection: int = 768, vocab=49408):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=77, projection_dim=projection, hidden_act="gelu",
    )  # fmt: skip


def sd_vae(force_upcast: bool = False):
    from diffusers import AutoencoderKL

    blocks = 4
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        force_upcast=force_upcast,
    )  # fmt: skip


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip


def build_model(name: str):
    """The diffusers pipeline (random weights) and the tdpo_trl wrapper class that trains it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOStableDiffusionXLPipeline
    from tdpo_trl.tiny_models import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_tokenizer

    torch.manual_seed(0)
    if "flux" in name:
        return build_flux(name)
    if name == "tiny-sd15":
        return tiny_stable_diffusion(), TDPOStableDiffusionPipeline
    if name == "tiny-sdxl":
        return tiny_stable_diffusion_xl(), TDPOStableDiffusionXLPipeline
    tokenizer = tiny_tokenizer(max_length=77)  # character-level; the text towers are full-size
    if name == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )  # fmt: skip
        text_encoder = CLIPTextModel(clip_text_config(768, 12, 12, 3072))
        pipeline = StableDiffusionPipeline(
            vae=sd_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddim(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        return pipeline, TDPOStableDiffusionPipeline
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=sd_vae(force_upcast=True), unet=unet, scheduler=ddim(), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, 5120, projection=1280)),
    )  # fmt: skip
    return pipeline, TDPOStableDiffusionXLPipeline


def build_flux(name: str):
    """FLUX.1-shaped pipelines, random weights: `flux` is FLUX.1-dev's size (19 double and 38 single blocks of width
    3072, T5-XXL's 4.8 B encoder, 16-channel VAE: a GPU-only build, ~70 GB in fp32); `flux-small` keeps the layout
    at width 512 and 2 + 4 blocks, with a 2-layer T5 of width 512 (runs on a CPU); `tiny-flux` is the test model."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from tdpo_trl import TDPOFluxPipeline
    from tdpo_trl.tiny_models import tiny_flux, tiny_tokenizer

    if name == "tiny-flux":
        return tiny_flux(), TDPOFluxPipeline
    full = name == "flux"
    width, heads = (3072, 24) if full else (512, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19 if full else 2, num_single_layers=38 if full else 4,
        attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096 if full else 512,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    t5 = T5Config(
        vocab_size=32128, d_model=4096 if full else 512, d_kv=64, d_ff=10240 if full else 1024,
        num_layers=24 if full else 2, num_heads=64 if full else 8, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    blocks = 4
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    tokenizer = tiny_tokenizer(max_length=77)  # character-level; the text towers are full-size
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=vae, transformer=transformer, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072)), text_encoder_2=T5EncoderModel(t5),
    )  # fmt: skip
    return pipeline, TDPOFluxPipeline


def clip_vit_l14_features():
    """CLIP ViT-L/14's image tower and projection, random weights (what the aesthetic score and the critic read)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tdpo_trl import CLIPImageFeatures

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)  # fmt: skip
    return CLIPImageFeatures(CLIPVisionModelWithProjection(vision))


def clip_vit_l14_critic(config):
    from tdpo_trl import TimestepCritic

    encoder = clip_vit_l14_features()
    return TimestepCritic(encoder, config.critic_hidden_sizes, config.critic_dropout, config.critic_activation)


def random_aesthetic_score():
    """The LAION aesthetic score (the paper's reward) with random weights: ViT-L/14 features and the MLP head."""
    from tdpo_trl import ValueHead
    from tdpo_trl.rewards import AestheticScore

    class RandomAestheticScore(AestheticScore):
        def load(self):
            torch.manual_seed(1)
            self.features = clip_vit_l14_features()
            self.head = ValueHead(self.features.feature_dim, (1024, 128, 64, 16), (0.2, 0.2, 0.1, 0.0))

    return RandomAestheticScore()


class DenoiserTimer:
    """Wall time inside the denoiser's forward passes (hooks; CUDA-synchronized on a GPU)."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.total, self._start, self.sync = 0.0, None, device.startswith("cuda")
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _after(self, *_):
        if self.sync:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._start


def reset_peak_rss():
    """Reset the process's peak resident set size (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: `peak_rss_mb` falls back to the peak since the process started
        pass


def peak_rss_mb() -> float:
    """Peak resident set size since `reset_peak_rss` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, mode: str) -> dict:
    """Runs in the child process: build, one warm-up epoch, `args.epochs` timed epochs."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from tdpo_trl import TDPOConfig, TDPOTrainer
    from tdpo_trl.tiny_models import mean_brightness

    diffusers_pipeline, family = build_model(args.model)
    options = {}
    if "flux" in args.model:  # FLUX's wrapper takes the resolution; T5 tokens as FLUX.1-dev (512) unless tiny
        options = {"resolution": args.resolution, "max_sequence_length": 16 if args.model == "tiny-flux" else 512}
        options.update(offload_text_encoders=args.offload_text_encoders)
    else:
        native = diffusers_pipeline.unet.config.sample_size
        latent = args.resolution // diffusers_pipeline.vae_scale_factor if args.resolution else native
        diffusers_pipeline.unet.register_to_config(sample_size=latent)  # the wrappers sample at the config's size
    with tempfile.TemporaryDirectory() as workdir:
        config = TDPOConfig(
            num_epochs=args.epochs + 1, sample_num_steps=args.steps, sample_batch_size=args.batch_size,
            sample_num_batches_per_epoch=args.batches, train_batch_size=args.train_batch_size,
            train_timestep_fraction=args.timestep_fraction,
            sample_guidance_scale=args.guidance_scale, mixed_precision="no" if args.dtype == "fp32" else args.dtype,
            use_critic=mode != "ddpo", critic_encoder="latents", critic_hidden_sizes=[1024, 128, 64, 16],
            critic_encode_batch_size=args.batch_size, neuron_reset=False, logdir=workdir, run_name=mode,
            save_freq=10_000, eval_reward_functions=[], use_lora=True, seed=0,
            gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        if mode == "tdpo-clip-taesd":  # a random AutoencoderTiny of TAESD's shape (its default config)
            from diffusers import AutoencoderTiny

            AutoencoderTiny().save_pretrained(os.path.join(workdir, "taesd"))
            config.critic_decoder = os.path.join(workdir, "taesd")
        reward, critic = mean_brightness, None
        if args.reward == "aesthetic":  # the critic reads the reward's ViT-L/14 (shared, as the paper's critic)
            reward = random_aesthetic_score()
            config.critic_encoder = reward.clip_model if mode.startswith("tdpo-clip") else "latents"
        elif mode.startswith("tdpo-clip"):  # the critic's own ViT-L/14
            critic = clip_vit_l14_critic(config)
        pipeline = family(diffusers_pipeline, use_lora=True, **options)
        trainer = TDPOTrainer(config, reward, lambda: ("a photo of a cat", {}), pipeline, critic=critic)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()  # the peak of training, not of building the models (in fp32, then cast)
        timer = DenoiserTimer(trainer.accelerator.unwrap_model(trainer.unet), args.device)
        global_step = trainer.step(0, 0)  # warm-up
        records, denoiser = [], []
        for epoch in range(1, args.epochs + 1):
            timer.total = 0.0
            global_step = trainer.step(epoch, global_step)
            records.append(trainer.log_history[-1])
            denoiser.append(timer.total)
        peak_rss = peak_rss_mb()
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    samples = args.batch_size * args.batches
    median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    epoch_s = median("time/epoch_s")
    return {
        "mode": mode,
        "epoch_s": epoch_s,
        "sampling_s": median("time/sampling_s"),
        "training_s": median("time/training_s"),
        "samples_per_s": samples / epoch_s,
        "sampling_samples_per_s": samples / median("time/sampling_s"),
        "training_samples_per_s": samples / median("time/training_s"),
        "denoiser_share": statistics.median(d / r["time/epoch_s"] for d, r in zip(denoiser, records)),
        "explained_variance": records[-1].get("critic/explained_variance"),
        "peak_rss_mb": peak_rss,
        "peak_gpu_mb": peak_gpu,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny-sd15")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's native size")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
    parser.add_argument("--batch_size", type=int, default=2, help="samples per sampling batch")
    parser.add_argument("--batches", type=int, default=1, help="sampling batches per epoch")
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument(
        "--timestep_fraction", type=float, default=1.0, help="train_timestep_fraction (< 1: fewer x_t embedded)"
    )
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="> 1: classifier-free guidance (2 passes)")
    parser.add_argument(
        "--reward", choices=("brightness", "aesthetic"), default="brightness",
        help="brightness: free, the critic brings its own ViT-L/14; aesthetic: the LAION aesthetic score (random "
        "ViT-L/14 + head) in every mode, whose ViT-L/14 the clip critics share",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute the denoiser's activations")
    parser.add_argument("--offload_text_encoders", action="store_true", help="FLUX: T5 and CLIP wait on the CPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r} but torch sees no CUDA device")

    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
        env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if args.device == "cpu" else {})}
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            sys.exit(f"mode {mode!r} failed:\n{completed.stderr[-3000:]}")
        results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])

    samples = args.batch_size * args.batches
    print(
        f"{args.model} (random weights), LoRA r=4, {args.resolution or 'native'} px, {args.steps} DDIM steps, "
        f"CFG {args.guidance_scale}, {samples} samples/epoch, {args.timestep_fraction:g} of the steps trained, "
        f"reward {args.reward}, "
        f"{args.dtype} on {args.device}, "
        f"{args.threads} thread(s), median of {args.epochs} epochs; torch {torch.__version__}"
    )
    base = results[args.modes[0]]
    header = (
        f"{'mode':<16} {'epoch s':>8} {'x ' + args.modes[0]:>10} {'samples/s':>10} {'sample/s':>9} {'train/s':>8} "
        f"{'denoiser':>9} {'peak MB':>9} {'x':>6} {'expl.var':>9}"
    )
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        peak = r["peak_gpu_mb"] if r["peak_gpu_mb"] is not None else r["peak_rss_mb"]
        base_peak = base["peak_gpu_mb"] if base["peak_gpu_mb"] is not None else base["peak_rss_mb"]
        variance = "" if r["explained_variance"] is None else f"{r['explained_variance']:.3f}"
        print(
            f"{mode:<16} {r['epoch_s']:>8.2f} {r['epoch_s'] / base['epoch_s']:>10.2f} {r['samples_per_s']:>10.3f} "
            f"{r['sampling_samples_per_s']:>9.3f} {r['training_samples_per_s']:>8.3f} {r['denoiser_share']:>9.0%} "
            f"{peak:>9.0f} {peak / base_peak:>6.2f} {variance:>9}"
        )
    print("peak MB: GPU memory allocated on cuda, process peak RSS on cpu; denoiser: share of the epoch in its passes")


if __name__ == "__main__":
    main()
