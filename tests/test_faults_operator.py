"""Operator faults injected by pid from outside the ranks into small local runs (ep_dp on 3 CPU
ranks, 6 steps, a checkpoint every 3): a stopped or killed rank, a lost or damaged result file,
a failed or killed collect, a cancel that SIGINT cannot reach, two jobs on one run folder.
Each fault ends in one line naming the rank or file, within the time promised, and leaves the
database and run folders equal to an uninterrupted reference or refused."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from masep.config import load_config
from masep.launch import CANCEL_GRACE_S, LaunchError, launch, run_lock

TIMEOUT_S = 10  # parallel.timeout_s of these runs: detection must come within it + 10 s
SETS = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=1",
        "train.global_batch=6", "data.seq_len=32", "model.experts=6", f"parallel.timeout_s={TIMEOUT_S}"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from masep.data import tokenize as tok

    root = tmp_path_factory.mktemp("tokens")
    tok.tokenize_shard(load_config("tiny", [f"data.tokens_dir={root}"]).data, 0)
    return root


def start(tmp: Path, tokens: Path, out: Path, *extra: str, ignore_sigint: bool = False) -> subprocess.Popen:
    """`masep train` (ep_dp, 3 ranks) in its own session, as an operator would start it."""
    cmd = ["masep", "train", "--config", "tiny", "--strategy", "ep_dp", "--world-size", "3", "--set",
           f"data.tokens_dir={tokens}", f"launch.log_dir={tmp}/logs", *SETS, *extra, "--out", str(out)]
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=pre)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def heartbeat(tmp: Path, rank: int, timeout: float = 300) -> dict:
    """The heartbeat of `rank` of the job under tmp/logs, once the rank beats."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (tmp / "logs").glob(f"*/*_{rank}_heartbeat.json"):
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never beat")


def wait_for_step(tmp: Path, step: int, timeout: float = 300) -> None:
    """Until rank 0 has logged `step` (so every rank is inside the training loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (tmp / "logs").glob("*/*_0_log.out"):
            if f"step {step}/" in path.read_text():
                return
        time.sleep(0.2)
    raise AssertionError(f"rank 0 never reached step {step}")


def failure_line(out: str) -> str:
    lines = [l for l in out.splitlines() if "masep" in l and ("rank " in l or "cancelled" in l
                                                              or "in use" in l or "still running" in l)]
    assert lines, out[-3000:]
    return lines[-1]


def assert_all_gone(pids) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def collect(runs: Path, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["masep", "collect", "--runs", str(runs), "--db", str(db)],
                          capture_output=True, text=True, timeout=300)


def table(db: Path, sql: str) -> list:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


