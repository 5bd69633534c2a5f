"""One description of who does what: world size -> data/tensor/pipeline/expert degrees and,
for ma_sep, the attention group (head-parallel degree x replicas) and the MoE group.

`make_layout(cfg)` checks that the layout divides the model and the batch and fills the
world, before any process starts, naming the numbers that do not fit.

Rank order (tensor-parallel innermost, so a TP group sits on neighbouring GPUs):
  tp, pp, tp_pp, ep_dp: rank = (dp_index * pp + stage) * tp + tp_index
  ma_sep: ranks [0, attn_tp * attn_replicas) are attention ranks, replica-major
          (rank = replica * attn_tp + head_shard); the remaining moe_ranks hold the experts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from masep.config import Config, ConfigError


@dataclass(frozen=True)
class Layout:
    strategy: str
    world_size: int
    dp: int = 1  # data-parallel replicas of the whole model (attention replicas for ma_sep)
    tp: int = 1  # tensor-parallel degree (heads and experts split)
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel degree (ep_dp)
    attn_tp: int = 1  # ma_sep: head-parallel degree inside one attention replica
    attn_replicas: int = 1  # ma_sep
    moe_ranks: int = 0  # ma_sep
    microbatches: int = 1  # micro-batches per replica per optimizer step
    microbatch_size: int = 1  # sequences per micro-batch

    def to_dict(self) -> dict:
        return asdict(self)

    # --- rank helpers shared by the strategies
    def coords(self, rank: int) -> dict:
        """Role of `rank`: indices along each parallel axis."""
        if self.strategy == "ma_sep":
            n_attn = self.attn_tp * self.attn_replicas
            if rank < n_attn:
                return {"role": "attention", "replica": rank // self.attn_tp, "head_shard": rank % self.attn_tp}
            return {"role": "moe", "moe_index": rank - n_attn}
        tp_index = rank % self.tp
        stage = (rank // self.tp) % self.pp
        dp_index = rank // (self.tp * self.pp)
        return {"role": "model", "dp": dp_index, "stage": stage, "tp": tp_index}

    def rank_of(self, dp: int, stage: int, tp: int) -> int:
        return (dp * self.pp + stage) * self.tp + tp

    @property
    def attention_ranks(self) -> list[int]:
        return list(range(self.attn_tp * self.attn_replicas))

    @property
    def moe_rank_list(self) -> list[int]:
        n = self.attn_tp * self.attn_replicas
        return list(range(n, n + self.moe_ranks))


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def make_layout(cfg: Config) -> Layout:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    s, W = p.strategy, p.world_size
    n_micro_total = t.global_batch // t.micro_batch
    common = dict(strategy=s, world_size=W, microbatch_size=t.micro_batch)

    def split_batch(replicas: int, what: str) -> int:
        _need(n_micro_total % replicas == 0, "train.global_batch",
              f"{n_micro_total} micro-batches ({t.global_batch} / micro_batch {t.micro_batch}) "
              f"cannot be shared by {replicas} {what}")
        return n_micro_total // replicas

    if s == "single":
        _need(W == 1, "parallel.world_size", f"strategy single runs on 1 rank, not {W}")
        return Layout(dp=1, microbatches=n_micro_total, **common)
    if s in ("tp", "pp", "tp_pp"):
        tp = p.tp if s != "pp" else 1
        pp = p.pp if s != "tp" else 1
        _need(tp >= 1 and pp >= 1, "parallel.tp", "degrees must be positive")
        _need(m.heads % tp == 0, "parallel.tp", f"tensor-parallel degree {tp} does not divide {m.heads} heads")
        _need(m.experts % tp == 0, "parallel.tp", f"tensor-parallel degree {tp} does not divide {m.experts} experts")
        _need(m.layers % pp == 0, "parallel.pp", f"{pp} pipeline stages do not divide {m.layers} layers")
        _need(W % (tp * pp) == 0, "parallel.world_size",
              f"world size {W} is not a multiple of tp {tp} x pp {pp} = {tp * pp}")
        dp = W // (tp * pp)
        micro = split_batch(dp, "data-parallel replicas")
        if pp > 1:
            _need(micro >= pp, "train.global_batch",
                  f"each replica gets {micro} micro-batches, fewer than the {pp} pipeline stages")
        return Layout(dp=dp, tp=tp, pp=pp, microbatches=micro, **common)
    if s == "ep_dp":
        _need(m.experts % W == 0, "parallel.world_size",
              f"world size {W} does not divide {m.experts} experts (expert parallelism over all ranks)")
        return Layout(dp=W, ep=W, microbatches=split_batch(W, "data-parallel replicas"), **common)
    if s == "ma_sep":
        a_tp, reps, moe = p.attn_tp, p.attn_replicas, p.moe_ranks
        _need(a_tp >= 1 and reps >= 1 and moe >= 1, "parallel.moe_ranks",
              "attn_tp, attn_replicas and moe_ranks must be positive")
        _need(a_tp * reps + moe == W, "parallel.world_size",
              f"attention group attn_tp {a_tp} x attn_replicas {reps} = {a_tp * reps} plus moe_ranks {moe} "
              f"= {a_tp * reps + moe}, not world size {W}")
        _need(m.heads % a_tp == 0, "parallel.attn_tp", f"head-parallel degree {a_tp} does not divide {m.heads} heads")
        _need(m.experts % moe == 0, "parallel.moe_ranks", f"{moe} MoE ranks do not divide {m.experts} experts")
        _need(p.in_flight >= 1, "parallel.in_flight", f"micro-batches in flight must be positive, not {p.in_flight}")
        micro = split_batch(reps, "attention replicas")
        return Layout(dp=reps, attn_tp=a_tp, attn_replicas=reps, moe_ranks=moe, microbatches=micro, **common)
    raise ConfigError(f"parallel.strategy: unknown strategy {s!r}")
