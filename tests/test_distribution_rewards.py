"""Distribution-level rewards: diversity, statistical parity, leave-one-out credit, prompt repeats, and the trainer's
batch (gathered features, wrong outputs refused)."""

import pytest
import torch
from conftest import tiny_config

from tdpo_trl import TDPOTrainer
from tdpo_trl.digits.judges import grayscale, shared_judges
from tdpo_trl.evaluation import score_images
from tdpo_trl.prompts import PromptSource, RepeatedPrompts
from tdpo_trl.rewards import Diversity, StatisticalParity, get_reward_function, prompt_groups
from tdpo_trl.tiny_models import mean_brightness


def flat_encoder(images):
    return images.flatten(1)


def one_hot_by_brightness(images):
    """A 3-class 'attribute classifier': the class is which third of [0, 1] the mean brightness falls in."""
    classes = (images.mean(dim=(1, 2, 3)) * 3).clamp(0, 2.999).long()
    return torch.nn.functional.one_hot(classes, 3).float()


def images_of_classes(classes: list[int]) -> torch.Tensor:
    brightness = torch.tensor([(c + 0.5) / 3 for c in classes])
    return brightness[:, None, None, None].expand(-1, 3, 4, 4).clone()


def test_diversity_is_higher_for_distinct_images_than_for_copies():
    torch.manual_seed(0)
    distinct = torch.rand(6, 3, 8, 8)
    copies = distinct[:1].expand(6, -1, -1, -1)
    reward = Diversity(encoder=flat_encoder)
    prompts = ["a cat"] * 6
    assert reward.batch_score(distinct, prompts) > 0.05
    assert reward.batch_score(copies, prompts) == pytest.approx(0.0, abs=1e-6)
    # groups are per prompt: two prompts of identical copies each score 0, however different the groups are
    mixed = torch.cat([copies[:3], (1 - copies)[:3]])
    assert reward.batch_score(mixed, ["a"] * 3 + ["b"] * 3) == pytest.approx(0.0, abs=1e-6)


def test_diversity_leave_one_out_credits_the_odd_image_out():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 8, 8)
    images = torch.cat([base.expand(4, -1, -1, -1), torch.rand(1, 3, 8, 8)])  # 4 copies and one different image
    rewards, info = Diversity(encoder=flat_encoder)(images, ["a cat"] * 5)
    assert rewards[4] > 0, "the image that makes the group diverse gets positive credit"
    assert (rewards[:4] < 0).all(), "each copy lowers the group's diversity"
    assert info["num_groups"] == 1


def test_parity_is_best_for_a_balanced_batch_and_falls_with_imbalance():
    reward = StatisticalParity(one_hot_by_brightness)
    prompts = ["a person"] * 6
    balanced = reward.batch_score(images_of_classes([0, 1, 2, 0, 1, 2]), prompts)
    skewed = reward.batch_score(images_of_classes([0, 0, 0, 0, 1, 2]), prompts)
    collapsed = reward.batch_score(images_of_classes([0] * 6), prompts)
    assert balanced == pytest.approx(0.0, abs=1e-6)  # -TV, 0 at the target
    assert balanced > skewed > collapsed
    assert collapsed == pytest.approx(-2 / 3)  # TV((1, 0, 0), uniform)
    # a target other than uniform
    only_first = StatisticalParity(one_hot_by_brightness, target=[1.0, 0.0, 0.0])
    assert only_first.batch_score(images_of_classes([0] * 6), prompts) == pytest.approx(0.0, abs=1e-6)
    kl = StatisticalParity(one_hot_by_brightness, distance="kl")
    assert kl.batch_score(images_of_classes([0, 1, 2]), ["p"] * 3) == pytest.approx(0.0, abs=1e-6)
    assert kl.batch_score(images_of_classes([0, 0, 1]), ["p"] * 3) < 0


def test_parity_counts_labels_so_unreadable_images_do_not_look_balanced():
    def unsure(images):  # a classifier that cannot tell: nearly uniform probabilities, class 0 by a hair
        probabilities = torch.full((len(images), 3), 0.33)
        probabilities[:, 0] = 0.34
        return probabilities

    prompts = ["a person"] * 6
    assert StatisticalParity(unsure).batch_score(images_of_classes([0] * 6), prompts) == pytest.approx(-2 / 3)
    soft = StatisticalParity(unsure, hard=False)  # averaged probabilities: the shortcut the default closes
    assert soft.batch_score(images_of_classes([0] * 6), prompts) == pytest.approx(-0.02 / 3, abs=1e-5)

    # min_confidence: images the classifier cannot read form an extra class with target share 0
    gated = StatisticalParity(one_hot_by_brightness, min_confidence=0.9)
    assert gated.batch_score(images_of_classes([0, 1, 2]), ["p"] * 3) == pytest.approx(0.0, abs=1e-6)
    unreadable = StatisticalParity(unsure, min_confidence=0.9)
    assert unreadable.batch_score(images_of_classes([0] * 6), prompts) == pytest.approx(-1.0)  # all mass off-target

    def half_sure(images):  # images 0-2 read confidently as classes 0, 1, 2; images 3-5 unreadable
        return torch.cat([torch.eye(3), unsure(images[3:])])

    rewards, info = StatisticalParity(half_sure, min_confidence=0.9)(images_of_classes([0] * 6), prompts)
    assert info["group_score"] == pytest.approx(-0.5)
    assert (rewards[3:] < 0).all() and (rewards[:3] > 0).all(), "an unreadable image lowers the score"
    with pytest.raises(ValueError, match="needs `hard=True`, got 0.9 with hard=False"):
        StatisticalParity(unsure, hard=False, min_confidence=0.9)


