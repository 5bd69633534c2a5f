"""MA Separation (strategy `ma_sep`): attention on one group of ranks, MoE experts on another.

Layout (masep.parallel.layout; world = attn_tp * attn_replicas + moe_ranks)
    ranks [0, attn_tp * attn_replicas)   attention ranks, replica-major:
                                          rank = replica * attn_tp + head_shard
    the next moe_ranks ranks              MoE ranks; MoE rank j holds experts
                                          [j * E/moe_ranks, (j + 1) * E/moe_ranks) of every layer
                                          (until `ma.rebalance` moves them: protocol.py's slots)
The paper's Section 4.4 ("8 attention GPUs, 4 heads per GPU, 2x replication, 2-way sequence
parallelism") cannot hold on 8 GPUs as written. This package takes the reading the project's
spec settles on: 2 attention replicas x 4-way head parallelism (8 of the 32 heads per GPU), the
two replicas splitting the token stream in two, plus 8 MoE GPUs with 2 experts each, i.e.
`parallel.attn_tp=4, attn_replicas=2, moe_ranks=8` on 16 GPUs.

A rank plays one role, chosen once from the layout (`MASeparation`):
- `attention.AttentionRank` (replica r, head shard t): the embedding, every layer's norms,
  router and its shard of the attention heads, the final norm and the output head; replica r
  takes the contiguous block r of the global batch's micro-batches.
- `experts.ExpertServer` (MoE rank j): its experts of every layer (and with `ma.head_split` its
  share of the output head's vocabulary rows, `head`).
`protocol` holds what travels between them (the wire protocol) and the schedule both sides
derive from the batch shape and the layout alone.

Gradients: attention parameters are summed over the replicas (the same head shard of every
replica, `sync_gradients`, kind `grad_sync`); inside a replica the replicated parameters' grads
are already complete (the f/g operators). Expert gradients are complete on their MoE rank: it
ran every row routed to its experts from all replicas. Statistics (loss, aux losses, tokens per
expert) are added by head shard 0 of each replica only; aux losses are per micro-batch, as in
`SingleRank`.

Decode: routing (and a capacity factor) sees the whole batch of one forward. With dropless
routing and a prompt batch B that is a multiple of attn_replicas, replica r decodes sequences
[r*B/R, (r+1)*B/R) and the MoE ranks serve both replicas' rows in one pass per layer; with a
capacity factor (the same tokens compete for capacity as on one rank) or an uneven batch,
replica 0 decodes the whole batch and the other replicas only take part in the collectives.
Head shard 0 of each decoding replica answers for its sequences, and every rank reports rank
0's prefill and token times (MoE ranks serve without a clock of their own per token).

Failure: every wait on a peer has the configured `parallel.timeout_s`; a dead or silent peer
raises `PeerCommError` naming the transfer (layer, micro-batch, peers) on the ranks waiting for
it, and a rank blocked in a collective instead fails within the same timeout.
"""
from __future__ import annotations

from masep.parallel.ma_sep.attention import AttentionRank
from masep.parallel.ma_sep.experts import ExpertServer


def MASeparation(cfg, layout, rank, device, model):  # noqa: N802 - the strategy's constructor
    """This rank's role of MA Separation."""
    role = AttentionRank if layout.coords(rank)["role"] == "attention" else ExpertServer
    return role(cfg, layout, rank, device, model)