STEPS_SQL = "SELECT run_id, rank, step, loss FROM steps ORDER BY ALL"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokens) -> Path:
    """An uninterrupted run: runs/train/ep_dp/seed=0 and its database."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "runs" / "train" / "ep_dp" / "seed=0"
    log = finish(start(tmp, tokens, out))
    assert (out / "run.json").exists(), log[-3000:]
    assert "rank 0: step 1/6 loss" in log  # rank 0's progress reaches the console that started it
    assert collect(tmp / "runs", tmp / "masep.duckdb").returncode == 0
    return tmp


def copy_run(reference: Path, tmp: Path) -> Path:
    shutil.copytree(reference / "runs", tmp / "runs")
    return tmp / "runs" / "train" / "ep_dp" / "seed=0"


# ------------------------------------------------------------------ 1: a stopped rank


@pytest.mark.slow
def test_1_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, tokens):
    proc = start(tmp_path, tokens, tmp_path / "run")
    pids = [heartbeat(tmp_path, r)["pid"] for r in range(3)]
    wait_for_step(tmp_path, 2)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        out = finish(proc, timeout=TIMEOUT_S + 60)
    finally:
        with_kill = [p for p in pids if psutil.pid_exists(p)]
        for pid in with_kill:  # never leave a stopped process behind, whatever happened
            os.kill(pid, signal.SIGKILL)
    ended = time.monotonic() - stopped_at
    assert proc.returncode != 0
    line = failure_line(out)
    found = re.search(rf"rank 1 \(pid {pids[1]} on {re.escape(socket.gethostname())}\) stopped making "
                      r"progress: no heartbeat for (\d+) s; the process is stopped \(SIGSTOP\); cancelled it",
                      line)
    assert found, line
    assert int(found[1]) < TIMEOUT_S + 10  # detected within the timeout + 10 s
    # then the cancel: a stopped process outlasts SIGINT's and SIGTERM's grace
    assert ended < TIMEOUT_S + 10 + 2 * CANCEL_GRACE_S, ended
    assert line.endswith("_1_log.err") and Path(line.split("log: ")[1]).exists()
    assert not with_kill, "the cancel left processes behind"
    assert not (tmp_path / "run" / "run.json").exists()


# ------------------------------------------------------------------ 4: the right rank is named


@pytest.mark.slow
@pytest.mark.parametrize("victim", [2, 0])
def test_4_a_killed_rank_is_named_with_its_signal(tmp_path, tokens, victim):
    proc = start(tmp_path, tokens, tmp_path / "run")
    pids = [heartbeat(tmp_path, r)["pid"] for r in range(3)]
    wait_for_step(tmp_path, 2)
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    out = finish(proc, timeout=TIMEOUT_S + 60)
    assert time.monotonic() - killed_at < TIMEOUT_S + 10
    line = failure_line(out)
    assert f"rank {victim} (pid {pids[victim]} on {socket.gethostname()}) exited without a result: " \
           f"killed by a signal it cannot catch (SIGKILL" in line, line
    assert "Connection closed" not in line
    assert_all_gone(pids)


@pytest.mark.slow
def test_4_a_truncated_rank_file_surfaces_its_error(tmp_path, tokens, reference):
    out_dir = copy_run(reference, tmp_path)
    path = out_dir / "steps-rank2.parquet"
    path.write_bytes(path.read_bytes()[:100])
    (out_dir / "run.json").unlink()  # as Snakemake's --forcerun does before it resumes
    out = finish(start(tmp_path, tokens, out_dir))
    line = failure_line(out)
    assert re.search(r"rank 2 \(pid \d+ on .*\) failed: pyarrow\.lib\.ArrowInvalid: .*", line), line
    assert "steps-rank2.parquet" in out


# ------------------------------------------------------------------ 2: a lost result file


@pytest.mark.slow
def test_2_a_lost_rank_file_is_refused_by_collect_and_resume(tmp_path, tokens, reference):
    out_dir = copy_run(reference, tmp_path)
    run_json = json.loads((out_dir / "run.json").read_text())
    assert run_json["files"]["steps-rank2.parquet"] == 6 and run_json["files"]["experts-rank0.parquet"] > 0
    (out_dir / "steps-rank2.parquet").unlink()
    done = collect(tmp_path / "runs", tmp_path / "masep.duckdb")
    assert done.returncode == 1 and not (tmp_path / "masep.duckdb").exists()
    assert done.stderr.strip() == (f"masep collect: {out_dir / 'steps-rank2.parquet'}: missing (run.json "
                                   f"lists 6 rows); run it again afresh (Snakemake: --config fresh=true)")
    # A resume from the final checkpoint would write no rows: it refuses, naming the file.
    (out_dir / "run.json").unlink()
    out = finish(start(tmp_path, tokens, out_dir))
    line = failure_line(out)
    assert "rank 2" in line and "ResumeError" in line and "steps-rank2.parquet: rows of 6 step(s) " \
           "before the checkpoint's step 6 are missing" in line and "fresh=true" in line, line
    assert not (out_dir / "run.json").exists()


# ------------------------------------------------------------------ 3 and 7: collect


def test_3_a_failed_collect_keeps_the_previous_database(tmp_path, reference):
    out_dir = copy_run(reference, tmp_path)
    db = tmp_path / "masep.duckdb"
    assert collect(tmp_path / "runs", db).returncode == 0
    before = db.read_bytes()
    assert table(db, STEPS_SQL) == table(reference / "masep.duckdb", STEPS_SQL)
    path = out_dir / "steps-rank1.parquet"
    path.write_bytes(path.read_bytes()[:-200])
    done = collect(tmp_path / "runs", db)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"masep collect: {path}: damaged (")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masep.duckdb", "runs"]


def test_3_the_workflow_does_not_make_the_database_an_output(tmp_path):
    """Snakemake deletes a job's outputs before it runs: collect's output is its summary, so a
    failed collect leaves the database and no summary (the next `snakemake` runs it again)."""
    text = (Path(__file__).resolve().parent.parent / "workflow" / "rules" / "results.smk").read_text()
    rule = text.split("rule collect:")[1].split("rule report:")[0]
    outputs = rule.split("output:")[1].split("log:")[0]
    assert "COLLECTED" in outputs and "DB" not in outputs


def test_7_a_killed_collects_leftovers_are_removed(tmp_path, reference):
    db = tmp_path / "masep.duckdb"
    # A collect killed while it wrote: a process that opened the temporary database its way,
    # wrote to it (leaving a WAL) and was SIGKILLed.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, os, sys, time; "
        f"con = duckdb.connect(os.path.join({str(tmp_path)!r}, f'.masep.duckdb.tmp-{{os.getpid()}}')); "
        "con.execute('CREATE TABLE t AS SELECT range AS x FROM range(100000)'); "
        "print('ready', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = sorted(p.name for p in tmp_path.glob(".masep.duckdb.tmp-*"))
    assert f".masep.duckdb.tmp-{writer.pid}" in leftovers and f".masep.duckdb.tmp-{writer.pid}.wal" in leftovers
    # a collect still running (this process' parent stands in for it) keeps its file
    alive = tmp_path / f".masep.duckdb.tmp-{os.getppid()}"
    alive.write_bytes(b"")
    assert collect(reference / "runs", db).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "masep.duckdb"]
    assert table(db, STEPS_SQL) == table(reference / "masep.duckdb", STEPS_SQL)


# ------------------------------------------------------------------ 5: cancel without SIGINT


def job_processes(proc: subprocess.Popen, count: int, timeout: float = 120) -> list[int]:
    """Pids of the `count` processes under `proc` (submitit's controller and the ranks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            found = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            if len(found) >= count:
                return found
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} processes under {proc.pid}")


