"""The shipped accelerate config files (examples/accelerate/) are read by accelerate's own launcher code."""

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env


CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def launch_environment(name: str):
    """`(args, env)`: what `accelerate launch --config_file <name>.yaml examples/tdpo.py` starts processes with."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "examples/tdpo.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "name, processes, machines",
    [("multi_gpu", 8, 1), ("multi_node", 16, 2), ("deepspeed_zero2", 8, 1), ("fsdp", 8, 1)],
)
def test_accelerate_reads_the_shipped_configs(name, processes, machines):
    args, env = launch_environment(name)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if name == "deepspeed_zero2":
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()  # what the Accelerator builds from that environment
        assert plugin.zero_stage == 2 and plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    if name == "fsdp":
        assert args.use_fsdp
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_USE_ORIG_PARAMS"] == "true"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BasicTransformerBlock"


def test_the_fsdp_wrap_class_is_the_unets_transformer_block():
    from diffusers.models.attention import BasicTransformerBlock

    from tdpo_trl.tiny_models import tiny_stable_diffusion_xl

    unet = tiny_stable_diffusion_xl().unet
    assert any(isinstance(m, BasicTransformerBlock) for m in unet.modules())
