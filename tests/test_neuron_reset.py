"""Scoring, statistics and reset of the critic's neurons, on tiny MLPs and on the real critic head."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tdpo_trl import ActiveNeuronResetCallback, ValueHead
from tdpo_trl.neuron_reset import activation_sums, hidden_layers, mask_overlap, neuron_scores, reset_neurons


def plain_mlp(input_dim, hidden_sizes, activation):
    """A user's own MLP head with PyTorch's default init (no `init_std`)."""
    torch.manual_seed(1)
    layers, width = [], input_dim
    for size in hidden_sizes:
        layers += [nn.Linear(width, size)] + ([activation()] if activation else [])
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))


def value_head(input_dim, hidden_sizes, activation):
    torch.manual_seed(1)
    name = {None: "none", nn.ReLU: "relu", nn.Tanh: "tanh"}[activation]
    return ValueHead(input_dim, tuple(hidden_sizes), (0.1,) * len(hidden_sizes), name)


def trained_with_adam(head, input_dim):
    """Two AdamW steps so that every parameter has exp_avg / exp_avg_sq state and non-trivial values."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        features = torch.randn(16, input_dim, generator=generator)
        head(features).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def expected_changes(layers, masks):
    """For every parameter, a bool tensor of the entries a reset of `masks` must re-draw."""
    changed = {}
    for layer in layers:
        changed.setdefault(layer.linear.weight, torch.zeros_like(layer.linear.weight, dtype=torch.bool))
        changed.setdefault(layer.linear.bias, torch.zeros_like(layer.linear.bias, dtype=torch.bool))
        changed.setdefault(layer.next_linear.weight, torch.zeros_like(layer.next_linear.weight, dtype=torch.bool))
        changed.setdefault(layer.next_linear.bias, torch.zeros_like(layer.next_linear.bias, dtype=torch.bool))
    for layer, mask in zip(layers, masks):
        changed[layer.linear.weight][mask] = True  # incoming rows
        changed[layer.linear.bias][mask] = True
        changed[layer.next_linear.weight][:, mask] = True  # outgoing columns
    return changed


SHAPES = [(5, [6]), (7, [8, 4]), (6, [5, 5, 3])]
TARGETS = ["active", "dormant", "all"]


@pytest.mark.parametrize("make_head", [plain_mlp, value_head], ids=["tiny-mlp", "value-head"])
@pytest.mark.parametrize("activation", [None, nn.ReLU, nn.Tanh], ids=["linear", "relu", "tanh"])
@pytest.mark.parametrize("input_dim, hidden_sizes", SHAPES, ids=[str(s[1]) for s in SHAPES])
@pytest.mark.parametrize("target", TARGETS)
def test_reset_changes_exactly_the_selected_neurons_and_their_adam_moments(
    make_head, activation, input_dim, hidden_sizes, target
):
    head = make_head(input_dim, hidden_sizes, activation)
    optimizer = trained_with_adam(head, input_dim)
    layers = hidden_layers(head)
    dormant = [
        torch.rand(size, generator=torch.Generator().manual_seed(3 + k)) < 0.4 for k, size in enumerate(hidden_sizes)
    ]
    masks = {"active": [~m for m in dormant], "dormant": dormant, "all": [torch.ones_like(m) for m in dormant]}[target]
    before = {p: p.detach().clone() for p in head.parameters()}
    state_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in head.parameters()}

    init_std = getattr(head, "init_std", None)
    count = reset_neurons(layers, masks, optimizer, torch.Generator().manual_seed(0), init_std)

    assert count == sum(int(m.sum()) for m in masks)
    changed = expected_changes(layers, masks)
    for param, where in changed.items():
        assert torch.equal(param[~where], before[param][~where]), "an unselected entry changed"
        new_values = param[where]
        if param.dim() == 1 and init_std is not None:  # the paper's head: reset biases are zero
            assert torch.equal(new_values, torch.zeros_like(new_values))
        else:
            assert (new_values != before[param][where]).all(), "a selected entry kept its value"
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][where], torch.zeros_like(state[key][where])), f"{key} not zeroed"
            assert torch.equal(state[key][~where], state_before[param][key][~where]), f"{key} changed elsewhere"
        assert torch.equal(state["step"], state_before[param]["step"]), "the step count changed"


def test_reset_draws_from_the_heads_init_distribution():
    head = ValueHead(255, (512, 256), (0.0, 0.0))  # init_std = 1/256
    trained_with_adam(head, 255)
    everything = [torch.ones(512, dtype=torch.bool), torch.ones(256, dtype=torch.bool)]
    reset_neurons(hidden_layers(head), everything, None, torch.Generator().manual_seed(0), head.init_std)
    for weight in (head[0].weight, head[1].weight):  # 130k entries each: the std is within 1%
        assert abs(weight.std().item() / head.init_std - 1) < 0.02
        assert abs(weight.mean().item()) < 0.02 * head.init_std
    assert abs(head[2].weight.std().item() / head.init_std - 1) < 0.2  # outgoing columns: 256 entries
    assert torch.equal(head[0].bias, torch.zeros(512)) and torch.equal(head[1].bias, torch.zeros(256))


