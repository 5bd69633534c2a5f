"""`snakemake --profile slurm` on a real one-node SLURM cluster: the embedded default end to end,
and its faults.

One module-scoped run of the whole DAG serves several tests (each SLURM job costs seconds of
rank start-up on a small machine):

* first run: every strategy of the embedded default trains as one multi-task SLURM job (4 tasks
  over gloo, `single` 1 task) and infers; while it runs, the `pp` training job is scancelled as
  soon as its tasks start: that rule fails naming CANCELLED, the rest of the DAG goes on (the
  profile keeps going) -> test (c);
* second run: completes the DAG, running only the cancelled job and what depends on it -> (d);
* the final state: DuckDB rows carry the SLURM job ids that sacct knows, the report exists -> (1).

Two further tests start from that run's files in folders of their own: an inference job that
fails inside its ranks on a corrupt checkpoint (a), and a training job that gets SLURM's
time-limit warning signal, is requeued by submitit and resumes from its checkpoint (b).

Every run happens in a scratch folder that links to this checkout's workflow/, config/ and
profiles/; the test config overrides only the partition, the resources and the `set:` entries
that make the study short (and, for (b), ma_sep's overrides that make its steps sleep). A
Snakemake run that is interrupted (timeout) has its SLURM jobs cancelled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
STRATEGIES = list(DEFAULT["strategies"])
WORLD = {s: DEFAULT["world_size"].get(s, 1) for s in STRATEGIES}
SEED = DEFAULT["seeds"][0]
CONFIGFILE = "slurm-test.yaml"
CONTEXTS = [32, 64]
STEPS = 4
# The tiny preset shortened: part of the sample, short sequences, 2 layers, 4 sequences a step.
SHORT_SET = [
    "data.max_docs=200", "data.seq_len=32", "model.layers=2", "train.global_batch=4",
    "train.micro_batch=1", "train.eval_batches=1", f"train.steps={STEPS}", "train.warmup_steps=1",
    f"train.decay_steps={STEPS}", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
    "infer.new_tokens=4", "infer.warmup_tokens=1",
]
CANCELLED_STRATEGY = "pp"
RUN_TIMEOUT_S = 1200


# ------------------------------------------------------------------ helpers


def make_project(path: Path, partition: str, extra_set: tuple[str, ...] = (),
                 launch: Optional[dict] = None, overrides: Optional[dict] = None) -> Path:
    """A scratch project: links to the workflow and profiles, and the test config."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("workflow", "config", "profiles"):
        (path / name).symlink_to(ROOT / name)
    (path / "slurm").symlink_to("profiles/slurm")
    # executor=slurm comes from the profile itself; one inference job per strategy (ctx=all).
    config = {"launch": {"partition": partition, "time_min": 10, "cpus_per_task": 1, **(launch or {})},
              "set": SHORT_SET + list(extra_set), "overrides": overrides or {},
              "context_lengths": CONTEXTS, "infer_jobs": "per_strategy",
              # the study's main runs only: no scaling sweep, one decoding repeat, no ablation
              # variant, no fault trials (each has tests of its own)
              "scaling_world_sizes": [], "infer_repeats": 1,
              "variants": {v: {"study": False} for v in DEFAULT.get("variants", {})},
              "faults": {"strategies": [], "kinds": [], "trials": 0, "set": []}}
    (path / CONFIGFILE).write_text(yaml.safe_dump(config))
    return path


@dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr, interleaved as Snakemake wrote them
    seconds: float


def snakemake(project: Path, *args: str, timeout_s: float = RUN_TIMEOUT_S) -> Run:
    """`snakemake --profile slurm ARGS --configfile slurm-test.yaml` in `project`.

    Targets go before --configfile, which takes every argument after it. When Snakemake returns,
    every masep job has seen its SLURM job end; when it is interrupted instead, the whole process
    group (Snakemake and its masep jobs) is stopped and the project's SLURM jobs are cancelled.
    """
    cmd = ["snakemake", "--profile", "slurm", *args, "--configfile", CONFIGFILE]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if SHOW_PROGRESS is not None and PROGRESS.search(line):
                SHOW_PROGRESS(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except BaseException as e:  # this timeout, pytest's, Ctrl-C: stop Snakemake, its jobs and theirs
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        reader.join()
        cancel_project_jobs(project)
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout_s:g} s:\n{''.join(lines)[-4000:]}")
        raise
    reader.join()
    return Run(proc.returncode, "".join(lines), time.monotonic() - t0)


