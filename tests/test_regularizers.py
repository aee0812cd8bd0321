"""Regularizers against over-optimization: the pretraining loss, the KL to the base model, the classifier critic."""

import numpy as np
import pytest
import torch
from conftest import cat_prompt, tiny_config
from datasets import Dataset
from trl.models.modeling_sd_base import scheduler_step

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer, TimestepCritic
from tdpo_trl.commands.train import default_config
from tdpo_trl.digits import (
    WORDS,
    label_of,
    load_digits,
    load_digits_pipeline,
    pretraining_dataset,
    shared_judges,
    train_test_split,
)
from tdpo_trl.digits.judges import grayscale
from tdpo_trl.pipelines import ddim_transition
from tdpo_trl.prompts import get_prompt_function
from tdpo_trl.regularizers import (
    PretrainingData,
    load_pretraining_dataset,
    pretraining_inputs,
    transition_kl,
)
from tdpo_trl.rewards import get_reward_function
from tdpo_trl.tiny_models import left_minus_right_brightness, tiny_stable_diffusion


def new_pipeline():
    return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)


def test_ddim_transition_is_the_gaussian_trl_scores():
    pipeline = new_pipeline()
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample, output, prev = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = torch.tensor([scheduler.timesteps[0], scheduler.timesteps[1], scheduler.timesteps[3]])
    mean, std = ddim_transition(scheduler, output, timesteps, sample, eta=1.0)
    expected = scheduler_step(scheduler, output, timesteps, sample, eta=1.0, prev_sample=prev).log_probs
    log_prob = (-((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)

    assert torch.equal(transition_kl(pipeline, output, output, timesteps, sample, 1.0), torch.zeros(3))
    shifted = output + 0.1
    kl = transition_kl(pipeline, shifted, output, timesteps, sample, 1.0)
    shifted_mean, _ = ddim_transition(scheduler, shifted, timesteps, sample, 1.0)
    torch.testing.assert_close(kl, ((shifted_mean - mean) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3)))
    assert (kl > 0).all()


def smooth_images(n: int, seed: int = 0) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear")
    return list((images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())


@pytest.fixture
def pretrain_folder(tmp_path):
    """A saved `datasets` folder of 32 image-caption pairs, as `pretrain_dataset=<folder>` would read."""
    folder = tmp_path / "pretrain-data"
    Dataset.from_dict({"image": smooth_images(32), "text": ["a photo of a cat"] * 32}).save_to_disk(folder)
    return str(folder)


def noise_prediction_drift(trainer, images, captions) -> float:
    """Mean squared difference of the trained and the base UNet's noise predictions on fixed noised images."""
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    inputs, _ = pretraining_inputs(trainer.sd_pipeline, images, captions, torch.Generator().manual_seed(123), "cpu")
    with torch.no_grad():
        trained = trainer.sd_pipeline.predict(unet, inputs)
        unet.disable_adapters()
        base = trainer.sd_pipeline.predict(unet, inputs)
        unet.enable_adapters()
    return ((trained - base) ** 2).mean().item()


def test_the_pretraining_loss_keeps_the_model_near_its_data(tmp_path):
    """The digits model was trained on the digits: the pretraining loss on them holds the LoRA near the base, where
    the ink reward alone moves it away. Drift: the trained vs the base UNet's noise predictions on held-out digits."""
    images, labels = load_digits()
    _, heldout = train_test_split(len(images))
    eval_images, eval_captions = images[heldout[:32]], [f"the digit {WORDS[int(labels[i])]}" for i in heldout[:32]]
    drifts, records = {}, {}
    for beta in (0.0, 1.0):
        config = default_config(
            "digits", logdir=str(tmp_path), run_name=f"beta_{beta}", num_epochs=3, sample_batch_size=8,
            sample_num_batches_per_epoch=1, train_batch_size=8, eval_reward_functions=[], pretrain_loss_coef=beta,
            pretrain_dataset="digits", pretrain_batch_size=8,
        )  # fmt: skip
        trainer = TDPOTrainer(
            config, get_reward_function("digit_ink"), get_prompt_function("digits", seed=0),
            TDPOStableDiffusionPipeline(load_digits_pipeline()),
        )  # fmt: skip
        trainer.train()
        drifts[beta] = noise_prediction_drift(trainer, eval_images, eval_captions)
        records[beta] = trainer.log_history
    assert "pretrain/loss" in records[1.0][-1] and "pretrain/loss" not in records[0.0][-1]
    assert drifts[1.0] < 0.5 * drifts[0.0], drifts


def test_pretraining_data_order_and_resume(tmp_path, pretrain_folder):
    dataset = Dataset.load_from_disk(pretrain_folder)
    data = PretrainingData(dataset, batch_size=12, resolution=16, seed=3)
    first = [data.next_batch()[0] for _ in range(3)]  # 36 rows: the second pass starts in the third batch
    assert (data.epoch, data.position) == (1, 4)
    state = data.state_dict()
    following = data.next_batch()[0]
    resumed = PretrainingData(dataset, batch_size=12, resolution=16, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], following)
    seen = torch.cat(first)[:32].flatten(1)
    assert len(torch.unique(seen, dim=0)) == 32  # one pass visits every pair once
    with pytest.raises(ValueError, match=r"columns \['image', 'text'\]; \['caption'\] missing"):
        PretrainingData(dataset, 4, 16, caption_column="caption")


def test_resume_with_the_pretraining_loss_and_kl_is_bit_exact(tmp_path, pretrain_folder):
    settings = dict(pretrain_loss_coef=1.0, pretrain_dataset=pretrain_folder, pretrain_batch_size=4, kl_coef=0.1,
                    save_freq=1)  # fmt: skip

    def run(name, epochs, resume=False):
        resume_from = str(tmp_path / "logs" / name) if resume else ""
        config = tiny_config(tmp_path, run_name=name, num_epochs=epochs, resume_from=resume_from, **settings)
        trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, new_pipeline())
        trainer.train()
        return trainer

    straight = run("straight", 2)
    run("interrupted", 1)
    resumed = run("interrupted", 2, resume=True)
    progress = [(t.pretraining.epoch, t.pretraining.position) for t in (straight, resumed)]
    assert progress[0] == progress[1] == (4, 0)  # 2 epochs x 16 updates x 4 pairs = 4 passes over 32
    for (name, a), (_, b) in zip(straight._named_weights(), resumed._named_weights()):
        assert torch.equal(a, b), name
    assert [r["pretrain/loss"] for r in resumed.log_history] == [r["pretrain/loss"] for r in straight.log_history]


