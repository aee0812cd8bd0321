"""save_pretrained, the model card, and push_to_hub against an intercepted Hub (no network)."""

import base64
import json
import logging
import os
import re

import httpx2
import pytest
import torch
from conftest import cat_prompt, tiny_config
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.hub import HubUploadError
from tdpo_trl.saving import load_critic_head
from tdpo_trl.tiny_models import left_minus_right_brightness, tiny_stable_diffusion


TOKEN = "hf_NotARealTokenButSecret123"


def trained(tmp_path, **overrides) -> TDPOTrainer:
    config = tiny_config(tmp_path, num_epochs=1, train_learning_rate=3e-2, **overrides)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0))
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline)
    trainer.train()
    return trainer


def images(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    output = pipeline(
        ["a photo of a cat", "a dog"], num_inference_steps=4, generator=generator, output_type="pt", guidance_scale=5.0
    )
    return output.images


def trained_images(trainer) -> torch.Tensor:
    pipeline = trainer.sd_pipeline.diffusers_pipeline
    pipeline.set_progress_bar_config(disable=True)
    return images(pipeline)


def fresh_pipeline() -> StableDiffusionPipeline:
    pipeline = tiny_stable_diffusion(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def lora_trainer(tmp_path_factory):
    # alpha != rank: the scaling must survive the round trip through the diffusers file
    return trained(tmp_path_factory.mktemp("lora"), lora_rank=4, lora_alpha=8.0)


def test_save_pretrained_writes_the_lora_critic_config_and_card_only(lora_trainer, tmp_path):
    folder = lora_trainer.save_pretrained(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {
        "pytorch_lora_weights.safetensors",
        "critic_head.safetensors",
        "critic_config.json",
        "tdpo_config.json",
        "README.md",
    }
    assert str(folder) == str(tmp_path / "out")


def test_load_lora_weights_reproduces_the_trained_models_images(lora_trainer, tmp_path):
    lora_trainer.save_pretrained(tmp_path / "out")
    pipeline = fresh_pipeline()
    base = images(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    loaded = images(pipeline)
    expected = trained_images(lora_trainer)
    assert not torch.allclose(base, expected, atol=1e-3), (
        "training changed nothing; the round trip would prove nothing"
    )
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)


def test_critic_head_and_config_round_trip(lora_trainer, tmp_path):
    lora_trainer.save_pretrained(tmp_path / "out")
    head, encoder = load_critic_head(tmp_path / "out")
    assert encoder == "latents"
    features = torch.randn(5, head.input_dim)
    trained_head = lora_trainer.critic.head.eval()
    torch.testing.assert_close(head.eval()(features), trained_head(features), rtol=0, atol=0)
    saved = json.loads((tmp_path / "out" / "tdpo_config.json").read_text())
    assert saved["lora_alpha"] == 8.0 and saved["critic_hidden_sizes"] == [32, 8]
    assert saved["train_adv_clip_max"] is None  # inf in strict JSON; None resolves to the same value
    rebuilt = TDPOConfig(**saved)
    assert rebuilt.to_dict() == lora_trainer.config.to_dict()


def test_model_card_metadata_and_content(lora_trainer, tmp_path):
    lora_trainer.save_pretrained(tmp_path / "out", base_model="org/base-model", repo_id="me/tiny-tdpo")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "org/base-model"
    assert card.data.pipeline_tag == "text-to-image"
    assert set(card.data.tags) == {
        "text-to-image",
        "diffusers",
        "lora",
        "trl",
        "ddpo",
        "tdpo",
        "reinforcement-learning",
    }
    text = card.text
    assert 'StableDiffusionPipeline.from_pretrained("org/base-model"' in text
    assert 'pipe.load_lora_weights("me/tiny-tdpo")' in text
    assert "hf download me/tiny-tdpo --local-dir tiny-tdpo" in text
    assert "`left_minus_right_brightness`" in text and "TDPO-R" in text
    assert "r=4, alpha=8.0" in text
    final_reward = lora_trainer.log_history[-1]["reward/mean"]
    assert f"| `reward/mean` | {final_reward:.4g} |" in text
    assert "zhang2024confronting" in text and "black2024training" in text


def test_local_base_path_is_not_written_as_hub_base_model(tmp_path, tiny_sd_path):
    config = tiny_config(tmp_path, num_epochs=1)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_sd_path))
    trainer.save_pretrained(tmp_path / "out")
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model is None


def test_full_unet_training_saves_a_loadable_unet(tmp_path):
    trainer = trained(tmp_path, use_lora=False, use_critic=False)
    trainer.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert not (tmp_path / "out" / "critic_head.safetensors").exists()  # DDPO mode: no critic
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    for name, value in trainer.accelerator.unwrap_model(trainer.unet).state_dict().items():
        assert torch.equal(unet.state_dict()[name], value), name
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "lora" not in card.data.tags and 'subfolder="unet"' in card.text


def test_merged_pipeline_option(lora_trainer, tmp_path):
    lora_trainer.save_pretrained(tmp_path / "out", merged_pipeline=True)
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "merged_pipeline")
    merged.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name, _ in merged.unet.named_parameters())
    torch.testing.assert_close(images(merged), trained_images(lora_trainer), rtol=0, atol=1e-4)
    assert any("lora" in n for n, _ in lora_trainer.sd_pipeline.unet.named_parameters()), "training UNet was changed"


