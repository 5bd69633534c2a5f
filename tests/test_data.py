"""C4 reading, shard tokenization (split, format, atomicity, reuse) and training batches."""
from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from masep import cli
from masep.config import load_config
from masep.data import tokenize as tok
from masep.data.batches import TokenDataset, shuffled
from masep.data.shards import shard_dirs
from masep.data.c4 import C4ReadError, load_c4_shard, shard_name, shard_path
from masep.data.shards import ShardError, read_manifest, sha256_file, shard_dir
from masep.data.tokenizer import EOT_ID, get_tokenizer
from helpers import WORDS, c4_file, flip_middle_byte, local_cfg, make_docs, write_gz


def no_trace_of_shard(cfg, index: int = 0) -> bool:
    final = shard_dir(cfg.data, index)
    return not final.exists() and not list(final.parent.glob(f".{final.name}*"))


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(directory / f"{split}.bin", dtype=np.uint16), np.load(directory / f"{split}.idx.npy")


# ------------------------------------------------------------------ split


def test_split_is_deterministic_and_about_the_fraction():
    n, p = 20000, 0.1
    keys = [(f"https://example.org/{i}", f"text {i}") for i in range(n)]
    first = [tok.is_validation(1234, u, t, p) for u, t in keys]
    assert first == [tok.is_validation(1234, u, t, p) for u, t in keys]
    sd = math.sqrt(n * p * (1 - p))
    assert abs(sum(first) - n * p) < 5 * sd  # 5 sigma: fails for a biased rule, not by chance
    other_seed = [tok.is_validation(99, u, t, p) for u, t in keys]
    both = sum(a and b for a, b in zip(first, other_seed))
    assert abs(both - n * p * p) < 5 * math.sqrt(n * p * p)  # seeds give independent splits
    assert sum(tok.is_validation(1234, u, t, 0.5) for u, t in keys) > sum(first) * 4


# ------------------------------------------------------------------ shard format