def test_kl_to_the_reference_is_zero_before_training_and_positive_after(tmp_path):
    config = tiny_config(tmp_path, num_epochs=2, kl_coef=0.1, train_learning_rate=1e-2)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, new_pipeline())
    trainer.sd_pipeline.scheduler.set_timesteps(config.sample_num_steps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = trainer.sd_pipeline.scheduler.timesteps[:1].repeat(4)
    negative = trainer.negative_conditioning["prompt_embeds"].repeat(4, 1, 1)
    conditioning = {"prompt_embeds": negative, "negative_prompt_embeds": negative}
    next_latents = torch.randn(4, 4, 8, 8, generator=generator)

    def kl_now():
        args = (latents, timesteps, next_latents, torch.zeros(4), torch.zeros(4), conditioning)
        with torch.no_grad():
            return trainer._step_loss(*args)[3]["policy/kl_ref"].item()

    assert kl_now() == 0.0  # the LoRA starts as the identity
    trainer.train()
    after = kl_now()
    assert after > 0 and kl_now() == after  # the adapter is enabled again after each reference pass
    assert all(r["policy/kl_ref"] >= 0 for r in trainer.log_history) and trainer.log_history[-1]["policy/kl_ref"] > 0


def test_the_classifier_critic_reads_the_features_the_ink_reward_reads(tmp_path):
    pipeline = TDPOStableDiffusionPipeline(load_digits_pipeline())
    config = tiny_config(tmp_path, critic_encoder="digit_classifier", critic_hidden_sizes=[16], critic_dropout=[0.0])
    critic = TimestepCritic.from_config(config, (4, 8, 8))
    assert critic.head.input_dim == 64 and critic.needs_pixels
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    features = critic.encode(latents, pipeline.decode)  # x_t as the family decodes it
    vae = pipeline.vae
    with torch.no_grad():
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        expected = shared_judges().classifier.features(grayscale(images))
    torch.testing.assert_close(features, expected)
    ink = shared_judges().ink(expected)  # the reward is a head on these very features
    torch.testing.assert_close(ink, shared_judges().score(images, names=("ink",))["ink"])


def test_the_digits_pretraining_dataset():
    dataset = pretraining_dataset()
    assert len(dataset) == 1500 and dataset.column_names == ["image", "text"]
    captions = dataset["text"]
    assert 0.05 < sum(c == "" for c in captions) / len(captions) < 0.15  # caption dropout, as in training
    data = PretrainingData(dataset, 8, 16)
    images, batch_captions = data.next_batch()
    assert images.shape == (8, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    labels = shared_judges().classifier(grayscale((images + 1) / 2)).argmax(1)
    named = [(label_of(caption), int(label)) for caption, label in zip(batch_captions, labels) if caption]
    assert sum(a == b for a, b in named) >= len(named) - 1  # the captions name the digits shown


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pretrain_loss_coef=1.0), "`pretrain_loss_coef` is 1.0 but `pretrain_dataset` is empty"),
        (dict(pretrain_loss_coef=-1.0), "`pretrain_loss_coef` must be >= 0, got -1.0"),
        (dict(kl_coef=0.1, sample_eta=0.0), r"`kl_coef` > 0 needs stochastic sampling \(`sample_eta` > 0\)"),
        (dict(pretrain_batch_size=0), "`pretrain_batch_size` must be >= 1, got 0"),
        (
            dict(kl_coef=0.1, kl_penalty="advantage"),
            r"`kl_penalty` must be one of \('loss', 'reward'\), got 'advantage'",
        ),
    ],
)
def test_bad_regularizer_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_an_unknown_pretraining_dataset_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="`pretrain_dataset` '.*nowhere' could not be loaded"):
        load_pretraining_dataset(str(tmp_path / "nowhere"))