class FakeHub:
    """Answers huggingface_hub's HTTP calls for create_repo and upload_folder, and keeps the uploaded files."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.requests: list[httpx2.Request] = []
        self.created: dict = {}
        self.files: dict[str, bytes] = {}
        self.commit_message = None
        self.validated_card = None

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if self.fail:
            raise httpx2.ConnectError("[Errno 101] Network is unreachable", request=request)
        path = request.url.path
        if path == "/api/repos/create":
            self.created = json.loads(request.content)
            name = f"{self.created.get('organization') or 'me'}/{self.created['name']}"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{name}"})
        if path == "/api/validate-yaml":  # the Hub checks the card's metadata before the commit
            self.validated_card = json.loads(request.content)["content"]
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if "/commit/" in path:
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "header":
                    self.commit_message = entry["value"]["summary"]
                elif entry["key"] == "file":
                    self.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/me/tiny-tdpo/commit/abc", "commitOid": "a" * 40}
            )
        return httpx2.Response(404, json={"error": f"the fake Hub does not serve {request.method} {path}"})

    def __enter__(self):
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handle)))
        return self

    def __exit__(self, *exc):
        set_client_factory(default_client_factory)


def test_push_to_hub_uploads_the_saved_folder(lora_trainer, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeHub() as hub:
        url = lora_trainer.push_to_hub(
            "me/tiny-tdpo", private=True, token=TOKEN, commit_message="first", local_dir=tmp_path / "hub"
        )
    assert url == "https://huggingface.co/me/tiny-tdpo/commit/abc"
    assert hub.created["name"] == "tiny-tdpo" and hub.created["organization"] == "me"
    assert hub.created["visibility"] == "private"
    assert hub.commit_message == "first"
    assert set(hub.files) == {p.name for p in (tmp_path / "hub").iterdir()}
    # the layout a user pulls with `hf download me/tiny-tdpo`: the card (front matter first), the LoRA in diffusers
    # format, the critic and the training config
    assert {"README.md", "pytorch_lora_weights.safetensors", "critic_head.safetensors", "critic_config.json",
            "tdpo_config.json"} <= set(hub.files)  # fmt: skip
    front_matter = hub.files["README.md"].decode().split("---\n")[1]  # the card starts with its YAML metadata
    assert "library_name: diffusers" in front_matter and "pipeline_tag: text-to-image" in front_matter
    for name, content in hub.files.items():
        assert content == (tmp_path / "hub" / name).read_bytes()
    writes = [r for r in hub.requests if r.method == "POST"]  # create, validate card, preupload, commit
    assert len(writes) == 4 and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in writes)
    card_text = hub.files["README.md"].decode()
    assert "library_name: diffusers" in card_text and 'pipe.load_lora_weights("me/tiny-tdpo")' in card_text
    assert hub.validated_card == card_text
    assert TOKEN not in caplog.text

    # round trip: what reached the Hub, loaded into a fresh pipeline, makes the trained model's images
    remote = tmp_path / "downloaded"
    remote.mkdir()
    for name, content in hub.files.items():
        (remote / name).write_bytes(content)
    pipeline = fresh_pipeline()
    pipeline.load_lora_weights(str(remote))
    torch.testing.assert_close(images(pipeline), trained_images(lora_trainer), rtol=0, atol=1e-6)


def test_push_failure_keeps_the_local_save_and_never_shows_the_token(lora_trainer, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeHub(fail=True), pytest.raises(HubUploadError) as error:
        lora_trainer.push_to_hub("me/tiny-tdpo", token=TOKEN, local_dir=tmp_path / "hub")
    message = str(error.value)
    assert "creating the repo 'me/tiny-tdpo'" in message and "Network is unreachable" in message
    assert str(tmp_path / "hub") in message and error.value.local_dir == str(tmp_path / "hub")
    assert TOKEN not in message and TOKEN not in caplog.text
    assert (tmp_path / "hub" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert (tmp_path / "hub" / "README.md").exists()


@pytest.mark.parametrize("repo_id", ["a/b/c", "", "/", "me/", "bad id!!", "-me/x", "me/x.."])
def test_bad_repo_ids_are_rejected_before_any_request(lora_trainer, tmp_path, repo_id):
    with FakeHub() as hub, pytest.raises(ValueError, match=f"`repo_id` {re.escape(repr(repo_id))} is not a valid Hub"):
        lora_trainer.push_to_hub(repo_id, local_dir=tmp_path / "hub")
    assert hub.requests == [] and not (tmp_path / "hub").exists()


@pytest.mark.parametrize("command", ["download", "upload"])
def test_the_documented_hub_commands_exist(command):
    """docs/saving_and_sharing.md and the model card tell users to run `hf download` / `hf upload`."""
    import shutil
    import subprocess
    import sys

    hf = shutil.which("hf", path=os.path.dirname(sys.executable)) or shutil.which("hf")
    assert hf, "huggingface_hub installs the `hf` command"
    result = subprocess.run([hf, command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"Usage: hf {command} [OPTIONS] REPO_ID" in result.stdout, result.stderr
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "saving_and_sharing.md")).read()
    assert f"hf {command} " in docs