def test_parity_leave_one_out_has_the_right_sign():
    reward = StatisticalParity(one_hot_by_brightness)
    rewards, _ = reward(images_of_classes([0, 0, 0, 0, 1, 2]), ["a person"] * 6)
    assert (rewards[:4] < 0).all(), "samples of the over-represented class move the batch away from uniform"
    assert (rewards[4:] > 0).all(), "samples of the rare classes move it toward uniform"
    shared = StatisticalParity(one_hot_by_brightness, credit="shared")
    rewards, _ = shared(images_of_classes([0, 0, 0, 0, 1, 2]), ["a person"] * 6)
    assert torch.allclose(rewards, torch.full((6,), -1 / 3))


def test_bad_distribution_reward_arguments_name_the_value():
    with pytest.raises(ValueError, match="'best'"):
        Diversity(encoder=flat_encoder, credit="best")
    with pytest.raises(ValueError, match="'hellinger'"):
        StatisticalParity(one_hot_by_brightness, distance="hellinger")
    with pytest.raises(ValueError, match=r"\[0.5, 0.2\]"):
        StatisticalParity(one_hot_by_brightness, target=[0.5, 0.2])
    with pytest.raises(ValueError, match="has 2 classes but the attribute classifier returns 3"):
        StatisticalParity(one_hot_by_brightness, target=[0.5, 0.5]).batch_score(images_of_classes([0, 1]), ["a", "a"])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        StatisticalParity(lambda images: torch.ones(len(images))).batch_score(images_of_classes([0, 1]), ["a", "a"])


def test_prompt_groups_and_repeated_prompts():
    assert [g.tolist() for g in prompt_groups(["a", "b", "a", "c"])] == [[0, 2], [1], [3]]
    source = RepeatedPrompts(PromptSource(["x", "y", "z"], seed=3), k=3)
    drawn = [source()[0] for _ in range(9)]
    assert [len(set(drawn[i : i + 3])) for i in range(0, 9, 3)] == [1, 1, 1]
    # its state (and its inner source's) resumes the same stream mid-group
    first = RepeatedPrompts(PromptSource(["x", "y", "z"], seed=3), k=3)
    [first() for _ in range(4)]
    second = RepeatedPrompts(PromptSource(["x", "y", "z"], seed=99), k=3)
    second.load_state_dict(first.state_dict())
    assert [second()[0] for _ in range(5)] == [first()[0] for _ in range(5)]
    with pytest.raises(ValueError, match="got 0"):
        RepeatedPrompts(source, k=0)


def test_digit_rewards_by_name():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    parity = get_reward_function("digit_parity")
    rewards, info = parity(images, ["a handwritten digit"] * 8)
    assert rewards.shape == (8,) and -1 <= info["group_score"] <= 0
    diversity = get_reward_function("digit_diversity")
    assert diversity.default_prompt_repeats == 8
    assert diversity.batch_score(images, ["p"] * 8) > diversity.batch_score(
        images[:1].expand(8, -1, -1, -1), ["p"] * 8
    )
    # the pixel-space judge: distinct images are more diverse than copies, a brightness shift is no variety
    pixels = get_reward_function("digit_pixel_diversity")
    copies = images[:1].expand(8, -1, -1, -1)
    assert pixels.batch_score(images, ["p"] * 8) > 0.5 > pixels.batch_score(copies, ["p"] * 8) == 0
    shifted = copies * 0.8 + torch.linspace(0, 0.2, 8).view(8, 1, 1, 1)  # stays in [0, 1]
    assert pixels.batch_score(shifted, ["p"] * 8) < 1e-3
    # in score_images (held-out evaluation) a distribution reward is its batch score, shared by every image
    scores = score_images({"parity": parity, "brightness": mean_brightness}, images, ["a handwritten digit"] * 8)
    assert torch.allclose(scores["parity"], torch.full((8,), info["group_score"]))