def test_per_step_rewards_enter_the_returns():
    from tdpo_trl.advantages import discounted_returns

    final = torch.tensor([1.0, -2.0])
    steps = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, -1.0]])
    returns = discounted_returns(final, 3, gamma=0.5, step_rewards=steps)
    # G_2 = r + s_2, G_1 = s_1 + 0.5 G_2, G_0 = s_0 + 0.5 G_1
    expected = torch.tensor([[0.1 + 0.5 * (0.2 + 0.5 * 1.3), 0.2 + 0.5 * 1.3, 1.3], [-0.75, -1.5, -3.0]])
    torch.testing.assert_close(returns, expected)
    torch.testing.assert_close(discounted_returns(final, 3, 0.5, torch.zeros(2, 3)), discounted_returns(final, 3, 0.5))


@pytest.mark.parametrize("use_critic", [True, False])
def test_kl_as_a_per_step_reward_penalty(tmp_path, use_critic):
    config = tiny_config(tmp_path, num_epochs=2, kl_coef=0.5, kl_penalty="reward", train_learning_rate=1e-2,
                         use_critic=use_critic)  # fmt: skip
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, new_pipeline())
    computed = []
    original = trainer._compute_advantages

    def spy(samples, normalized):
        kl = samples["kl_ref"].clone()
        samples, stats = original(samples, normalized)
        computed.append((kl, torch.as_tensor(normalized), samples["advantages"].clone(), samples.get("returns")))
        return samples, stats

    trainer._compute_advantages = spy
    trainer.train()
    (kl_first, _, _, _), (kl, rewards, advantages, returns) = computed
    assert torch.all(kl_first == 0)  # the LoRA starts as the identity: no penalty in the first epoch
    assert kl.shape == advantages.shape and torch.all(kl >= 0) and kl.sum() > 0
    penalized = discounted_returns_of(rewards, kl, config)
    if use_critic:
        torch.testing.assert_close(returns, penalized)  # the critic learns the penalized returns
    else:
        torch.testing.assert_close(advantages, penalized.clamp(-5, 5))  # DDPO: the penalized return of each step
    assert trainer.log_history[-1]["policy/kl_ref"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert "policy/kl_ref" in trainer.log_history[0]


def discounted_returns_of(rewards, kl, config):
    from tdpo_trl.advantages import discounted_returns

    return discounted_returns(rewards.float(), kl.shape[1], config.gamma, -config.kl_coef * kl)
