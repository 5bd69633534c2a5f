"""C4 readers, all through `datasets`: the Hub's `allenai/c4`, a local mirror, the embedded sample.

A shard is C4's file `en/c4-train.NNNNN-of-01024.json.gz`: gzip'd JSON lines, each an object
with `text`, `timestamp` and `url`. Reading one yields `{"text", "url", "timestamp"}` dicts in
file order. Empty documents and documents that are not valid Unicode (JSON escapes of lone
surrogates such as "\\ud800") are skipped and counted in `reader.skipped`; a missing file, a
truncated or corrupt gzip stream, bytes that are not UTF-8 and a line that is not JSON stop
the read with a one-line `C4ReadError` naming the file.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from masep.config import CONFIG_DIR
from masep.errors import ExpectedError

HUB_DATASET = "allenai/c4"
SHARD_COUNT = 1024
SAMPLE_DIR = CONFIG_DIR.parent / "data" / "c4-sample"
READ_BATCH = 1024  # rows per Arrow batch handed over by `datasets`


class C4ReadError(ExpectedError, RuntimeError):
    """A shard cannot be read; the message names the file."""


def shard_name(index: int) -> str:
    if not 0 <= index < SHARD_COUNT:
        raise ValueError(f"C4 shard index {index} is outside 0..{SHARD_COUNT - 1}")
    return f"en/c4-train.{index:05d}-of-{SHARD_COUNT:05d}.json.gz"


def source_dir(data) -> Path | None:
    """The directory mirroring C4's layout for local and sample sources (None for the Hub)."""
    if data.source == "hub":
        return None
    if data.local_dir:
        return Path(data.local_dir).expanduser()
    if data.source == "sample":
        return SAMPLE_DIR
    raise C4ReadError("data.local_dir is required when data.source is local")


def shard_path(data, index: int) -> Path | None:
    root = source_dir(data)
    return None if root is None else root / shard_name(index)


class C4Shard:
    """One C4 shard as an iterable of documents; `skipped` counts what was left out, by reason."""

    def __init__(self, data, index: int, cache_dir: Path | None = None):
        self.source = data.source
        self.index = index
        self.name = shard_name(index)
        self.path = shard_path(data, index)
        self.hub_streaming = data.hub_streaming
        self.cache_dir = cache_dir
        self.max_docs = data.max_docs
        self.skipped: Counter[str] = Counter()
        self.docs = 0  # documents yielded
        self.origin = f"{HUB_DATASET}/{self.name}" if self.path is None else str(self.path)

    def __iter__(self) -> Iterator[dict]:
        rows = self._hub_rows() if self.path is None else self._local_rows()
        for doc in rows:
            if self.max_docs is not None and self.docs >= self.max_docs:
                return
            text = doc["text"]
            if not text or text.isspace():
                self.skipped["empty"] += 1
                continue
            self.docs += 1
            yield doc

    # -- local mirror and embedded sample

    def _local_rows(self) -> Iterator[dict]:
        for number, line in enumerate(self._local_lines(), start=1):
            if not line or line.isspace():
                self.skipped["blank_line"] += 1
                continue
            try:
                raw = json.loads(line)
            except ValueError as e:
                raise C4ReadError(f"{self.path}: line {number} is not valid JSON ({e})") from None
            doc = self._document(raw, f"{self.path}: line {number}")
            if doc is not None:
                yield doc

    def _local_lines(self) -> Iterator[str]:
        import datasets

        if not self.path.is_file():
            raise C4ReadError(f"{self.path}: no such C4 file")
        # The "text" builder hands over raw lines and each is parsed here, so a document holding
        # an escaped lone surrogate is skipped on its own (pyarrow's JSON reader, behind the
        # "json" builder, rejects the whole file for it). Streaming reads the file directly: no
        # Arrow cache that could go stale when the file changes. A local file needs no network,
        # so datasets' download-count ping (a 3 s timeout on nodes without internet) is off.
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        try:
            ds = datasets.load_dataset("text", data_files=str(self.path.resolve()), split="train",
                                       streaming=True, keep_linebreaks=True,  # JSON ignores them
                                       cache_dir=None if self.cache_dir is None else str(self.cache_dir))
            for batch in ds.iter(batch_size=READ_BATCH):
                yield from batch["text"]
        except UnicodeDecodeError as e:
            raise C4ReadError(f"{self.path}: not UTF-8 text ({e.reason})") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise C4ReadError(f"{self.path}: truncated or corrupt gzip file ({e})") from None
        except OSError as e:
            raise C4ReadError(f"{self.path}: cannot read ({e})") from None

    # -- the Hub

    def _hub_rows(self) -> Iterator[dict]:
        import datasets

        try:
            ds = datasets.load_dataset(HUB_DATASET, data_files=self.name, split="train",
                                       streaming=self.hub_streaming,
                                       cache_dir=None if self.cache_dir is None else str(self.cache_dir))
            for batch in ds.iter(batch_size=READ_BATCH):
                keys = list(batch)
                for values in zip(*batch.values()):
                    doc = self._document(dict(zip(keys, values)), self.origin)
                    if doc is not None:
                        yield doc
        except C4ReadError:
            raise
        except Exception as e:  # network, gzip and JSON failures all surface from datasets here
            raise C4ReadError(f"{self.origin}: cannot read from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    # -- both

    def _document(self, raw, where: str) -> dict | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("text", 0), (str, type(None))):
            raise C4ReadError(f"{where}: expected a JSON object with a string 'text'")
        doc = {"text": raw["text"] or "", "url": str(raw.get("url") or ""),
               "timestamp": str(raw.get("timestamp") or "")}
        try:
            for value in doc.values():
                value.encode("utf-8")  # lone surrogates from \uD800-style escapes fail here
        except UnicodeEncodeError:
            self.skipped["invalid_utf8"] += 1
            return None
        return doc


def load_c4_shard(data, index: int, cache_dir: Path | None = None) -> C4Shard:
    """Documents of C4 shard `index` from `data.source` (a `DataConfig`)."""
    return C4Shard(data, index, cache_dir)