def test_reset_without_init_std_uses_pytorch_default_linear_bounds():
    head = plain_mlp(100, [64], nn.ReLU)
    trained_with_adam(head, 100)
    reset_neurons(hidden_layers(head), [torch.ones(64, dtype=torch.bool)], None, torch.Generator().manual_seed(0))
    assert head[0].weight.abs().max() <= 0.1 and head[0].weight.abs().max() > 0.09  # U(-1/sqrt(100), 1/sqrt(100))
    assert head[2].weight.abs().max() <= 1 / 8  # next layer fan-in 64


def test_successive_resets_draw_fresh_numbers_and_leave_the_global_rng_alone():
    head = ValueHead(6, (4,), (0.0,))
    layers, everything = hidden_layers(head), [torch.ones(4, dtype=torch.bool)]
    generator = torch.Generator().manual_seed(0)
    global_state = torch.random.get_rng_state()
    reset_neurons(layers, everything, None, generator, head.init_std)
    first = head[0].weight.clone()
    reset_neurons(layers, everything, None, generator, head.init_std)
    assert not torch.equal(first, head[0].weight)
    assert torch.equal(global_state, torch.random.get_rng_state())
    reset_neurons(layers, everything, None, torch.Generator().manual_seed(0), head.init_std)
    assert torch.equal(first, head[0].weight), "the same seed must give the same draw"


def test_hidden_layers_pair_each_linear_with_its_activation_and_consumer():
    head = ValueHead(6, (5, 3), (0.2, 0.0), "relu")
    layers = hidden_layers(head)
    shapes = [(lay.linear.in_features, lay.linear.out_features, lay.next_linear.out_features) for lay in layers]
    assert shapes == [(6, 5, 3), (5, 3, 1)]
    assert all(isinstance(layer.activation, nn.ReLU) for layer in layers)
    assert hidden_layers(ValueHead(6, (5,), (0.2,)))[0].activation is torch.nn.functional.relu  # the paper's head
    with pytest.raises(ValueError, match="at least 2 Linear layers"):
        hidden_layers(nn.Sequential(nn.Linear(4, 1)))


def constructed_head():
    """3 hidden neurons reading features (a, b): n0 = 2a, n1 = -|...| (never fires), n2 = a; then 2 more: m0 = n0,
    m1 = 0 (dead)."""
    head = ValueHead(2, (3, 2), (0.5, 0.0))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
        head[0].bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
        head[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        head[2].bias.zero_()
    return head


def test_scores_on_constructed_activations():
    head = constructed_head()
    features = torch.tensor([[1.0, 5.0], [3.0, -5.0]])  # a = 1, 3
    sums = activation_sums(head, features, hidden_layers(head))
    # layer 0: relu(2a) = 2, 6; relu(-1) = 0; relu(a) = 1, 3. Layer 1: relu(n0) = 2, 6; 0.
    assert sums.tolist() == [8.0, 0.0, 4.0, 8.0, 0.0]
    scores = neuron_scores([sums[:3] / 2, sums[3:] / 2])
    torch.testing.assert_close(scores[0], torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(scores[1], torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert head.training, "scoring must restore the head's train mode"


def fake_trainer(head, optimizer=None):
    accelerator = Accelerator(cpu=True)
    return SimpleNamespace(
        accelerator=accelerator,
        critic_head=head,
        critic_optimizer=optimizer,
        critic=object(),
        config=SimpleNamespace(seed=0),
    )


@pytest.mark.parametrize(
    "threshold, dormant, layer0_dormant_fraction, total_dormant_fraction",
    [
        (0.0, [[False, True, False], [False, True]], 1 / 3, 2 / 5),
        (1.0, [[False, True, True], [False, True]], 2 / 3, 3 / 5),
        (2.0, [[True, True, True], [True, True]], 1.0, 1.0),
    ],
)
def test_measured_masks_and_statistics(threshold, dormant, layer0_dormant_fraction, total_dormant_fraction):
    callback = ActiveNeuronResetCallback(threshold=threshold)
    masks = callback.measure(fake_trainer(constructed_head()), torch.tensor([[1.0, 5.0], [3.0, -5.0]]))
    assert [m.tolist() for m in masks] == dormant
    stats = callback.statistics(masks)
    assert stats["neurons/layer_0/dormant_fraction"] == pytest.approx(layer0_dormant_fraction)
    assert stats["neurons/layer_0/active_fraction"] == pytest.approx(1 - layer0_dormant_fraction)
    assert stats["neurons/dormant_fraction"] == pytest.approx(total_dormant_fraction)
    assert stats["neurons/active_fraction"] == pytest.approx(1 - total_dormant_fraction)
    assert "neurons/mask_overlap" not in stats  # no previous measurement


@pytest.mark.parametrize(
    "previous, current, expected",
    [
        ([1, 1, 0, 0], [0, 1, 1, 1], 1 / 2),  # the official code sums numel and would report 100%
        ([1, 0, 0, 0], [1, 1, 1, 0], 1.0),
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0),
        ([0, 0, 0, 0], [1, 1, 0, 0], None),
    ],
)
def test_mask_overlap(previous, current, expected):
    assert mask_overlap(torch.tensor(previous, dtype=torch.bool), torch.tensor(current, dtype=torch.bool)) == expected


def test_callback_resets_on_schedule_and_zeroes_moments_through_an_accelerated_optimizer():
    head = ValueHead(2, (3, 2), (0.0, 0.0))
    trainer = fake_trainer(head)
    optimizer = trained_with_adam(head, 2)
    trainer.critic_head, trainer.critic_optimizer = trainer.accelerator.prepare(head, optimizer)
    callback = ActiveNeuronResetCallback(frequency=2, target="active")
    features = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))  # (n, T, D)
    counts = []
    for epoch in range(4):
        before = head[0].weight.clone()
        metrics = {}
        callback.on_epoch_end(
            trainer, epoch=epoch, global_step=0, samples={"critic_features": features}, metrics=metrics
        )
        counts.append((metrics["neurons/reset_count"], metrics["neurons/reset_neurons"]))
        active_rows = ~callback.dormant_masks[0]
        assert torch.equal(
            head[0].weight[active_rows] != before[active_rows],
            torch.full_like(before[active_rows], epoch % 2 == 1, dtype=torch.bool),
        )
        if epoch % 2 == 1:
            assert torch.equal(
                optimizer.state[head[0].weight]["exp_avg"][active_rows], torch.zeros_like(before[active_rows])
            )
    active = 5 - int(torch.cat(callback.dormant_masks).sum())
    assert [c[0] for c in counts] == [0, 1, 1, 2]
    assert counts[1][1] > 0 and counts[0][1] == counts[2][1] == 0
    assert counts[3][1] == active


