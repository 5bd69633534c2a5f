"""Training sequences straight from memory-mapped token shards.

Two ways to cut documents into `seq_len`-token training examples (inputs x[:-1], targets x[1:]
of a window x of seq_len + 1 tokens):

* padding (the paper's choice, default): every document is cut on its own. Window k of a
  document of L tokens starts at token k * seq_len, so consecutive windows share one token and
  every token but the document's first is a target exactly once. The last window is padded on
  the right with `pad_id`; the loss mask is 0 on padded targets. No window crosses documents.
* packing: a shard's documents (each ending in EOT) are one stream, cut into windows with the
  same stride. The mask is all ones. Windows do not cross shards.

Order: the sequence at global position p = step * global_batch + j is `perm_e(p mod N)`, with
e = p div N and perm_e a pseudo-random permutation of range(N) keyed by (seed, e) (`shuffled`),
evaluated only at the positions a step asks for: no rank holds a permutation of the whole
dataset (at the paper's ~10^8 sequences that was ~1 GB and ~10 s of every rank's start-up). The
batch of a step therefore depends only on (seed, step): a resumed run sees exactly the batches
an uninterrupted run would have seen, and epochs wrap around on their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from masep.data.shards import ShardError, split_files
from masep.data.tokenizer import EOT_ID


def _load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    bin_name, idx_name = split_files(split)
    offsets = np.load(directory / idx_name)
    path = directory / bin_name
    # np.memmap refuses empty files; an empty split (tiny shard) is simply no tokens.
    tokens = (np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size
              else np.zeros(0, dtype=np.uint16))
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or np.any(np.diff(offsets) < 0):
        raise ShardError(f"{directory / idx_name}: offsets do not describe {bin_name} "
                         f"({len(tokens)} tokens)")
    return tokens, offsets


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shuffled(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """perm(positions) for a pseudo-random permutation perm of range(n) keyed by (seed, epoch):
    a 6-round Feistel network on the smallest even number of bits that holds n (a bijection of
    that domain, at most 4n), applied again to a value until it falls below n (cycle walking:
    still a bijection of range(n), under 4 passes on average)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, epoch]).integers(0, 2 ** 64, 6, dtype=np.uint64)

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    outside = out >= n
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= n
    return out.astype(np.int64)


class TokenDataset:
    """Fixed-length training sequences over a list of shard directories, without copying.

    Sequence indices run over the shards in order. Only each shard's number of sequences is
    computed up front (from its document index alone); a shard's tokens and window table are
    opened when a batch first touches it, so start-up reads no token file."""

    def __init__(self, shard_dirs: list[Path], split: str, seq_len: int, packing: bool = False,
                 pad_id: int = EOT_ID):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, not {split!r}")
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        self.split, self.seq_len, self.packing, self.pad_id = split, seq_len, packing, pad_id
        self.dirs = [Path(d) for d in shard_dirs]
        if not self.dirs:
            raise ShardError("no token shards given")
        counts = [self._count_windows(d) for d in self.dirs]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard s: [first[s], first[s+1])
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # shard -> tokens, start, count
        if self._first[-1] == 0:
            raise ShardError(f"the {split} split of {', '.join(map(str, shard_dirs))} holds no "
                             f"sequence of {seq_len} tokens")

    def _count_windows(self, directory: Path) -> int:
        bin_name, idx_name = split_files(self.split)
        if self.packing:
            return max((directory / bin_name).stat().st_size // 2 - 1, 0) // self.seq_len
        lengths = np.diff(np.load(directory / idx_name))
        return int(np.where(lengths >= 2, (lengths - 2) // self.seq_len + 1, 0).sum())

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if s not in self._open:
            tokens, offsets = _load_split(self.dirs[s], self.split)
            start, count = self._packed_windows(len(tokens)) if self.packing else self._document_windows(offsets)
            if len(start) != self._first[s + 1] - self._first[s]:
                raise ShardError(f"{self.dirs[s]}: {self.split} split changed while in use; restart the run")
            self._open[s] = tokens, start, count
        return self._open[s]

    def _document_windows(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        lengths = np.diff(offsets)
        per_doc = np.where(lengths >= 2, (lengths - 2) // T + 1, 0)  # ceil((L - 1) / T) targets
        doc = np.repeat(np.arange(len(lengths)), per_doc)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        start = offsets[:-1][doc] + k * T
        count = np.minimum(T + 1, lengths[doc] - k * T)
        return start.astype(np.int64), count.astype(np.int32)

    def _packed_windows(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(n_tokens - 1, 0) // self.seq_len
        start = np.arange(n, dtype=np.int64) * self.seq_len
        return start, np.full(n, self.seq_len + 1, dtype=np.int32)

    def __len__(self) -> int:
        return int(self._first[-1])

    def shard_tokens(self, s: int) -> np.ndarray:
        """The token ids of shard `s` (a memory map, opened on first use)."""
        return self._shard(s)[0]

    def window(self, i: int) -> tuple[np.ndarray, int]:
        """Sequence i's seq_len + 1 tokens (int64, padded) and how many of them are real."""
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        tokens, starts, counts = self._shard(s)
        start, count = int(starts[i - self._first[s]]), int(counts[i - self._first[s]])
        x = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        x[:count] = tokens[start:start + count]
        return x, count

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int64[T], target_ids int64[T], loss_mask float32[T]) of sequence i."""
        x, count = self.window(i)
        mask = np.zeros(self.seq_len, dtype=np.float32)
        mask[:count - 1] = 1.0
        return x[:-1], x[1:], mask

    def indices(self, step: int, global_batch: int, seed: int) -> np.ndarray:
        """Sequence indices of one optimizer step's global batch."""
        positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
        epochs, within = np.divmod(positions, len(self))
        out = np.empty(global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch spans at most two epochs
            at = epochs == epoch
            out[at] = shuffled(within[at], len(self), seed, int(epoch))
        return out

    def batch(self, step: int, global_batch: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs[B, T], targets[B, T], mask[B, T]) for one step."""
        rows = [self.get(int(i)) for i in self.indices(step, global_batch, seed)]
        inputs, targets, mask = (torch.from_numpy(np.stack(col)) for col in zip(*rows))
        return inputs, targets, mask

    def batches(self, global_batch: int, seed: int, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches for step start_step, start_step + 1, ... without end."""
        step = start_step
        while True:
            yield self.batch(step, global_batch, seed)
            step += 1
