"""MA Separation's balancing (the paper's Section 4.4): a time predictor, a placement planner and
expert migration. Strategies call these between optimizer steps; nothing here changes what the
model computes.

- `TimePredictor`: a 3-layer MLP trained online (CPU) on (features, measured seconds) of one
  side's work on one rank and layer, e.g. `expert_features` / `attention_features`.
- `plan_placement`: given predicted per-expert times and the current expert -> rank placement,
  a new placement whose predicted max/mean - 1 over the ranks falls under the threshold, or None
  when the current one is already under it (or nothing better exists).
- `assign_rows` + `exchange_experts`: an expert lives in row `row` of the stacked expert
  parameters (`w_up`, `w_down`) of its rank; a move sends that row's weight, its gradient
  accumulator and its AdamW state (exp_avg, exp_avg_sq, step) point-to-point into a free row of
  the destination, exactly (fp32 bits).
- `MoEBalancer`: the MoE group's sync points, built from the above, writing `BalanceEvent` rows.
- `HeadSplit`: the lever between the groups, the output head split by vocabulary (`vocab_parts`,
  `head_part`, `split_cross_entropy`), its cut moved at the sync points.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from masep.model import compute_weight
from masep.parallel.comm import p2p_exchange
from masep.telemetry.timing import comm_timer


# ---------------------------------------------------------------- features
# A sample is a [items, features] matrix: one rank's work in one layer as a sum of items (one per
# expert; one for attention). Feature 0 says whether the item is present on the rank.


def expert_features(tokens: Sequence[int], local: Sequence[bool], layer: int, layers: int) -> torch.Tensor:
    """One MoE rank in one layer: an item per expert of the model (present where the rank holds
    it; tokens routed to it; which expert; the layer) and one for the rank's fixed cost."""
    n = len(tokens)
    x = torch.zeros(n + 1, 3 + n + layers)
    x[:n, 0] = torch.tensor([float(h) for h in local])
    x[:n, 1] = torch.tensor([float(t) for t in tokens])
    x[:n, 2:2 + n] = torch.eye(n)
    x[:, 2 + n + layer] = 1.0
    x[n, 0] = x[n, -1] = 1.0
    return x


def attention_features(micro_batch: int, seq_len: int, micro_batches: int, layer: int, layers: int) -> torch.Tensor:
    """One attention rank in one layer: its micro-batches' shape (the quadratic term of attention
    is spelled out so the network need not learn a product)."""
    tokens = micro_batch * seq_len * micro_batches
    return torch.tensor([[1.0, micro_batch, seq_len, micro_batches, tokens, tokens * seq_len]
                         + [1.0 if j == layer else 0.0 for j in range(layers)]])


# ---------------------------------------------------------------- predictor