def test_target_none_only_measures():
    head = ValueHead(2, (3,), (0.0,))
    before = head[0].weight.clone()
    callback = ActiveNeuronResetCallback(frequency=1, target="none")
    metrics = {}
    callback.on_epoch_end(
        fake_trainer(head), epoch=0, global_step=0, samples={"critic_features": torch.randn(2, 2, 2)}, metrics=metrics
    )
    assert metrics["neurons/reset_count"] == 0 and "neurons/dormant_fraction" in metrics
    assert torch.equal(before, head[0].weight)


def test_scoring_size_scores_a_subset():
    head = constructed_head()
    callback = ActiveNeuronResetCallback(scoring_size=1, threshold=0.0)
    trainer = fake_trainer(head)
    masks = callback.measure(trainer, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # one of them: n0, n2 fire or not
    assert sum(int(m.sum()) for m in masks) in (2, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frequency": 0}, r"`frequency` must be an integer >= 1, got 0"),
        ({"threshold": -1.0}, r"`threshold` must be a finite number >= 0, got -1.0"),
        ({"target": "random"}, r"`target` must be one of .* got 'random'"),
        ({"scoring_size": 0}, r"`scoring_size` must be None or >= 1, got 0"),
    ],
)
def test_callback_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActiveNeuronResetCallback(**kwargs)


def test_state_dict_round_trip_continues_the_random_stream():
    callback = ActiveNeuronResetCallback(seed=3)
    torch.rand(5, generator=callback.generator())
    callback.reset_count = 4
    restored = ActiveNeuronResetCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.reset_count == 4
    assert torch.equal(torch.rand(3, generator=restored.generator()), torch.rand(3, generator=callback.generator()))


def test_one_step_per_sample_scores_one_feature_row_per_sample():
    callback = ActiveNeuronResetCallback(seed=0)  # the default, as the official code: one random step per sample
    features = torch.arange(5 * 3 * 2, dtype=torch.float32).view(5, 3, 2)  # (n=5, T=3, D=2)
    trainer = fake_trainer(constructed_head())
    scored = callback.scored_features(trainer, features)
    assert scored.shape == (5, 2)
    for i, row in enumerate(scored):  # each row is sample i's features at one of its own steps
        assert any(torch.equal(row, features[i, t]) for t in range(3))
    all_steps = ActiveNeuronResetCallback(scoring="all_steps").scored_features(trainer, features)
    assert torch.equal(all_steps, features.flatten(0, 1))


def test_an_unknown_scoring_mode_is_named():
    with pytest.raises(ValueError, match=r"`scoring` must be one of .* got 'some'"):
        ActiveNeuronResetCallback(scoring="some")
