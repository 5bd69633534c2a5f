"""Walks docs/ERRORS.md: every bad input in its table is run and must end in the table's one line.

Each row names a setup below (files it prepares in an empty working folder) and a `masep`
command run in that folder; `…` in the expected line stands for any text (job ids, long lists).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest

from masep.cli import main

TABLE = Path(__file__).resolve().parent.parent / "docs" / "ERRORS.md"
ROW = re.compile(r"^\| `([\w-]+)` \| (.+?) \| `([\w-]+)` \| `(masep [^`]+)` \| (?:`` (.+) ``|`(.+)`) \|$")
CORPUS = Path("c4/en/c4-train.00000-of-01024.json.gz")


def rows() -> list[tuple[str, str, str, str, str]]:
    return [(*m.groups()[:4], m[5] or m[6]) for line in TABLE.read_text().splitlines() if (m := ROW.match(line))]


def write_corpus(*lines: str | bytes, raw: bool = False) -> None:
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    CORPUS.write_bytes(body if raw else gzip.compress(body, mtime=0))


def doc(i: int) -> str:
    return json.dumps({"text": f"Document {i} about rivers and stones.", "url": f"https://example.org/{i}"})


def tokenized() -> None:
    shutil.copytree(SAMPLE_TOKENS, "data/tokens")


def flip_byte(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def trained() -> None:
    tokenized()
    assert main(["train", "--set", "train.steps=1", "train.warmup_steps=1", "train.decay_steps=1",
                 "train.eval_every=1", "launch.executor=debug", "--out", "run"]) == 0


def damaged_checkpoint() -> None:
    trained()
    for f in Path("run/checkpoint/step-1").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])


def latest_names_missing_step() -> None:
    trained()
    Path("run/checkpoint/latest").write_text("step-30\n")


def corpus_changed() -> None:
    write_corpus(*(doc(i) for i in range(30)))
    assert main(["tokenize", "--set", "data.source=local", "data.local_dir=c4", "--no-progress"]) == 0
    write_corpus(*(doc(i) for i in range(20)))


def interrupted_tokenize(monkeypatch, stop) -> None:
    import masep.data.tokenize as tok

    def dying(*args, **kwargs):
        stop()

    monkeypatch.setattr(tok, "write_shard", dying)


def raise_interrupt():
    raise KeyboardInterrupt


SETUPS = {
    "nothing": lambda mp: None,
    "bad-yaml": lambda mp: Path("mine.yaml").write_text("train:\n  lr: [1e-3\n"),
    "not-a-mapping-yaml": lambda mp: Path("mine.yaml").write_text("- just\n- a list\n"),
    "corpus-not-json": lambda mp: write_corpus(doc(0), doc(1), '{"text": "unterminated'),
    "corpus-not-object": lambda mp: write_corpus(doc(0), '["a list"]'),
    "corpus-not-gzip": lambda mp: write_corpus(doc(0), raw=True),
    "corpus-truncated": lambda mp: (write_corpus(*(doc(i) for i in range(200))),
                                    CORPUS.write_bytes(CORPUS.read_bytes()[:-40])),
    "corpus-not-utf8": lambda mp: write_corpus(doc(0), b'{"text": "caf\xe9"}'),
    "corpus-text-not-string": lambda mp: write_corpus(doc(0), '{"text": 42}'),
    "tokenized": lambda mp: tokenized(),
    "shard-flipped-byte": lambda mp: (tokenized(), flip_byte("data/tokens/sample/shard-00000/val.bin")),
    "shard-truncated": lambda mp: (tokenized(), Path("data/tokens/sample/shard-00000/train.bin").write_bytes(b"")),
    "shard-manifest-gone": lambda mp: (tokenized(), Path("data/tokens/sample/shard-00000/manifest.json").unlink()),
    "shard-corpus-changed": lambda mp: corpus_changed(),
    "checkpoint-damaged": lambda mp: damaged_checkpoint(),
    "checkpoint-latest-missing": lambda mp: latest_names_missing_step(),
    "checkpoint-none": lambda mp: (tokenized(), Path("run/checkpoint").mkdir(parents=True)),
    "empty-db": lambda mp: __import__("duckdb").connect("results.duckdb").close(),
    "ctrl-c-tokenize": lambda mp: interrupted_tokenize(mp, raise_interrupt),
    "sigterm-tokenize": lambda mp: interrupted_tokenize(mp, lambda: os.kill(os.getpid(), signal.SIGTERM)),
}
SAMPLE_TOKENS: Path


@pytest.fixture(scope="module", autouse=True)
def sample_tokens(tmp_path_factory):
    """The embedded sample shard, tokenized once for the rows that need token shards."""
    global SAMPLE_TOKENS
    folder = tmp_path_factory.mktemp("sample")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["tokenize", "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    SAMPLE_TOKENS = folder / "data" / "tokens"


def test_the_table_lists_at_least_30_bad_inputs_each_with_a_setup():
    ids = [r[0] for r in rows()]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert {r[2] for r in rows()} <= set(SETUPS)


@pytest.mark.parametrize("case", rows(), ids=lambda r: r[0])
def test_bad_input_ends_in_its_one_line(case, tmp_path, monkeypatch, capsys):
    """The last line masep writes to stderr is the table's; rows named warn-* succeed, the rest fail."""
    name, _, setup, command, expected = case
    monkeypatch.chdir(tmp_path)
    SETUPS[setup](monkeypatch)
    capsys.readouterr()
    try:
        rc = main(shlex.split(command)[1:])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("masep ")]
    if os.environ.get("MASEP_ERRORS_SHOW"):  # a file to append the lines seen to, for the table
        with open(os.environ["MASEP_ERRORS_SHOW"], "a") as f:
            f.write(f"{name}\t{rc}\t{lines[-1] if lines else err!r}\n")
    assert "Traceback" not in err
    pattern = "^" + ".*".join(re.escape(part) for part in expected.split("…")) + "$"
    assert lines and re.match(pattern, lines[-1]), f"\n got: {lines[-1] if lines else err}\nwant: {expected}"
    assert (rc == 0) == name.startswith("warn-")


