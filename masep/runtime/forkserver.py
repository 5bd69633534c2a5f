"""CPU ranks forked from a process that has already imported torch and masep.

A CPU rank of a short run spends most of its time importing: torch, torch.distributed.checkpoint
and torch._dynamo (which the optimizer pulls in) cost 8-10 CPU-seconds a rank on a 2-core
machine, paid by every rank of every job. With the local executor a `Server` (one per workflow
run, from Snakemake's `onstart`, else one per submitted job) imports them once; a one-node SLURM
job's batch script starts its own (`batch_setup`). Each task starts through `client` (submitit's
`python`: LocalExecutor's controller, or srun), which hands its command,
environment, working folder and stdin/stdout/stderr to the server, and the server forks a child
that runs the task (`python -u -m submitit.core._submit <folder>`) as a fresh interpreter would.
The client stays the task's process for submitit: it forwards the signals it gets to the child
and exits as the child did (same code, or killed by the same signal). The child's pid is the rank's pid
(heartbeat, fault injection); a client that disappears takes its child with it (SIGKILL).

Under SLURM the ranks run in the batch step, beside the server: sacct's srun step still has one
task per rank (the clients), but its CPU time and memory are the clients'; the batch step's are
the ranks'.

A restarted job gets a new server: a full restart still pays one import. Where the server
cannot be reached the client runs the task in the plain interpreter, saying so on stderr.

Forking is safe here because the server only imports: no tensor work starts torch's thread
pools before the fork, and every rank sets its thread count (`worker.cpu_threads`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import suppress

ENV = "MASEP_FORK_SERVER"  # the server's socket, for the clients
# What a rank imports; the strategies are small once torch is in. pandas and the rest: pyarrow imports
# them on a rank's first Parquet table (0.5-1 CPU-second a rank).
PRELOAD = ("masep.runtime.worker", "masep.commands.train", "masep.commands.infer", "torch._dynamo",
           "torch.distributed.checkpoint", "masep.data.batches", "pandas", "pyarrow.pandas_compat",
           "pyarrow.vendored.version", "masep.parallel.single", "masep.parallel.tp", "masep.parallel.pp",
           "masep.parallel.tp_pp", "masep.parallel.ep_dp", "masep.parallel.ma_sep")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)


def usable(launch_cfg) -> bool:
    """CPU ranks on Linux. A GPU rank must not come from a process that may have touched the
    CUDA driver (some imports query the devices), and fork after imports is Linux's ground."""
    return sys.platform.startswith("linux") and not launch_cfg.gpus_per_node


def shared_server(restart: int):
    """The socket of the server this process' environment names (the workflow's), where a job
    may use it: not for a restart (a full restart pays the import a new job would) and only
    from the same interpreter (not from a conda environment of its own)."""
    path = os.environ.get(ENV)
    if restart or not path or os.environ.get(f"{ENV}_PYTHON") != sys.executable or not os.path.exists(path):
        return None
    return path


def client_command() -> str:
    """LocalExecutor's `python`: the tasks start through `client`."""
    import shlex

    return f"{shlex.quote(sys.executable)} -m masep.runtime.forkserver"


# ------------------------------------------------------------------ the launcher's side


def batch_setup(preload: tuple[str, ...] = PRELOAD) -> list[str]:
    """Lines of a one-node SLURM batch script that start its job's server before srun starts the
    tasks (through `client`). The server lives while the script holds its stdin (fd 9) and ignores
    the signals that scancel and the time-limit warning send to the whole job (`serve`): its tasks
    get them from their clients, which are srun's tasks (one per rank, as sacct and scancel see them)."""
    import shlex

    python, env = shlex.quote(sys.executable), f'"${ENV}"'
    return [f'export {ENV}="$(mktemp -d "${{TMPDIR:-/tmp}}/masep-fork-XXXXXX")/socket" {ENV}_PYTHON={python}',
            # The server removes its folder when it ends, unless the job's end kills it first.
            f'trap \'rm -rf "$(dirname {env})"\' EXIT',
            f'exec 9> >(exec {python} -u -m masep.runtime.forkserver --serve '
            f'{env} {" ".join(preload)})',
            f'for _ in $(seq 600); do [ -S {env} ] && break; sleep 0.05; done  # else the tasks start alone']