def test_digit_diversity_adds_the_accuracy_term_to_each_credit():
    """A wrong digit loses `accuracy_weight` of its credit; the group score stays the diversity alone."""
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    labels = shared_judges().classifier(grayscale(images)).argmax(1).tolist()  # what the classifier reads
    right = [f"the digit {label}" for label in labels]
    wrong = [f"the digit {(label + 1) % 10}" for label in labels[:4]] + right[4:]
    diversity = get_reward_function("digit_diversity", accuracy_weight=0.5)
    plain = get_reward_function("digit_diversity", accuracy_weight=0.0)
    with torch.no_grad():
        features = {name: diversity.features(images, prompts) for name, prompts in (("r", right), ("w", wrong))}
        rewards = {name: diversity.rewards_from_features(f, ["p"] * 8) for name, f in features.items()}
        pure, pure_info = plain.rewards_from_features(features["r"], ["p"] * 8)
    torch.testing.assert_close(rewards["r"][0] - rewards["w"][0], torch.tensor([0.5] * 4 + [0.0] * 4))
    torch.testing.assert_close(rewards["r"][0], pure + 0.5)  # every image read right: +0.5 on the credit
    assert rewards["r"][1]["group_score"] == rewards["w"][1]["group_score"] == pure_info["group_score"] > 0
    with pytest.raises(ValueError, match="accuracy_weight.*-1"):
        get_reward_function("digit_diversity", accuracy_weight=-1)


class CountingDiversity(Diversity):
    """Diversity of flattened pixels that records the batches its features and rewards were computed on."""

    def __init__(self, rewards_override=None):
        super().__init__(encoder=flat_encoder)
        self.feature_calls, self.reward_batches, self.rewards_override = 0, [], rewards_override

    def features(self, images, prompts, metadata=None):
        self.feature_calls += 1
        return super().features(images, prompts, metadata)

    def rewards_from_features(self, features, prompts):
        self.reward_batches.append(list(prompts))
        if self.rewards_override is not None:
            return self.rewards_override(features), {}
        return super().rewards_from_features(features, prompts)


def test_trainer_scores_the_whole_epoch_in_groups_of_repeated_prompts(tmp_path, tiny_pipeline):
    reward = CountingDiversity()
    prompts = PromptSource(["a cat", "a dog", "a cow"], seed=0)
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1), reward, prompts, tiny_pipeline)
    assert trainer.prompt_repeats == [4], "the reward's default_prompt_repeats is used when the config leaves it"
    trainer.train()
    (batch,) = reward.reward_batches  # one call per epoch, on all 8 samples (2 sampled batches)
    assert len(batch) == 8 and reward.feature_calls == 2
    assert batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    record = trainer.log_history[-1]
    assert "reward/group_score" in record and record["reward/group_score"] >= 0


def test_trainer_refuses_a_distribution_reward_with_the_wrong_number_of_rewards(tmp_path, tiny_pipeline):
    reward = CountingDiversity(rewards_override=lambda features: torch.zeros(len(features) - 1))
    trainer = TDPOTrainer(tiny_config(tmp_path), reward, lambda: ("a cat", {}), tiny_pipeline)
    with pytest.raises(ValueError, match=r"distribution reward 'diversity' returned rewards .* for a batch of 8"):
        trainer.train()


def test_prompt_repeats_larger_than_the_batch_or_not_dividing_it(tmp_path, tiny_pipeline):
    with pytest.raises(ValueError, match=r"`prompt_repeats` \(16\) is larger .* = 8"):
        tiny_config(tmp_path, prompt_repeats=16)
    with pytest.raises(ValueError, match=r"`prompt_repeats` \(3\) must divide .* = 8"):
        tiny_config(tmp_path, prompt_repeats=3)
    with pytest.raises(ValueError, match="got 0"):
        tiny_config(tmp_path, prompt_repeats=0)
    # a reward's default is checked against the batch too
    with pytest.raises(ValueError, match=r"`prompt_repeats` \(4\) must divide .* = 6"):
        TDPOTrainer(
            tiny_config(tmp_path, sample_batch_size=3, train_batch_size=3),
            CountingDiversity(),
            lambda: ("a", {}),
            tiny_pipeline,
        )


def test_train_judges_digits_distribution_rewards_independently(tmp_path):
    from tdpo_trl.commands.train import parse_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit\n")
    _, config = parse_args(["--pretrained_model", "digits", "--reward", "digit_parity", "--prompts", str(prompts)])
    assert config.eval_prompts == str(prompts) and config.eval_num_prompts == 64
    assert config.eval_reward_functions[0] == "digit_parity_independent"
    assert "digit_accuracy" not in config.eval_reward_functions  # the prompt names no digit
    assert config.pretrain_loss_coef == 0.0 and config.num_epochs == 120  # the measured parity recipe
    assert config.train_lr_scheduler == "cosine"
    _, config = parse_args(["--pretrained_model", "digits", "--reward", "digit_parity", "--num_epochs", "5"])
    assert config.num_epochs == 5  # a flag still wins
    _, config = parse_args(["--pretrained_model", "digits", "--reward", "digit_diversity"])
    assert config.eval_prompts == "digits" and config.train_clip_range == 5e-3  # the measured diversity recipe
    judges = ["digit_pixel_diversity", "digit_accuracy", "digit_accuracy_independent"]
    assert config.eval_reward_functions[:3] == judges