def test_shard_holds_every_document_in_order_with_eot(local_shard):
    cfg, docs, manifest = local_shard
    directory = shard_dir(cfg.data, 0)
    enc = get_tokenizer()
    expected = {"train": [], "val": []}
    for d in docs:
        split = "val" if tok.is_validation(cfg.data.split_seed, d["url"], d["text"], 0.1) else "train"
        expected[split].append(d["text"])
    assert 0 < len(expected["val"]) < len(docs) // 4
    for split in ("train", "val"):
        tokens, offsets = read_split(directory, split)
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert len(offsets) == len(expected[split]) + 1
        assert np.all(np.diff(offsets) >= 2)
        assert np.all(tokens[offsets[1:] - 1] == EOT_ID)  # every document ends with EOT
        assert int((tokens == EOT_ID).sum()) == len(expected[split])  # and EOT nowhere else
        decoded = [enc.decode(tokens[a:b - 1].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
        assert decoded == expected[split]
        assert manifest["counts"][split] == {"docs": len(expected[split]), "tokens": len(tokens)}
    for name, meta in manifest["files"].items():
        assert sha256_file(directory / name) == meta["sha256"]
    assert manifest["input"]["sha256"] == sha256_file(shard_path(cfg.data, 0))
    assert read_manifest(directory) == json.loads(json.dumps(manifest))


def test_max_docs_caps_the_shard(tmp_path):
    write_gz(c4_file(tmp_path), make_docs(50))
    cfg = local_cfg(tmp_path, "data.max_docs=20")
    _, manifest = tok.tokenize_shard(cfg.data, 0)
    assert manifest["counts"]["train"]["docs"] + manifest["counts"]["val"]["docs"] == 20


def test_empty_and_invalid_unicode_documents_are_skipped_and_counted(tmp_path):
    docs = make_docs(30)
    lines = docs[:10] + [
        {"text": "", "url": "e1", "timestamp": ""},
        {"text": "  \n\t ", "url": "e2", "timestamp": ""},
        {"text": None, "url": "e3", "timestamp": ""},
        '{"text": "lone surrogate \\ud800 here", "url": "s1", "timestamp": ""}',
        '{"text": "fine", "url": "low surrogate \\udc00", "timestamp": ""}',
    ] + docs[10:]
    write_gz(c4_file(tmp_path), lines)
    cfg = local_cfg(tmp_path)
    reader = load_c4_shard(cfg.data, 0)
    assert [d["text"] for d in reader] == [d["text"] for d in docs]
    assert reader.skipped == {"empty": 3, "invalid_utf8": 2}
    _, manifest = tok.tokenize_shard(cfg.data, 0)
    assert manifest["skipped"] == {"empty": 3, "invalid_utf8": 2}
    assert manifest["counts"]["train"]["docs"] + manifest["counts"]["val"]["docs"] == 30


# ------------------------------------------------------------------ bad input


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


BAD_INPUTS = {
    "missing": (lambda p: p.unlink(), "no such C4 file"),
    "truncated": (_truncate, "truncated or corrupt gzip"),
    "corrupt": (flip_middle_byte, "truncated or corrupt gzip"),
    "not_gzip": (lambda p: p.write_bytes(b'{"text": "plain"}\n' * 50), "truncated or corrupt gzip"),
    "bad_json": (lambda p: write_gz(p, make_docs(20)[:7] + ['{"text": "unterminated'] + make_docs(5)),
                 "line 8 is not valid JSON"),
    "not_object": (lambda p: write_gz(p, make_docs(3) + ['["a list"]']), "line 4: expected a JSON object"),
    "raw_non_utf8": (lambda p: write_gz(p, make_docs(3) + [b'{"text": "caf\xe9"}']), "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_clear_error_and_leaves_no_shard(tmp_path, case):
    damage, message = BAD_INPUTS[case]
    path = write_gz(c4_file(tmp_path), make_docs(400, max_words=120))
    damage(path)
    cfg = local_cfg(tmp_path)
    with pytest.raises(C4ReadError, match=message) as info:
        tok.tokenize_shard(cfg.data, 0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert no_trace_of_shard(cfg)


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    cfg = local_cfg(tmp_path)
    rc = cli.main(["tokenize", "--config", "tiny", "--no-progress", "--set", "data.source=local",
                   f"data.local_dir={tmp_path / 'c4'}", f"data.tokens_dir={tmp_path / 'tokens'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == f"masep tokenize: {c4_file(tmp_path)}: no such C4 file"
    assert no_trace_of_shard(cfg)


# ------------------------------------------------------------------ reuse and atomicity


def _mtimes(directory: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_empty_shard_directory_counts_as_missing(tmp_path, capsys):
    write_gz(c4_file(tmp_path), make_docs(20))
    cfg = local_cfg(tmp_path)
    shard_dir(cfg.data, 0).mkdir(parents=True)  # as a workflow engine makes it for its output
    assert tok.tokenize_shard(cfg.data, 0)[0] == "built"
    assert capsys.readouterr().err == ""
    assert shard_dirs(cfg) == [shard_dir(cfg.data, 0)]


def test_done_shard_is_skipped_untouched(local_shard):
    cfg, _, manifest = local_shard
    directory = shard_dir(cfg.data, 0)
    before = _mtimes(directory)
    status, again = tok.tokenize_shard(cfg.data, 0)
    assert status == "skipped" and again == read_manifest(directory)
    assert _mtimes(directory) == before


def test_done_shard_with_a_flipped_byte_is_rebuilt(local_shard, capsys):
    cfg, _, manifest = local_shard
    directory = shard_dir(cfg.data, 0)
    good = (directory / "train.bin").read_bytes()
    flip_middle_byte(directory / "train.bin")
    with pytest.raises(ShardError, match="train.bin fails its checksum"):
        shard_dirs(cfg)
    status, rebuilt = tok.tokenize_shard(cfg.data, 0)
    assert status == "rebuilt"
    assert "train.bin fails its checksum; rebuilding" in capsys.readouterr().err
    assert (directory / "train.bin").read_bytes() == good
    assert rebuilt["files"] == manifest["files"]
    assert shard_dirs(cfg) == [directory]
    assert not list(directory.parent.glob(".shard-*"))


def test_changed_settings_or_input_rebuild_the_shard(local_shard):
    cfg, docs, manifest = local_shard
    other = local_cfg(Path(cfg.data.local_dir).parent, "data.split_seed=7")
    with pytest.raises(ShardError, match="other settings .split_seed."):
        shard_dirs(other)
    assert tok.tokenize_shard(other.data, 0)[0] == "rebuilt"
    write_gz(Path(cfg.data.local_dir) / shard_name(0), docs[:100])
    status, manifest = tok.tokenize_shard(other.data, 0)
    assert status == "rebuilt"
    assert manifest["counts"]["train"]["docs"] + manifest["counts"]["val"]["docs"] == 100


def test_failure_midway_leaves_no_visible_shard(tmp_path, monkeypatch):
    write_gz(c4_file(tmp_path), make_docs(3000, max_words=5))
    cfg = local_cfg(tmp_path)
    calls = []
    real_add = tok.SplitWriter.add

    def dying_add(self, docs):
        calls.append(len(docs))
        if len(calls) == 3:  # some batches already written to disk
            raise KeyboardInterrupt
        real_add(self, docs)

    monkeypatch.setattr(tok.SplitWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        tok.tokenize_shard(cfg.data, 0)
    assert no_trace_of_shard(cfg)
    with pytest.raises(ShardError, match="missing; run `masep tokenize`"):
        shard_dirs(cfg)
    # A process killed outright leaves its hidden temporary directory; the next run clears it.
    final = shard_dir(cfg.data, 0)
    (final.parent / f".{final.name}.tmp-999999").mkdir()
    (final.parent / f".{final.name}.tmp-999999" / "train.bin").write_bytes(b"\0" * 10)
    monkeypatch.setattr(tok.SplitWriter, "add", real_add)
    assert tok.tokenize_shard(cfg.data, 0)[0] == "built"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


# ------------------------------------------------------------------ batches


@pytest.fixture
def sized_shard(tmp_path):
    """Documents of chosen token lengths, seq_len 8: exact window arithmetic is checkable."""
    cfg = local_cfg(tmp_path, "data.seq_len=8", "data.val_fraction=0.01")
    rng = random.Random(3)
    docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(n)), "url": f"u{i}", "timestamp": ""}
            for i, n in enumerate([1, 2, 7, 8, 9, 16, 17, 40, 3, 100] * 3)]
    write_gz(c4_file(tmp_path), docs)
    tok.tokenize_shard(cfg.data, 0)
    return cfg, shard_dirs(cfg)


def _documents(directory: Path, split: str) -> list[np.ndarray]:
    tokens, offsets = read_split(directory, split)
    return [tokens[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]


def test_padding_mode_cuts_each_document_and_masks_only_padding(sized_shard):
    cfg, dirs = sized_shard
    T, PAD = 8, -1  # a pad id no real token has, so padded positions are unambiguous
    ds = TokenDataset(dirs, "train", T, packing=False, pad_id=PAD)
    docs = _documents(dirs[0], "train")
    assert len(ds) == sum(math.ceil((len(d) - 1) / T) for d in docs)
    targets_seen, i = [], 0
    for doc in docs:
        for k in range(math.ceil((len(doc) - 1) / T)):
            x, y, m = ds.get(i)
            assert x.shape == y.shape == m.shape == (T,) and x.dtype == y.dtype == np.int64
            n = int(m.sum())
            real = doc[k * T: k * T + T + 1]  # the window, never past the document's end
            assert n == len(real) - 1 and np.all(m[:n] == 1) and np.all(m[n:] == 0)
            assert np.array_equal(x[:n], real[:-1]) and np.array_equal(y[:n], real[1:])
            assert np.array_equal(x[:n + 1][:len(real)], real[:T])  # inputs: the real tokens,
            assert np.all(x[len(real):] == PAD) and np.all(y[n:] == PAD)  # then padding
            targets_seen.append(y[:n])
            i += 1
    assert i == len(ds)
    # Every token but each document's first is a target exactly once.
    assert np.array_equal(np.concatenate(targets_seen), np.concatenate([d[1:] for d in docs]))
    x, y, m = TokenDataset(dirs, "train", T).get(0)  # default pad is EOT
    assert np.all(y[m == 0] == EOT_ID)


def test_packing_windows_are_contiguous(sized_shard):
    cfg, dirs = sized_shard
    T = 8
    ds = TokenDataset(dirs, "train", T, packing=True)
    stream = np.fromfile(dirs[0] / "train.bin", dtype=np.uint16).astype(np.int64)
    assert len(ds) == (len(stream) - 1) // T
    for i in range(len(ds)):
        x, y, m = ds.get(i)
        assert np.array_equal(x, stream[i * T:(i + 1) * T])
        assert np.array_equal(y, stream[i * T + 1:(i + 1) * T + 1])
        assert np.all(m == 1)
    assert np.array_equal(np.concatenate([ds.get(i)[0] for i in range(len(ds))]), stream[:len(ds) * T])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4099])
def test_shuffled_is_a_keyed_permutation_of_any_size(n):
    orders = {(seed, epoch): shuffled(np.arange(n), n, seed, epoch) for seed in (0, 7) for epoch in (0, 1)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(n))
    if n >= 64:  # another seed or epoch, another order
        assert len({o.tobytes() for o in orders.values()}) == 4
    if n >= 1000:  # the first half of the positions spreads over the range (sd of the share: 0.016)
        assert 0.44 < np.mean(orders[0, 0][: n // 2] < n // 2) < 0.56
    # any positions, in any order, as the whole permutation has them
    pick = np.array([n - 1, 0, n // 2])
    assert np.array_equal(shuffled(pick, n, 7, 1), orders[7, 1][pick])


def test_batches_are_seeded_cover_each_epoch_and_resume_exactly(sized_shard):
    cfg, dirs = sized_shard
    ds = TokenDataset(dirs, "train", 8)
    B = 5
    steps = 2 * len(ds) // B + 3  # wraps into a third epoch
    run = ds.batches(B, seed=11)
    first = [next(run) for _ in range(steps)]
    inputs, targets, mask = first[0]
    assert inputs.shape == targets.shape == mask.shape == (B, 8)
    assert str(inputs.dtype) == "torch.int64" and str(mask.dtype) == "torch.float32"
    order = np.concatenate([ds.indices(s, B, 11) for s in range(steps)])
    assert sorted(order[:len(ds)]) == list(range(len(ds)))  # epoch 0 is a permutation
    assert sorted(order[len(ds):2 * len(ds)]) == list(range(len(ds)))
    assert not np.array_equal(order[:len(ds)], order[len(ds):2 * len(ds)])  # reshuffled
    resumed = ds.batches(B, seed=11, start_step=steps - 4)
    for s in range(steps - 4, steps):
        again = next(resumed)
        assert all(bool((a == b).all()) for a, b in zip(again, first[s]))
    fresh = TokenDataset(dirs, "train", 8)  # a new process: same batches from the same seed
    assert all(bool((a == b).all()) for a, b in zip(fresh.batch(steps - 1, B, 11), first[-1]))
    assert not np.array_equal(ds.indices(0, B, 12), ds.indices(0, B, 11))


def test_shard_dirs_requires_tokenized_shards(tmp_path):
    cfg = local_cfg(tmp_path)
    with pytest.raises(ShardError, match=r"shard-00000: token shard missing; run `masep tokenize`"):
        shard_dirs(cfg)


# ------------------------------------------------------------------ the embedded sample


def test_embedded_sample_tokenizes_through_the_cli(tmp_path, capsys):
    tokens = tmp_path / "tokens"
    rc = cli.main(["tokenize", "--config", "tiny", "--no-progress", "--shard", "0",
                   "--set", f"data.tokens_dir={tokens}"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("shard 00000: built: train ")
    cfg = load_config("tiny", [f"data.tokens_dir={tokens}"])
    directory, = shard_dirs(cfg)
    assert directory == tokens / "sample" / "shard-00000"
    manifest = read_manifest(directory)
    docs = manifest["counts"]["train"]["docs"] + manifest["counts"]["val"]["docs"]
    with gzip.open(shard_path(cfg.data, 0), "rt") as f:
        lines = sum(1 for _ in f)
    assert docs == lines and manifest["skipped"] == {}
    sd = math.sqrt(docs * 0.1 * 0.9)
    assert abs(manifest["counts"]["val"]["docs"] - 0.1 * docs) < 5 * sd
    assert manifest["counts"]["train"]["tokens"] > 100_000
    ds = TokenDataset([directory], "train", cfg.data.seq_len)
    x, y, m = ds.batch(0, cfg.train.global_batch, cfg.train.seed)
    assert x.shape == (cfg.train.global_batch, cfg.data.seq_len) and int(x.max()) < 50257


def test_training_refuses_a_shard_whose_corpus_file_changed(local_shard):
    """A corpus replaced after tokenizing is not trained on silently."""
    cfg, docs, _ = local_shard
    directory = shard_dir(cfg.data, 0)
    corpus = Path(cfg.data.local_dir) / shard_name(0)
    write_gz(corpus, docs[:100])
    with pytest.raises(ShardError) as e:
        shard_dirs(cfg)
    assert str(e.value) == (f"{directory}: token shard was made from {corpus} before that file changed; "
                            "run `masep tokenize` with this config first")
    assert tok.tokenize_shard(cfg.data, 0)[0] == "rebuilt"
    assert shard_dirs(cfg) == [directory]