# Snakemake's "N of M steps (P%) done" lines reach the console while a run goes (pytest
# captures everything else), so a run of many minutes shows its progress.
PROGRESS = re.compile(r"\d+ of \d+ steps \(\d+%\) done")
SHOW_PROGRESS: Optional[Callable[[str], None]] = None


@pytest.fixture(scope="module", autouse=True)
def live_progress(pytestconfig):
    global SHOW_PROGRESS
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def show(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n    snakemake: {line.strip()}", end="", flush=True)

    SHOW_PROGRESS = show
    yield
    SHOW_PROGRESS = None


def job_counts(run: Run) -> dict[str, int]:
    """The first 'Job stats' table of a run: rule -> jobs to run."""
    counts: dict[str, int] = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)$", run.output.split("Job stats:", 1)[1], flags=re.M):
        counts[m[1]] = int(m[2])
        if m[1] == "total":
            return counts
    raise AssertionError(f"no job stats in:\n{run.output[-3000:]}")


def project_jobs(project: Path) -> list[tuple[str, str, str]]:
    """(job id, name, state) of the queued or running SLURM jobs submitted from `project`."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T|%Z"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    root = project.resolve()
    return [(r[0], r[1], r[2]) for r in rows if Path(r[3]).resolve() == root]


def cancel_project_jobs(project: Path) -> None:
    """Cancel what a test leaves queued or running (a job already COMPLETING keeps its end state)."""
    ids = [job_id for job_id, _, state in project_jobs(project) if state != "COMPLETING"]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def sacct(job_ids: list[str], fields: str, *, steps: bool = False,
          requeues: bool = False) -> list[list[str]]:
    """sacct rows of jobs: allocations only unless `steps`; every requeued run with `requeues`."""
    cmd = ["sacct", "-n", "-P", "-j", ",".join(job_ids), "-o", fields]
    cmd += [] if steps else ["-X"]
    cmd += ["-D"] if requeues else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def sacct_states(job_ids: list[str], done: Callable[[dict[str, str]], bool],
                 timeout_s: float = 30) -> dict[str, str]:
    """Job id -> accounting state; waits up to `timeout_s` for `done(states)` (slurmdbd receives
    records asynchronously, so sacct may lag a job by a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {row[0]: row[1] for row in sacct(job_ids, "JobID,State")}
        if done(states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def run_job_ids(project: Path) -> dict[str, Optional[str]]:
    """run id (e.g. train/tp/ws=4/seed=0) -> slurm_job_id of every complete run folder."""
    runs = project / "results" / "runs"
    return {str(p.parent.relative_to(runs)): json.loads(p.read_text())["slurm_job_id"]
            for p in runs.rglob("run.json")}


def submitted_job_ids(log: Path) -> list[str]:
    """SLURM job ids in a masep job's log (masep launch prints one line per submission)."""
    return re.findall(r"submitted job (\d+) \(SLURM\)", log.read_text())


def read_rows(folder: Path, kind: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(folder.glob(f"{kind}-rank*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def copy_tokens(src: Path, dst: Path) -> None:
    # copy2 keeps the modification times, so the tokens stay older than any run made from them.
    shutil.copytree(src / "data", dst / "data")


# ------------------------------------------------------------------ the shared end-to-end run


@dataclass
class EndToEnd:
    project: Path
    dry_run: Run
    first: Run
    cancelled_job: Optional[str]
    cancel_error: Optional[str]
    ids_after_first: dict[str, Optional[str]]
    second_dry_run: Run
    second: Run
    final_dry_run: Run
    seconds: dict[str, float] = field(default_factory=dict)


def cancel_once_started(project: Path, job_name: str, stop: threading.Event, result: dict) -> None:
    """scancel the job `job_name` of `project` as soon as its first task has started."""
    try:
        while not stop.is_set():
            for job_id, name, state in project_jobs(project):
                log = project / "logs" / "submitit" / job_name / f"{job_id}_0_log.out"
                if name == job_name and state == "RUNNING" and log.exists() \
                        and "Starting with JobEnvironment" in log.read_text():
                    subprocess.run(["scancel", job_id], check=True, timeout=30)
                    result["job_id"] = job_id
                    return
            time.sleep(0.5)
        result["error"] = f"{job_name} was never seen running"
    except Exception as e:  # reported by the test that needs the cancellation
        result["error"] = f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def e2e(slurm_cluster, tmp_path_factory) -> EndToEnd:
    if slurm_cluster.cpus < max(WORLD.values()):
        pytest.skip(f"node {slurm_cluster.node} declares {slurm_cluster.cpus} CPUs; "
                    f"{max(WORLD.values())} needed")
    project = make_project(tmp_path_factory.mktemp("slurm-e2e"), slurm_cluster.partition)
    seconds = {}
    dry_run = snakemake(project, "-n")
    assert dry_run.returncode == 0, dry_run.output[-4000:]

    stop, cancel = threading.Event(), {}
    canceller = threading.Thread(target=cancel_once_started,
                                 args=(project, f"train-{CANCELLED_STRATEGY}-seed{SEED}", stop, cancel))
    canceller.start()
    try:
        first = snakemake(project)
    finally:
        stop.set()
        canceller.join()
    seconds["first run"] = first.seconds
    ids_after_first = run_job_ids(project)

    second_dry_run = snakemake(project, "-n")
    second = snakemake(project)
    seconds["second run"] = second.seconds
    final_dry_run = snakemake(project, "-n")
    print(f"slurm e2e in {project}: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return EndToEnd(project, dry_run, first, cancel.get("job_id"), cancel.get("error"), ids_after_first,
                    second_dry_run, second, final_dry_run, seconds)


def train_run(s: str) -> str:
    return f"train/{s}/ws={WORLD[s]}/seed={SEED}"


def infer_run(s: str) -> str:
    return f"infer/{s}/ws={WORLD[s]}/seed={SEED}/rep=0/ctx=all"


def expected_run_ids() -> set[str]:
    return {train_run(s) for s in STRATEGIES} | {infer_run(s) for s in STRATEGIES}


# ------------------------------------------------------------------ (c) scancel, (d) re-run, (1) results


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_scancel_of_a_running_job_fails_its_rule_and_only_its_descendants(e2e):
    assert e2e.cancel_error is None, e2e.cancel_error
    out = e2e.first.output
    assert e2e.first.returncode != 0, out[-4000:]
    # Exactly one rule failed: the cancelled training, with SLURM's verdict in its log.
    errors = re.findall(r"^Error in rule (\w+):", out, flags=re.M)
    assert errors == ["train"], errors
    block = out.split("Error in rule train:", 1)[1]
    assert f"output: results/runs/{train_run(CANCELLED_STRATEGY)}/run.json" in block
    # The launcher's one line names the job and a rank of it (which rank SLURM ended first varies),
    # or, when the ranks finished within SLURM's kill-wait, the cancellation itself.
    assert re.search(rf"job {e2e.cancelled_job} \(SLURM\): (rank \d|cancelled outside masep \(SLURM state "
                     rf"CANCELLED)", block), block[:4000]
    assert "state CANCELLED" in block, block[:4000]
    states = sacct_states([e2e.cancelled_job], lambda s: s.get(e2e.cancelled_job, "").startswith("CANCELLED"))
    assert states[e2e.cancelled_job].startswith("CANCELLED"), states
    # Snakemake kept going: everything that does not need the cancelled run finished.
    assert set(e2e.ids_after_first) == expected_run_ids() - {
        train_run(CANCELLED_STRATEGY), infer_run(CANCELLED_STRATEGY)}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_second_run_completes_the_dag_without_redoing_finished_jobs(e2e):
    left = {"train": 1, "infer": 1, "collect": 1, "report": 1, "all": 1, "total": 5}
    assert e2e.second_dry_run.returncode == 0, e2e.second_dry_run.output[-4000:]
    assert job_counts(e2e.second_dry_run) == left
    assert e2e.second.returncode == 0, e2e.second.output[-4000:]
    assert job_counts(e2e.second) == left
    assert f"output: results/runs/{train_run(CANCELLED_STRATEGY)}/run.json" in e2e.second.output
    # The runs of the first Snakemake run kept their SLURM jobs: none ran again.
    after = run_job_ids(e2e.project)
    assert {k: after[k] for k in e2e.ids_after_first} == e2e.ids_after_first
    assert "Nothing to be done" in e2e.final_dry_run.output


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_end_to_end_rows_carry_the_slurm_job_ids(e2e):
    assert job_counts(e2e.dry_run) == {"tokenize": 1, "tokenize_all": 1, "train": len(STRATEGIES),
                                       "infer": len(STRATEGIES), "collect": 1, "report": 1, "all": 1,
                                       "total": 5 + 2 * len(STRATEGIES)}
    assert e2e.second.returncode == 0, e2e.second.output[-4000:]
    with duckdb.connect(str(e2e.project / "results" / "masep.duckdb"), read_only=True) as con:
        runs = con.execute("SELECT run_id, experiment, strategy, world_size, status, slurm_job_id "
                           "FROM runs ORDER BY run_id").fetchall()
        steps = dict(con.execute(
            "SELECT run_id, list(DISTINCT rank ORDER BY rank) = range(max(rank) + 1) "
            "AND count(*) = count(DISTINCT (rank, step)) AND min(step) = 0 AND max(step) = ? - 1 "
            "AND count(*) = ? * count(DISTINCT rank) AND bool_and(loss > 0) "
            "FROM steps GROUP BY run_id", [STEPS, STEPS]).fetchall())
        step_rows = dict(con.execute("SELECT run_id, count(*) FROM steps GROUP BY 1").fetchall())
        eval_rows = dict(con.execute(
            "SELECT run_id, count(*) FROM eval WHERE val_loss > 0 GROUP BY 1").fetchall())
        inference = dict(con.execute(
            "SELECT run_id, list(DISTINCT context_len ORDER BY context_len) FROM inference "
            "WHERE tpot_ms > 0 GROUP BY 1").fetchall())
        inference_rows = dict(con.execute("SELECT run_id, count(*) FROM inference GROUP BY 1").fetchall())

    assert {r[0] for r in runs} == expected_run_ids()
    for run_id, experiment, strategy, world_size, status, job_id in runs:
        assert experiment == run_id.split("/")[0], run_id
        assert (world_size, status) == (WORLD[strategy], "completed"), run_id
        assert job_id is not None and job_id.isdigit(), (run_id, job_id)
    job_ids = {r[0]: r[5] for r in runs}
    assert len(set(job_ids.values())) == len(runs)  # one SLURM job per run

    # sacct knows each job: its name, its end state, and the srun step that ran its tasks.
    acct = sacct(list(job_ids.values()), "JobID,JobName,State,NTasks", steps=True)
    print("\n".join("|".join(row) for row in acct))
    jobs = {row[0]: row for row in acct}
    for run_id, job_id in job_ids.items():
        experiment, strategy = run_id.split("/")[:2]
        name = f"train-{strategy}-seed{SEED}" if experiment == "train" else \
            f"infer-{strategy}-" + "-".join(map(str, CONTEXTS))
        assert jobs[job_id][1:3] == [name, "COMPLETED"], (run_id, jobs[job_id])
        assert jobs[f"{job_id}.0"][3] == str(WORLD[strategy]), (run_id, jobs.get(f"{job_id}.0"))

    for s in STRATEGIES:
        train, infer = train_run(s), infer_run(s)
        assert steps[train] is True, train
        assert step_rows[train] == STEPS * WORLD[s], train
        assert eval_rows[train] == STEPS // 2, train  # eval every 2 steps, on rank 0
        assert inference[infer] == CONTEXTS, infer
        assert inference_rows[infer] == len(CONTEXTS) * WORLD[s], infer

    for f in ("index.html", "figures/loss_curves.svg", "figures/throughput.svg", "figures/tpot.svg"):
        assert (e2e.project / "reports" / f).stat().st_size > 0, f


# ------------------------------------------------------------------ (a) a job that fails inside


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_job_failing_inside_its_ranks_fails_the_rule_with_the_job_error(e2e, slurm_cluster, tmp_path):
    strategy = "tp"
    project = make_project(tmp_path / "project", slurm_cluster.partition)
    copy_tokens(e2e.project, project)
    train = Path("results/runs") / train_run(strategy)
    # Hard links: the e2e run's files are shared, never changed (corrupt files are new inodes).
    shutil.copytree(e2e.project / train, project / train, copy_function=os.link)
    checkpoint = project / train / "checkpoint"
    latest = checkpoint / (checkpoint / "latest").read_text().strip()
    shards = sorted(latest.glob("*.distcp"))
    assert shards, f"no checkpoint shard files in {latest}"
    for shard in shards:  # cut to its first KiB: the ranks' reads run past the end
        tmp = shard.with_name(shard.name + ".tmp")
        tmp.write_bytes(shard.read_bytes()[:1024])
        os.replace(tmp, shard)

    target = f"results/runs/{infer_run(strategy)}/run.json"
    # Only the inference runs: the copied training run is taken as it is, never redone.
    assert job_counts(snakemake(project, target, "-n")) == {"infer": 1, "total": 1}
    run = snakemake(project, target)
    out = run.output
    assert run.returncode != 0, out[-4000:]
    assert re.findall(r"^Error in rule (\w+):", out, flags=re.M) == ["infer"]
    # per_strategy: one job decodes every repeat, its log named without the repeat
    [job_id] = submitted_job_ids(project / f"logs/{infer_run(strategy).replace('/rep=0', '')}.log")
    # The job's own error, from its ranks' stderr, in Snakemake's log.
    assert f"job {job_id} (SLURM): rank " in out and " failed: " in out, out[-4000:]
    assert "cannot be read (EOFError)" in out, out[-4000:]
    assert not (project / f"results/runs/{infer_run(strategy)}/run.json").exists()
    # Ended, never left running: FAILED when every rank exited before masep's verdict, CANCELLED
    # when masep ended the rest of the job first (a race), and then its error says so.
    states = sacct_states([job_id], lambda s: s.get(job_id, "").startswith(("FAILED", "CANCELLED")))
    assert states[job_id] == "FAILED" or (
        states[job_id].startswith("CANCELLED") and "cancelled it (scancel; SLURM state CANCELLED" in out), states


# ------------------------------------------------------------------ (b) time limit, requeue, resume


# SLURM's time-limit warning is `scancel --signal=USR2` to the job's steps, 90 s before the limit
# (submitit's --signal=USR2@90; test_slurm_submitit checks that SLURM delivers it). This test
# sends that signal itself once the training has a checkpoint at step REQUEUE_AT or later,
# instead of waiting a minute or more for the limit: what it checks is masep's side, that a
# training job checkpoints, is requeued by submitit and resumes from its checkpoint.
REQUEUE_STEPS, REQUEUE_AT, REQUEUE_EVERY = 40, 24, 2  # at most REQUEUE_EVERY steps are lost
# Each step sleeps (ma_sep's test-only expert delay, with balancing, whose clock applies it), so
# that the training outlasts the signal however fast the machine, and leaves the cores to the
# tests beside it: a floor of 2 layers x 2 micro-batches x 8 experts x 0.02 s = 0.64 s a step.
EXPERT_DELAY_S = 0.02  # per expert, layer and micro-batch in the forward


def signal_once_checkpointed(project: Path, folder: Path, stop: threading.Event, result: dict) -> None:
    """`scancel --signal=USR2` the training job of `project` once `folder` has a checkpoint at
    step REQUEUE_AT or later."""
    latest = folder / "checkpoint" / "latest"
    log = project / "logs" / f"{folder.relative_to(project / 'results/runs')}.log"
    try:
        while not stop.wait(0.2):
            step = latest.read_text().strip() if latest.exists() else ""
            if step.startswith("step-") and int(step[5:]) >= REQUEUE_AT and (ids := submitted_job_ids(log)):
                subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True, timeout=30)
                result["step"] = int(step[5:])
                return
        result["error"] = f"no checkpoint at step {REQUEUE_AT} or later appeared in {folder}"
    except Exception as e:  # reported by the test
        result["error"] = f"{type(e).__name__}: {e}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_warning_signal_requeues_the_job_and_training_resumes_from_its_checkpoint(e2e, slurm_cluster, tmp_path):
    strategy = "ma_sep"
    experts = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())["model"]["experts"]
    steps, every = REQUEUE_STEPS, REQUEUE_EVERY
    delays = "{" + ", ".join(f"{e}: {EXPERT_DELAY_S}" for e in range(experts)) + "}"
    project = make_project(tmp_path / "project", slurm_cluster.partition,
                           extra_set=(f"train.steps={steps}", f"train.decay_steps={steps}",
                                      f"train.checkpoint_every={every}", f"train.eval_every={steps}",
                                      f"train.log_every={every}"),
                           overrides={strategy: ["ma.rebalance=true", f"ma.debug_expert_delay_s={delays}"]})
    copy_tokens(e2e.project, project)
    folder = project / "results/runs" / train_run(strategy)
    stop, signalled = threading.Event(), {}
    signaller = threading.Thread(target=signal_once_checkpointed, args=(project, folder, stop, signalled))
    signaller.start()
    try:
        run = snakemake(project, f"results/runs/{train_run(strategy)}/run.json")
    finally:
        stop.set()
        signaller.join()
    out = run.output
    assert run.returncode == 0, out[-4000:]
    assert "error" not in signalled, signalled["error"]
    assert job_counts(run) == {"train": 1, "total": 1}  # on the copied tokens
    [job_id] = submitted_job_ids(project / f"logs/{train_run(strategy)}.log")  # never resubmitted
    record = json.loads((folder / "run.json").read_text())
    deadline = time.monotonic() + 30  # slurmdbd may record the end a moment after Snakemake saw it
    while (history := sacct([job_id], "JobID,State,Start,End", requeues=True))[-1][1] \
            in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"{steps} steps, checkpoint every {every}, USR2 at checkpoint {signalled['step']} in "
          f"{run.seconds:.0f} s in all; sacct:\n" + "\n".join("|".join(row) for row in history))
    stderr = (project / "logs/submitit" / f"train-{strategy}-seed{SEED}" / f"{job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in stderr, f"sacct: {history}"

    # SLURM requeued the job at least once, then it completed under the same id.
    states = [row[1] for row in history]
    assert states[-1] == "COMPLETED" and states[:-1] and set(states[:-1]) == {"REQUEUED"}, history
    assert record["slurm_job_id"] == job_id and record["status"] == "completed"
    assert record["steps_completed"] == steps
    resumed = record["resumed_from_step"]
    assert signalled["step"] <= resumed <= signalled["step"] + every and resumed % every == 0, (signalled, resumed)
    stdout = (project / "logs/submitit" / f"train-{strategy}-seed{SEED}" / f"{job_id}_0_log.out").read_text()
    assert f"resuming from step {resumed} " in stdout

    # Every rank has each step exactly once: rows after the checkpoint were dropped on resume.
    rows = read_rows(folder, "steps")
    for rank in range(WORLD[strategy]):
        assert sorted(r["step"] for r in rows if r["rank"] == rank) == list(range(steps)), rank
    # The resumed run's losses continue the interrupted ones instead of starting over. One step's
    # loss (4 short sequences) scatters by about 0.5, so compare means of up to 10 steps: they
    # differ by a few tenths, while weights back at their start would put it ~4 higher.
    loss = {r["step"]: r["loss"] for r in rows if r["rank"] == 0}
    k = min(10, resumed, steps - resumed)
    before = statistics.fmean(loss[s] for s in range(resumed - k, resumed))
    after = statistics.fmean(loss[s] for s in range(resumed, resumed + k))
    assert abs(after - before) < 1.0 and after < loss[0] - 1.0, (loss[0], before, after)
