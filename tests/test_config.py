import dataclasses
import json
import math

import pytest
from transformers import HfArgumentParser
from trl import DDPOConfig

from tdpo_trl import TDPOConfig


def test_subclasses_ddpo_config_with_paper_defaults():
    config = TDPOConfig()
    assert isinstance(config, DDPOConfig)
    assert config.use_critic is True
    assert config.critic_learning_rate == 1e-4
    assert (config.critic_adam_beta1, config.critic_adam_beta2) == (0.9, 0.999)
    assert (config.critic_adam_epsilon, config.critic_adam_weight_decay) == (1e-8, 1e-4)
    assert config.critic_value_clip_range == 0.2
    assert config.critic_loss_coef == 1.0
    assert config.critic_max_grad_norm == 1.0
    assert config.critic_hidden_sizes == [1024, 128, 64, 16]
    assert config.gamma == 1.0
    assert config.normalize_temporal_advantages is True
    assert config.critic_encoder == "openai/clip-vit-large-patch14"
    # per-prompt reward statistics (buffer 32, min count 16) and one scored step per sample, as the official code
    assert config.per_prompt_stat_tracking is True
    assert (config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count) == (32, 16)
    assert config.neuron_reset_scoring == "one_step_per_sample"
    assert TDPOConfig(use_critic=False).per_prompt_stat_tracking is False  # DDPO's own default
    assert TDPOConfig(per_prompt_stat_tracking=False).per_prompt_stat_tracking is False


def test_advantage_clipping_defaults_to_off_for_tdpo_and_5_for_ddpo():
    assert math.isinf(TDPOConfig().train_adv_clip_max)
    assert TDPOConfig(use_critic=False).train_adv_clip_max == 5.0
    assert TDPOConfig(train_adv_clip_max=2.0).train_adv_clip_max == 2.0


def test_neuron_reset_defaults_to_on_for_tdpo_and_off_for_ddpo():
    config = TDPOConfig()
    assert config.neuron_reset is True
    assert (config.neuron_reset_frequency, config.neuron_reset_threshold, config.neuron_reset_target) == (
        10,
        0.0,
        "active",
    )
    assert TDPOConfig(use_critic=False).neuron_reset is False
    assert TDPOConfig(neuron_reset=False).neuron_reset is False


