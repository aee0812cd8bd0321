"""The `tdpo-trl` command: `demo`, `train` and `evaluate`.

    tdpo-trl demo                         # TDPO-R on the shipped digits model, ~8 min on 2 CPU cores
    tdpo-trl train --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic --use_lora
    tdpo-trl evaluate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --runs tdpo=outputs/tdpo ddpo=outputs/ddpo \\
        --target_reward aesthetic --eval_rewards pickscore imagereward hpsv2 --output_dir eval

A user error (a bad flag value, a missing file, an unknown name, an unwritable folder) prints one line naming the flag
and the value and exits with status 2; `--debug` (or `TDPO_TRL_DEBUG=1`) shows the traceback instead.
"""

import argparse
import os
import re
import sys
from typing import Optional

from ..disk_space import DiskFullError
from ..hub import HubUploadError


DEBUG_ENV = "TDPO_TRL_DEBUG"
# What a user's mistake raises (config validation, missing files, damaged checkpoints); anything else is a bug and
# keeps its traceback.
USER_ERRORS = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
    DiskFullError,  # says what was being written and what is kept
    HubUploadError,  # the Hub could not be reached or refused: the message says where the saved files are
)  # fmt: skip


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` report a bad flag in one line (`prog: error: ...`, exit status 2) instead of its whole usage."""

    def error(message):
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error
    return parser


def _as_flags(message: str) -> str:
    """`num_epochs` -> --num_epochs in an error message: the command line user knows fields as flags."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", r"--\1", message)


def _parse_runs(values: list[str]) -> dict[str, str]:
    runs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = value.rstrip("/").split("/")[-1], value
        if not name or not path:
            raise ValueError(f"`runs`: expected NAME=PATH or PATH, got {value!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"`runs`: {path!r} (run {name!r}) does not exist")
        runs[name] = path
    return runs


def _reward_kwargs(text: str, specs: list[str]) -> dict[str, dict]:
    """`--reward_kwargs` of `tdpo-trl evaluate`: a JSON object mapping reward specs given to keyword arguments."""
    import json

    expected = 'a JSON object of keyword arguments per reward given, e.g. \'{"composition": {"threshold": 0.3}}\''
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`reward_kwargs` {text!r} is not JSON ({err}); expected {expected}") from None
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ValueError(f"`reward_kwargs` must be {expected}, got {text!r}")
    unknown = sorted(set(kwargs) - set(specs))
    if unknown:
        raise ValueError(f"`reward_kwargs` names {unknown}, which are not among the rewards given: {specs}")
    return kwargs


def evaluate_command(args) -> dict:
    import torch

    from ..evaluation import evaluate_checkpoints, plot_cross_reward
    from ..loading import check_model_reference, load_pretrained
    from ..prompts import RepeatedPrompts, get_prompt_function
    from ..rewards import get_reward_function, short_name
    from ..validation import check_writable_folder, field_errors

    runs = _parse_runs(args.runs)  # every user input is checked before the model loads
    check_writable_folder(args.output_dir, "output_dir")
    check_model_reference(args.base, "base", ("tiny", "tiny-sdxl", "digits"))
    kwargs = _reward_kwargs(args.reward_kwargs, [args.target_reward, *args.eval_rewards])
    with field_errors("target_reward"):
        target_reward = get_reward_function(args.target_reward, **kwargs.get(args.target_reward, {}))
    with field_errors("eval_rewards"):
        eval_rewards = {short_name(s): get_reward_function(s, **kwargs.get(s, {})) for s in args.eval_rewards}
    with field_errors("prompts"):
        prompt_fn = get_prompt_function(args.prompts, seed=args.seed, template=args.prompt_template)
    if args.base == "tiny":
        from ..tiny_models import tiny_stable_diffusion

        pipeline = tiny_stable_diffusion(seed=0)
    elif args.base == "tiny-sdxl":
        from ..tiny_models import tiny_stable_diffusion_xl

        pipeline = tiny_stable_diffusion_xl(seed=0)
    elif args.base == "digits":
        from ..digits import load_digits_pipeline

        pipeline = load_digits_pipeline()
    else:
        from diffusers import DiffusionPipeline  # the class the model folder names: SD 1.x/2.x, SDXL

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        pipeline = load_pretrained(DiffusionPipeline.from_pretrained, args.base, "base", torch_dtype=dtype)
        if hasattr(pipeline, "safety_checker"):
            pipeline.safety_checker = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.to(device)
    # distribution-level rewards score prompt groups: each drawn prompt fills `prompt_repeats` consecutive samples
    repeats = args.prompt_repeats or getattr(target_reward, "default_prompt_repeats", 1)
    prompt_fn = RepeatedPrompts(prompt_fn, repeats)
    prompts = [prompt_fn()[0] for _ in range(args.num_prompts)]
    results = evaluate_checkpoints(
        pipeline,
        runs,
        target_reward,
        eval_rewards,
        prompts,
        seed=args.seed,
        num_inference_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        output_dir=args.output_dir,
        resolution=args.resolution,
    )
    figure_path = f"{args.output_dir}/cross_reward.png"
    figure = plot_cross_reward(results, list(eval_rewards), figure_path, target_name=args.target_reward)
    names = ["target", *eval_rewards]
    print(f"\n{'run':<12} {'checkpoint':<16} " + " ".join(f"{n[:14]:>14}" for n in names))
    for run, records in results.items():
        for record in records:
            print(f"{run:<12} {record['checkpoint']:<16} " + " ".join(f"{record[n]:>14.4f}" for n in names))
    print(f"\nfigure: {figure_path}\nscores: {args.output_dir}/cross_reward.json\ngrids:  {args.output_dir}/grids/")
    return {"results": results, "figure": figure}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdpo-trl",
        description="TDPO-R for text-to-image diffusion models.",
        epilog=f"--debug (or {DEBUG_ENV}=1) shows the traceback of an error.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("demo", "TDPO-R with LoRA on the shipped digits model and its learned ink reward (minutes on a CPU)"),
        ("train", "fine-tune any diffusers Stable Diffusion model; every TDPOConfig field is a flag"),
    ):
        commands.add_parser(name, help=f"{help_text}; `tdpo-trl {name} --help` lists the flags", add_help=False)
    evaluate = commands.add_parser(
        "evaluate",
        help="score saved checkpoints with a target and out-of-domain rewards; draw the cross-reward figure",
    )
    evaluate.add_argument(
        "--base", required=True, help="base Stable Diffusion / SDXL id or folder, 'digits', 'tiny' or 'tiny-sdxl'"
    )
    evaluate.add_argument(
        "--runs", nargs="+", required=True, help="NAME=PATH per run: a run folder (its checkpoints/) or a saved folder"
    )
    evaluate.add_argument("--target_reward", required=True, help="reward name or dotted path the runs trained on")
    evaluate.add_argument("--eval_rewards", nargs="+", required=True, help="out-of-domain reward names or paths")
    evaluate.add_argument(
        "--reward_kwargs",
        default="{}",
        help='JSON: keyword arguments per reward given, e.g. \'{"composition": {"threshold": 0.3}}\'',
    )
    evaluate.add_argument("--prompts", default="simple_animals", help="built-in set, text file or dataset:<id>")
    evaluate.add_argument("--prompt_template", default="{}", help="e.g. 'a photo of a {}'")
    evaluate.add_argument("--num_prompts", type=int, default=16, help="images per checkpoint")
    evaluate.add_argument(
        "--prompt_repeats",
        type=int,
        default=None,
        help="each drawn prompt fills this many consecutive images (groups for distribution-level rewards); "
        "default: the target reward's default_prompt_repeats (4 for diversity), else 1",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--num_steps", type=int, default=20)
    evaluate.add_argument("--guidance_scale", type=float, default=5.0)
    evaluate.add_argument("--eta", type=float, default=1.0)
    evaluate.add_argument(
        "--resolution", type=int, default=None, help="image side in pixels; default: the model's own (FLUX: 1024)"
    )
    evaluate.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--output_dir", default="outputs/evaluate")
    evaluate.set_defaults(handler=evaluate_command)
    one_line_errors(evaluate)
    return one_line_errors(parser)


HF_ARGUMENT_COMMANDS = {"demo": "demo", "train": "train"}  # parsed by HfArgumentParser in tdpo_trl.commands.<module>


def main(argv: Optional[list[str]] = None):
    """Run a command; errors propagate (the console script turns user errors into one line, see `entry_point`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HF_ARGUMENT_COMMANDS:
        import importlib

        module = importlib.import_module(f"tdpo_trl.commands.{HF_ARGUMENT_COMMANDS[argv[0]]}")
        return module.cli(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "num_prompts", 1) < 1:
        raise ValueError(f"`num_prompts` must be >= 1, got {args.num_prompts}")
    if getattr(args, "resolution", None) is not None and (args.resolution < 8 or args.resolution % 8):
        raise ValueError(f"`resolution` must be a multiple of 8 (as diffusers pipelines need), got {args.resolution}")
    if getattr(args, "prompt_repeats", None) is not None and args.prompt_repeats < 1:
        raise ValueError(f"`prompt_repeats` must be >= 1, got {args.prompt_repeats}")
    return args.handler(args)


def entry_point(argv: Optional[list[str]] = None):
    """The `tdpo-trl` console script. A user error prints one line naming the flag and exits with status 2 (with
    `--debug` or `TDPO_TRL_DEBUG=1`: the traceback). Returns nothing, so the exit status is 0 on success."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        command = f"tdpo-trl {argv[0]}" if argv and not argv[0].startswith("-") else "tdpo-trl"
        message = " ".join(_as_flags(str(err)).split())  # one line
        print(f"{command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry_point()