def test_train_command_shows_the_group_score_of_a_distribution_reward(tmp_path, capsys):
    from tdpo_trl.commands import cli

    cli.main([
        "train", "--pretrained_model", "tiny", "--reward", "digit_pixel_diversity", "--num_epochs", "1",
        "--sample_batch_size", "8", "--sample_num_batches_per_epoch", "1", "--train_batch_size", "8",
        "--eval_freq", "0", "--logdir", str(tmp_path), "--prompts", "simple_animals",
    ])  # fmt: skip
    printed = capsys.readouterr().out  # the run summary, then the per-epoch table
    table = printed[printed.index("\nepoch ") + len("\nepoch") :]
    assert table.split()[0] == "group_score"  # not the leave-one-out credits, whose mean is about 0
    assert 0 < float(table.splitlines()[1].split()[1]) <= 2  # a mean cosine distance


def test_reward_kwargs_reach_the_reward_or_are_refused_by_name(tmp_path):
    from tdpo_trl.commands.train import build_trainer, parse_args

    argv = ["--pretrained_model", "tiny", "--reward", "digit_parity", "--reward_kwargs", '{"min_confidence": 0.8}']
    trainer = build_trainer(*parse_args([*argv, "--logdir", str(tmp_path), "--num_epochs", "1"]))
    assert trainer.tasks[0].reward_function.min_confidence == 0.8
    with pytest.raises(ValueError, match=r"`reward`: reward 'digit_parity' does not accept .*'confidence': 0.8"):
        build_trainer(*parse_args(["--reward", "digit_parity", "--reward_kwargs", '{"confidence": 0.8}']))
    with pytest.raises(ValueError, match="is a function and takes no keyword arguments"):
        get_reward_function("tdpo_trl.tiny_models:mean_brightness", scale=2)


def test_a_weighted_sum_with_a_distribution_component_credits_each_sample_with_both():
    from tdpo_trl.rewards import WeightedSum

    torch.manual_seed(0)
    images, prompts = torch.rand(8, 3, 8, 8), ["a cat"] * 4 + ["a dog"] * 4
    diversity = Diversity(encoder=flat_encoder)
    mixed = WeightedSum({"diversity": (diversity, 2.0), "bright": (mean_brightness, 0.5)})
    assert mixed.is_distribution_level and mixed.default_prompt_repeats == 4
    assert not WeightedSum({"bright": (mean_brightness, 1.0)}).is_distribution_level

    rewards, info = mixed(images, prompts)
    credits, alone = diversity(images, prompts)
    brightness = mean_brightness(images)[0]
    assert torch.allclose(rewards, 2 * credits + 0.5 * brightness, atol=1e-6)
    assert torch.allclose(info["components"]["diversity"], credits) and torch.allclose(
        info["components"]["bright"], brightness
    )
    assert info["group_score"] == pytest.approx(2 * alone["group_score"] + 0.5 * brightness.mean().item(), abs=1e-6)
    assert mixed.batch_score(images, prompts) == pytest.approx(info["group_score"], abs=1e-6)
    with pytest.raises(ValueError, match=r"features of shape \(8, 5\) do not match its components' widths \[192, 1\]"):
        mixed.rewards_from_features(torch.zeros(8, 5), prompts)


def test_trainer_trains_on_a_weighted_sum_with_a_distribution_component(tmp_path, tiny_pipeline):
    from tdpo_trl.rewards import WeightedSum

    reward = WeightedSum({"diversity": (Diversity(encoder=flat_encoder), 1.0), "bright": (mean_brightness, 0.1)})
    prompts = PromptSource(["a cat", "a dog", "a cow"], seed=0)
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1), reward, prompts, tiny_pipeline)
    assert trainer.prompt_repeats == [4]
    trainer.train()
    record = trainer.log_history[-1]
    assert {"reward/group_score", "reward/diversity/mean", "reward/bright/mean"} <= set(record)
    # the logged components are each sample's own: their weighted means add up to the mean reward
    expected = record["reward/diversity/mean"] + 0.1 * record["reward/bright/mean"]
    assert record["reward/mean"] == pytest.approx(expected, abs=1e-6)
    assert record["reward/group_score"] > 0.1 * record["reward/bright/mean"]  # plus the groups' diversity (> 0)
