"""Token shard integrity where it is cheap: jobs and ranks compare sizes and a sampled
fingerprint; `data.verify_checksums` re-hashes every byte; a corrupt shard fails in one line."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from masep.data import shards
from masep.data.shards import shard_dirs
from masep.data.shards import ShardError, fingerprint_file, shard_dir
from helpers import flip_middle_byte


def test_fingerprint_reads_sampled_blocks_of_a_large_file(tmp_path):
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    before = fingerprint_file(path)

    def changed(offset: int) -> bool:
        flipped = data.copy()
        flipped[offset] ^= 0xFF
        path.write_bytes(flipped.tobytes())
        return fingerprint_file(path) != before

    assert changed(0) and changed(len(data) - 1) and changed((len(data) - (1 << 16)) // 15 + 10)  # in blocks 0, 15, 1
    assert not changed(100_000)  # between the first and second of 16 blocks: only a full hash sees it
    path.write_bytes(data[:-1].tobytes())
    assert fingerprint_file(path) != before  # the size is part of it


def _count_full_hashes(monkeypatch) -> list:
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(p.name) or real(p, *a))
    return calls


def test_jobs_check_shards_without_hashing_them_in_full(local_shard, monkeypatch):
    cfg, _, manifest = local_shard
    assert all("fingerprint" in meta for meta in manifest["files"].values())
    calls = _count_full_hashes(monkeypatch)
    assert shard_dirs(cfg) == [shard_dir(cfg.data, 0)] and calls == []
    full = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, verify_checksums=True))
    assert shard_dirs(full) == [shard_dir(cfg.data, 0)]
    assert sorted(calls) == sorted(manifest["files"])  # every file, once


@pytest.mark.parametrize("verify", [False, True])
def test_a_corrupt_shard_fails_in_one_line_naming_it(local_shard, verify):
    cfg, _, _ = local_shard
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, verify_checksums=verify))
    flip_middle_byte(shard_dir(cfg.data, 0) / "train.bin")
    with pytest.raises(ShardError) as err:
        shard_dirs(cfg)
    message = str(err.value)
    assert "\n" not in message and str(shard_dir(cfg.data, 0)) in message
    assert "train.bin fails its checksum" in message and "masep tokenize" in message
