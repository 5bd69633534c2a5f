"""Start the ranks of one job through submitit, watch them, and cancel them for real.

* `launch(entry, cfg, world_size, job_name, folder)` runs in the `masep train` / `masep infer`
  process (a Snakemake job). It submits ONE submitit job of `world_size` tasks, prints the job
  id, waits (never longer than `cfg.launch.wait_timeout_s`) and returns the per-task results, or
  raises `LaunchError` carrying the failing task's error and the paths of its logs.
  Executors (`cfg.launch.executor`):
    - ``local``: submitit's LocalExecutor, N processes on this machine (CPU ranks over gloo);
    - ``slurm``: submitit's SlurmExecutor, nodes/tasks/GPUs/partition/account/qos/time/mem and
      extra ``#SBATCH`` flags from `cfg.launch`;
    - ``debug``: submitit's DebugExecutor, in this very process; world size 1 only.

* What runs inside each rank (`init_distributed`, `DistInfo`) lives in `masep.runtime.distributed`.

Watching: every rank beats a heartbeat file (`<log folder>/<job id>_<rank>_heartbeat.json`:
pid, host; its mtime moves every `HEARTBEAT_S`) from `init_distributed` on. While waiting, the
launcher reads the heartbeats and the per-task results; the first rank that fails (an
exception), disappears without a result (killed), or beats no more for `parallel.timeout_s`
(stopped, hung host) ends the whole job at once, with one line naming the rank, its host, its
exception or signal, and its log. Cancelling escalates SIGINT -> SIGTERM -> SIGKILL over the
job's processes (locally: submitit's controller and every process under it; on SLURM: scancel)
and checks that they are gone. Rank 0's stdout (its progress lines) is echoed to this console
(after a lost rank 0 under `ma.failover`, the lowest survivor's).

Restart: with `cfg.launch.max_restarts` N > 0, a rank found lost (as above) ends the job and the
launcher submits `entry` again (resume=True), up to N times; the ranks continue from the newest
checkpoint. Each rank also writes its progress (`report_progress`: last finished step and phase)
to `<log folder>/<job id>_<rank>_progress.json`, which a fault injector (masep.faults) watches.

In-job recovery (`ma.failover`, ma_sep): this process hosts the ranks' rendezvous store, so it
outlives any rank; a lost attention rank (with replicas to take over) or MoE rank (with another
holding its experts' copy) is left out of the verdict (`_drop_lost`) while the others regroup
(masep.parallel.regroup), and any other loss ends the job as above.

Requeue: `entry` should subclass `RankEntry` (a `submitit.helpers.Checkpointable`). When SLURM
(or the local executor) signals a timeout, rank 0's `entry.checkpoint()` resubmits a copy with
`resume=True`; the rank worker then starts from the newest checkpoint in its run folder. At most
`cfg.launch.max_requeues` requeues happen.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from masep.config import keeps_expert_copies
from masep.errors import ExpectedError

# How often the waiting process looks at the job. SLURM states come from sacct, which submitit
# itself rate-limits; a job that ends without results (FAILED, CANCELLED, NODE_FAIL ...) counts
# as done and fails in _collect. Without accounting submitit sees UNKNOWN forever: the wait
# timeout is what ends that.
POLL_S = 0.5
HEARTBEAT_S = 1.0  # how often a rank touches its heartbeat file
# A rank silent this long while another has failed is taken for the cause (stopped or gone)
# rather than the ranks that report a lost peer.
SILENT_S = 5.0
# What a rank reports when it lost a peer (gloo, NCCL, the rendezvous store): a consequence,
# blamed only when no rank reports a cause.
PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|[Tt]imeout|"
                       r"communicator was aborted|DistNetworkError|DistStoreError")
CANCEL_GRACE_S = 3.0  # time each signal of a cancel gets before the next, stronger one
SLURM_ACTIVE = ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "SUSPENDED", "CONFIGURING")  # not ended


class LaunchError(ExpectedError, RuntimeError):
    """A job failed, timed out, or could not be submitted; the message names its logs."""


class RankEntry(Checkpointable):
    """Base class for what each rank runs: picklable, called once per task.

    `resume` is False on the first start and True after a requeue; the worker should always
    look for the newest checkpoint in its run folder anyway so that re-runs continue.
    """

    resume: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Tell the launcher the ranks are leaving on purpose: their exits are no failure.
        with contextlib.suppress(RuntimeError, OSError):
            env = submitit.JobEnvironment()
            _requeue_marker(env.paths.folder, env.job_id).write_text(str(time.time()))
        resumed = copy.copy(self)
        resumed.resume = True
        return DelayedSubmission(resumed, *args, **kwargs)


# ------------------------------------------------------------------ submitting


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executor_parameters(launch_cfg, world_size: int, job_name: str) -> dict:
    """submitit parameters for one job of `world_size` tasks under `launch_cfg.executor`."""
    lc = launch_cfg
    if world_size < 1:
        raise LaunchError(f"parallel.world_size: must be positive, got {world_size}")
    if lc.executor == "debug":
        if world_size != 1:
            raise LaunchError(f"launch.executor: debug runs in this process and supports world size 1 "
                              f"only, got {world_size}; use local or slurm")
        return {}
    if lc.executor == "local":
        return {
            "tasks_per_node": world_size,
            "nodes": 1,
            "gpus_per_node": lc.gpus_per_node,
            # LocalExecutor kills tasks after timeout_min (2 minutes unless told otherwise)
            "timeout_min": lc.time_min,
        }
    if lc.executor == "slurm":
        if world_size % lc.nodes:
            raise LaunchError(f"launch.nodes: world size {world_size} does not split evenly over "
                              f"{lc.nodes} nodes")
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": lc.nodes,
            "ntasks_per_node": world_size // lc.nodes,
            "cpus_per_task": lc.cpus_per_task,
            "time": lc.time_min,
        }
        if lc.gpus_per_node:
            params["gpus_per_node"] = lc.gpus_per_node
        for key in ("partition", "account", "qos"):
            if getattr(lc, key):
                params[key] = getattr(lc, key)
        if lc.mem_gb:
            params["mem"] = f"{lc.mem_gb}G"
        if lc.extra_sbatch:
            params["additional_parameters"] = dict(lc.extra_sbatch)
        return params
    raise LaunchError(f"launch.executor: must be local, slurm or debug, got {lc.executor!r}")


def make_executor(launch_cfg, world_size: int, job_name: str, folder: str | Path):
    params = executor_parameters(launch_cfg, world_size, job_name)
    folder = Path(folder)
    if launch_cfg.executor == "debug":
        return submitit.DebugExecutor(folder)
    from masep.runtime import forkserver

    if launch_cfg.executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=launch_cfg.max_requeues,
                                    python=forkserver.client_command())
    else:
        # CPU ranks on one node fork from a server the batch script starts (seconds of imports a rank)
        forked = forkserver.usable(launch_cfg) and launch_cfg.nodes == 1
        ex = submitit.SlurmExecutor(folder, max_num_timeout=launch_cfg.max_requeues,
                                    python=forkserver.client_command() if forked else None)
        if forked:
            params["setup"] = forkserver.batch_setup()
    ex.update_parameters(**params)
    return ex


def _task(job, task: int):
    return job.task(task) if job.num_tasks > 1 else job


def _log_paths(job, task: int) -> str:
    paths = _task(job, task).paths
    return f"stdout: {paths.stdout}\n  stderr: {paths.stderr}"


def _describe(job) -> str:
    return f"job {job.job_id}" + (" (SLURM)" if isinstance(job, submitit.SlurmJob) else "")


# ------------------------------------------------------------------ heartbeats and rank states


def heartbeat_path(folder: str | Path, job_id: str, rank: int) -> Path:
    return Path(folder) / f"{job_id}_{rank}_heartbeat.json"


def progress_path(folder: str | Path, job_id: str, rank: int) -> Path:
    return Path(folder) / f"{job_id}_{rank}_progress.json"


def _requeue_marker(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_requeued"


def start_heartbeat(folder: Path, job_id: str, rank: int) -> None:
    """Write this rank's heartbeat file and touch it every HEARTBEAT_S from a daemon thread: a
    stopped (SIGSTOP) or killed rank, or a frozen host, stops touching it."""
    path = heartbeat_path(folder, job_id, rank)
    from masep.telemetry.writer import atomic_write_json

    atomic_write_json(path, {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()})

    def beat() -> None:
        while True:
            with contextlib.suppress(OSError):
                os.utime(path)
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="masep-heartbeat", daemon=True).start()


@dataclass
class _RankState:
    rank: int
    log: Path
    host: Optional[str] = None
    pid: Optional[int] = None
    age_s: Optional[float] = None  # since the last heartbeat; None before the first
    started: float = 0.0  # when this attempt's heartbeat began
    alive: Optional[bool] = None  # known only for ranks on this host
    stopped: bool = False
    error: Optional[str] = None  # the exception line of a failed rank
    error_at: float = 0.0
    finished: bool = False


def _exception_line(trace: str) -> str:
    """'Type: message' of a formatted traceback (the first line after its last frame)."""
    lines = [l for l in str(trace).splitlines() if l.strip()]
    frames = [i for i, l in enumerate(lines) if l.startswith(" ")]
    rest = lines[frames[-1] + 1:] if frames else lines
    return (rest or lines or ["(no message)"])[0].strip()


def _rank_states(job) -> list[_RankState]:
    import psutil

    here, now = socket.gethostname(), time.time()
    states = []
    for task in range(job.num_tasks):
        paths = _task(job, task).paths
        st = _RankState(task, paths.stderr)
        hb = heartbeat_path(paths.folder, job.job_id, task)
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(hb.read_text())
            st.host, st.pid, st.started = info["host"], int(info["pid"]), float(info["started"])
            st.age_s = max(0.0, now - hb.stat().st_mtime)
        if st.pid is not None and st.host == here:
            try:
                proc_status = psutil.Process(st.pid).status()
                st.alive = proc_status != psutil.STATUS_ZOMBIE
                st.stopped = proc_status == psutil.STATUS_STOPPED
            except psutil.Error:
                st.alive = False
        # the result is looked at after the process: a rank writes it before it exits
        with contextlib.suppress(OSError, EOFError, ValueError):
            outcome, value = submitit.core.utils.pickle_load(paths.result_pickle)
            if outcome == "error":
                st.error, st.error_at = _exception_line(value), paths.result_pickle.stat().st_mtime
            else:
                st.finished = True
        states.append(st)
    return states


def _where(st: _RankState) -> str:
    return f"rank {st.rank}" + (f" (pid {st.pid} on {st.host})" if st.pid else "")


def _failure(states: list[_RankState], stale_s: float, requeued_at: float) -> Optional[tuple[bool, str, Path]]:
    """(certain, what happened, its log) for the rank to blame, or None while the job looks healthy.
    `certain` is False while a rank on another host may yet turn out to be the cause."""
    # Ranks between a requeue and their next start are leaving on purpose.
    live = [st for st in states if not (requeued_at and st.started <= requeued_at)]
    gone = [st for st in live if st.alive is False and not st.finished and st.error is None]
    silent = sorted((st for st in live if st.age_s is not None and st.age_s > SILENT_S
                     and not st.finished and st.error is None), key=lambda st: -st.age_s)
    failed = sorted((st for st in live if st.error is not None),
                    key=lambda st: (bool(PEER_LOST.search(st.error)), st.error_at))
    stale = [st for st in silent if st.age_s > stale_s]
    if not (gone or failed or stale):
        return None
    if gone:
        st = gone[0]
        return True, (f"{_where(st)} exited without a result: killed by a signal it cannot catch "
                      f"(SIGKILL, or the out-of-memory killer)"), st.log
    if silent:
        st = silent[0]
        state = "; the process is stopped (SIGSTOP)" if st.stopped else ""
        return True, f"{_where(st)} stopped making progress: no heartbeat for {st.age_s:.0f} s{state}", st.log
    st = failed[0]
    # The cause may yet show: a remote rank's silence, or the result of a rank that closed its
    # connections before writing it.
    undecided = bool(PEER_LOST.search(st.error)) or any(
        other.alive is None and other.error is None and not other.finished for other in live)
    return not undecided, f"{_where(st)} failed: {st.error}", st.log


# ------------------------------------------------------------------ cancelling


def _cancel(job) -> str:
    """End every process of the job, escalating; returns what happened, in a few words."""
    if isinstance(job, submitit.SlurmJob):
        return _cancel_slurm(job)
    import psutil

    procs: list = []
    with contextlib.suppress(psutil.Error, ValueError):
        controller = psutil.Process(int(job.job_id))
        procs = [controller, *controller.children(recursive=True)]
    here = socket.gethostname()
    for task in range(job.num_tasks):  # ranks that left the controller's tree still count
        with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
            info = json.loads(heartbeat_path(_task(job, task).paths.folder, job.job_id, task).read_text())
            if info["host"] == here and all(p.pid != info["pid"] for p in procs):
                procs.append(psutil.Process(int(info["pid"])))
    alive = procs
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                # A stopped rank is left stopped until SIGKILL: resumed, it would go on training
                # (the ranks pass SIGINT/SIGTERM by) and write rows and checkpoints after the verdict.
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=CANCEL_GRACE_S)
        if not alive:
            return f"cancelled it ({signal.Signals(sig).name}: {len(procs)} process(es) gone)"
    return f"cancelled it, but pids {' '.join(str(p.pid) for p in alive)} are still alive"


def _cancel_slurm(job) -> str:
    """scancel: SIGINT to every step first, then SLURM's own SIGTERM, SIGKILL after KillWait."""
    with contextlib.suppress(Exception):
        subprocess.run(["scancel", "--full", "--signal=INT", str(job.job_id)], capture_output=True, timeout=30)
    deadline = time.monotonic() + CANCEL_GRACE_S
    while time.monotonic() < deadline and not job.done(force_check=True):
        time.sleep(POLL_S)
    with contextlib.suppress(Exception):
        job.cancel(check=False)  # scancel: SIGTERM, then SIGKILL after the cluster's KillWait
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if job.state not in SLURM_ACTIVE:
            return f"cancelled it (scancel; SLURM state {job.state})"
        time.sleep(2)
    return f"cancelled it with scancel, but SLURM still reports {job.state}"