class Server:
    """The fork server of one submitted job (or of a workflow run): `env` goes into the job's
    environment; `stop()` lets it end once its last task has."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD):
        self.dir = tempfile.mkdtemp(prefix="masep-fork-")
        self.path = os.path.join(self.dir, "socket")
        # stdin is the server's lifeline: closed when this process stops it or dies.
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "masep.runtime.forkserver", "--serve",
                                      self.path, *preload], stdin=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the server listens before it imports; clients queue until it is ready
        self.env = {ENV: self.path, f"{ENV}_PYTHON": sys.executable}

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # tasks still running (a cancelled job's) keep it until they end
        with suppress(OSError):  # the server removes both when it ends first
            os.unlink(self.path)
        with suppress(OSError):
            os.rmdir(self.dir)


# ------------------------------------------------------------------ the server


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("client went away")
        data += more
    return json.loads(data[4:]), list(fds)


def _become_task(request: dict, fds: list[int], keep_closed: list[socket.socket]) -> None:
    """In the forked child: take the client's stdio, folder and environment and run its module
    as `python -u -m <module> <args>` would; never returns."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        for s in keep_closed:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        with suppress(Exception):  # Linux: die with the server, never orphaned
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in FORWARDED:  # as a fresh interpreter: what its parent ignored stays ignored
            signal.signal(sig, signal.SIG_IGN if sig in request["ignored"]
                          else signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        module, *args = request["argv"][2:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B036 - the interpreter's own last resort, as in a fresh process
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, preload: list[str]) -> None:
    import gc
    import importlib
    import selectors

    # Signals to the launcher's process group (Ctrl-C, a SIGTERM) or, under SLURM, to the whole job
    # (scancel, the time-limit warning) are the launcher's and the tasks' to act on: the server ends
    # by its lifeline, with its last task, and removes its socket then.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    for name in preload:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the children share these pages: collecting them would copy every one

    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    running = True
    while running or children:
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, EOFError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _become_task(request, fds, [listener, conn, *children.values()])
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                with suppress(OSError):
                    conn.sendall(f"pid {pid}\n".encode())
                sel.register(conn, selectors.EVENT_READ, pid)
            elif key.fileobj == sys.stdin.fileno():
                # The launcher is done with it, or gone (its job's ranks go on, as the local
                # executor's do without their launcher): no new tasks; ends with the last one.
                if not os.read(sys.stdin.fileno(), 4096):
                    sel.unregister(key.fileobj)
                    sel.unregister(listener)
                    listener.close()
                    with suppress(OSError):
                        os.unlink(path)
                        os.rmdir(os.path.dirname(path))
                    running = False
            else:  # a client closed its end: it is gone, and so is its task
                sel.unregister(key.fileobj)
                with suppress(OSError):
                    os.kill(key.data, signal.SIGKILL)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with suppress(OSError):
                    conn.sendall(f"exit {status}\n".encode())
                with suppress(KeyError):  # unregistered already when its client closed first
                    sel.unregister(conn)
                conn.close()


# ------------------------------------------------------------------ the client (a task's process)


def _fallback(argv: list[str], why: str) -> None:
    print(f"masep: rank fork server not reachable ({why}); starting this rank as a fresh process",
          file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *argv])


def client(argv: list[str]) -> None:
    path = os.environ.get(ENV)
    if argv[:2] != ["-u", "-m"] or len(argv) < 3 or not path:
        os.execv(sys.executable, [sys.executable, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        ignored = [int(sig) for sig in FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]
        request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(),
                              "ignored": ignored}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    except OSError as e:
        _fallback(argv, f"{path}: {e.strerror or e}")
    child: list[int] = []
    pending: list[int] = []

    def forward(signum, frame):
        if child:
            with suppress(OSError):
                os.kill(child[0], signum)
        elif signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # No task yet (the server may still be importing): end now, as a fresh interpreter
            # would; the server kills the task it forks for a client that is gone.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        else:
            pending.append(signum)

    for sig in FORWARDED:
        if sig not in ignored:
            signal.signal(sig, forward)
    replies = conn.makefile("r")
    line = replies.readline().split()
    if line[:1] != ["pid"]:
        _fallback(argv, "it closed the connection")
    child.append(int(line[1]))
    for signum in pending:
        forward(signum, None)
    line = replies.readline().split()
    if line[:1] != ["exit"]:
        print(f"masep: the rank fork server ended before rank pid {child[0]} did", file=sys.stderr, flush=True)
        sys.exit(1)
    status = int(line[1])
    if os.WIFSIGNALED(status):  # die of the same signal (SIGKILL and SIGSTOP keep their action)
        sig = os.WTERMSIG(status)
        if sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        sys.exit(128 + sig)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], sys.argv[3:])
    else:
        client(sys.argv[1:])