class TimePredictor:
    """Predicts the seconds of a sample (`expert_features`, `attention_features`) as the sum over
    its present items of a 3-layer MLP (Linear-ReLU-Linear-ReLU-Linear, softplus), on features
    scaled by the largest magnitude seen so far, fitted to relative squared error (what MAPE
    measures). Per-item times (`item_times`) are what the planner needs: how long each expert
    takes. `observe` adds samples to a bounded window and takes `train_steps` Adam steps on
    mini-batches of it (one CPU thread: these matrices only lose time to threading)."""

    def __init__(self, n_features: int, hidden: int = 64, lr: float = 3e-3, window: int = 4096,
                 batch: int = 128, train_steps: int = 20, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(n_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1)) ** 0.5)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.scale = torch.ones(n_features)
        self.unit = 1.0  # seconds of an item at output 1: set from the first observations
        self.x = torch.zeros(0, 0, n_features)
        self.y = torch.zeros(0)
        self.window, self.batch, self.train_steps = window, batch, train_steps
        self.gen = torch.Generator().manual_seed(seed + 1)

    @staticmethod
    def _stack(samples) -> torch.Tensor:
        return samples if torch.is_tensor(samples) and samples.ndim == 3 else torch.stack(list(samples))

    def observe(self, samples, seconds) -> None:
        x = self._stack(samples).float()
        t = torch.as_tensor(seconds, dtype=torch.float32).reshape(-1)
        if torch.any(t <= 0):
            raise ValueError("TimePredictor.observe: measured times must be positive")
        if self.y.numel() == 0:
            self.unit = float((t / x[:, :, 0].sum(1).clamp(min=1)).mean())
            self.x = x[:0]
        self.scale = torch.maximum(self.scale, x.flatten(0, 1).abs().amax(dim=0))
        self.x = torch.cat([self.x, x])[-self.window:]
        self.y = torch.cat([self.y, t])[-self.window:]
        self.fit(self.train_steps)

    def fit(self, steps: int) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    idx = torch.randint(0, self.y.numel(), (min(self.batch, self.y.numel()),), generator=self.gen)
                    rel = self._predict(self.x[idx]) / self.y[idx] - 1
                    loss = (rel * rel).mean()
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
        finally:
            torch.set_num_threads(threads)

    def _item_times(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(self.net(x / self.scale).squeeze(-1)) * self.unit * x[..., 0]

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._item_times(x).sum(-1)

    @torch.no_grad()
    def predict(self, samples) -> torch.Tensor:
        return self._predict(self._stack(samples).float())

    @torch.no_grad()
    def item_times(self, sample: torch.Tensor) -> torch.Tensor:
        """Predicted seconds of each item of one sample (0 for absent items)."""
        return self._item_times(sample.float())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "scale": self.scale,
                "unit": self.unit, "x": self.x, "y": self.y, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.scale, self.unit, self.x, self.y = state["scale"], state["unit"], state["x"], state["y"]
        self.gen.set_state(state["gen"])

    def mape(self, samples, seconds) -> float:
        """Mean absolute percentage error (a fraction) on observations not yet trained on."""
        t = torch.as_tensor(seconds, dtype=torch.float32).reshape(-1)
        return float(((self.predict(samples) - t).abs() / t).mean())


def expert_times(predictor: TimePredictor, tokens: Sequence[int], layer: int, layers: int) -> list[float]:
    """Predicted seconds of each expert of one layer with the given tokens, wherever it is placed."""
    return predictor.item_times(expert_features(tokens, [True] * len(tokens), layer, layers))[:-1].tolist()


# ---------------------------------------------------------------- planner


def imbalance(loads: Sequence[float]) -> float:
    """max/mean - 1 of per-rank loads (0 when all are equal or all idle)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1.0 if mean > 0 else 0.0


def rank_loads(times: Sequence[float], placement: Sequence[int], n_ranks: int) -> list[float]:
    loads = [0.0] * n_ranks
    for t, r in zip(times, placement):
        loads[r] += t
    return loads


@dataclass
class Plan:
    placement: list[int]  # expert -> rank after the plan
    moves: list[tuple[int, int, int]]  # (expert, from rank, to rank)
    loads_before: list[float]
    loads_after: list[float]
    imbalance_before: float
    imbalance_after: float


def plan_placement(times: Sequence[float], placement: Sequence[int], n_ranks: int,
                   threshold: float = 0.05) -> Optional[Plan]:
    """A placement of the experts (same number on every rank, as the stacked parameters need)
    whose predicted imbalance is below `threshold`, or as low as swaps reach. None when the
    current placement is already within the threshold or no swap lowers its imbalance.

    Pairwise swaps from the current placement, hottest rank first, keep the experts that need not
    move where they are (each move costs a migration)."""
    current = list(placement)
    before = rank_loads(times, current, n_ranks)
    if imbalance(before) <= threshold:
        return None
    new = list(current)
    loads = list(before)
    while imbalance(loads) > threshold:
        best = None  # (new max of the pair, a, b)
        hot = max(range(n_ranks), key=loads.__getitem__)
        for a, b in itertools.product(range(len(new)), repeat=2):
            if new[a] != hot or new[b] == hot:
                continue
            other, delta = new[b], times[a] - times[b]
            pair_max = max(loads[hot] - delta, loads[other] + delta)
            if pair_max < loads[hot] - 1e-12 and (best is None or pair_max < best[0]):
                best = (pair_max, a, b)
        if best is None:
            break
        _, a, b = best
        other, delta = new[b], times[a] - times[b]
        loads[hot] -= delta
        loads[other] += delta
        new[a], new[b] = other, hot
    if imbalance(loads) >= imbalance(before):
        return None
    moves = [(e, r0, r1) for e, (r0, r1) in enumerate(zip(current, new)) if r0 != r1]
    return Plan(new, moves, before, loads, imbalance(before), imbalance(loads))


# ---------------------------------------------------------------- migration


def assign_rows(rows: dict[int, tuple[int, int]], placement: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Expert -> (rank, row) after a placement change: experts that stay keep their row; those
    arriving take the rows freed on their new rank, in expert order."""
    freed: dict[int, list[int]] = {}
    for e, (r, row) in sorted(rows.items()):
        if placement[e] != r:
            freed.setdefault(r, []).append(row)
    out = {e: rr for e, rr in rows.items() if placement[e] == rr[0]}
    for e in sorted(rows):
        if e not in out:
            free = freed.get(placement[e])
            if not free:
                raise ValueError(f"assign_rows: rank {placement[e]} has no free row for expert {e} "
                                 "(a placement must keep the number of experts per rank)")
            out[e] = (placement[e], free.pop(0))
    return out


def _expert_rows(params: Sequence[torch.nn.Parameter], row: int, opt) -> list[torch.Tensor]:
    """The fp32 tensors that make up one expert: per parameter its weight row, gradient row and
    AdamW exp_avg / exp_avg_sq rows (zeros where absent), then flags and AdamW steps."""
    out, flags = [], []
    for p in params:
        state = opt.state.get(p, {}) if opt is not None else {}
        out.append(p.data[row].float())
        out.append(p.grad[row].float() if p.grad is not None else torch.zeros_like(p.data[row], dtype=torch.float32))
        for k in ("exp_avg", "exp_avg_sq"):
            out.append(state[k][row].float() if k in state else torch.zeros_like(p.data[row], dtype=torch.float32))
        step = state.get("step")
        flags += [float(p.grad is not None), float("exp_avg" in state), float(step) if step is not None else 0.0]
    out.append(torch.tensor(flags, dtype=torch.float32, device=params[0].device))
    return out


def _load_expert(params: Sequence[torch.nn.Parameter], row: int, opt, flat: torch.Tensor) -> None:
    *pieces, flags = flat.split([p.data[row].numel() for p in params for _ in range(4)] + [3 * len(params)])
    flags = flags.view(-1, 3)
    with torch.no_grad():
        for i, p in enumerate(params):
            w, g, m, v = (x.view_as(p.data[row]) for x in pieces[4 * i:4 * i + 4])
            p.data[row] = w.to(p.dtype)
            if flags[i, 0]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad[row] = g.to(p.grad.dtype)
            elif p.grad is not None:
                p.grad[row] = 0
            if opt is not None and flags[i, 1]:
                state = opt.state[p]
                for k, x in (("exp_avg", m), ("exp_avg_sq", v)):
                    if k not in state:
                        state[k] = torch.zeros_like(p.data, dtype=torch.float32)
                    state[k][row] = x.to(state[k].dtype)
                step = state.get("step")
                if step is None:
                    state["step"] = torch.tensor(float(flags[i, 2]))
                else:
                    step.fill_(float(flags[i, 2]))


def exchange_experts(params: Sequence[torch.nn.Parameter], opt, sends: list[tuple[int, int]],
                     recvs: list[tuple[int, int]], group=None, timeout_s: Optional[float] = None) -> float:
    """Move experts between ranks: `sends` are (row, destination rank) of experts leaving this
    rank, `recvs` (row, source rank) of rows receiving one; `params` are this layer's stacked
    expert parameters (same shapes on every rank). Rows are read before any is written, so two
    ranks may swap. Sends and receives between one pair match in the order given. Returns the
    seconds it took (timed under `p2p`)."""
    t0 = time.perf_counter()
    out = [(torch.cat([t.reshape(-1) for t in _expert_rows(params, row, opt)]), dst) for row, dst in sends]
    size = 4 * sum(p.data[0].numel() for p in params) + 3 * len(params)
    inbox = [(torch.empty(size, dtype=torch.float32, device=params[0].device), src) for _, src in recvs]
    p2p_exchange(out, inbox, group=group, timeout_s=timeout_s)
    for (row, _), (flat, _) in zip(recvs, inbox):
        _load_expert(params, row, opt, flat)
    if params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)
    return time.perf_counter() - t0


