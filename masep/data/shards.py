"""Token shards on disk: where they live, what their manifest holds, and when one counts as done.

A shard is `<tokens_dir>/<source>/shard-NNNNN/` with `train.bin`, `val.bin` (uint16 ids),
`train.idx.npy`, `val.idx.npy` (int64 document starts plus the total) and `manifest.json`.
It is built in a hidden temporary directory beside its final place and renamed into place
whole, so a shard directory either is complete or does not exist. It is *done* when its
manifest lists the files with their sizes and SHA-256 and every one matches, and the manifest's
`params` (tokenizer, split rule, document cap) equal the current configuration's. Training and
inference jobs compare sizes and a sampled fingerprint only (reading at most 1 MiB per file;
`data.verify_checksums: true` makes them re-hash every file in full); their ranks, started right
after, compare manifests and sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from masep.data.c4 import shard_path
from masep.data.tokenizer import tokenizer_identity
from masep.errors import ExpectedError

SPLITS = ("train", "val")
FORMAT = "masep-token-shard/1"
MANIFEST = "manifest.json"


class ShardError(ExpectedError, RuntimeError):
    """A token shard is missing or does not verify."""


def data_config(cfg):
    """Accept a whole Config or its DataConfig."""
    return getattr(cfg, "data", cfg)


def shard_dir(data, index: int) -> Path:
    return Path(data.tokens_dir) / data.source / f"shard-{index:05d}"


def split_files(split: str) -> tuple[str, str]:
    return f"{split}.bin", f"{split}.idx.npy"


def shard_params(data, index: int) -> dict:
    """Everything that decides a shard's contents besides the input bytes themselves."""
    return {
        "source": data.source,
        "shard": index,
        "max_docs": data.max_docs,
        "split_seed": data.split_seed,
        "val_fraction": data.val_fraction,
        "tokenizer": tokenizer_identity(),
    }


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: Path, blocks: int = 16, block: int = 1 << 16) -> str:
    """SHA-256 of the size and `blocks` evenly spaced blocks (the whole file when it is smaller):
    reads at most 1 MiB, so every job and rank can afford it whatever the shard's size."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for i in range(blocks):
                f.seek(i * (size - block) // (blocks - 1))
                h.update(f.read(block))
    return h.hexdigest()


def file_meta(path: Path, sha256: str) -> dict:
    """A shard file's manifest entry."""
    return {"bytes": path.stat().st_size, "sha256": sha256, "fingerprint": fingerprint_file(path)}


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_shard(directory: Path, params: dict, checksums: bool = True, fingerprints: bool = True) -> str | None:
    """None when the shard is done for `params`; otherwise why not, in a few words.

    With `checksums` every file's SHA-256 is recomputed; without, sizes and (with `fingerprints`)
    the sampled `fingerprint_file` are compared (a full hash where an older manifest has none).
    """
    if not directory.is_dir() or not any(directory.iterdir()):  # Snakemake pre-creates it empty
        return "missing"
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("format") != FORMAT:
        return f"{MANIFEST} missing or unreadable"
    if manifest.get("params") != params:
        changed = sorted(k for k in params if manifest.get("params", {}).get(k) != params[k])
        return f"built with other settings ({', '.join(changed) or 'params'})"
    for name, meta in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return f"{name} missing or of the wrong size"
        if checksums or (fingerprints and "fingerprint" not in meta):
            if sha256_file(path) != meta["sha256"]:
                return f"{name} fails its checksum"
        elif fingerprints and fingerprint_file(path) != meta["fingerprint"]:
            return f"{name} fails its checksum (sampled blocks)"
    if set(manifest.get("files", {})) != {f for s in SPLITS for f in split_files(s)}:
        return f"{MANIFEST} does not list every file"
    return None


def check_source(directory: Path, data, index: int) -> str | None:
    """None when the corpus file the shard was made from is unchanged; otherwise what changed.
    Cheap: the file is hashed again only when its size matches but it is newer than the manifest."""
    recorded = (read_manifest(directory) or {}).get("input", {})
    path = shard_path(data, index)
    if path is None or "sha256" not in recorded:  # the Hub: its files are immutable
        return None
    if not path.is_file():  # removed after tokenizing (to save space): the shard stands
        return None
    stat = path.stat()
    if stat.st_size != recorded["bytes"] or (
            stat.st_mtime > (directory / MANIFEST).stat().st_mtime and sha256_file(path) != recorded["sha256"]):
        return f"was made from {path} before that file changed"
    return None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir_for(final: Path) -> Path:
    """A hidden sibling, unique to this process, that readers never look at."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def remove_stale_temps(final: Path) -> None:
    """Drop what an earlier, killed build of this shard left behind."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary shard into place, replacing a broken one if present."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def shard_dirs(cfg, contents: bool = True) -> list[Path]:
    """The token shards for `cfg.data`, each checked against its manifest and the config: sizes
    and, with `contents`, sampled fingerprints (every byte with `data.verify_checksums`). Ranks
    pass contents=False: their job checked the same files just before starting them, and
    sampling every shard in every rank would make start-up grow with the number of shards."""
    data = data_config(cfg)
    out = []
    for index in data.shards:
        directory = shard_dir(data, index)
        reason = check_shard(directory, shard_params(data, index), checksums=contents and data.verify_checksums,
                             fingerprints=contents)
        if reason is None and contents:  # the corpus file: the job checks it, ranks trust the job
            reason = check_source(directory, data, index)
        if reason is not None:
            raise ShardError(f"{directory}: token shard {reason}; run `masep tokenize` with this "
                             f"config first")
        out.append(directory)
    return out