def test_every_field_has_help_and_a_docstring_entry():
    own = {f.name for f in dataclasses.fields(TDPOConfig)} - {f.name for f in dataclasses.fields(DDPOConfig)}
    assert own, "TDPOConfig adds no field"
    for field in dataclasses.fields(TDPOConfig):
        assert field.metadata.get("help"), f"{field.name} has no help"
    for name in own:
        assert f"{name} (`" in TDPOConfig.__doc__, f"{name} is missing from the TDPOConfig docstring"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_batch_size": 0}, r"`sample_batch_size` must be >= 1, got 0"),
        ({"critic_learning_rate": -1.0}, r"`critic_learning_rate` must be > 0, got -1.0"),
        ({"critic_value_clip_range": -0.1}, r"`critic_value_clip_range` must be >= 0, got -0.1"),
        ({"gamma": 1.5}, r"`gamma` must be in \[0, 1\], got 1.5"),
        ({"train_timestep_fraction": 0.0}, r"`train_timestep_fraction` must be in \(0, 1\], got 0.0"),
        ({"sample_num_steps": 4, "train_timestep_fraction": 0.2}, r"4 \* 0.2 trains on no timestep"),
        (
            {"sample_batch_size": 4, "train_batch_size": 3},
            r"`sample_batch_size` \(4\) must be a multiple of `train_batch_size` \(3\)",
        ),
        (
            {
                "sample_batch_size": 2,
                "sample_num_batches_per_epoch": 3,
                "train_batch_size": 2,
                "train_gradient_accumulation_steps": 2,
            },
            r"3 minibatches per epoch .* not a multiple of `train_gradient_accumulation_steps` \(2\)",
        ),
        (
            {"critic_hidden_sizes": [8, 4], "critic_dropout": [0.1]},
            r"2 hidden sizes \[8, 4\] but 1 dropout values \[0.1\]",
        ),
        ({"critic_dropout": [0.2, 0.2, 0.1, 1.0]}, r"`critic_dropout` values must be in \[0, 1\)"),
        ({"critic_activation": "swish"}, r"`critic_activation` must be one of .* got 'swish'"),
        (
            {"use_critic": False, "neuron_reset": True},
            r"`neuron_reset=True` needs a critic, but `use_critic` is False",
        ),
        ({"neuron_reset_target": "random"}, r"`neuron_reset_target` must be one of .* got 'random'"),
        ({"neuron_reset_frequency": 0}, r"`neuron_reset_frequency` must be >= 1, got 0"),
        ({"neuron_reset_threshold": -0.5}, r"`neuron_reset_threshold` must be a finite number >= 0, got -0.5"),
        ({"neuron_reset_scoring": "some"}, r"`neuron_reset_scoring` must be one of .* got 'some'"),
        ({"per_prompt_stat_tracking_buffer_size": 0}, r"`per_prompt_stat_tracking_buffer_size` must be >= 1, got 0"),
        ({"neuron_reset_scoring_size": 0}, r"`neuron_reset_scoring_size` must be None or >= 1, got 0"),
        ({"tracker_kwargs": "{not json"}, r"`tracker_kwargs`: expected a JSON object, got '\{not json'"),
        ({"project_kwargs": "[1, 2]"}, r"`project_kwargs`: expected a JSON object, got '\[1, 2\]'"),
        ({"log_with": "mlflow"}, r"`log_with` must be None, 'wandb' or 'tensorboard', got 'mlflow'"),
        (
            {"train_lr_scheduler": "step"},
            r"`train_lr_scheduler` must be one of \('constant', 'linear', 'cosine'\), got 'step'",
        ),
        (
            {"num_epochs": 10, "train_lr_warmup_epochs": 10},
            r"`train_lr_warmup_epochs` must be in \[0, num_epochs\) = \[0, 10\), got 10",
        ),
    ],
)
def test_bad_values_raise_errors_that_name_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TDPOConfig(**kwargs)


def test_every_field_is_settable_from_the_command_line():
    args = [
        "--use_critic", "false",
        "--critic_encoder", "latents",
        "--critic_hidden_sizes", "64", "16",
        "--critic_dropout", "0.1", "0.0",
        "--critic_activation", "relu",
        "--critic_learning_rate", "3e-4",
        "--critic_value_clip_range", "0",
        "--gamma", "0.9",
        "--no_normalize_temporal_advantages",
        "--train_adv_clip_max", "3",
        "--tracker_kwargs", json.dumps({"wandb": {"entity": "me"}}),
        "--project_kwargs", '{"project_dir": "/tmp/x"}',
        "--accelerator_kwargs", "{}",
        "--sample_num_steps", "20",
    ]  # fmt: skip
    (config,) = HfArgumentParser(TDPOConfig).parse_args_into_dataclasses(args)
    assert config.use_critic is False
    assert config.critic_encoder == "latents"
    assert config.critic_hidden_sizes == [64, 16]
    assert config.critic_dropout == [0.1, 0.0]
    assert config.critic_activation == "relu"
    assert config.critic_learning_rate == 3e-4
    assert config.critic_value_clip_range == 0.0
    assert config.gamma == 0.9
    assert config.normalize_temporal_advantages is False
    assert config.train_adv_clip_max == 3.0
    assert config.tracker_kwargs == {"wandb": {"entity": "me"}}
    assert config.project_kwargs == {"project_dir": "/tmp/x"}
    assert config.accelerator_kwargs == {}
    assert config.sample_num_steps == 20


def test_dict_fields_accept_json_strings_in_python():
    config = TDPOConfig(tracker_kwargs='{"wandb": {"name": "run"}}')
    assert config.tracker_kwargs == {"wandb": {"name": "run"}}
    assert isinstance(config.to_dict(), dict)
