"""C4 shards -> uint16 token shards, one shard at a time (the command: `masep tokenize`).

Each document goes to train or validation by a seeded hash of its URL and text (so the split
does not depend on order, batching or threads), is encoded with GPT-2's BPE and ends with EOT.
The shard is written into a hidden temporary directory and renamed into place whole; a shard
that is already done (its manifest verifies, same settings, same input file) is left untouched.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from masep.data.c4 import (HUB_DATASET, C4ReadError, load_c4_shard, shard_name,
                           shard_path)
from masep.data.shards import (FORMAT, MANIFEST, SPLITS, check_shard, file_meta, fsync_dir, publish,
                               read_manifest, remove_stale_temps, sha256_file, shard_dir,
                               shard_params, split_files, temp_dir_for)
from masep.data.tokenizer import EOT_ID, encode_ordinary_numpy, get_tokenizer

ENCODE_BATCH = 1024  # documents per encode call: enough work to keep every thread busy


def is_validation(split_seed: int, url: str, text: str, val_fraction: float) -> bool:
    """Deterministic per document: a 64-bit BLAKE2b of (seed, url, text) below the fraction."""
    h = hashlib.blake2b(f"{split_seed}\n{url}\n".encode(), digest_size=8)
    h.update(text.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0 ** 64


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SplitWriter:
    """Appends documents' ids to `<split>.bin`, hashing as it goes; writes the index at the end."""

    def __init__(self, directory: Path, split: str):
        self.bin_name, self.idx_name = split_files(split)
        self.directory = directory
        self.file = open(directory / self.bin_name, "wb")
        self.sha = hashlib.sha256()
        self.lengths: list[int] = []

    def add(self, docs: list[np.ndarray]) -> None:
        """Append documents' ids, each followed by EOT."""
        if not docs:
            return
        out = np.empty(sum(len(ids) + 1 for ids in docs), dtype=np.uint16)
        pos = 0
        for ids in docs:
            n = len(ids)
            out[pos:pos + n] = ids  # ids < n_vocab <= 65536: the uint16 cast is exact
            out[pos + n] = EOT_ID
            pos += n + 1
            self.lengths.append(n + 1)
        self.file.write(out.data)
        self.sha.update(out.data)

    def finish(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        idx_path = self.directory / self.idx_name
        with open(idx_path, "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        bin_path = self.directory / self.bin_name
        return {
            "docs": len(self.lengths),
            "tokens": int(offsets[-1]),
            "files": {
                self.bin_name: file_meta(bin_path, self.sha.hexdigest()),
                self.idx_name: file_meta(idx_path, sha256_file(idx_path)),
            },
        }


def describe_input(data, index: int) -> dict:
    """Which bytes a shard is made from; a local file is identified by size and SHA-256."""
    name = shard_name(index)
    path = shard_path(data, index)
    if path is None:
        return {"name": name, "hub": HUB_DATASET}
    if not path.is_file():
        raise C4ReadError(f"{path}: no such C4 file")
    return {"name": name, "path": str(path.resolve()), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def same_input(a: dict, b: dict) -> bool:
    keys = ("name", "hub", "bytes", "sha256")
    return all(a.get(k) == b.get(k) for k in keys)


def write_shard(directory: Path, data, index: int, threads: int, progress: bool) -> dict:
    """Tokenize shard `index` into the (empty) `directory`; returns the manifest's counts."""
    get_tokenizer()  # built before the progress bar starts
    docs = load_c4_shard(data, index, cache_dir=Path(data.tokens_dir) / ".hf-cache")
    writers = {split: SplitWriter(directory, split) for split in SPLITS}
    tty = sys.stderr.isatty()
    bar = tqdm(desc=f"shard {index:05d}", unit="doc", file=sys.stderr, disable=not progress,
               mininterval=0.5 if tty else 30.0, dynamic_ncols=tty)

    def flush(batch: list[dict]) -> None:
        encoded = encode_ordinary_numpy([d["text"] for d in batch], threads)
        out: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        for doc, ids in zip(batch, encoded):
            val = is_validation(data.split_seed, doc["url"], doc["text"], data.val_fraction)
            out["val" if val else "train"].append(ids)
        for split in SPLITS:
            writers[split].add(out[split])
        bar.update(len(batch))

    try:
        batch: list[dict] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        results = {split: writers[split].finish() for split in SPLITS}
    finally:
        bar.close()
        for w in writers.values():
            w.file.close()  # a no-op after finish(); on failure, before the directory is removed
    return {
        "counts": {split: {k: results[split][k] for k in ("docs", "tokens")} for split in SPLITS},
        "skipped": dict(sorted(docs.skipped.items())),
        "files": {name: meta for split in SPLITS for name, meta in results[split]["files"].items()},
    }


def tokenize_shard(data, index: int, threads: int = 1, progress: bool = False) -> tuple[str, dict]:
    """Make sure shard `index` is done; returns ("skipped" | "built" | "rebuilt", manifest)."""
    final = shard_dir(data, index)
    params = shard_params(data, index)
    source = describe_input(data, index)
    reason = check_shard(final, params)
    if reason is None:
        manifest = read_manifest(final)
        if same_input(manifest.get("input", {}), source):
            return "skipped", manifest
        reason = "its input file changed"
    status = "built" if reason == "missing" else "rebuilt"
    if status == "rebuilt":
        print(f"{final}: {reason}; rebuilding it", file=sys.stderr)

    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_dir_for(final)
    tmp.mkdir()
    started = time.perf_counter()
    try:
        body = write_shard(tmp, data, index, threads, progress)
        manifest = {
            "format": FORMAT,
            "params": params,
            "input": source,
            "split": {"seed": data.split_seed, "val_fraction": data.val_fraction,
                      "rule": "val iff little-endian blake2b-64(f'{seed}\\n{url}\\n' + text) < val_fraction * 2**64"},
            "dtype": "uint16",
            "eot_id": EOT_ID,
            **body,
            "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "build_seconds": round(time.perf_counter() - started, 3),
            "threads": threads,
            "versions": {p: importlib.metadata.version(p) for p in ("tiktoken", "datasets", "numpy")},
        }
        # The manifest is written last: its presence and checksums are what "done" means.
        manifest_tmp = tmp / (MANIFEST + ".tmp")
        with open(manifest_tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        manifest_tmp.replace(tmp / MANIFEST)
        fsync_dir(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return status, manifest


def summary(index: int, status: str, manifest: dict, directory: Path) -> str:
    c = manifest["counts"]
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    verb = "already done" if status == "skipped" else status
    return (f"shard {index:05d}: {verb}: train {c['train']['docs']:,} docs / {c['train']['tokens']:,} tokens, "
            f"val {c['val']['docs']:,} docs / {c['val']['tokens']:,} tokens, skipped: {skipped} -> {directory}")