@pytest.mark.slow
def test_5_cancel_ends_a_job_that_ignores_sigint(tmp_path, tokens):
    """Started with SIGINT ignored (nohup, &) and stopped as Snakemake stops its jobs (SIGTERM):
    the cancel escalates to SIGKILL. Sent once every rank beats, so submitit's tasks pass SIGTERM
    by (the wait timeout's own cancel is tested in test_launch.py)."""
    out_dir = tmp_path / "run"
    proc = start(tmp_path, tokens, out_dir, "train.steps=500", ignore_sigint=True)
    pids = job_processes(proc, 4)
    for r in range(3):
        heartbeat(tmp_path, r)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout=200)
    line = failure_line(out)
    assert re.search(r"interrupted; cancelled it \(SIGKILL: \d+ process\(es\) gone\)", line), line
    assert_all_gone(pids)
    time.sleep(3)
    assert not (out_dir / "run.json").exists()


# ------------------------------------------------------------------ 6: one job per run folder


@pytest.mark.slow
def test_6_a_second_job_on_a_run_folder_is_refused(tmp_path, tokens):
    out_dir = tmp_path / "run"
    first = start(tmp_path, tokens, out_dir)
    pids = [heartbeat(tmp_path, r)["pid"] for r in range(3)]
    job_id = json.loads((out_dir / ".masep-lock.json").read_text())["job_id"]
    try:
        out = finish(start(tmp_path / "second", tokens, out_dir), timeout=120)
        assert failure_line(out).endswith(
            f"run folder {out_dir} is in use by pid {first.pid} on {socket.gethostname()} (job {job_id}, "
            f"since {json.loads((out_dir / '.masep-lock.json').read_text())['since']}); wait for that "
            f"job or stop it, then run again"), out[-2000:]
        # The launcher alone killed (as when Snakemake dies): its job still runs and still counts.
        first.send_signal(signal.SIGKILL)
        first.wait()
        out = finish(start(tmp_path / "third", tokens, out_dir), timeout=120)
        assert f"the job of pid {first.pid} on" in failure_line(out) and "is still running" in out
    finally:
        procs = [psutil.Process(pid) for pid in [int(job_id), *pids] if psutil.pid_exists(pid)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=30)


def test_6_a_stale_lock_is_taken_over_and_said_so(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".masep-lock.json").write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "job_id": str(gone.pid), "executor": "local",
         "since": "then"}))
    with run_lock(tmp_path, "local") as record:
        record("123")
        assert json.loads((tmp_path / ".masep-lock.json").read_text())["pid"] == os.getpid()
        with pytest.raises(LaunchError, match=f"is in use by pid {os.getpid()} on"):
            with run_lock(tmp_path, "local"):
                pass
    assert f"taking over the lock of {tmp_path} from pid {gone.pid}" in capsys.readouterr().out


# ------------------------------------------------------------------ 9: smaller ones


def test_9_run_files_are_group_readable(tmp_path):
    from masep.telemetry import writer as w

    w.write_parquet(tmp_path / "steps-rank0.parquet", [{"step": 0}])
    w.atomic_write_json(tmp_path / "run.json", {})
    for name in ("steps-rank0.parquet", "run.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~w._UMASK


def test_9_no_slurm_is_one_line(tmp_path):
    if shutil.which("srun"):
        pytest.skip("SLURM is installed here")
    cfg = load_config("tiny", ["launch.executor=slurm", f"launch.log_dir={tmp_path}"])
    with pytest.raises(LaunchError) as e:
        launch(lambda: None, cfg, 1, "job", tmp_path / "job", run_dirs=[tmp_path / "run"])
    assert str(e.value).startswith("job: cannot start the slurm executor: Could not detect \"srun\"")
    assert "\n" not in str(e.value)


def test_9_a_read_only_run_folder_is_refused_before_the_first_step(tmp_path, tokens, monkeypatch, capsys):
    import errno

    from masep.cli import main

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes through any mode: refuse as the kernel refuses everyone else
        real_open = os.open

        def refused(path, *args, **kwargs):
            if Path(path).parent == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refused)
    capsys.readouterr()
    rc = main(["train", "--set", f"data.tokens_dir={tokens}", f"launch.log_dir={tmp_path}/logs",
               "launch.executor=local", *SETS, "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.splitlines() == [f"masep train: run folder {run} is not writable (Permission denied); "
                                "fix its permissions or choose another --out"]
    assert list(run.iterdir()) == [] and not (tmp_path / "logs").exists()  # no job started, no step ran