def _final_state(job) -> str:
    """SLURM's state of a job whose ranks have all ended, read afresh (submitit's cached state may
    predate a scancel in whose kill-wait the ranks finished) once the batch script has ended too."""
    deadline = time.monotonic() + 30
    while (state := job.get_info(mode="force").get("State", "")) in SLURM_ACTIVE and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return state


# ------------------------------------------------------------------ waiting


class _Echo:
    """Copies what one rank prints (rank 0's progress lines) to this console as it appears."""

    def __init__(self, path: Path, rank: int = 0):
        self.path, self.rank, self.pos, self.partial = Path(path), rank, 0, b""

    def __call__(self) -> None:
        with contextlib.suppress(OSError):
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
            self.pos += len(data)
            *lines, self.partial = (self.partial + data).split(b"\n")
            for line in lines:
                if not line.startswith(b"submitit "):  # submitit's own log lines stay in the file
                    print(f"  rank {self.rank}: {line.decode(errors='replace')}", flush=True)


def _drop_lost(states: list[_RankState], tolerate: set, lost: set, stale_s: float) -> list[_RankState]:
    """`ma.failover`: ranks in `tolerate` may be lost while the others go on.
    Leave such a rank (killed, or silent past `stale_s`, when the others have timed out on it
    too) out of the verdict, adding it to `lost` and saying so once; a silent one here is
    killed, since the others went on without it."""
    keep = []
    for st in states:
        if st.rank in lost or (st.rank in tolerate and not st.finished and st.error is None and (
                st.alive is False or (st.age_s is not None and st.age_s > stale_s))):
            if st.rank not in lost:
                lost.add(st.rank)
                if st.alive and st.pid:
                    with contextlib.suppress(OSError):
                        os.kill(st.pid, signal.SIGKILL)
                print(f"masep launch: {_where(st)} lost ({'silent' if st.alive else 'gone'}); ma.failover "
                      f"is on: the other ranks regroup and go on without it", flush=True)
            continue
        keep.append(st)
    return keep


