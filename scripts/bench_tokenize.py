"""Tokenization throughput on the embedded sample: the full shard pipeline vs bare tiktoken.

    python scripts/bench_tokenize.py [--repeats 7] [--shards 0 1]

A: `masep tokenize`'s own code (masep.data.tokenize.tokenize_shard, one thread): read the
   gzip'd JSON lines through `datasets`, split, encode, write the shard with its checksums and
   manifest, into a fresh directory each time.
B: `tiktoken` `encode_ordinary` on the same texts, already in memory, one thread.

Repeats interleave A and B so that drift on a shared machine hits both; the medians are
reported in tokens per second per core (ids produced, EOT markers not counted) by wall clock
and by the process's CPU time, and the ratio A/B (goal: at least 0.70).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from masep.config import load_config  # noqa: E402
from masep.data import tokenize as tok  # noqa: E402
from masep.data.c4 import shard_path  # noqa: E402
from masep.data.tokenizer import get_tokenizer  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shards", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()

    cfg = load_config("tiny")
    enc = get_tokenizer()
    texts = []
    for index in args.shards:
        with gzip.open(shard_path(cfg.data, index), "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    raw_tokens = sum(len(enc.encode_ordinary(t)) for t in texts)  # also warms the encoder

    scratch = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    runs_done = []

    def pipeline():
        data = load_config("tiny", [f"data.tokens_dir={scratch / str(len(runs_done))}"]).data
        runs_done.append(data)
        produced = 0
        for index in args.shards:
            status, manifest = tok.tokenize_shard(data, index, threads=1, progress=False)
            assert status == "built"
            produced += sum(manifest["counts"][s]["tokens"] - manifest["counts"][s]["docs"]
                            for s in ("train", "val"))
        return produced

    def bare():
        return sum(len(enc.encode_ordinary(t)) for t in texts)

    pipeline()  # warm-up: imports, `datasets` module resolution, page cache
    runs = {"pipeline": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in (("pipeline", pipeline), ("bare", bare)):
            n, wall, cpu = timed(fn)
            assert n == raw_tokens, (name, n, raw_tokens)
            runs[name].append((wall, cpu))

    print(f"embedded sample shards {args.shards}: {len(texts):,} documents, {raw_tokens:,} tokens, "
          f"{args.repeats} interleaved repeats, medians, one thread")
    rates = {}
    for name, label in (("pipeline", "A masep tokenize (gz JSON -> shard on disk)"),
                        ("bare", "B tiktoken encode_ordinary (texts in memory)")):
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        rates[name] = (raw_tokens / wall, raw_tokens / cpu)
        print(f"{label}: {rates[name][0]:>12,.0f} tok/s wall  {rates[name][1]:>12,.0f} tok/s CPU "
              f"({wall:.3f} s wall, {cpu:.3f} s CPU)")
    ratio_wall = rates["pipeline"][0] / rates["bare"][0]
    ratio_cpu = rates["pipeline"][1] / rates["bare"][1]
    print(f"ratio A/B: {ratio_wall:.2f} by wall clock, {ratio_cpu:.2f} by CPU time (goal >= 0.70)")
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
