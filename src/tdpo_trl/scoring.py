"""Scoring an epoch's samples across processes: the training reward (per image, or distribution-level over the
batch of every process), reward components, and the out-of-domain rewards logged beside it."""

from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from .evaluation import mean_std, score_images
from .rewards import DistributionReward, call_reward_function, check_reward_output, is_distribution_reward, reward_name


logger = get_logger(__name__)


def shown_reward_key(record: dict, prefix: str = "") -> str:
    """The per-epoch reward to show a person (progress bar, tables): a distribution-level reward's batch score
    `<prefix>reward/group_score` (its per-sample leave-one-out credits average about 0), else `<prefix>reward/mean`."""
    key = f"{prefix}reward/group_score"
    return key if key in record else f"{prefix}reward/mean"


def local_rows(accelerator: Accelerator, gathered: torch.Tensor) -> torch.Tensor:
    """This process's rows of a tensor gathered over processes: (N_all, ...) -> (N_all / P, ...)."""
    rows = gathered.reshape(accelerator.num_processes, -1, *gathered.shape[1:])
    return rows[accelerator.process_index].contiguous()


def score_batches(
    accelerator: Accelerator, reward_function: Callable, prompt_image_pairs: list,
    executor: Optional[futures.Executor] = None,
) -> tuple[list[torch.Tensor], list]:  # fmt: skip
    """Score each sampled batch `[images, prompts, metadata]` with `reward_function` (in `executor` if given),
    checking what it returns. Returns per batch a `(B,)` float32 tensor on the device and the function's metadata.

    A distribution-level reward instead scores the epoch's batch of every process at once (`distribution_rewards`).
    """
    if is_distribution_reward(reward_function):
        return distribution_rewards(accelerator, reward_function, list(prompt_image_pairs))

    def score(pair):
        images, prompts, prompt_metadata = pair[:3]
        return call_reward_function(reward_function, images, prompts, prompt_metadata)

    pairs = list(prompt_image_pairs)
    results = list(executor.map(score, pairs)) if executor is not None else [score(pair) for pair in pairs]
    rewards, metadata = zip(*results)
    return [r.to(accelerator.device) for r in rewards], list(metadata)


def distribution_rewards(accelerator: Accelerator, function: DistributionReward, prompt_image_pairs: list):
    """Per-sample features on each process, gathered; rewards from the whole batch (every process computes the
    same ones); this process's rows, split back into its sampled batches. So the batch a distribution is measured
    on is the epoch's samples of all processes, and 1 or 2 processes give the same rewards for the same samples."""
    name = f"distribution reward {reward_name(function)!r}"
    features, prompts = [], []
    for images, batch_prompts, metadata, *_ in prompt_image_pairs:
        batch_features = torch.as_tensor(function.features(images, batch_prompts, metadata))
        if batch_features.dim() != 2 or len(batch_features) != len(images):
            raise ValueError(
                f"{name}: `features` returned shape {tuple(batch_features.shape)} for {len(images)} images; "
                "expected (batch, feature_dim)"
            )
        features.append(batch_features.float().to(accelerator.device))
        prompts.extend(batch_prompts)
    gathered = accelerator.gather(torch.cat(features))  # (N_all, D), process-major as `local_rows` reads
    all_prompts = gather_object(prompts)  # as is on one process
    rewards, info = check_reward_output(function.rewards_from_features(gathered, all_prompts), len(gathered), name)
    local = local_rows(accelerator, rewards.to(accelerator.device))  # (n_local,)
    sizes = [len(pair[0]) for pair in prompt_image_pairs]
    if not (isinstance(info, dict) and "components" in info):
        return list(local.split(sizes)), [info] * len(sizes)
    # per-sample component scores (a `WeightedSum`'s) of the whole batch -> this process's rows, per sampled batch
    parts = {
        name: local_rows(accelerator, v.to(accelerator.device)).split(sizes) for name, v in info["components"].items()
    }
    infos = [{**info, "components": {name: split[b] for name, split in parts.items()}} for b in range(len(sizes))]
    return list(local.split(sizes)), infos


def reward_stats(rewards: np.ndarray, rewards_metadata: list, when: str) -> dict[str, float]:
    """`reward/mean|std` of the finite rewards `(N_all,)`, `reward/invalid_count` (warned about, naming `when`), and a
    distribution-level reward's `reward/group_score`."""
    finite = rewards[np.isfinite(rewards)]
    stats = {"reward/mean": float(finite.mean()), "reward/std": float(finite.std())}
    stats["reward/invalid_count"] = int(len(rewards) - len(finite))
    if stats["reward/invalid_count"]:
        logger.warning(
            f"{when}: {stats['reward/invalid_count']} of {len(rewards)} rewards were NaN or infinite; they are left "
            "out of the reward statistics and their samples get advantage 0"
        )
    if isinstance(rewards_metadata[0], dict) and "group_score" in rewards_metadata[0]:  # distribution-level
        stats["reward/group_score"] = float(rewards_metadata[0]["group_score"])
    return stats


def gathered_mean_std(accelerator: Accelerator, prefix: str, values: dict[str, list[torch.Tensor]]) -> dict:
    """`<prefix>/<name>/mean|std` of each name's per-batch tensors, gathered over processes."""
    return mean_std({name: accelerator.gather(torch.cat(batches)) for name, batches in values.items()}, prefix)


def reward_component_stats(accelerator: Accelerator, rewards_metadata: list) -> dict[str, float]:
    """`reward/<name>/mean|std` for rewards that report components (e.g. `tdpo_trl.rewards.WeightedSum`)."""
    components = defaultdict(list)
    for metadata in rewards_metadata:
        for name, values in (metadata.get("components", {}) if isinstance(metadata, dict) else {}).items():
            components[name].append(torch.as_tensor(values, dtype=torch.float32, device=accelerator.device))
    return gathered_mean_std(accelerator, "reward", components)


def eval_reward_stats(accelerator: Accelerator, eval_rewards: dict, prompt_image_data: list) -> dict[str, float]:
    """`eval/<name>/mean|std`: the out-of-domain rewards of this epoch's training samples, over all processes."""
    scores = defaultdict(list)
    for images, prompts, prompt_metadata, *_ in prompt_image_data:
        for name, values in score_images(eval_rewards, images, prompts, prompt_metadata).items():
            scores[name].append(values.to(accelerator.device))
    return gathered_mean_std(accelerator, "eval", scores)
