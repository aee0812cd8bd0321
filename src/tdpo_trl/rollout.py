"""One epoch's sampled trajectories (`Rollout`), which of their denoising steps are trained (`TrainedSteps`), and
how they are shuffled into minibatches.

Shapes: N samples, T sampled denoising steps, k trained steps (k <= T).
"""

from collections.abc import Iterator, MutableMapping
from typing import Optional

import torch


# what sampling records per denoising step, `(N, T, ...)`
SAMPLED_STEP_KEYS = ("timesteps", "latents", "next_latents", "log_probs")
# every entry indexed by denoising step: permuted along that axis before training
PER_STEP_KEYS = (
    "timesteps",
    "latents",
    "next_latents",
    "log_probs",
    "advantages",
    "critic_features",
    "values",
    "returns",
)


class Rollout(MutableMapping):
    """Batch-first tensors of sampled trajectories, read and written like a dict (callbacks receive it as `samples`).

    Entries: `timesteps`, `log_probs` `(N, T)`; `latents` / `next_latents` `(N, T, ...)` (x_t before and after each
    step); the prompts' conditioning (`prompt_embeds`, ... and their `negative_` counterparts); with a critic
    `critic_features` `(N, T or k, D)` and `values` `(N, T or k)`; after scoring `advantages` (and `returns`)
    `(N, k)` and `task_index` `(N,)`.
    """

    def __init__(self, entries: Optional[dict[str, torch.Tensor]] = None):
        self._entries: dict[str, torch.Tensor] = dict(entries or {})

    @classmethod
    def cat(cls, rollouts: list) -> "Rollout":
        """Concatenate along samples: each entry becomes `(sum of N, ...)`."""
        return cls({key: torch.cat([r[key] for r in rollouts]) for key in rollouts[0]})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key]

    def __setitem__(self, key: str, value: torch.Tensor):
        self._entries[key] = value

    def __delitem__(self, key: str):
        del self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._entries.items())
        return f"Rollout({shapes})"

    @property
    def num_samples(self) -> int:
        return len(self["timesteps"])

    def rows(self, index) -> "Rollout":
        """The samples at `index` (a slice or an index tensor), every entry."""
        return Rollout({key: value[index] for key, value in self._entries.items()})

    def per_step(self, index: torch.Tensor, keys=PER_STEP_KEYS) -> "Rollout":
        """The per-step entries named in `keys` reindexed along their step axis by `index` `(N, k)`; the others
        kept."""
        rows = torch.arange(len(index), device=index.device)[:, None]
        return Rollout({k: v[rows, index] if k in keys else v for k, v in self._entries.items()})

    def conditioning(self, keys) -> dict[str, torch.Tensor]:
        """The prompts' conditioning entries named `keys` and their `negative_` counterparts."""
        return {k: v for k, v in self._entries.items() if k in keys or (k.startswith("negative_") and k[9:] in keys)}


def sample_rollout(
    pipeline, prompts: list[str], negative_conditioning: dict, config, device, autocast
) -> tuple[Rollout, torch.Tensor]:
    """Sample one batch of `prompts` through `pipeline.sample_with_log_probs` (the config's steps, guidance and eta;
    under `autocast`). Returns the `Rollout` (with `prompt_ids`) and the images `(B, 3, H, W)` in [0, 1]."""
    batch = len(prompts)
    negative = {k: v.repeat(batch, *[1] * (v.ndim - 1)) for k, v in negative_conditioning.items()}  # (B, ...) each
    with torch.no_grad():
        prompt_ids, conditioning = pipeline.encode_prompts(prompts, device)
    with autocast():
        output = pipeline.sample_with_log_probs(
            conditioning,
            negative,
            num_inference_steps=config.sample_num_steps,
            guidance_scale=config.sample_guidance_scale,
            eta=config.sample_eta,
        )
    rollout = Rollout({"prompt_ids": prompt_ids, **conditioning, "timesteps": output.timesteps})
    rollout["latents"] = output.latents[:, :-1]  # (B, T, ...): x_t before each step
    rollout["next_latents"] = output.latents[:, 1:]  # (B, T, ...): x_t after each step
    rollout["log_probs"] = output.log_probs
    rollout.update({f"negative_{k}": v for k, v in negative.items()})
    return rollout, output.images


def step_permutations(num_samples: int, num_steps: int, device, num_trainable: Optional[int] = None) -> torch.Tensor:
    """An independent random order of the denoising steps for each sample, `(N, T)`, from the global RNG. With
    `num_trainable < T` only the first `num_trainable` steps are shuffled; the others stay last, in order."""
    num_trainable = num_steps if num_trainable is None else num_trainable
    rest = torch.arange(num_trainable, num_steps, device=device)
    return torch.stack([torch.cat([torch.randperm(num_trainable, device=device), rest]) for _ in range(num_samples)])


class TrainedSteps:
    """Which denoising steps of each trajectory are trained, decided in one place.

    Of `num_steps` sampled steps, the first `num_trainable` may be trained (the final step may be left out,
    `train_final_step`); each sample trains `num_trained` of them (`train_timestep_fraction`), drawn at random.
    With one inner epoch and fewer steps trained than sampled, the draw happens at sampling time (`draw`), so that
    the critic embeds only the trained x_t; otherwise each inner epoch draws its own (`shuffle_and_batch`).
    """

    def __init__(self, num_steps: int, num_trainable: int, num_trained: int, num_inner_epochs: int):
        self.num_steps, self.num_trainable, self.num_trained = num_steps, num_trainable, num_trained
        self.drawn_at_sampling = num_trained < num_steps and num_inner_epochs == 1

    @classmethod
    def from_config(cls, config, train_final_step: bool) -> "TrainedSteps":
        """The steps a `TDPOConfig` trains (`sample_num_steps`, `train_timestep_fraction`, `train_num_inner_epochs`),
        the final one only if `train_final_step`."""
        config.check_num_train_timesteps(train_final_step)
        return cls(
            config.sample_num_steps,
            config.num_trainable_steps(train_final_step),
            config.num_train_timesteps(train_final_step),
            config.train_num_inner_epochs,
        )

    def draw(self, num_samples: int, device) -> torch.Tensor:
        """`(N, k)`: the steps each sample will train (`drawn_at_sampling`), stored as the rollout's `trained_steps`
        until `keep_drawn` applies it."""
        return step_permutations(num_samples, self.num_steps, device, self.num_trainable)[:, : self.num_trained]

    @staticmethod
    def keep_drawn(rollout: Rollout) -> Rollout:
        """Reduce the sampled per-step entries `(N, T, ...)` to the drawn steps `(N, k, ...)` (once the returns, which
        need every step, are computed); the critic's entries were computed for those steps only."""
        trained_steps = rollout.pop("trained_steps")  # (N, k)
        return rollout.per_step(trained_steps, SAMPLED_STEP_KEYS)

    def shuffle_and_batch(self, rollout: Rollout, batch_size: int) -> list[Rollout]:
        """Shuffle the samples, permute the steps of each independently, and split into minibatches of
        `batch_size`; a rollout already reduced to its drawn steps (`(N, k)`) has only trainable steps."""
        device = rollout["timesteps"].device
        num_samples, num_steps = rollout["timesteps"].shape
        rollout = rollout.rows(torch.randperm(num_samples, device=device))
        num_trainable = min(num_steps, self.num_trainable)
        rollout = rollout.per_step(step_permutations(num_samples, num_steps, device, num_trainable))  # (N, T)
        return [rollout.rows(slice(i, i + batch_size)) for i in range(0, num_samples, batch_size)]
