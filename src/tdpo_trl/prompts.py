"""Prompt functions: `prompt_fn() -> (prompt, metadata)`, drawn from built-in sets, text files or `datasets`.

Sampling uses its own seeded `random.Random`, so a prompt stream is reproducible and independent of the global RNG.
Streaming datasets (millions of prompts) are read through a shuffle buffer and never loaded whole. Every source has
`state_dict()` / `load_state_dict()`: the trainer checkpoints it, and a resumed run draws the prompts an
uninterrupted run would have drawn.
"""

import itertools
import os
import random
import string
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any, Optional

from .validation import check_prompt_length


BUILTIN_PROMPT_SETS = ("simple_animals", "digits", "composition", "composition_heldout")  # tdpo_trl/prompt_sets/
# Bytes a streamed local text or JSON-lines file is read in (datasets' default is 10 MB: its chunk and the rows parsed
# from it dominate the memory of a stream; benchmarks/prompt_stream.py measures it).
STREAM_CHUNK_BYTES = 1 << 18


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [
            check_prompt_length(line.strip(), f"line {number} of the prompt file {path!r}")
            for number, line in enumerate(f, 1)
        ]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt file {path!r} holds no prompt (empty lines and # comments are skipped)")
    return prompts


def check_template(template, field: str = "template") -> str:
    """`template` is a str with exactly one empty `{}` field and nothing else to fill (`{{` and `}}` are literal
    braces); a `ValueError` naming `field` otherwise."""
    expected = "a str with exactly one '{}' (e.g. 'a photo of a {}'; '{}' uses the prompts as they are)"
    if not isinstance(template, str):
        raise ValueError(f"`{field}` must be {expected}, got {template!r}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:  # a lone '{' or '}'
        raise ValueError(f"`{field}` {template!r} is not a valid format string ({err}); expected {expected}") from None
    if fields != [""]:
        named = [f for f in fields if f]
        found = f"it names {named}" if named else f"it has {len(fields) or 'no'} '{{}}' field(s)"
        raise ValueError(f"`{field}` must be {expected}, got {template!r}: {found}")
    return template


class PromptSource:
    """A seeded prompt function over a fixed list of prompts.

    Args:
        prompts: the prompts (or subjects filled into `template`).
        template: a format string with one `{}`, e.g. `"a photo of a {}"`; `"{}"` uses prompts as they are.
        seed: seed of this source's own random stream.
    """

    def __init__(self, prompts: list[str], template: str = "{}", seed: int = 0):
        if not prompts:
            raise ValueError("a PromptSource needs at least one prompt")
        check_template(template)
        self.prompts, self.template, self.rng = list(prompts), template, random.Random(seed)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "PromptSource":
        """A built-in set (`BUILTIN_PROMPT_SETS`), e.g. `"simple_animals"`: the 45 animals of DDPO and TDPO-R."""
        if name not in BUILTIN_PROMPT_SETS:
            raise ValueError(f"unknown built-in prompt set {name!r}; expected one of {BUILTIN_PROMPT_SETS}")
        path = resources.files("tdpo_trl").joinpath("prompt_sets", f"{name}.txt")
        return cls(_read_lines(str(path)), **kwargs)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "PromptSource":
        """One prompt per line; empty lines and lines starting with `#` are skipped."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        return cls(_read_lines(path), **kwargs)

    def sample(self, n: int) -> list[str]:
        return [self()[0] for _ in range(n)]

    def __call__(self) -> tuple[str, dict]:
        return self.template.format(self.rng.choice(self.prompts)), {}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        self.rng.setstate(_as_rng_state(state["rng"]))


def _as_rng_state(state) -> tuple:
    """`random.Random` states come back from `torch.load` as lists; `setstate` wants the original tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class DatasetPromptSource:
    """Prompts from a `datasets` dataset column, local or on the Hub; `streaming=True` for sets too large to load.

    Non-streaming datasets are sampled uniformly with the seeded RNG. Streaming ones are shuffled through a buffer
    of `buffer_size` rows (seeded) and cycled, a new shuffle per pass. Extra keyword arguments go to
    `datasets.load_dataset` (e.g. `data_files=`); `dataset=` takes an already loaded one.
    """

    def __init__(
        self,
        path: str,
        column: str = "prompt",
        *,
        split: str = "train",
        name: Optional[str] = None,
        streaming: bool = False,
        buffer_size: int = 10_000,
        template: str = "{}",
        seed: int = 0,
        dataset=None,
        **load_kwargs,
    ):
        check_template(template)
        if dataset is None:
            import datasets

            if streaming and path in ("text", "json"):  # local files: read 256 KiB at a time, not 10 MB
                load_kwargs.setdefault("chunksize", STREAM_CHUNK_BYTES)
            dataset = datasets.load_dataset(path, name, split=split, streaming=streaming, **load_kwargs)
        features = getattr(dataset, "column_names", None) or list(getattr(dataset, "features", None) or [])
        if not features and streaming:  # a stream of unknown features (e.g. JSON lines): its first row tells
            features = list(next(iter(dataset), {}))
        if features and column not in features:
            raise ValueError(f"the dataset {path!r} has no column {column!r}; its columns are {features}")
        self.dataset, self.column, self.template, self.seed = dataset, column, template, seed
        self.is_text = path == "text"  # a prompt file read as a text dataset: `#` lines are comments
        self.streaming, self.buffer_size = streaming, buffer_size
        self.rng = random.Random(seed)
        self._epoch, self._consumed, self._iterator = 0, 0, None  # pass number, rows read in this pass
        if not streaming and len(dataset) == 0:
            raise ValueError(f"the dataset {path!r} (split {split!r}) is empty")

    def _open_pass(self, skip: int = 0):
        """Iterate pass `self._epoch` (its own shuffle seed), after skipping the `skip` rows already read."""
        shuffled = self.dataset.shuffle(seed=self.seed + self._epoch, buffer_size=self.buffer_size)
        self._iterator: Iterator = itertools.islice(iter(shuffled), skip, None)
        self._consumed = skip

    def _next_streamed(self) -> str:
        """The next prompt of the stream; blank rows (and, in a text file, `#` comment lines) are skipped."""
        passes_without_prompt = 0
        while passes_without_prompt < 2:  # a pass that ends restarts; two in a row without a prompt: none at all
            if self._iterator is None:
                self._open_pass()
                passes_without_prompt += 1
            try:
                row = next(self._iterator)
            except StopIteration:
                self._iterator, self._epoch = None, self._epoch + 1
                continue
            self._consumed += 1
            prompt = row[self.column]
            if isinstance(prompt, str) and prompt.strip() and not (self.is_text and prompt.lstrip().startswith("#")):
                return prompt
        raise ValueError("the streamed prompt dataset yields no prompts (no row that is not blank or a # comment)")

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict):
        """Restore the position; a stream is re-opened and fast-forwarded (rows are read, not kept) on next use."""
        self.rng.setstate(_as_rng_state(state["rng"]))
        self._epoch, self._consumed = int(state["epoch"]), int(state["consumed"])
        self._iterator = None
        if self.streaming and self._consumed:
            self._open_pass(skip=self._consumed)

    def __call__(self) -> tuple[str, dict]:
        if self.streaming:
            prompt = self._next_streamed()
        else:
            prompt = self.dataset[self.rng.randrange(len(self.dataset))][self.column]
        return self.template.format(prompt), {}


class RepeatedPrompts:
    """Each prompt of `prompt_function` returned `k` times in a row, so that a sampled batch holds groups of `k`
    images of one prompt (what distribution-level rewards such as `diversity` compare).

    The trainer wraps its prompt function in this when `TDPOConfig.prompt_repeats > 1`, and checks that every
    epoch's samples hold whole groups, so no group straddles an epoch.
    """

    def __init__(self, prompt_function: Callable[[], tuple[str, Any]], k: int):
        if k < 1:
            raise ValueError(f"`k` (prompt repeats) must be >= 1, got {k}")
        self.prompt_function, self.k = prompt_function, k
        self._current, self._left = None, 0

    def __call__(self) -> tuple[str, Any]:
        if self._left == 0:
            self._current, self._left = self.prompt_function(), self.k
        self._left -= 1
        return self._current

    def state_dict(self) -> dict:
        inner = self.prompt_function
        return {
            "left": self._left,
            "current": self._current,
            "inner": inner.state_dict() if has_state(inner) else None,
        }

    def load_state_dict(self, state: dict):
        self._left, self._current = int(state["left"]), state["current"]
        if state["inner"] is not None and has_state(self.prompt_function):
            self.prompt_function.load_state_dict(state["inner"])


def has_state(obj) -> bool:
    """Whether `obj` can be checkpointed (has `state_dict` and `load_state_dict`)."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def get_prompt_function(spec: str, *, template: str = "{}", seed: int = 0, column: str = "prompt", **kwargs):
    """A built-in set name, a text file, or a dataset given as `"dataset:<path or Hub id>"`."""
    if spec in BUILTIN_PROMPT_SETS:
        return PromptSource.from_name(spec, template=template, seed=seed)
    if spec.startswith("dataset:"):
        return DatasetPromptSource(spec[len("dataset:") :], column, template=template, seed=seed, **kwargs)
    if os.path.isfile(spec):
        return PromptSource.from_file(spec, template=template, seed=seed)
    raise ValueError(
        f"prompts {spec!r}: not a built-in set {BUILTIN_PROMPT_SETS}, not an existing file, and not 'dataset:<id>'"
    )
