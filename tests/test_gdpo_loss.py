"""GDPO's loss and ranking metrics as pure functions: definitions, hand-worked values, invariances."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lexalign.methods.gdpo import (
    gdpo_loss,
    group_loss,
    kendall_tau,
    pair_accuracy,
    pairwise_loss,
    plackett_luce_log_prob,
    top1_accuracy,
)


def brute_force_pl(r: list[float]) -> float:
    """Plackett–Luce probability of the order r[0] ≻ r[1] ≻ … as the product of successive softmax choices."""
    p = 1.0
    for k in range(len(r)):
        p *= math.exp(r[k]) / sum(math.exp(x) for x in r[k:])
    return p


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- K = 2: both terms are DPO's sigmoid loss -------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_k2_equals_dpo_sigmoid_for_every_weight(weight):
    torch.manual_seed(0)
    rewards = torch.randn(64, 2, dtype=torch.float64) * 3
    dpo = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    out = gdpo_loss(rewards, weight)
    torch.testing.assert_close(out.pairwise, dpo)
    torch.testing.assert_close(out.group, dpo)
    torch.testing.assert_close(out.loss, dpo.mean())


# --- the group term is the Plackett–Luce likelihood -------------------------------------------------


def test_group_term_is_plackett_luce_at_k4():
    torch.manual_seed(1)
    rewards = torch.randn(8, 4, dtype=torch.float64)
    group = group_loss(rewards)
    for row, value in zip(rewards.tolist(), group.tolist(), strict=True):
        assert math.exp(-(4 - 1) * value) == pytest.approx(brute_force_pl(row), rel=1e-10)


def test_probabilities_of_all_orderings_sum_to_one():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64)
    orders = list(itertools.permutations(range(4)))
    assert len(orders) == math.factorial(4)
    permuted = torch.stack([rewards[list(order)] for order in orders])
    probs = torch.exp(plackett_luce_log_prob(permuted))
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # and -(K-1)·L_group is that log-probability
    torch.testing.assert_close(-(4 - 1) * group_loss(permuted), plackett_luce_log_prob(permuted))


def test_invariant_to_a_constant_added_to_every_reward_of_a_prompt():
    torch.manual_seed(2)
    rewards = torch.randn(5, 4, dtype=torch.float64)
    shift = torch.tensor([[0.0], [7.0], [-3.0], [1e3], [-1e3]], dtype=torch.float64)
    shifted = rewards + shift
    torch.testing.assert_close(pairwise_loss(shifted), pairwise_loss(rewards))
    torch.testing.assert_close(group_loss(shifted), group_loss(rewards))


def test_stable_for_large_rewards():
    rewards = torch.tensor([[1e4, 0.0, -1e4, -2e4], [-1e4, 0.0, 1e4, 2e4]])
    out = gdpo_loss(rewards, 0.5)
    assert torch.isfinite(out.pairwise).all() and torch.isfinite(out.group).all()
    assert out.group[0].item() == pytest.approx(0.0, abs=1e-6)  # the ranking is certain
    assert out.group[1].item() == pytest.approx((3e4 + 2e4 + 1e4) / 3, rel=1e-6)  # certainly reversed


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_raising_the_best_reward_lowers_the_loss(weight):
    torch.manual_seed(3)
    rewards = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    out = gdpo_loss(rewards, weight)
    out.loss.backward()
    assert (rewards.grad[:, 0] < 0).all()
    raised = rewards.detach().clone()
    raised[:, 0] += 0.5
    assert gdpo_loss(raised, weight).loss < out.loss


# --- hand-worked values -----------------------------------------------------------------------------


def test_hand_worked_k3():
    rewards = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    # pairs (1,2), (1,3), (2,3) with margins 1, 2, 1
    pair = (softplus(-1) + softplus(-2) + softplus(-1)) / 3
    # choices: y1 from {y1,y2,y3}, y2 from {y2,y3}
    group = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    out = gdpo_loss(rewards, 0.25)
    assert out.pairwise.item() == pytest.approx(pair, rel=1e-12)
    assert out.group.item() == pytest.approx(group, rel=1e-12)
    assert out.loss.item() == pytest.approx(0.75 * pair + 0.25 * group, rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_hand_worked_equal_rewards(k):
    """Untrained policy (r = 0): L_pair = log 2 and L_group = log(K!)/(K-1)."""
    out = gdpo_loss(torch.zeros(3, k), 0.5)
    torch.testing.assert_close(out.pairwise, torch.full((3,), math.log(2)))
    torch.testing.assert_close(out.group, torch.full((3,), math.log(math.factorial(k)) / (k - 1)))


def test_batch_loss_is_mean_over_prompts():
    torch.manual_seed(4)
    rewards = torch.randn(7, 4)
    out = gdpo_loss(rewards, 0.3)
    per_prompt = torch.stack([gdpo_loss(rewards[i : i + 1], 0.3).loss for i in range(7)])
    torch.testing.assert_close(out.loss, per_prompt.mean())


def test_weight_outside_unit_interval_is_refused():
    with pytest.raises(ValueError):
        gdpo_loss(torch.zeros(1, 2), 1.5)


# --- ties -------------------------------------------------------------------------------------------


def test_ties_are_left_out_of_the_pairwise_term():
    rewards = torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([[2.0, 2.0, 1.0]])  # y1 ~ y2 ≻ y3
    expected = (softplus(-1.0) + softplus(-3.0)) / 2  # pairs (1,3) and (2,3) only
    assert pairwise_loss(rewards, scores).item() == pytest.approx(expected, rel=1e-12)


def test_all_tied_group_has_no_pairwise_term():
    rewards = torch.tensor([[1.0, 3.0]])
    assert pairwise_loss(rewards, torch.tensor([[1.0, 1.0]])).item() == 0.0
    assert torch.isnan(pair_accuracy(rewards, torch.tensor([[1.0, 1.0]]))).all()


def test_ties_are_broken_stably_in_the_group_term():
    """The group term reads the given order: a tie keeps the first-listed response ahead."""
    rewards = torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(group_loss(rewards),
                               torch.tensor([-math.log(brute_force_pl([1.0, 3.0, 0.0])) / 2], dtype=torch.float64))


# --- ranking metrics ----------------------------------------------------------------------------------


def test_top1_accuracy_is_strict():
    rewards = torch.tensor([[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [3.0, 3.0, 0.0], [1.0, 3.0, 0.0]])
    scores = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 2.0, 0.0], [2.0, 2.0, 0.0]])
    # right; wrong (y2 wins); wrong (tie for the top reward); right (y2 shares the best score)
    assert top1_accuracy(rewards, scores).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert top1_accuracy(torch.zeros(1, 4)).tolist() == [0.0]


def test_pair_accuracy():
    rewards = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    # pairs: (1,2)✓ (1,3)✓ (1,4)✓ (2,3)✗ (2,4)✓ (3,4)✓
    assert pair_accuracy(rewards).item() == pytest.approx(5 / 6)
    # a tie in rewards is not a correct pair
    assert pair_accuracy(torch.tensor([[1.0, 1.0]])).item() == 0.0


def test_kendall_tau():
    assert kendall_tau(torch.tensor([[4.0, 3.0, 2.0, 1.0]])).item() == pytest.approx(1.0)
    assert kendall_tau(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).item() == pytest.approx(-1.0)
    # one discordant pair of six: (C - D) / 6 = (5 - 1) / 6
    assert kendall_tau(torch.tensor([[3.0, 1.0, 2.0, 0.0]])).item() == pytest.approx(4 / 6)
    # K = 2: tau = 2·accuracy − 1
    assert kendall_tau(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-1.0)
    # all rewards tied: undefined
    assert torch.isnan(kendall_tau(torch.zeros(1, 3))).all()


def test_kendall_tau_b_with_tied_scores():
    rewards = torch.tensor([[3.0, 2.0, 1.0]])
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    # concordant: (1,3), (2,3); the (1,2) pair is tied in scores. tau_b = 2 / sqrt(3 · 2)
    assert kendall_tau(rewards, scores).item() == pytest.approx(2 / math.sqrt(6))