def _wait(job, timeout_s: float, stale_s: float, tolerate: set = frozenset(), lost: Optional[set] = None) -> None:
    """Wait for the job to finish, at most `timeout_s`, watching every rank; cancel the job and
    raise a one-line LaunchError when a rank fails (one in `tolerate` may be lost: `_drop_lost`)
    or the time is up."""
    deadline = time.monotonic() + timeout_s
    echo = _Echo(_task(job, 0).paths.stdout)
    requeue = _requeue_marker(_task(job, 0).paths.folder, job.job_id)
    first_seen: Optional[float] = None
    try:
        lost = lost if lost is not None else set()
        while not job.done():
            echo()
            requeued_at = requeue.stat().st_mtime if requeue.exists() else 0.0
            verdict = _failure(_drop_lost(_rank_states(job), tolerate, lost, stale_s), stale_s, requeued_at)
            if echo.rank in lost:  # ma.failover: the lowest survivor prints the progress lines now
                first = min(set(range(job.num_tasks)) - lost)
                echo = _Echo(_task(job, first).paths.stdout, first)
            if verdict is not None:
                first_seen = first_seen or time.monotonic()
                certain, what, log = verdict
                # a peer's "connection closed" may come before the silence of a remote rank shows
                if certain or time.monotonic() - first_seen > SILENT_S + 2 * HEARTBEAT_S:
                    detected_at = time.time()
                    err = LaunchError(f"{_describe(job)}: {what}; {_cancel(job)}; log: {log}")
                    err.detected_at = detected_at  # unix time a rank was found lost: a restart may follow
                    raise err
            if time.monotonic() > deadline:
                raise LaunchError(f"{_describe(job)} did not finish within launch.wait_timeout_s="
                                  f"{timeout_s:g} s; {_cancel(job)}; log: {_task(job, 0).paths.stderr}")
            time.sleep(POLL_S)
    finally:
        echo()


