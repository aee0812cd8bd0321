"""Model cards for adapters trained with `TDPOTrainer`, built with huggingface_hub's `ModelCard`."""

import os
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from .rewards import reward_name


TAGS = ["text-to-image", "diffusers", "lora", "trl", "ddpo", "tdpo", "reinforcement-learning"]

CITATIONS = """\
```bibtex
@inproceedings{zhang2024confronting,
  title = {Confronting Reward Overoptimization for Diffusion Models: A Perspective of Inductive and Primacy Biases},
  author = {Ziyi Zhang and Sen Zhang and Yibing Zhan and Yong Luo and Yonggang Wen and Dacheng Tao},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  pages = {60396--60413},
  year = {2024},
}

@inproceedings{black2024training,
  title = {Training Diffusion Models with Reinforcement Learning},
  author = {Kevin Black and Michael Janner and Yilun Du and Ilya Kostrikov and Sergey Levine},
  booktitle = {The Twelfth International Conference on Learning Representations},
  year = {2024},
}
```"""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

## Use

```python
{{ usage }}
```

Download the files with `hf download {{ repo_id }} --local-dir {{ local_name }}` (`huggingface-cli download` before
huggingface_hub 1.0).

## Training

- Algorithm: {{ algorithm }}
- Reward: {{ rewards }}
- Trained weights: {{ trained }}

| hyperparameter | value |
| --- | --- |
{% for name, value in hyperparameters %}| `{{ name }}` | {{ value }} |
{% endfor %}
{% if metrics %}
## Metrics

