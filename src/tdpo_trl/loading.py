"""Model ids and paths checked early, and loading errors that name the field, the value and what was tried."""

import difflib
import os
from collections.abc import Callable, Sequence
from typing import Any

from huggingface_hub import file_exists, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id


def check_model_reference(value: Any, field: str, names: Sequence[str] = ()) -> None:
    """Without touching the network: `value` is one of `names`, an existing local folder, or a valid Hub model id.

    Raises a `ValueError` naming `field` and `value` otherwise (with a close match among `names`, if any).
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{field}` must be a model id or a local folder, got {value!r}")
    if value in names or os.path.isdir(value):
        return
    hint = ""
    close = difflib.get_close_matches(value, list(names), n=1)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    if os.path.isfile(value):
        raise ValueError(f"`{field}` {value!r} is a file; expected a model folder or a Hub model id{hint}")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        expected = f"one of {list(names)}, " if names else ""
        raise ValueError(
            f"`{field}` {value!r} is neither {expected}a local folder (none at that path) nor a valid Hugging Face "
            f"Hub model id ({err}){hint}"
        ) from None
    if close and "/" not in value:  # one typo away from a built-in name, with no org: the name was meant
        raise ValueError(f"`{field}` {value!r} is no local folder and looks like a typo{hint}")


def load_pretrained(load: Callable, value: str, field: str, **kwargs):
    """`load(value, **kwargs)`; a missing folder or an unreachable/unknown Hub id becomes one `ValueError` naming
    `field`, `value` and what was tried."""
    try:
        return load(value, **kwargs)
    except OSError as err:  # diffusers and transformers raise OSError (EnvironmentError) for every not-found case
        if os.path.isdir(value):
            tried = f"the local folder {value!r} holds no loadable model"
        else:
            tried = (
                f"there is no local folder {value!r}, and the Hub id {value!r} is neither in the local cache nor "
                "downloadable (no such repo, a private repo without a token, or no network)"
            )
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"`{field}` {value!r} could not be loaded: {tried}. Cause: {cause}") from err


def check_hub_file(repo: str, filename: str, needed_by: str) -> None:
    """Downloading nothing: `repo` is a local folder, or its `filename` is in the local Hub cache or on the Hub.
    Otherwise one `ValueError` naming `needed_by`, the repo and the file, so that a model a reward loads on its first
    call fails before training rather than after the first epoch's sampling."""
    if os.path.isdir(repo):
        return
    what = f"{needed_by} needs {filename!r} of the Hub repo {repo!r}"
    try:
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return
        found = file_exists(repo, filename)
    except HFValidationError as err:
        raise ValueError(f"{what}, which is neither a local folder nor a valid Hub model id ({err})") from None
    except Exception as err:  # offline mode, no network, a gated or private repo without a token
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what}, which is not in the local Hub cache and cannot be reached ({type(err).__name__}: {cause}); run "
            "once with network access, point HF_HOME at a cache that holds it, or pass a local folder"
        ) from None
    if not found:
        raise ValueError(f"{what}, which the Hub does not have (no such file or repo)")
