"""Upload a saved folder to the Hugging Face Hub, keeping the local copy and the token safe on failure."""

import os
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id


class HubUploadError(RuntimeError):
    """Creating the repo or uploading failed; the files are still in `local_dir`."""

    def __init__(self, message: str, local_dir: str):
        super().__init__(message)
        self.local_dir = local_dir


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id) -> None:
    """huggingface_hub's own validator, as a `ValueError` that names `repo_id`; nothing is written before it."""
    if not isinstance(repo_id, str):
        raise ValueError(f"`repo_id` must be a str like 'user/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repo id like 'user/name': {err}") from None


def push_folder(
    local_dir: str,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload TDPO-R fine-tune",
    revision: Optional[str] = None,
) -> str:
    """Create `repo_id` (a model repo; fine if it exists) and upload `local_dir` to it. Returns the commit URL.

    Raises `HubUploadError` naming the step that failed and where the files are; the token never appears in it.
    """
    check_repo_id(repo_id)
    local_dir = os.fspath(local_dir)
    api = HfApi(token=token)
    step = f"creating the repo {repo_id!r}"
    try:
        repo_url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        step = f"uploading {local_dir!r} to {repo_url.repo_id!r}"
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=local_dir,
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
        )
    except Exception as err:  # network, auth, permissions: the local save must survive all of them
        detail = _scrub(f"{type(err).__name__}: {err}", token)
        message = (
            f"pushing to the Hub failed while {step}: {detail}. The trained files are saved in {local_dir!r}; "
            f"retry with `hf upload {repo_id} {local_dir}` or `trainer.push_to_hub(...)`."
        )
        raise HubUploadError(message, local_dir) from err
    return commit.commit_url
