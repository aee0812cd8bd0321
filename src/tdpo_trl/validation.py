"""Checks where user code hands data back to the library: prompt functions, configuration values, and the weights
about to be written to disk (the reward contract is `tdpo_trl.rewards.contract`). Each error says what came back
(type, shape, first values) and what was expected.
"""

import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


# Text encoders read 77 (CLIP) to 512 (T5) tokens; a "prompt" far longer is a wrong file or column, and tokenizing
# megabytes of it takes minutes.
MAX_PROMPT_CHARS = 10_000
PROMPT_CONTRACT = "a prompt function must return one `(prompt, metadata)` pair: `prompt` a str, `metadata` e.g. `{}`"


def describe(value: Any, max_items: int = 4) -> str:
    """A short description of `value` for error messages: its type, shape/length and first values."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        flat = value.flatten()[:max_items].tolist() if value.ndim else [value.item()]
        flat = [float(f"{v:.4g}") if isinstance(v, float) else v for v in flat]
        return f"{type(value).__name__} of shape {tuple(value.shape)}, dtype {value.dtype}, first values {flat}"
    if isinstance(value, str):
        return f"str {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple)):
        items = ", ".join(describe_short(v) for v in value[:max_items]) + (", ..." if len(value) > max_items else "")
        return f"{type(value).__name__} of length {len(value)}: [{items}]"
    return f"{type(value).__name__} {value!r}"[:120]


def describe_short(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__}{tuple(value.shape)}"
    return repr(value)[:40]


def check_prompt_output(result: Any, name: str = "prompt function") -> tuple[str, Any]:
    """`(prompt, metadata)` from what a prompt function returned, or a `ValueError` saying what came back."""
    if isinstance(result, str):
        raise ValueError(f"{name} returned the bare {describe(result)}; {PROMPT_CONTRACT}, e.g. `({result!r}, {{}})`")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"{name} returned {describe(result)}; {PROMPT_CONTRACT}, e.g. `('a photo of a cat', {{}})`")
    prompt, metadata = result
    if not isinstance(prompt, str):
        raise ValueError(f"{name} returned a prompt that is {describe(prompt)}, not a str; {PROMPT_CONTRACT}")
    check_prompt_length(prompt, f"a prompt of {name}")
    return prompt, metadata


def check_prompt_length(prompt: str, what: str) -> str:
    """`prompt`, or a `ValueError` if it is longer than `MAX_PROMPT_CHARS` (no text encoder reads that far)."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{what} is {len(prompt):,} characters long ({prompt[:40]!r}...); a prompt may have at most "
            f"{MAX_PROMPT_CHARS:,} (text encoders read 77 to 512 tokens): is this the right file or column?"
        )
    return prompt


class CheckedPromptFunction:
    """Wraps a prompt function so that every `(prompt, metadata)` it returns is checked."""

    def __init__(self, function: Callable):
        if not callable(function):
            raise TypeError(f"`prompt_function` must be callable, got {describe(function)}")
        self.function = function
        self.name = f"prompt function {getattr(function, '__name__', type(function).__name__)!r}"

    def __call__(self) -> tuple[str, Any]:
        return check_prompt_output(self.function(), self.name)


def non_finite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in named_tensors if t.is_floating_point() and not torch.isfinite(t).all()]


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str, destination: str):
    """Raise before anything non-finite is written: `what` (e.g. "the LoRA") to `destination`."""
    bad = non_finite_tensors(named_tensors)
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise FloatingPointError(
            f"refusing to write {what} to {destination!r}: {len(bad)} tensor(s) hold NaN or inf ({listed}). "
            "Nothing was written; resume from the last checkpoint and lower the learning rate or check the reward."
        )


@contextmanager
def field_errors(field: str):
    """Prefix a `ValueError` / `FileNotFoundError` raised inside with the name of the field whose value caused it."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"`{field}`: {err}") from err


def check_writable_folder(path: str, field: str) -> str:
    """Create `path` if needed and check that a file can be written in it; a `ValueError` naming `field` if not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"`{field}` {path!r} cannot be created or written to: {err.strerror or err}") from None
    return path