def _collect(job, lost: set = frozenset()) -> list:
    """Per-task results (None for a rank lost under `ma.failover`), or a one-line LaunchError
    naming the rank to blame and its log."""
    state = _final_state(job) if isinstance(job, submitit.SlurmJob) else ""
    if state.startswith("CANCELLED"):  # scancel: ranks may still finish in its kill-wait
        raise LaunchError(f"{_describe(job)}: cancelled outside masep (SLURM state {state}); "
                          f"log: {_task(job, 0).paths.stderr}")
    states = [st for st in _rank_states(job) if st.rank not in lost]
    verdict = _failure(states, 0.0, 0.0)
    if verdict is not None:  # the job ended before the wait saw the loss: a restart may follow
        err = LaunchError(f"{_describe(job)}: {verdict[1]}; log: {verdict[2]}")
        err.detected_at = time.time()
        raise err
    results = []
    for task in range(job.num_tasks):
        if task in lost:
            results.append(None)
            continue
        sub = _task(job, task)
        err = sub.exception()
        if err is not None:  # no heartbeat to go by (a rank that never started)
            raise LaunchError(f"{_describe(job)}: rank {task} failed: {_exception_line(err)} "
                              f"(job state {job.state}); log: {sub.paths.stderr}")
        results.append(sub.result())
    return results


