"""Run by tests/test_multiprocess.py under `torch.distributed.run` (2 CPU processes, gloo): three Adam steps of the
tiny FLUX transformer wrapped by DDP, then by torch's FSDP2 (`fully_shard` on every block, then the model), from the
same seed on the same per-rank batches; writes the largest weight difference to OUT_DIR/fsdp_rank<r>.txt.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp_flux.py OUT_DIR
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from tdpo_trl.tiny_models import tiny_flux


def batch(rank: int) -> dict:
    generator = torch.Generator().manual_seed(rank)  # each rank its own data, as in training
    return dict(
        hidden_states=torch.randn(2, 16, 16, generator=generator),  # packed latents (B, tokens, 4 C)
        timestep=torch.full((2,), 0.5),
        guidance=torch.full((2,), 3.5),
        pooled_projections=torch.randn(2, 32, generator=generator),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=generator),
        txt_ids=torch.zeros(8, 3),
        img_ids=torch.zeros(16, 3),
        return_dict=False,
    )


def train(kind: str, rank: int) -> dict[str, torch.Tensor]:
    model = tiny_flux(seed=0).transformer
    if kind == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            fully_shard(block)
        wrapped = fully_shard(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (wrapped(**batch(rank))[0] ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (FSDP2 shards are DTensors)
    return {name: full(value).detach().clone() for name, value in model.state_dict().items()}


def main():
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp, fsdp = train("ddp", rank), train("fsdp", rank)
    assert ddp.keys() == fsdp.keys()
    difference = max((ddp[name] - fsdp[name]).abs().max().item() for name in ddp)
    changed = max((ddp[name] - tiny_flux(seed=0).transformer.state_dict()[name]).abs().max().item() for name in ddp)
    with open(os.path.join(sys.argv[1], f"fsdp_rank{rank}.txt"), "w") as f:
        f.write(f"{dist.get_world_size()} {difference} {changed}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