| metric | first epoch | last epoch |
| --- | --- | --- |
{% for name, start, end in metrics %}| `{{ name }}` | {{ start }} | {{ end }} |
{% endfor %}
Rewards under `eval/` and `heldout/` were not trained on: they show what the gain in the target reward cost.
{% endif %}
{% if note %}
**{{ note }}**
{% endif %}
Trained with tdpo-trl {{ version }} (TDPO-R on TRL's DDPO trainer).

## Citations

{{ citations }}
"""

HYPERPARAMETERS = (
    "num_epochs",
    "sample_num_steps",
    "sample_batch_size",
    "sample_num_batches_per_epoch",
    "sample_guidance_scale",
    "sample_eta",
    "train_batch_size",
    "train_gradient_accumulation_steps",
    "train_learning_rate",
    "train_clip_range",
    "train_num_inner_epochs",
    "train_timestep_fraction",
    "train_final_step",
    "critic_encoder",
    "critic_learning_rate",
    "gamma",
    "neuron_reset",
    "neuron_reset_frequency",
    "neuron_reset_target",
    "mixed_precision",
    "seed",
)
METRICS = (
    "epoch",
    "reward/mean",
    "reward/std",
    "policy/approx_kl",
    "critic/explained_variance",
    "neurons/dormant_fraction",
)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def create_model_card(
    *,
    config,
    base_model: Optional[str],
    repo_id: Optional[str],
    reward_names: list[str],
    use_lora: bool,
    lora_config=None,
    final_metrics: Optional[dict] = None,
    start_metrics: Optional[dict] = None,
    note: Optional[str] = None,
    version: str = "",
    pipeline_class: str = "StableDiffusionPipeline",
    denoiser: tuple[str, str] = ("unet", "UNet2DConditionModel"),
) -> ModelCard:
    """A diffusers text-to-image card: metadata, a usage snippet, the reward, key hyperparameters, final metrics and
    citations of TDPO-R and DDPO. `pipeline_class`: the diffusers pipeline the usage snippet loads the base with;
    `denoiser`: the trained network's (subfolder, diffusers class) for a full fine-tune."""
    algorithm = "TDPO-R (temporal critic, active-neuron reset)" if config.use_critic else "DDPO"
    if config.use_critic and not config.neuron_reset:
        algorithm = "TDPO (temporal critic, no neuron reset)"
    tags = TAGS if use_lora else [t for t in TAGS if t != "lora"]
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        pipeline_tag="text-to-image",
        tags=tags,
        license=None,
    )
    repo = repo_id or "<your-repo-id>"
    dtype = "bfloat16" if pipeline_class == "FluxPipeline" else "float16"  # FLUX.1 is published and run in bf16
    base = base_model or "<base-model-id>"
    if use_lora:
        usage = (
            f"import torch\nfrom diffusers import {pipeline_class}\n\n"
            f'pipe = {pipeline_class}.from_pretrained("{base}", torch_dtype=torch.{dtype}).to("cuda")\n'
            f'pipe.load_lora_weights("{repo}")\n'
            f'image = pipe("a photo of a cat", num_inference_steps=50, guidance_scale={config.sample_guidance_scale})'
            ".images[0]"
        )
        trained = (
            f"LoRA (r={lora_config.r}, alpha={lora_config.lora_alpha}, "
            f"targets {sorted(lora_config.target_modules)}) in diffusers format"
        )
    else:
        usage = (
            f"import torch\nfrom diffusers import {pipeline_class}, {denoiser[1]}\n\n"
            f'{denoiser[0]} = {denoiser[1]}.from_pretrained("{repo}", subfolder="{denoiser[0]}", '
            f"torch_dtype=torch.{dtype})\n"
            f'pipe = {pipeline_class}.from_pretrained("{base}", {denoiser[0]}={denoiser[0]}, '
            f"torch_dtype=torch.{dtype})\n"
            'image = pipe.to("cuda")("a photo of a cat").images[0]'
        )
        trained = f"the whole {'UNet' if denoiser[0] == 'unet' else 'transformer'} (`{denoiser[0]}/`)"
    title = f"{repo_id.split('/')[-1]}" if repo_id else f"{algorithm.split(' ')[0]} fine-tune of {base}"
    description = (
        f"A {'LoRA adapter for' if use_lora else 'fine-tuned ' + denoiser[0] + ' of'} `{base}`, trained by "
        f"reinforcement learning with {algorithm} to maximize the reward {', '.join(f'`{r}`' for r in reward_names)}."
    )
    if pipeline_class == "FluxPipeline":  # `sample_guidance_scale` below means something else than for SD
        description += (
            f" It was sampled with FLUX.1's distilled guidance {config.sample_guidance_scale:g}: an input of the "
            "transformer (`guidance_scale` in diffusers), not classifier-free guidance."
        )
    hyperparameters = [(name, _format(getattr(config, name))) for name in HYPERPARAMETERS if hasattr(config, name)]
    final_metrics, start_metrics = final_metrics or {}, start_metrics or {}
    judged = sorted(k for k in final_metrics if k.startswith(("eval/", "heldout/")) and k.endswith("/mean"))
    metrics = [
        (name, _format(start_metrics.get(name, "")), _format(final_metrics[name]))
        for name in (*METRICS, *judged)
        if name in final_metrics
    ]
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=title,
        description=description,
        usage=usage,
        repo_id=repo,
        local_name=repo.split("/")[-1],
        algorithm=algorithm,
        rewards=", ".join(f"`{r}`" for r in reward_names),
        trained=trained,
        hyperparameters=hyperparameters,
        metrics=metrics,
        note=note,
        version=version,
        citations=CITATIONS,
    )


def trained_reward_names(tasks: list, multi_task: bool) -> list[str]:
    """The trained rewards, for the model card (a combined reward lists its components; with several tasks
    `<task>: <reward>`)."""
    names = []
    for task in tasks:
        function = task.reward_function
        found = getattr(function, "reward_names", None)
        found = list(found) if found else [reward_name(function)]
        names.extend(f"{task.name}: {n}" for n in found) if multi_task else names.extend(found)
    return names


def hub_base_model(pipeline) -> Optional[str]:
    """The base model's Hub id, if `pipeline` was loaded by id (not from a local folder or built in memory)."""
    name = getattr(pipeline, "pretrained_model", None)
    if not isinstance(name, str) or not name or os.path.exists(name):  # a local folder is not a Hub id
        return None
    return name