# ------------------------------------------------------------------ the run folder's lock


def _job_alive(info: dict) -> bool:
    """Whether the job a lock names still runs (local: its controller pid; SLURM: squeue)."""
    import psutil

    job_id = info.get("job_id")
    if not job_id:
        return False
    if info.get("executor") == "slurm":
        out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
        return out.returncode == 0 and bool(out.stdout.strip())
    if info.get("host") != socket.gethostname():
        return False
    try:  # a killed controller whose parent died too stays a zombie until init reaps it
        return psutil.Process(int(job_id)).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def run_lock(run_dir: str | Path, executor: str):
    """Hold `<run_dir>/.masep-lock.json` (pid, host, job id) for one job; a second job on the
    same folder is refused. The lock is an flock, so a dead holder's lock is free; its job,
    when it outlived its launcher, still counts."""
    path = Path(run_dir) / ".masep-lock.json"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        raise LaunchError(f"run folder {run_dir} is not writable ({e.strerror}); "
                          f"fix its permissions or choose another --out") from e
    held: dict = {}
    with contextlib.suppress(OSError, ValueError):
        held = json.loads(os.pread(fd, 4096, 0) or b"{}")
    where = f"pid {held.get('pid')} on {held.get('host')} (job {held.get('job_id')}, since {held.get('since')})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LaunchError(f"run folder {run_dir} is in use by {where}; wait for that job or stop "
                          f"it, then run again") from None
    if held and _job_alive(held):
        os.close(fd)
        raise LaunchError(f"run folder {run_dir}: the job of {where} is still running; stop it "
                          f"(kill {held.get('job_id')} or scancel) or wait, then run again")
    if held:
        print(f"masep launch: taking over the lock of {run_dir} from {where}: that process is gone",
              flush=True)

    def record(job_id: Optional[str]) -> None:
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job_id": job_id,
                           "executor": executor, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    record(None)
    try:
        yield record
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting it would race a new holder)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (Snakemake stopping its jobs, kill) interrupts the wait like Ctrl-C does, so the
    job is cancelled rather than left running without its launcher."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(entry: Callable[[], Any], cfg, world_size: int, job_name: str,
           folder: str | Path, run_dirs: Sequence[str | Path] = (), injector=None) -> list:
    """Run `entry()` once in each of `world_size` tasks of one job; return their results by rank.
    The job holds the lock of each of `run_dirs` (the run folders it writes) while it runs. A
    rank lost while the job runs ends it (under `ma.failover` a lost ma_sep rank that can be
    recovered in the job does not: the others regroup); up to `cfg.launch.max_restarts` times a new job of `entry`
    (resume=True) then continues from the newest checkpoint. `injector` (masep.faults.Injector)
    watches each job and hears of each loss."""
    lc = cfg.launch
    with contextlib.ExitStack() as locks:
        records = [locks.enter_context(run_lock(d, lc.executor)) for d in run_dirs]
        record = lambda job_id: [r(job_id) for r in records]  # noqa: E731
        try:
            ex = make_executor(lc, world_size, job_name, folder)
        except LaunchError:
            raise
        except Exception as e:  # e.g. submitit finds no srun/sbatch without SLURM
            raise LaunchError(f"{job_name}: cannot start the {lc.executor} executor: {e}; "
                              f"use executor=local without SLURM") from e
        if lc.executor == "debug":
            return _run_debug(ex, entry, job_name)
        for restart in range(lc.max_restarts + 1):
            try:
                job, lost = _submit_and_wait(ex, entry, cfg, world_size, job_name, folder, record, injector, restart)
                results = _collect(job, lost)
                break
            except LaunchError as e:
                if getattr(e, "detected_at", None) is None or restart == lc.max_restarts:
                    raise
                if injector is not None:
                    injector.lost(e, restart + 1)
                scope = " (ma.failover could not recover this in the job)" if _failover_ranks(cfg) else ""
                print(f"masep launch: {job_name}: {e}; restarting every rank from the newest checkpoint{scope} "
                      f"(restart {restart + 1} of launch.max_restarts={lc.max_restarts})", flush=True)
                entry = copy.copy(entry)
                entry.resume = True
    print(f"masep launch: {job_name}: {_describe(job)} finished", flush=True)
    return results


