"""Capacity routing on hand-computed tables: which assignments an expert keeps, and what the
load-balancing loss sees. Each table is small enough to check by reading it."""
from __future__ import annotations

import math

import pytest
import torch

from masep.model.moe_transformer import expert_capacity, route


def _logits(preferences: list[list[int]], n_experts: int) -> torch.Tensor:
    """Router logits whose top-k order per token is `preferences[token]` (best first)."""
    logits = torch.zeros(len(preferences), n_experts)
    for n, order in enumerate(preferences):
        for rank, e in enumerate(order):
            logits[n, e] = float(len(order) - rank)
    return logits


def test_capacity_rounds_up():
    # 1.0 x 5 tokens x top-1 / 2 experts = 2.5 assignments: an expert takes 3, not 2
    assert expert_capacity(5, 2, 1, 1.0) == 3
    assert expert_capacity(6, 4, 2, 1.25) == 4  # 3.75
    assert expert_capacity(4, 2, 1, 1.0) == 2  # exact: no rounding
    assert expert_capacity(1, 64, 1, 1.0) == 1 and expert_capacity(8, 2, 1, None) is None


def test_overflow_is_dropped_in_token_order_at_the_rounded_up_capacity():
    # 5 tokens, all choose expert 0 (top-1, 2 experts): capacity ceil(2.5) = 3 keeps tokens 0-2
    r = route(_logits([[0]] * 5, 2), top_k=1, capacity_factor=1.0)
    assert r.keep[:, 0].tolist() == [True, True, True, False, False]
    assert r.tokens_per_expert.tolist() == [3, 0] and int(r.dropped) == 2


def test_first_choices_are_served_before_second_choices():
    # 3 tokens, 3 experts, top-2, capacity ceil(0.5 * 3 * 2 / 3) = 1 assignment per expert.
    # token: (first, second) = 0: (0, 1), 1: (1, 2), 2: (2, 0). Choice-major queues: every expert
    # is some token's first choice, so all three first choices are kept and every second dropped.
    # (A token-major queue would keep token 0's second choice and drop token 1's and 2's first.)
    r = route(_logits([[0, 1], [1, 2], [2, 0]], 3), top_k=2, capacity_factor=0.5)
    assert r.expert.tolist() == [[0, 1], [1, 2], [2, 0]]
    assert r.keep.tolist() == [[True, False], [True, False], [True, False]]
    assert r.tokens_per_expert.tolist() == [1, 1, 1] and int(r.dropped) == 3


def test_load_balancing_loss_counts_the_router_choices_not_the_kept_assignments():
    # 4 tokens all choose expert 0 of 2 (top-1), capacity 2: half of them overflow. The loss must
    # see every choice (f = [1, 0]) so that it keeps pushing tokens away from the full expert.
    logits = torch.tensor([[2.0, 0.0]] * 4)
    r = route(logits, top_k=1, capacity_factor=1.0)
    assert int(r.dropped) == 2
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0)  # mean router probability of expert 0
    assert float(r.lb_loss) == pytest.approx(2 * (1.0 * p0 + 0.0 * (1 - p0)), rel=1e-6)
    # without capacity the same choices give the same loss
    assert float(route(logits, 1, None).lb_loss) == pytest.approx(float(r.lb_loss))

