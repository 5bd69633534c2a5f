"""MA Separation's balancing: the time predictor on synthetic timings, the placement planner on
skewed and even loads, and expert migration over two gloo ranks."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from masep.parallel.balance import (TimePredictor, assign_rows, attention_features, exchange_experts,
                                    expert_features, expert_times, imbalance, migration_lists, plan_placement, rank_loads)
from masep.testing import run_ranks

E, RANKS, LAYERS = 16, 2, 4
PER_TOKEN = 2e-6
DELAY = {3: 1.5e-3, 11: 0.8e-3}  # injected per-expert delays (seconds per layer)


class SyntheticMoE:
    """Measured time of one MoE rank in one layer: fixed cost per layer, linear in the tokens of
    its experts, per-expert delays, 3% multiplicative noise."""

    def __init__(self, delay: dict[int, float], seed: int = 0):
        self.delay, self.gen = delay, torch.Generator().manual_seed(seed)

    def tokens(self) -> list[int]:
        p = torch.distributions.Dirichlet(torch.full((E,), 20.0)).sample()  # torch's global RNG
        return torch.multinomial(p, 4096, replacement=True, generator=self.gen).bincount(minlength=E).tolist()

    def true_time(self, tokens, local, layer) -> float:
        return 2e-4 + 5e-5 * layer + sum(PER_TOKEN * t + self.delay.get(e, 0.0)
                                         for e, (t, here) in enumerate(zip(tokens, local)) if here)

    def step(self, placement: list[int]) -> tuple[list, list, list[int]]:
        """Features and measured seconds of every (rank, layer) of one step, and its tokens."""
        x, y = [], []
        tokens = self.tokens()
        for layer in range(LAYERS):
            for r in range(RANKS):
                local = [placement[e] == r for e in range(E)]
                noise = 1 + 0.03 * float(torch.randn(1, generator=self.gen))
                x.append(expert_features(tokens, local, layer, LAYERS))
                y.append(self.true_time(tokens, local, layer) * noise)
        return x, y, tokens


def random_placement(gen) -> list[int]:
    perm = torch.randperm(E, generator=gen)
    out = [0] * E
    for i, e in enumerate(perm.tolist()):
        out[e] = i * RANKS // E
    return out


def test_predictor_mape_under_10_percent_on_held_out_steps():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    moe, pred = SyntheticMoE(DELAY), TimePredictor(3 + E + LAYERS)
    for _ in range(100):
        x, y, _ = moe.step(random_placement(gen))
        pred.observe(x, y)
    held = [moe.step(random_placement(gen)) for _ in range(30)]
    mape = pred.mape([r for x, _, _ in held for r in x], [t for _, y, _ in held for t in y])
    assert mape < 0.10
    # the injected delays are found: the delayed experts are predicted the costliest
    times = expert_times(pred, [256] * E, 0, LAYERS)
    assert sorted(range(E), key=times.__getitem__)[-2:] == [11, 3]


def test_predictor_learns_attention_time_quadratic_in_sequence():
    gen = torch.Generator().manual_seed(2)
    pred = TimePredictor(6 + LAYERS)

    def sample():
        mb, seq = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen)) * 256
        layer = int(torch.randint(0, LAYERS, (1,), generator=gen))
        t = (1e-4 + 3e-8 * mb * seq + 4e-11 * mb * seq * seq) * (1 + 0.03 * float(torch.randn(1, generator=gen)))
        return attention_features(mb, seq, 2, layer, LAYERS), t

    for _ in range(120):
        x, y = zip(*[sample() for _ in range(8)])
        pred.observe(x, y)
    x, y = zip(*[sample() for _ in range(200)])
    assert pred.mape(x, y) < 0.10


def test_planner_evens_one_rank_twice_as_slow():
    times = [1.0] * 8 + [2.0] * 8  # rank 1's experts take twice as long
    placement = [0] * 8 + [1] * 8
    assert imbalance(rank_loads(times, placement, 2)) == pytest.approx(1 / 3)
    plan = plan_placement(times, placement, 2, threshold=0.05)
    assert plan is not None and plan.imbalance_after <= 0.05
    assert plan.imbalance_before == pytest.approx(1 / 3)
    assert sorted(plan.placement) == sorted(placement)  # still 8 experts per rank
    assert plan.loads_after == pytest.approx(rank_loads(times, plan.placement, 2))
    assert len(plan.moves) == 8  # four swaps, the fewest: each narrows the gap of 8 by 2


def test_planner_on_four_ranks_with_a_hot_rank():
    gen = torch.Generator().manual_seed(3)
    times = (torch.rand(16, generator=gen) + 0.5).tolist()
    placement = [e // 4 for e in range(16)]
    for e in range(4):
        times[e] *= 2.5
    plan = plan_placement(times, placement, 4, threshold=0.05)
    assert plan is not None and plan.imbalance_after <= 0.05 < plan.imbalance_before
    assert all(plan.placement.count(r) == 4 for r in range(4))


def test_no_plan_without_skew():
    gen = torch.Generator().manual_seed(4)
    times = (1 + 0.01 * torch.rand(16, generator=gen)).tolist()
    assert plan_placement(times, [e // 8 for e in range(16)], 2, threshold=0.05) is None
    assert plan_placement([1.0] * 16, [e // 4 for e in range(16)], 4) is None


def test_predictor_and_planner_bring_two_x_skew_under_threshold_within_two_sync_points():
    """Rank 1's experts carry delays that make it ~2x slower than rank 0; the planner, fed the
    predictor's per-expert times, evens the true loads within two sync points."""
    torch.manual_seed(5)
    delay = {e: PER_TOKEN * 256 + 2e-4 / 8 for e in range(8, 16)}
    moe, pred = SyntheticMoE(delay, seed=5), TimePredictor(3 + E + LAYERS)
    gen = torch.Generator().manual_seed(6)
    placement = [e * RANKS // E for e in range(E)]
    mean_tokens = [4096 / E] * E

    def true_imbalance(p):
        return max(imbalance([moe.true_time(mean_tokens, [q == r for q in p], layer) for r in range(RANKS)])
                   for layer in range(LAYERS))

    assert true_imbalance(placement) > 0.3  # max/mean of 2:1
    for _ in range(60):  # warm-up: varied placements, as earlier plans would have produced
        pred.observe(*moe.step(random_placement(gen))[:2])
    for _sync_point in range(2):
        for _ in range(20):
            pred.observe(*moe.step(placement)[:2])
        times = [sum(expert_times(pred, mean_tokens, layer, LAYERS)[e] for layer in range(LAYERS))
                 for e in range(E)]
        plan = plan_placement(times, placement, RANKS, threshold=0.05)
        if plan is None:
            break
        placement = plan.placement
    assert true_imbalance(placement) < 0.05


def test_assign_rows_keeps_staying_experts_in_place():
    rows = {e: (e // 4, e % 4) for e in range(8)}
    new = assign_rows(rows, [0, 1, 0, 0, 1, 1, 0, 1])  # experts 1 and 6 swap ranks
    assert new == {0: (0, 0), 2: (0, 2), 3: (0, 3), 4: (1, 0), 5: (1, 1), 7: (1, 3), 1: (1, 2), 6: (0, 1)}
    assert migration_lists(rows, new, 0) == ([(1, 1)], [(1, 1)])
    assert migration_lists(rows, new, 1) == ([(2, 0)], [(2, 0)])
    with pytest.raises(ValueError, match="no free row"):
        assign_rows(rows, [1] * 8)


def _experts(rank: int) -> tuple[list, torch.optim.AdamW]:
    """Stacked expert parameters of 4 experts whose values name (rank, expert), after 3 AdamW
    steps, with a fresh gradient accumulated."""
    torch.manual_seed(10 + rank)
    params = [torch.nn.Parameter(torch.randn(4, 6, 5)), torch.nn.Parameter(torch.randn(4, 5, 6))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


def migrate_rank(rank: int, world: int) -> dict:
    """Experts 1 and 3 (rank 0) and 4 and 6 (rank 1) change ranks: two rows each way at once."""
    params, opt = _experts(rank)
    before = {"w": [p.detach().clone() for p in params], "g": [p.grad.clone() for p in params],
              "m": [opt.state[p]["exp_avg"].clone() for p in params],
              "v": [opt.state[p]["exp_avg_sq"].clone() for p in params],
              "step": [float(opt.state[p]["step"]) for p in params]}
    old = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (0, 3), 4: (1, 0), 5: (1, 1), 6: (1, 2), 7: (1, 3)}
    new = assign_rows(old, [0, 1, 0, 1, 0, 1, 0, 1])
    sends, recvs = migration_lists(old, new, rank)
    seconds = exchange_experts(params, opt, sends, recvs, timeout_s=60)
    after = {"w": [p.detach().clone() for p in params], "g": [p.grad.clone() for p in params],
             "m": [opt.state[p]["exp_avg"].clone() for p in params],
             "v": [opt.state[p]["exp_avg_sq"].clone() for p in params],
             "step": [float(opt.state[p]["step"]) for p in params]}
    return {"before": before, "after": after, "old": old, "new": new, "seconds": seconds}


def test_migration_moves_weights_gradients_and_adamw_state_exactly():
    results = run_ranks(2, migrate_rank)
    old, new = results[0]["old"], results[0]["new"]
    for e in old:
        (r0, row0), (r1, row1) = old[e], new[e]
        for k in ("w", "g", "m", "v"):
            for i in range(2):
                assert torch.equal(results[r1]["after"][k][i][row1], results[r0]["before"][k][i][row0]), (e, k)
        assert results[r1]["after"]["step"] == results[r0]["before"]["step"] == [3.0, 3.0]
    assert all(r["seconds"] > 0 for r in results)
    assert sum(old[e] != new[e] for e in old) == 4


def test_config_keys():
    from masep.config import ConfigError, load_config

    cfg = load_config("tiny")
    assert (cfg.ma.rebalance, cfg.ma.rebalance_every, cfg.ma.threshold) == (False, 100, 0.05)
    assert cfg.train.grad_compression == "none"
    assert load_config("tiny", ["train.grad_compression=int8"]).train.grad_compression == "int8"
    for bad, key in (("ma.rebalance=on", "ma.rebalance"), ("ma.threshold=-1", "ma.threshold"),
                     ("train.grad_compression=fp8", "train.grad_compression"),
                     ("ma.debug_expert_delay_s={16: 0.1}", "ma.debug_expert_delay_s")):
        with pytest.raises(ConfigError, match=key):
            load_config("tiny", [bad])
    cfg = load_config("tiny", ["parallel.strategy=ma_sep", "ma.rebalance=true", "ma.debug_expert_delay_s={3: 0.01}"])
    assert cfg.ma.rebalance and cfg.ma.debug_expert_delay_s == {3: 0.01}
    assert not cfg.ma.head_split
    assert load_config("tiny", ["parallel.strategy=ma_sep", "ma.head_split=true"]).ma.head_split
    for bad in (["ma.head_split=true"], ["parallel.strategy=ma_sep", "ma.head_split=true", "model.tie_embeddings=true"],
                ["ma.debug_head_delay_s=-1"]):
        with pytest.raises(ConfigError, match="ma.head_split|ma.debug_head_delay_s"):
            load_config("tiny", bad)


def test_split_cross_entropy_is_the_unsplit_one_with_its_gradients():
    """Parts of any partition of the vocabulary give F.cross_entropy and its gradients."""
    from masep.parallel.balance import head_part, split_cross_entropy, vocab_parts

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 8, generator=gen, requires_grad=True), torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (12,), generator=gen)
    want = torch.nn.functional.cross_entropy(x @ w.T, targets, reduction="none")
    gx, gw = torch.autograd.grad(want.sum(), (x, w))
    for cut, moe in ((50, 2), (1, 1), (17, 3), (40, 4)):
        parts = vocab_parts(cut, 50, moe)
        assert parts[0] == (0, cut) and parts[-1][1] == 50 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        got = split_cross_entropy(torch.stack([head_part(x, w, p, targets) for p in parts if p[1] > p[0]]))
        torch.testing.assert_close(got, want)
        for g, ref in zip(torch.autograd.grad(got.sum(), (x, w)), (gx, gw)):
            torch.testing.assert_close(g, ref)


def balancer_rank(rank: int, world: int, every: int, syncs: int, run_dir: str) -> dict:
    """Two MoE ranks, 16 experts, rank 1's experts delayed so that it is ~2x slower. Measured
    times follow the placement the balancer chose; expert weights carry their expert's id."""
    import torch.distributed as dist

    from masep.config import MaConfig
    from masep.parallel.balance import MoEBalancer

    torch.manual_seed(0)  # the same tokens on both ranks, as the step's global statistics are
    delay = {e: PER_TOKEN * 256 + 2e-4 / 8 for e in range(8, 16)}
    moe = SyntheticMoE(delay, seed=100 + rank)
    group = dist.new_group([0, 1])
    balancer = MoEBalancer(MaConfig(rebalance=True, rebalance_every=every, threshold=0.05), E, LAYERS, group,
                           [0, 1], "run", timeout_s=60)
    params = [[torch.nn.Parameter(torch.arange(8 * rank, 8 * rank + 8, dtype=torch.float32).view(8, 1, 1)
                                  .expand(8, 3, 2).clone())] for _ in range(LAYERS)]
    opt = torch.optim.AdamW([p for ps in params for p in ps], lr=0.0)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    opt.step()
    step = 0
    for _ in range(syncs):
        for _ in range(every):
            tokens = moe.tokens()
            local = [q == rank for q in balancer.placement]
            seconds = [moe.true_time(tokens, local, layer) * (1 + 0.03 * float(torch.randn(1, generator=moe.gen)))
                       for layer in range(LAYERS)]
            balancer.record(torch.tensor([tokens] * LAYERS), seconds)
            if balancer.due(step):
                balancer.sync(step, params, opt)
            step += 1
    balancer.write_events(run_dir)
    held = {e: float(params[0][0].data[row, 0, 0]) for e, (r, row) in balancer.rows.items() if r == rank}
    return {"events": [dataclasses.asdict(ev) for ev in balancer.events], "held": held,
            "placement": balancer.placement}


def test_moe_balancer_evens_a_two_x_slower_rank_within_two_sync_points(tmp_path):
    import math

    import pyarrow.parquet as pq

    results = run_ranks(2, balancer_rank, 40, 3, str(tmp_path), timeout_s=600)
    for rank in range(2):
        assert pq.read_table(tmp_path / f"balance_events-rank{rank}.parquet").to_pylist() == results[rank]["events"]
    events = [r["events"] for r in results]
    assert results[0]["placement"] == results[1]["placement"]
    first = events[0][0]
    assert first["plan_applied"] and first["moves"] > 0 and first["imbalance_before"] > 0.25
    assert first["predicted_before_s"] is None and all(ev[0]["migration_ms"] > 0 for ev in events)
    # measured within two sync points: the window after the first or second plan is even
    assert min(events[0][0]["imbalance_after"], events[0][1]["imbalance_after"]) < 0.05
    last = events[0][-1]
    assert not last["plan_applied"] and last["migration_ms"] is None  # no plan without skew
    assert abs(last["predicted_before_s"] / last["measured_before_s"] - 1) < 0.10  # the predictor's error
    for r in results:  # every expert's weights arrived where the rows say
        assert all(float(e) == v for e, v in r["held"].items()) and len(r["held"]) == 8
    assert not any(math.isnan(ev["measured_before_s"]) for ev in events[1])


def test_predictor_state_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(8)
    moe = SyntheticMoE(DELAY, seed=8)
    torch.manual_seed(8)
    a = TimePredictor(3 + E + LAYERS, train_steps=5)
    for _ in range(3):
        a.observe(*moe.step(random_placement(gen))[:2])
    b = TimePredictor(3 + E + LAYERS, train_steps=5, seed=99)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint would: no shared tensors
    x, y, _ = moe.step(random_placement(gen))
    a.observe(x, y)
    b.observe(x, y)
    assert torch.equal(a.predict(x), b.predict(x))