def _submit_and_wait(ex, entry, cfg, world_size: int, job_name: str, folder, record, injector, restart: int):
    lc = cfg.launch
    # Hide the caller's SLURM/torchrun variables from the job (sbatch and the local executor
    # pass this process' environment on), and give local ranks a free rendezvous port.
    tolerate, lost, store, server = _failover_ranks(cfg), set(), None, None
    with submitit.helpers.clean_env():
        extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()} if lc.executor == "local" else {}
        if lc.executor == "local":
            # The ranks fork from a process that has imported torch: the workflow's, or this job's own.
            from masep.runtime import forkserver

            if not forkserver.usable(lc):
                os.environ.pop(forkserver.ENV, None)  # the ranks start as fresh interpreters
            elif shared := forkserver.shared_server(restart):
                extra[forkserver.ENV] = shared
            else:
                server = forkserver.Server()
                extra.update(server.env)
        if tolerate:  # ma.failover: this process hosts the store, so it outlives every rank
            from torch.distributed import TCPStore

            host = "127.0.0.1" if lc.executor == "local" else lc.store_host or socket.getfqdn()
            port = extra.get("MASTER_PORT") or _free_port()
            store = TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=cfg.parallel.timeout_s))
            extra["MASEP_HOSTED_STORE"] = f"{host}:{port}"
        with submitit.helpers.environment_variables(**extra):
            try:
                job = ex.submit(entry)
            except Exception as e:  # sbatch refused, submitit missing binaries, ...
                if server is not None:
                    server.stop()
                raise LaunchError(f"{job_name}: submission to {lc.executor} failed: {e}") from e
    record(job.job_id)
    print(f"masep launch: {job_name}: submitted {_describe(job)} with {world_size} task(s) "
          f"on {lc.executor}; logs in {Path(folder).resolve()}", flush=True)
    if injector is not None:
        injector.watch(job)
    try:
        with _sigterm_interrupts():
            _wait(job, lc.wait_timeout_s, cfg.parallel.timeout_s, tolerate, lost)
    except KeyboardInterrupt:
        print(f"masep launch: {job_name}: interrupted; {_cancel(job)}", file=sys.stderr, flush=True)
        raise
    finally:
        if injector is not None:
            injector.stop()
        if server is not None:
            server.stop()
        del store  # the ranks are done with it
    return job, lost


def _failover_ranks(cfg) -> set:
    """The ranks whose loss the others recover from in the job (`ma.failover`: ma_sep's
    attention ranks when there are replicas to take over, its MoE ranks when they keep copies
    of each other's experts), else none."""
    p = cfg.parallel
    if not (getattr(cfg, "ma", None) and cfg.ma.failover and p.strategy == "ma_sep"):
        return set()
    n_attn = p.attn_tp * p.attn_replicas
    return (set(range(n_attn)) if p.attn_replicas > 1 else set()) | \
        (set(range(n_attn, n_attn + p.moe_ranks)) if keeps_expert_copies(cfg) else set())


def _run_debug(ex, entry, job_name: str) -> list:
    job = ex.submit(entry)
    print(f"masep launch: {job_name}: running {job.job_id} in-process (debug executor)", flush=True)
    # DebugJob.results() drops into pdb on an exception; exception() runs it without that.
    # The entry runs in this process: give back the environment it changes (RANK, MASTER_*...).
    saved = dict(os.environ)
    try:
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = job.job_id
        err = job.exception()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if err is not None:
        raise LaunchError(f"{job_name}: {job.job_id} failed: {type(err).__name__}: {err}") from err
    return job.results()