def test_a_failed_rank_is_reported_with_its_own_message_and_log():
    """What the launcher raises for a rank that failed (submitit's text around the rank's
    traceback) becomes the rank's message and its log file."""
    from masep.errors import one_line
    from masep.launch import LaunchError

    trace = ("Job (task=1) failed during processing with trace:\n----------------------\n"
             "Traceback (most recent call last):\n  File \"worker.py\", line 3, in train_rank\n"
             "torch.distributed.checkpoint.api.CheckpointException: CheckpointException ranks:dict_keys([1])\n\n"
             "The above exception was the direct cause of the following exception:\n\n"
             "Traceback (most recent call last):\n  File \"checkpoint.py\", line 9, in load\n"
             "masep.runtime.checkpoint.CheckpointError: checkpoint run/checkpoint/step-2 cannot be read "
             "(EOFError); move it away to start this run over\n----------------------\n"
             "You can check full logs with 'job.stderr(1)' and 'job.stdout(1)'or at paths:\n"
             "  - logs/7_1_log.err\n  - logs/7_1_log.out\n")
    e = LaunchError(f"job 7 task 1 of 4 failed:\n{trace}\nLogs:\n  stdout: logs/7_1_log.out\n  stderr: logs/7_1_log.err")
    assert one_line(e) == ("rank 1: checkpoint run/checkpoint/step-2 cannot be read (EOFError); move it away "
                           "to start this run over (traceback: logs/7_1_log.err)")
    other = LaunchError(e.args[0].replace("masep.runtime.checkpoint.CheckpointError", "ZeroDivisionError"))
    assert one_line(other).startswith("rank 1: ZeroDivisionError: checkpoint")


@pytest.mark.parametrize("how", ["-v", "MASEP_TRACEBACK=1"])
def test_verbose_shows_the_traceback_before_the_line(how, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--out", "run"]
    if how == "-v":
        argv.append("-v")
    else:
        monkeypatch.setenv("MASEP_TRACEBACK", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise ShardError" in err
    assert err.splitlines()[-1].startswith("masep train: data/tokens/sample/shard-00000: token shard missing")
