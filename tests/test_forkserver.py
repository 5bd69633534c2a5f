"""The local ranks' fork server: a task started through the client runs as a fresh interpreter
would (its argv, environment, folder, stdio and exit status), in a child of the server."""
import os
import signal
import subprocess
import sys
import time

import pytest

from masep.runtime import forkserver

TASK = """
import os, signal, sys, time
print("pid", os.getpid(), "cwd", os.getcwd(), "argv", sys.argv[1:], "env", os.environ.get("TASK_VALUE"), flush=True)
how = sys.argv[1]
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "wait":
    print("waiting", flush=True)
    time.sleep(60)
if how == "raise":
    raise ValueError("task failed")
sys.exit(int(how))
"""


@pytest.fixture()
def server(tmp_path, monkeypatch):
    (tmp_path / "task_module.py").write_text(TASK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    srv = forkserver.Server(preload=("json",))
    yield srv
    srv.stop()
    assert not os.path.exists(srv.dir)  # the socket and its folder are gone


def _client(tmp_path, how, env_extra, **kw):
    out = open(tmp_path / f"out-{how}.txt", "w")
    env = {**os.environ, "TASK_VALUE": "given", **env_extra}
    cmd = [sys.executable, "-m", "masep.runtime.forkserver", "-u", "-m", "task_module", how]
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, **kw), out.name


def _wait_until_waiting(out: str) -> None:
    deadline = time.monotonic() + 60
    while "waiting" not in open(out).read():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_task_runs_in_a_child_of_the_server_with_the_clients_stdio_env_and_exit_code(server, tmp_path):
    proc, out = _client(tmp_path, "3", server.env)
    assert proc.wait(timeout=60) == 3
    words = open(out).read().split()
    assert words[words.index("pid") + 1] != str(proc.pid)
    assert words[words.index("cwd") + 1] == str(tmp_path)
    assert words[words.index("env") + 1] == "given"
    assert "['3']" in words


def test_a_killed_task_kills_its_client_with_the_same_signal(server, tmp_path):
    proc, _ = _client(tmp_path, "kill", server.env)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_a_task_that_raises_prints_its_traceback_and_exits_1(server, tmp_path):
    proc, out = _client(tmp_path, "raise", server.env)
    assert proc.wait(timeout=60) == 1
    assert "ValueError: task failed" in open(out).read()


def test_signals_to_the_client_reach_the_task_and_a_killed_client_takes_its_task_along(server, tmp_path):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc, out = _client(tmp_path, "wait", server.env)
        _wait_until_waiting(out)
        words = open(out).read().split()
        task_pid = int(words[words.index("pid") + 1])
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig
        deadline = time.monotonic() + 10
        while _running(task_pid):
            assert time.monotonic() < deadline, f"task pid {task_pid} outlived its client ({sig.name})"
            time.sleep(0.05)


def test_signals_to_the_server_leave_it_and_its_tasks_to_the_launcher(server, tmp_path):
    """Ctrl-C or SIGTERM to the launcher's process group, or scancel to a whole SLURM job, reach the
    server too: it keeps serving and, released by its launcher, removes its socket (the fixture)."""
    proc, out = _client(tmp_path, "wait", server.env)
    _wait_until_waiting(out)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        os.kill(server.proc.pid, sig)
    time.sleep(0.5)
    assert server.proc.poll() is None and proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the task still takes its own signals
    assert proc.wait(timeout=60) == -signal.SIGTERM


def test_a_client_stopped_before_its_task_starts_ends_at_once_and_no_task_runs(tmp_path, monkeypatch):
    (tmp_path / "task_module.py").write_text(TASK)
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(8)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    srv = forkserver.Server(preload=("slow_import",))  # clients queue until it has imported
    try:
        proc, out = _client(tmp_path, "wait", srv.env)
        time.sleep(1.5)  # connected and waiting for the server
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # ended by the signal while the server still imports (about 6 s more), not after it
        assert proc.wait(timeout=60) == -signal.SIGTERM and time.monotonic() - start < 4
        time.sleep(8)  # the server is ready now: the task it forked for the gone client is killed
        assert "pid" not in open(out).read()
    finally:
        srv.stop()


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (it may be reaped while /proc is read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_without_a_server_the_client_runs_the_task_itself_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "task_module.py").write_text(TASK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    proc, out = _client(tmp_path, "0", {forkserver.ENV: str(tmp_path / "no-such-socket")})
    assert proc.wait(timeout=60) == 0
    text = open(out).read()
    assert "rank fork server not reachable" in text and "env given" in text


RANK_IMPORTS = """
import importlib, sys
from masep.runtime.forkserver import PRELOAD
for name in PRELOAD:
    importlib.import_module(name)
before = set(sys.modules)
from masep.telemetry.writer import write_parquet
write_parquet(sys.argv[1], [{"step": 0, "loss": 1.0}])  # pyarrow's first table imports pandas
import torch.distributed.checkpoint.api, masep.parallel.comm  # what checkpoint.save/load import
print(sorted(m for m in set(sys.modules) - before if not m.startswith("encodings.")))
"""


def test_a_rank_imports_nothing_after_the_fork(tmp_path):
    """What every rank does (write its Parquet rows, save or load a checkpoint) finds its modules
    imported by the server: an import after the fork is paid again by every rank."""
    out = subprocess.run([sys.executable, "-c", RANK_IMPORTS, str(tmp_path / "rows.parquet")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
