"""Reward functions on tiny randomly-initialized models of the real classes; downloads are intercepted."""

import importlib.util

import pytest
import torch
from conftest import cat_prompt, tiny_config
from transformers import CLIPVisionModelWithProjection

import tdpo_trl.rewards.models as reward_models
from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer, ValueHead
from tdpo_trl.loading import check_hub_file
from tdpo_trl.modeling_critic import CLIP_MEAN, CLIP_STD, clip_pixel_values
from tdpo_trl.rewards import (
    AestheticScore,
    CLIPScore,
    PickScore,
    WeightedSum,
    get_reward_function,
    jpeg_compressibility,
    jpeg_incompressibility,
)
from tdpo_trl.tiny_models import mean_brightness, tiny_clip_model, tiny_clip_vision_model, tiny_stable_diffusion


def random_images(n=5, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_jpeg_rewards_on_real_photos():
    from sklearn.datasets import load_sample_image

    photos = [
        torch.from_numpy(load_sample_image(n)[:256, :256].copy()).permute(2, 0, 1).float() / 255
        for n in ("china.jpg", "flower.jpg")
    ]
    photos = torch.stack(photos)  # (2, 3, 256, 256) real photographs
    blurred = torch.nn.functional.avg_pool2d(photos, 9, stride=1, padding=4)  # the same scenes, detail removed
    small, _ = jpeg_compressibility(torch.cat([photos, blurred]))
    assert (small[2:] > small[:2]).all(), "a blurred photo must compress better than the original"
    assert (-small[:2] > 5).all()  # a 256x256 photo at quality 95 takes well over 5 kB


def test_jpeg_rewards_on_constructed_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    stripes = torch.zeros(1, 3, 64, 64)
    stripes[..., ::2] = 1.0
    noise = random_images(1, 64)
    images = torch.cat([flat, stripes, noise])
    small, _ = jpeg_compressibility(images)
    large, _ = jpeg_incompressibility(images)
    assert small.shape == (3,) and small.dtype == torch.float32
    assert torch.equal(large, -small)
    assert small[0] > small[1] > small[2], "flat < stripes < noise in JPEG size"
    assert 0 < large[0] < 2 and large[2] > 5  # kB: a flat 64x64 image compresses to well under 2 kB


@pytest.fixture
def aesthetic_files(tmp_path, tiny_clip_path, monkeypatch):
    """A seeded head saved as the LAION checkpoint is (`layers.<i>.weight`), served by an intercepted download."""
    torch.manual_seed(3)
    head = ValueHead(16, (1024, 128, 64, 16), (0.2, 0.2, 0.1, 0.0))
    torch.nn.init.normal_(head[7].weight, std=1.0)  # spread the scores
    path = tmp_path / "aesthetic-model.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    requested = []

    def download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        return str(path)

    def check(repo, filename, needed_by):  # the served head counts as downloadable; anything else is checked
        if (repo, filename) != ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"):
            check_hub_file(repo, filename, needed_by)

    monkeypatch.setattr(reward_models, "hf_hub_download", download)
    monkeypatch.setattr(reward_models, "check_hub_file", check)
    return head, requested


def test_aesthetic_score_on_a_tiny_clip(aesthetic_files, tiny_clip_path):
    head, requested = aesthetic_files
    reward = AestheticScore(clip_model=tiny_clip_path, batch_size=2)
    images = random_images()
    scores, metadata = reward(images, ["a cat"] * 5, [{}] * 5)
    assert requested == [("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")]
    assert scores.shape == (5,) and scores.dtype == torch.float32 and metadata == {}
    # the same as CLIP features through the saved head, whatever the chunking
    expected = head.eval()(reward.features(images))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(AestheticScore(clip_model=tiny_clip_path, batch_size=5)(images)[0], scores)
    assert torch.equal(reward(images)[0], scores), "not deterministic"
    changed = images.clone()
    changed[0] = 1 - changed[0]
    assert reward(changed)[0][0] != scores[0] and torch.equal(reward(changed)[0][1:], scores[1:])


def test_aesthetic_loader_asks_for_the_configured_names(aesthetic_files, monkeypatch):
    _, requested = aesthetic_files
    clip_names = []

    def from_pretrained(name, **kwargs):
        clip_names.append(name)
        return tiny_clip_vision_model()

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", from_pretrained)
    AestheticScore()(random_images(2))
    AestheticScore(clip_model="me/clip", head_repo="me/head", head_filename="h.pth")(random_images(2))
    assert clip_names == ["openai/clip-vit-large-patch14", "me/clip"]
    assert requested == [("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"), ("me/head", "h.pth")]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip-model")
    model, tokenizer = tiny_clip_model(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("reward_class", [PickScore, CLIPScore])
def test_text_image_rewards_on_a_tiny_clip(reward_class, tiny_clip_folder):
    kwargs = {"tokenizer": tiny_clip_folder} if reward_class is PickScore else {}
    reward = reward_class(model=tiny_clip_folder, batch_size=2, **kwargs)
    images = random_images(4)
    prompts = ["a cat", "a dog", "a cat", "a red car"]
    scores, _ = reward(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(
        reward_class(model=tiny_clip_folder, batch_size=4, **kwargs)(images, prompts)[0], scores
    )
    # the score depends on the prompt and on the image
    assert reward(images[:1], ["a cat"])[0] != reward(images[:1], ["a red car"])[0]
    assert reward(images[1:2], ["a cat"])[0] != reward(images[:1], ["a cat"])[0]
    # the scale: the model's logit scale (PickScore) or 100 (CLIP score), times a cosine
    scale = reward.model.logit_scale.exp().item() if reward_class is PickScore else 100.0
    assert scores.abs().max() <= scale + 1e-4


@pytest.mark.parametrize(
    "name, model, tokenizer",
    [
        ("pickscore", "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
        ("clip_score", "openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    ],
)
def test_text_image_loaders_ask_for_the_right_names(name, model, tokenizer, monkeypatch, tiny_clip_folder):
    from transformers import AutoTokenizer, CLIPModel

    asked = []
    load_model, load_tokenizer = CLIPModel.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda n, **kw: asked.append(n) or load_model(tiny_clip_folder))
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda n, **kw: asked.append(n) or load_tokenizer(tiny_clip_folder)
    )
    scores, _ = get_reward_function(name)(random_images(2), ["a cat", "a dog"])
    assert asked == [model, tokenizer] and scores.shape == (2,)


def test_registry_and_dotted_paths():
    assert get_reward_function("jpeg_compressibility") is jpeg_compressibility
    assert isinstance(get_reward_function("aesthetic"), AestheticScore)  # built lazily: no download yet
    assert isinstance(get_reward_function("pickscore", batch_size=4), PickScore)
    assert get_reward_function("tdpo_trl.tiny_models:mean_brightness") is mean_brightness
    assert get_reward_function("tdpo_trl.tiny_models.mean_brightness") is mean_brightness
    assert isinstance(get_reward_function("tdpo_trl.rewards:CLIPScore", batch_size=3), CLIPScore)
    with pytest.raises(ValueError, match=r"unknown reward 'aesthetics': expected one of \['aesthetic'"):
        get_reward_function("aesthetics")
    with pytest.raises(ValueError, match="cannot import reward 'tdpo_trl.tiny_models:nothing'"):
        get_reward_function("tdpo_trl.tiny_models:nothing")
    with pytest.raises(ValueError, match="is a int, not a callable"):
        get_reward_function("tdpo_trl.tiny_models:TINY_PROMPT_LENGTH")


@pytest.mark.parametrize("name, package", [("hpsv2", "open_clip_torch"), ("imagereward", "image-reward")])
def test_optional_packages_are_named_in_the_error(name, package):
    module = {"hpsv2": "open_clip", "imagereward": "ImageReward"}[name]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(ImportError, match=f"pip install {package}"):
        get_reward_function(name)(random_images(1), ["a cat"])


def test_weighted_sum_reports_components():
    reward = WeightedSum({"small": (jpeg_compressibility, 1.0), "bright": (mean_brightness, 2.0)})
    images = random_images(3)
    total, metadata = reward(images, ["a"] * 3, [{}] * 3)
    small, _ = jpeg_compressibility(images)
    bright, _ = mean_brightness(images)
    torch.testing.assert_close(total, small + 2.0 * bright)
    torch.testing.assert_close(metadata["components"]["bright"], bright)
    assert reward.reward_names == ["1 x small", "2 x bright"]
    with pytest.raises(ValueError, match="must be a \\(reward_function, weight\\) pair"):
        WeightedSum({"x": mean_brightness})


def test_trainer_logs_each_component_of_a_weighted_sum(tmp_path, tiny_pipeline):
    from conftest import cat_prompt, tiny_config

    from tdpo_trl import TDPOTrainer
    from tdpo_trl.tiny_models import left_minus_right_brightness

    reward = WeightedSum({"bright": (mean_brightness, 1.0), "left": (left_minus_right_brightness, 3.0)})
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1), reward, cat_prompt, tiny_pipeline)
    trainer.train()
    record = trainer.log_history[-1]
    expected = record["reward/bright/mean"] + 3.0 * record["reward/left/mean"]
    assert record["reward/mean"] == pytest.approx(expected, rel=1e-5)
    assert record["reward/left/std"] > 0
    assert trainer.reward_names() == ["1 x bright", "3 x left"]


# HPSv2 and ImageReward need packages that cannot be installed here (open_clip needs torchvision, which needs a CUDA
# build of torch). These tests put stand-ins for the packages in `sys.modules`: they check this library's wiring
# (download names, checkpoint loading, preprocessing, scoring), not the packages themselves.


class TinyOpenCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(3 * 8 * 8, 6)
        self.visual.image_size = (8, 8)
        self.text = torch.nn.Embedding(128, 6)

    def encode_image(self, pixels):
        return self.visual(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def test_hpsv2_wiring_with_a_stand_in_open_clip(tmp_path, monkeypatch):
    import sys
    import types

    torch.manual_seed(0)
    trained = TinyOpenCLIP()
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    requested, created = [], []
    monkeypatch.setattr(
        reward_models, "hf_hub_download", lambda repo, name, **kw: requested.append((repo, name)) or str(path)
    )
    fake = types.ModuleType("open_clip")
    fake.create_model_and_transforms = lambda name, pretrained=None: (
        created.append(name) or TinyOpenCLIP(),
        None,
        None,
    )

    def tokenize(prompts):
        return torch.tensor([[ord(c) % 128 for c in p[:6].ljust(6)] for p in prompts])

    fake.get_tokenizer = lambda name: tokenize
    monkeypatch.setitem(sys.modules, "open_clip", fake)

    images = random_images(3)
    prompts = ["a cat", "a dog", "a cat"]
    scores, _ = get_reward_function("hpsv2", batch_size=2)(images, prompts)
    assert requested == [("xswu/HPSv2", "HPS_v2_compressed.pt")] and created == ["ViT-H-14"]
    pixels = torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    image = torch.nn.functional.normalize(trained.encode_image((pixels - mean) / std), dim=-1)
    text = torch.nn.functional.normalize(trained.encode_text(tokenize(prompts)), dim=-1)
    torch.testing.assert_close(scores, (image * text).sum(-1).detach())


def test_imagereward_wiring_with_a_stand_in_package(monkeypatch):
    import sys
    import types

    loaded = []

    class Model:
        def score(self, prompt, image):
            return len(prompt) + sum(image.getpixel((0, 0))) / 765

    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device: loaded.append((name, device)) or Model()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    images = torch.zeros(2, 3, 8, 8)
    images[1] = 1.0
    scores, _ = get_reward_function("imagereward")(images, ["ab", "abc"])
    assert loaded == [("ImageReward-v1.0", "cpu")]
    torch.testing.assert_close(scores, torch.tensor([2.0, 4.0]))


def test_hpsv2_on_a_tiny_open_clip_model(tmp_path, monkeypatch):
    """The real open_clip class, ViT-H-14's layout shrunk to 2 layers; runs where open_clip (and torchvision) are
    installed, and is skipped elsewhere (CI's CPU torch has no torchvision)."""
    open_clip = pytest.importorskip("open_clip")
    import json

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (tmp_path / "TinyHPS.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "TinyHPS.json"))
    torch.manual_seed(0)
    trained = open_clip.create_model("TinyHPS", pretrained=None).eval()
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    monkeypatch.setattr(reward_models, "hf_hub_download", lambda repo, name, **kw: str(path))

    images, prompts = random_images(3), ["a cat", "a dog", "a photo of a cat"]
    scores, _ = get_reward_function("hpsv2", model_name="TinyHPS", batch_size=2)(images, prompts)
    pixels = torch.nn.functional.interpolate(images, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = torch.nn.functional.normalize(trained.encode_image((pixels - mean) / std), dim=-1)
        text = torch.nn.functional.normalize(trained.encode_text(open_clip.get_tokenizer("TinyHPS")(prompts)), dim=-1)
    torch.testing.assert_close(scores, (image * text).sum(-1), rtol=1e-5, atol=1e-6)
    assert scores[0] != scores[2], "the prompt must matter"


def test_the_critic_shares_the_rewards_clip_tower(aesthetic_files, tiny_clip_path, tiny_pipeline, tmp_path):
    """The paper's critic reads the reward's encoder: one copy of its weights, and the reward's scores unchanged."""
    reward = AestheticScore(clip_model=tiny_clip_path, batch_size=4)
    config = tiny_config(tmp_path, critic_encoder=tiny_clip_path, num_epochs=1)
    trainer = TDPOTrainer(config, reward, cat_prompt, tiny_pipeline)
    assert trainer.critic.encoder is reward.features
    images = random_images(3)
    before = reward(images)[0]
    trainer.train()
    assert "critic/explained_variance" in trainer.log_history[-1]
    torch.testing.assert_close(reward(images)[0], before, rtol=0, atol=0)  # frozen, and left in the reward's dtype
    assert not any(p.requires_grad for p in reward.features.parameters())

    # another checkpoint: the critic loads its own
    other = tmp_path / "other-clip"
    tiny_clip_vision_model(seed=1).save_pretrained(other)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
    trainer = TDPOTrainer(tiny_config(tmp_path, critic_encoder=str(other)), reward, cat_prompt, pipeline)
    assert trainer.critic.encoder is not reward.features
    # a weighted sum lends its components' encoders
    summed = WeightedSum({"aesthetic": (reward, 1.0), "brightness": (mean_brightness, 0.1)})
    assert summed.image_features(tiny_clip_path) is reward.features and summed.image_features(str(other)) is None


def test_a_clip_score_lends_its_image_tower(tiny_clip_folder):
    reward = CLIPScore(model=tiny_clip_folder)
    features = reward.image_features(tiny_clip_folder)
    assert reward.image_features("openai/clip-vit-large-patch14") is None
    assert features is reward.image_features(tiny_clip_folder) and features.model is reward.model  # no copy
    # the image embeddings the whole CLIPModel computes (what the reward scores with)
    images = random_images(3)
    pixels = clip_pixel_values(images, reward.model.config.vision_config.image_size)
    tokens = reward.tokenizer(["a cat"] * 3, padding=True, return_tensors="pt")
    expected = torch.nn.functional.normalize(reward.model(**tokens, pixel_values=pixels).image_embeds, dim=-1)
    torch.testing.assert_close(features(images), expected)