def migration_lists(old: dict[int, tuple[int, int]], new: dict[int, tuple[int, int]], rank: int
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """This rank's `sends` and `recvs` for `exchange_experts`, ordered by expert on every rank."""
    sends = [(old[e][1], new[e][0]) for e in sorted(old) if old[e][0] == rank and new[e][0] != rank]
    recvs = [(new[e][1], old[e][0]) for e in sorted(old) if new[e][0] == rank and old[e][0] != rank]
    return sends, recvs


# ---------------------------------------------------------------- clocks


class LayerClock:
    """Seconds of this rank's expert work per layer over one step: the host clock on CPU, CUDA
    events on GPU (read once, at the end of the step). `delay_s` is the test-only sleep
    (`ma.debug_expert_delay_s`); only the host clock sees it."""

    def __init__(self, layers: int, device: torch.device):
        self.layers, self.cuda = layers, device.type == "cuda"
        self.seconds, self.events = [0.0] * layers, []

    @contextmanager
    def time(self, layer: int, delay_s: float = 0.0):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((layer, start, end))
            return
        t = time.perf_counter()
        if delay_s:
            time.sleep(delay_s)
        yield
        self.seconds[layer] += time.perf_counter() - t

    def read(self) -> list[float]:
        """The step's seconds per layer; starts the next step at zero."""
        if self.events:
            torch.cuda.synchronize()
        for layer, start, end in self.events:
            self.seconds[layer] += start.elapsed_time(end) / 1e3
        out, self.seconds, self.events = self.seconds, [0.0] * self.layers, []
        return out


# ---------------------------------------------------------------- event rows


@dataclass
class BalanceEvent:
    """One row of `balance_events-rank<R>.parquet` (table `balance_events`): one rank's side at one
    sync point. Times are seconds per step, summed over layers, over the window since the last
    sync point ("before") and the window after the plan ("after", NULL until measured)."""
    run_id: str
    step: int  # the sync point: the plan (if any) applies from this step on
    rank: int
    side: str  # attention | moe
    predicted_before_s: Optional[float]  # for the window before, ahead of training on it (NULL at the first)
    measured_before_s: float
    predicted_after_s: Optional[float]  # under the plan's placement (the same as before without a plan)
    measured_after_s: Optional[float]
    imbalance_before: float  # measured max/mean - 1 over the side's ranks, window before
    imbalance_after: Optional[float]  # measured, window after; NULL until measured
    predicted_imbalance_before: float
    predicted_imbalance_after: Optional[float]
    plan_applied: bool
    moves: int  # experts that changed rank (all ranks)
    migration_ms: Optional[float]  # this rank's measured migration time; NULL without a plan
    lever: str = "experts"  # experts: placement inside the MoE group; head: the head's vocabulary cut


def write_events(run_dir, run_id: str, events: Sequence[BalanceEvent]) -> None:
    """This rank's rows as `balance_events-rank<R>.parquet` (atomically; rewritten each call)."""
    from masep.telemetry.writer import write_parquet

    write_parquet(Path(run_dir) / f"balance_events-rank{dist.get_rank()}.parquet",
                  [{**dataclasses.asdict(e), "run_id": run_id} for e in events])


# ---------------------------------------------------------------- the MoE group's sync points


class MoEBalancer:
    """Dynamic expert balancing for the ranks holding the experts (one instance per MoE rank).

    Every step the expert server calls `record` with the step's global tokens per (layer, expert)
    (the same on every rank) and its own measured seconds of expert work per layer. At a sync
    point (`due`), every MoE rank calls `sync`: the window's times are gathered over the MoE
    group, the predictor (trained identically on every rank) is scored on them before training
    on them, planned on MoE rank 0 and the placement broadcast, then experts migrate. The
    placement (expert -> MoE rank index) and rows (expert -> (MoE rank index, row of the stacked
    expert parameters)) are what routing must follow from then on.
    """

    def __init__(self, ma_cfg, experts: int, layers: int, group, ranks: Sequence[int], run_id: str,
                 timeout_s: Optional[float] = None, seed: int = 0):
        self.cfg, self.E, self.L, self.group, self.ranks = ma_cfg, experts, layers, group, list(ranks)
        self.me = self.ranks.index(dist.get_rank())
        per = experts // len(self.ranks)
        self.rows = {e: (e // per, e % per) for e in range(experts)}
        self.predictor = TimePredictor(3 + experts + layers, seed=seed)
        self.run_id, self.timeout_s = run_id, timeout_s
        self.window: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tokens [L, E], seconds [L])
        self.events: list[BalanceEvent] = []

    @property
    def placement(self) -> list[int]:
        return [self.rows[e][0] for e in range(self.E)]

    def record(self, tokens: torch.Tensor, seconds: Sequence[float]) -> None:
        self.window.append((tokens.detach().float().cpu(), torch.tensor(list(seconds), dtype=torch.float32)))

    def due(self, step: int) -> bool:
        return (step + 1) % self.cfg.rebalance_every == 0 and bool(self.window)

    def _samples(self, tokens: torch.Tensor, placement: Sequence[int]) -> torch.Tensor:
        """[ranks * layers, items, features] for one step's tokens under `placement`."""
        return torch.stack([expert_features(tokens[layer].tolist(), [p == r for p in placement], layer, self.L)
                            for r in range(len(self.ranks)) for layer in range(self.L)])

    def _per_rank(self, samples_seconds: torch.Tensor) -> list[float]:
        return samples_seconds.view(-1, len(self.ranks), self.L).sum(-1).mean(0).tolist()

    def sync(self, step: int, expert_params: Sequence[Sequence[torch.nn.Parameter]], opt) -> BalanceEvent:
        """`expert_params[layer]`: this rank's stacked expert parameters of that layer."""
        mine = torch.stack([s for _, s in self.window])  # [S, L]
        gathered = [torch.empty_like(mine) for _ in self.ranks]
        dist.all_gather(gathered, mine, group=self.group)
        measured = torch.stack(gathered, dim=1)  # [S, R, L]
        placement = self.placement
        x = torch.cat([self._samples(tokens, placement) for tokens, _ in self.window])
        y = measured.reshape(-1)
        trained = self.predictor.y.numel() > 0
        predicted_ranks = self._per_rank(self.predictor.predict(x)) if trained else None
        for s in range(len(self.window)):  # train on the window, one observation per step
            n = len(self.ranks) * self.L
            self.predictor.observe(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n])
        measured_ranks = self._per_rank(y)
        if self.events:  # the previous sync point's "after" window is this one's "before"
            prev = self.events[-1]
            prev.measured_after_s, prev.imbalance_after = measured_ranks[self.me], imbalance(measured_ranks)

        mean_tokens = torch.stack([t for t, _ in self.window]).mean(0)
        times = torch.tensor([expert_times(self.predictor, mean_tokens[layer].tolist(), layer, self.L)
                              for layer in range(self.L)]).sum(0).tolist()
        plan = None
        if imbalance(measured_ranks) > self.cfg.threshold:
            plan = plan_placement(times, placement, len(self.ranks), self.cfg.threshold)
        decided = torch.tensor(plan.placement if plan else placement)
        if self.cfg.debug_shuffle_placement:  # test-only: experts move whatever the times (and plans)
            decided = torch.tensor(placement)[torch.randperm(self.E, generator=torch.Generator().manual_seed(step))]
        dist.broadcast(decided, src=self.ranks[0], group=self.group)  # MoE rank 0's plan holds
        new_placement = decided.tolist()
        loads_before = rank_loads(times, placement, len(self.ranks))
        loads_after = rank_loads(times, new_placement, len(self.ranks))
        applied = new_placement != placement
        migration_ms = None
        if applied:
            new_rows = assign_rows(self.rows, new_placement)
            sends, recvs = migration_lists(self.rows, new_rows, self.me)
            sends = [(row, self.ranks[dst]) for row, dst in sends]
            recvs = [(row, self.ranks[src]) for row, src in recvs]
            seconds = sum(exchange_experts(params, opt, sends, recvs, timeout_s=self.timeout_s)
                          for params in expert_params)
            migration_ms = 1e3 * seconds
            self.rows = new_rows
        event = BalanceEvent(
            run_id=self.run_id, step=step, rank=dist.get_rank(), side="moe",
            predicted_before_s=predicted_ranks[self.me] if trained else None, measured_before_s=measured_ranks[self.me],
            predicted_after_s=loads_after[self.me] + self._fixed_cost(mean_tokens), measured_after_s=None,
            imbalance_before=imbalance(measured_ranks), imbalance_after=None,
            predicted_imbalance_before=imbalance(loads_before), predicted_imbalance_after=imbalance(loads_after),
            plan_applied=applied, moves=sum(a != b for a, b in zip(placement, new_placement)),
            migration_ms=migration_ms)
        self.events.append(event)
        self.window = []
        return event

    def state_dict(self) -> dict:
        """What a checkpoint must keep: the placement, the predictor, the open window and the rows."""
        return {"rows": dict(self.rows), "predictor": self.predictor.state_dict(), "window": list(self.window),
                "events": [dataclasses.asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = dict(state["rows"])
        self.predictor.load_state_dict(state["predictor"])
        self.window = list(state["window"])
        self.events = [BalanceEvent(**e) for e in state["events"]]

    def write_events(self, run_dir) -> None:
        write_events(run_dir, self.run_id, self.events)

    def _fixed_cost(self, tokens: torch.Tensor) -> float:
        """Predicted seconds per step a rank spends besides its experts (the per-layer fixed item)."""
        return sum(float(self.predictor.item_times(expert_features(tokens[layer].tolist(), [False] * self.E,
                                                                   layer, self.L))[-1])
                   for layer in range(self.L))


# ---------------------------------------------------------------- the output head between the groups


def vocab_parts(cut: int, vocab: int, moe_ranks: int) -> list[tuple[int, int]]:
    """Vocabulary rows of the output head per part: the attention side's [0, cut) (it also keeps
    the padding rows past `vocab`, whose logits are -inf), then MoE rank j's even share of [cut, vocab)."""
    n = vocab - cut
    return [(0, cut)] + [(cut + n * j // moe_ranks, cut + n * (j + 1) // moe_ranks) for j in range(moe_ranks)]


def head_part(xn: torch.Tensor, weight: torch.Tensor, rows: tuple[int, int], targets: torch.Tensor) -> torch.Tensor:
    """[N, 2] for the rows `xn` [N, H]: the log-sum-exp of the logits of vocabulary rows [lo, hi)
    and the target's logit where the target is one of them (else 0). The parts of a partition of
    the vocabulary give the unsplit cross-entropy (`split_cross_entropy`) and, through autograd,
    its gradients."""
    lo, hi = rows
    z = F.linear(xn, compute_weight(weight)[lo:hi]).float()
    picked = z.gather(1, (targets - lo).clamp(0, hi - lo - 1)[:, None])[:, 0]
    return torch.stack([torch.logsumexp(z, 1), torch.where((targets >= lo) & (targets < hi), picked, 0.0)], 1)


def split_cross_entropy(parts: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] from the parts' `head_part` statistics [P, N, 2]."""
    return torch.logsumexp(parts[..., 0], 0) - parts[..., 1].sum(0)


class HeadSplit:
    """The lever across the groups (`ma.head_split`; one instance per rank of ma_sep): the output
    head's vocabulary rows [0, cut) are computed by the attention ranks, the rest by the MoE ranks
    (`vocab_parts`); the cut starts at the whole vocabulary (today's placement).

    Every training step a rank records its busy seconds (step time less communication, as the step
    rows' compute_s) and its seconds of head work. At a sync point the world gathers their medians
    over the window: with each group's time (its slowest rank's) and the measured seconds per head
    row and rank, the predicted times are linear in the cut; when the measured max/mean - 1 of the two
    groups exceeds the threshold, the cut moves to where the predictions meet. Rows changing sides
    move with their gradients and AdamW state (`migrate`, exact: one rank holds each row, zeros
    elsewhere, so the sum over the world is the row). A row is exactly zero, with zero AdamW
    state, on every rank not computing it, and AdamW keeps it so."""

    def __init__(self, ma_cfg, vocab: int, layout, device, seed: int = 0):
        self.cfg, self.vocab, self.seed = ma_cfg, vocab, seed
        self.attention, self.moe = list(layout.attention_ranks), list(layout.moe_rank_list)
        me = dist.get_rank()
        self.part = 0 if me in self.attention else 1 + self.moe.index(me)
        self.contributes = self.part > 0 or me == self.attention[0]  # one copy of the attention rows counts
        self.cut = self._random_cut(-1) if ma_cfg.debug_shuffle_placement else vocab
        self.clock = LayerClock(1, torch.device(device))
        self.window: list[tuple[float, float]] = []  # (busy seconds, head seconds) per training step
        self.events: list[BalanceEvent] = []
        self.predicted: Optional[list[float]] = None  # [attention, moe] group times for the next window
        self.predicted_mine: Optional[float] = None  # this rank's, likewise

    def _random_cut(self, step: int) -> int:  # test-only: `ma.debug_shuffle_placement`
        return int(torch.randint(1, self.vocab + 1, (1,), generator=torch.Generator().manual_seed(
            self.seed * 7919 + step + 1)))

    def rows(self, cut: Optional[int] = None) -> tuple[int, int]:
        """The vocabulary rows this rank computes."""
        return vocab_parts(self.cut if cut is None else cut, self.vocab, len(self.moe))[self.part]

    def moe_peers(self) -> list[int]:
        """The MoE ranks computing head rows."""
        return [r for r, (lo, hi) in zip(self.moe, vocab_parts(self.cut, self.vocab, len(self.moe))[1:]) if hi > lo]

    def owned(self, t: torch.Tensor, cut: Optional[int] = None) -> torch.Tensor:
        """Bool [rows, 1] on t's device: the head rows this rank holds."""
        lo, hi = self.rows(cut)
        idx = torch.arange(t.shape[0], device=t.device)
        held = (idx >= lo) & (idx < hi)
        return (held | (idx >= self.vocab) if self.part == 0 else held)[:, None]

    @torch.no_grad()
    def keep_owned(self, t: torch.Tensor) -> None:
        """Zero the rows of `t` (the head weight or its gradient) this rank does not hold."""
        t.masked_fill_(~self.owned(t), 0)

    def timed(self, forward: bool):
        """The clock around head work while training (with the test-only delay in the forward)."""
        lo, hi = self.rows()
        delay = self.cfg.debug_head_delay_s * (hi - lo) / self.vocab if forward else 0.0
        return self.clock.time(0, delay) if torch.is_grad_enabled() else nullcontext()

    def record(self, busy_s: float) -> None:
        self.window.append((busy_s, self.clock.read()[0]))

    def sync(self, step: int, weight: torch.nn.Parameter, opt, run_id: str = "") -> BalanceEvent:
        # Medians: a step slowed by something else (a sync point, a busy host) does not move the cut.
        mine = torch.tensor(self.window, dtype=torch.float64).median(0).values
        gathered = [torch.empty_like(mine, device=weight.device) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine.to(weight.device))
        busy, head = torch.stack(gathered).cpu().T.tolist()
        times = [max(busy[r] for r in ranks) for ranks in (self.attention, self.moe)]
        M, V, cut = len(self.moe), self.vocab, self.cut
        # Seconds per head row on one rank, pooled over both sides (the same kernel on both): a side
        # holding few rows would give a per-row figure of mostly fixed costs.
        moe_rows = -(-(V - cut) // M)
        per_row = (max(head[r] for r in self.attention) + max(head[r] for r in self.moe)) / (cut + moe_rows)
        new_cut = cut
        if imbalance(times) > self.cfg.threshold:  # rows leaving the attention side (negative: coming back)
            leaving = (times[0] - times[1]) / max(per_row * (1 + 1 / M), 1e-12)
            new_cut = min(V, max(1, round(cut - leaving)))
        if self.cfg.debug_shuffle_placement:
            new_cut = self._random_cut(step)
        decided = torch.tensor([new_cut], device=weight.device)
        dist.broadcast(decided, src=0)  # one decision for the world
        new_cut = int(decided)
        after = [times[0] - (cut - new_cut) * per_row, times[1] + (cut - new_cut) / M * per_row]
        lo, hi = self.rows()
        new_lo, new_hi = self.rows(new_cut)
        mine_after = busy[dist.get_rank()] + ((new_hi - new_lo) - (hi - lo)) * per_row
        if self.events:  # the previous sync point's "after" window is this one's "before"
            self.events[-1].measured_after_s, self.events[-1].imbalance_after = busy[dist.get_rank()], imbalance(times)
        migration_ms = 1e3 * self.migrate(weight, opt, new_cut) if new_cut != cut else None
        event = BalanceEvent(
            run_id=run_id, step=step, rank=dist.get_rank(), side="moe" if self.part else "attention",
            predicted_before_s=self.predicted_mine, measured_before_s=busy[dist.get_rank()],
            predicted_after_s=mine_after, measured_after_s=None,
            imbalance_before=imbalance(times), imbalance_after=None,
            predicted_imbalance_before=imbalance(self.predicted) if self.predicted else None,
            predicted_imbalance_after=imbalance(after), plan_applied=new_cut != cut, moves=abs(new_cut - cut),
            migration_ms=migration_ms, lever="head")
        self.predicted, self.predicted_mine = after, mine_after
        self.events.append(event)
        self.window = []
        return event

    @torch.no_grad()
    def migrate(self, weight: torch.nn.Parameter, opt, new_cut: int) -> float:
        """Move the head rows between [cut, vocab) and [new_cut, vocab) to their new holders with
        their gradients and AdamW moments; returns the seconds it took (every rank takes part)."""
        t0 = time.perf_counter()
        lo = min(self.cut, new_cut)
        state = opt.state.get(weight, {}) if opt is not None else {}
        tensors = [weight.detach(), weight.grad, state.get("exp_avg"), state.get("exp_avg_sq")]
        sent = (self.owned(weight, self.cut) & self.contributes)[lo:self.vocab]
        flat = torch.stack([torch.where(sent, t[lo:self.vocab].float(), 0.0) if t is not None
                            else weight.new_zeros((self.vocab - lo, weight.shape[1]), dtype=torch.float32)
                            for t in tensors])
        with comm_timer().time("p2p"):
            dist.all_reduce(flat)
        kept = self.owned(weight, new_cut)[lo:self.vocab]
        for t, rows in zip(tensors, flat):
            if t is not None:
                t[lo:self.vocab] = torch.where(kept, rows, 0.0).to(t.dtype)
        self.cut = new_cut
        if weight.device.type == "cuda":
            torch.cuda.synchronize(weight.device)
        return time.perf_counter() - t0

    @contextmanager
    def whole(self, weight: torch.nn.Parameter):
        """Decoding keeps the head unsplit: while it runs, the attention ranks hold every row."""
        if self.cut == self.vocab:
            yield
            return
        with torch.no_grad():
            rows = weight.detach()[self.cut:self.vocab].clone()  # each row nonzero on one MoE rank
            dist.all_reduce(rows)
            if self.part == 0:
                weight[self.cut:self.vocab] = rows
        try:
            yield
        finally:
            if self.part == 0:
                with torch.no_grad():
                    weight[self.cut:self.vocab] = 0

    def state_dict(self) -> dict:
        return {"cut": self.cut, "window": list(self.window), "predicted": self.predicted,
                "predicted_mine": self.predicted_mine, "events": [dataclasses.asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.cut, self.window = state["cut"], list(state["window"])
        self.predicted, self.predicted_mine = state["predicted"], state["predicted_mine"]
        self.events = [BalanceEvent(**e) for e in state["events"]]
