"""The embedded digits model and its judges, as shipped in `tdpo_trl/digits/assets`."""

import json
import os

import numpy as np
import pytest
import torch

from tdpo_trl.digits import (
    DigitJudges,
    label_of,
    load_digits,
    load_digits_pipeline,
    prompted_accuracy,
    shared_judges,
    train_test_split,
)
from tdpo_trl.digits.data import ASSETS
from tdpo_trl.digits.judges import grayscale, stroke_mass, vary_strokes
from tdpo_trl.rewards import get_reward_function


@pytest.fixture(scope="module")
def held_out():
    images, labels = load_digits()
    _, test_idx = train_test_split(len(images))
    return (images[test_idx] + 1) / 2, labels[test_idx]  # (297, 3, 16, 16) in [0, 1]


def test_shipped_digits_equal_scikit_learns():
    pytest.importorskip("sklearn")
    shipped, shipped_labels = load_digits()
    original, labels = load_digits("sklearn")
    assert shipped.shape == (1797, 3, 16, 16)
    torch.testing.assert_close(shipped, original, rtol=0, atol=0)
    assert torch.equal(shipped_labels, labels)


def test_shipped_files_stay_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ASSETS) for f in files)
    assert total <= 10 * 2**20, f"shipped digits assets are {total / 2**20:.1f} MB"


def test_classifier_accuracy_on_held_out_real_digits(held_out):
    images, labels = held_out
    judges = shared_judges()
    predicted = judges.classifier(grayscale(images)).argmax(1)
    assert (predicted == labels).float().mean().item() >= 0.95


def test_ink_regressor_tracks_stroke_mass_on_held_out_digits(held_out):
    """R^2 on held-out real digits with varied stroke width (the regressor's task); on real digits alone the stroke
    mass varies little and the learned reward is a weak proxy, as reward models are."""
    images, _ = held_out
    varied = torch.cat([images, vary_strokes(images, torch.Generator().manual_seed(0))])
    target = stroke_mass(varied)
    scores = shared_judges().score(varied)
    r2 = 1 - ((scores["ink"] - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert r2.item() >= 0.7
    scores = shared_judges().score(images)
    # thicker strokes (3x3 dilation) score more ink, as their true stroke mass says
    thick = torch.nn.functional.max_pool2d(images, 3, 1, 1)
    assert (shared_judges().score(thick)["ink"] > scores["ink"]).float().mean() >= 0.9


def test_realism_is_scikit_learns_ppca_log_likelihood(held_out):
    sklearn = pytest.importorskip("sklearn.decomposition")
    with open(os.path.join(ASSETS, "base_metrics.json")) as f:
        n_components = json.load(f)["realism_components"]
    images, _ = load_digits()
    train_idx, _ = train_test_split(len(images))
    real = ((images[train_idx] + 1) / 2).mean(1).flatten(1).double().numpy()
    pca = sklearn.PCA(n_components=n_components, random_state=0).fit(real)
    test_images, _ = held_out
    expected = pca.score_samples(test_images.mean(1).flatten(1).double().numpy()) / 256
    np.testing.assert_allclose(shared_judges().score(test_images)["realism"].numpy(), expected, rtol=1e-3, atol=1e-3)


def test_realism_and_nearest_real_separate_digits_from_noise(held_out):
    images, _ = held_out
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    real, fake = shared_judges().score(images), shared_judges().score(noise)
    assert real["realism"].min() > fake["realism"].max()
    assert real["nearest_real"].max() < fake["nearest_real"].min()


@pytest.mark.parametrize(
    "prompt, label",
    [("a handwritten digit seven", 7), ("a drawing of the number 0", 0), ("the digit nine", 9), ("a cat", -1),
     ("", -1), ("Digit THREE", 3)],
)  # fmt: skip
def test_label_of(prompt, label):
    assert label_of(prompt) == label


def test_digit_rewards_by_name(held_out):
    images, labels = held_out[0][:20], held_out[1][:20]
    prompts = [f"the digit {int(n)}" for n in labels]
    accuracy, _ = get_reward_function("digit_accuracy")(images, prompts, [{}] * 20)
    assert accuracy.shape == (20,) and set(accuracy.tolist()) <= {0.0, 1.0} and accuracy.mean() >= 0.9
    wrong, _ = get_reward_function("digit_accuracy")(images, [f"the digit {(int(n) + 1) % 10}" for n in labels], None)
    assert wrong.mean() <= 0.1
    unnamed, _ = get_reward_function("digit_accuracy")(images[:2], ["a cat", "a dog"], None)
    assert torch.isnan(unnamed).all()
    ink, _ = get_reward_function("digit_ink")(images, prompts, None)
    assert ink.dtype == torch.float32 and torch.isfinite(ink).all()


def test_missing_judges_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="judges.safetensors"):
        DigitJudges.from_file(str(tmp_path / "judges.safetensors"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_digits_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="'mnist'"):
        load_digits("mnist")


def test_shipped_base_draws_the_prompted_digit():
    """The shipped base reaches >= 95% prompted-digit accuracy on the fixed seed set it was released with."""
    accuracy = prompted_accuracy(load_digits_pipeline(), shared_judges(), per_digit=10, seed=1234)
    assert accuracy >= 0.95


def test_the_independent_judge_reads_real_digits_and_names_prompts_without_one():
    from tdpo_trl.digits import WORDS, load_digits, train_test_split
    from tdpo_trl.digits.independent_judge import DigitAccuracyIndependent, independent_labels
    from tdpo_trl.rewards import get_reward_function

    images, labels = load_digits()
    _, held_out = train_test_split(len(images))
    real = (images[held_out] + 1) / 2  # (297, 3, 16, 16) in [0, 1], as the pipeline outputs
    assert (independent_labels(real) == labels[held_out]).float().mean() >= 0.95
    judge = get_reward_function("digit_accuracy_independent")
    assert isinstance(judge, DigitAccuracyIndependent)
    prompts = [f"the digit {WORDS[int(label)]}" for label in labels[held_out[:4]]]
    wrong = [f"the digit {WORDS[(int(label) + 1) % 10]}" for label in labels[held_out[:4]]]
    scores, _ = judge(real[:4], prompts)
    assert scores.tolist() == [1.0] * 4
    assert judge(real[:4], wrong)[0].sum() <= 1  # the SVC reads the digit, not the prompt
    assert torch.isnan(judge(real[:1], ["a handwritten digit"])[0]).all()  # names no digit
