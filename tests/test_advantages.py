import math

import pytest
import torch

from tdpo_trl import clipped_value_loss, discounted_returns, explained_variance, temporal_advantages


def test_discounted_returns_on_hand_computed_numbers():
    rewards = torch.tensor([1.0, -2.0])
    returns = discounted_returns(rewards, num_steps=3, gamma=0.5)
    # G_2 = r, G_1 = 0.5 r, G_0 = 0.25 r
    expected = torch.tensor([[0.25, 0.5, 1.0], [-0.5, -1.0, -2.0]])
    torch.testing.assert_close(returns, expected)


def test_gamma_one_gives_the_final_reward_at_every_step():
    rewards = torch.tensor([0.3, 0.7, -1.1])
    returns = discounted_returns(rewards, num_steps=5, gamma=1.0)
    torch.testing.assert_close(returns, rewards[:, None].expand(3, 5))


def test_temporal_advantages_on_hand_computed_numbers():
    returns = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    values = torch.tensor([[0.5, 1.5], [0.0, -1.0]])
    raw = temporal_advantages(returns, values, normalized=False)
    torch.testing.assert_close(raw, torch.tensor([[0.5, -0.5], [-1.0, 0.0]]))

    normalized = temporal_advantages(returns, values, normalized=True)
    # raw entries 0.5, -0.5, -1, 0: mean -0.25, population std sqrt(0.3125)
    mean, std = -0.25, math.sqrt(0.3125)
    expected = (torch.tensor([[0.5, -0.5], [-1.0, 0.0]]) - mean) / (std + 1e-8)
    torch.testing.assert_close(normalized, expected)
    assert normalized.mean().abs() < 1e-6


def test_temporal_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"returns \(2, 3\) and values \(2, 2\)"):
        temporal_advantages(torch.zeros(2, 3), torch.zeros(2, 2))


def test_clipped_value_loss_on_hand_computed_numbers():
    values = torch.tensor([1.0, 0.0, 0.5])
    old_values = torch.tensor([0.5, 0.1, 0.5])
    returns = torch.tensor([2.0, -1.0, 0.5])
    loss, clipfrac = clipped_value_loss(values, old_values, returns, clip_range=0.2)
    # entry 0: unclipped (1-2)^2 = 1; clipped value 0.7 -> (0.7-2)^2 = 1.69; max 1.69
    # entry 1: unclipped (0+1)^2 = 1; clipped value stays 0.0 (within 0.1 +- 0.2) -> 1; max 1
    # entry 2: both 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_clipped_value_loss_with_clipping_off_is_half_mse():
    values = torch.tensor([1.0, 0.0])
    returns = torch.tensor([3.0, 1.0])
    loss, clipfrac = clipped_value_loss(values, torch.zeros(2), returns, clip_range=0.0)
    assert loss.item() == pytest.approx(0.5 * (4.0 + 1.0) / 2)
    assert clipfrac.item() == 0.0


def test_explained_variance():
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(targets, targets) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), targets) == pytest.approx(0.0)
    # residuals 1, -1, 1, -1: variance 1 against variance 1.25
    assert explained_variance(targets + torch.tensor([-1.0, 1.0, -1.0, 1.0]), targets) == pytest.approx(1 - 1 / 1.25)
    assert math.isnan(explained_variance(torch.zeros(3), torch.ones(3)))
