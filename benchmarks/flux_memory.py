"""Activation memory of a FLUX-shaped transformer's training step, measured and extrapolated to FLUX.1-dev.

What backpropagation keeps is measured exactly: the bytes of every tensor autograd saves in one forward pass
(`torch.autograd.graph.saved_tensors_hooks`), for a LoRA-trained FLUX-layout transformer (random weights) at several
widths, depths and token counts, with and without gradient checkpointing. Attention runs through SDPA's flash kernel
(linear in the tokens, as on a GPU). The per-(block x token x width) cost fitted on these small sizes then gives
FLUX.1-dev's (57 blocks of width 3072; 4,096 image + 512 text tokens at 1024 px) in bf16.

    python benchmarks/flux_memory.py            # CPU, 6 s (2026-12-05)
"""

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def flux_transformer(width: int, double: int, single: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=64,
        num_attention_heads=width // 64, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    )  # fmt: skip


def saved_bytes(model, image_tokens: int, text_tokens: int) -> int:
    """Bytes autograd keeps for the backward of one forward pass (batch 1, fp32), the LoRA adapters trained; the
    weights themselves are not counted."""
    from peft import LoraConfig

    if not getattr(model, "peft_config", None):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, 64), timestep=torch.full((1,), 0.5), guidance=torch.full((1,), 3.5),
        pooled_projections=torch.randn(1, 64), encoder_hidden_states=torch.randn(1, text_tokens, 256),
        txt_ids=torch.zeros(text_tokens, 3), img_ids=torch.zeros(image_tokens, 3), return_dict=False,
    )  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        output = model(**inputs)[0]
    output.mean().backward()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    per_value = []  # saved fp32 values per (block x token x width)
    print(f"{'width':>5} {'blocks':>7} {'tokens':>6} {'saved MiB':>10} {'values / (block x token x width)':>34}")
    for width, double, single in [(256, 1, 2), (512, 1, 2), (256, 2, 4)]:
        model = flux_transformer(width, double, single)
        for image_tokens in (64, 256):
            tokens, blocks = image_tokens + 32, double + single
            saved = saved_bytes(model, image_tokens, 32)
            per_value.append(saved / 4 / (blocks * tokens * width))
            print(f"{width:>5} {f'{double}+{single}':>7} {tokens:>6} {saved / 2**20:>10.2f} {per_value[-1]:>34.1f}")
    low, high = min(per_value), max(per_value)
    blocks, tokens, width, bf16 = 57, 4096 + 512, 3072, 2  # FLUX.1-dev at 1024 px
    inputs = blocks * tokens * width * bf16 / 2**30  # what gradient checkpointing keeps: each block's input
    per_block = tokens * width * bf16 / 2**30  # one block's activations, recomputed in the backward pass
    print(
        f"\nFLUX.1-dev at 1024 px, one trained sample, bf16: without gradient checkpointing {low * inputs:.0f}-"
        f"{high * inputs:.0f} GiB of activations; with it {inputs:.1f} GiB of block inputs + {low * per_block:.1f}-"
        f"{high * per_block:.1f} GiB for the block being recomputed"
    )


if __name__ == "__main__":
    main()
