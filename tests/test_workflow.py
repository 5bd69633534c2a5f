"""The Snakemake workflow: dry-runs (embedded default, paper scale, profiles), lint, config
validation, and one end-to-end run of the embedded default with few steps.

Every run happens in a scratch folder that links to this checkout's workflow/, config/ and
profiles/, so the repository's own data/, results/ and reports/ are never touched.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
# A local job's threads: the widest strategy's 4 ranks, as many as there are cores (`cores: all`).
BUDGET = min(4, len(os.sched_getaffinity(0)))


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("workflow", "config", "profiles"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "slurm").symlink_to("profiles/slurm")
    return tmp_path


def snakemake(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["snakemake", *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout)


def job_counts(out: subprocess.CompletedProcess) -> dict[str, int]:
    assert out.returncode == 0, out.stderr[-3000:]
    block = (out.stdout + out.stderr).split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, flags=re.M)}


def shell_commands(out: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"^Shell command: (.*)$", out.stdout + out.stderr, flags=re.M)


def test_dry_run_of_the_embedded_default(project):
    out = snakemake(project, "-n", "-p")
    # every strategy trains once and decodes twice in one job (infer_repeats 2; infer_jobs:
    # per_strategy -> ctx=all); the scaling sweep; the paper variant of ma_sep; one trial of each
    # fault kind for ma_sep and ep_dp (kill_attention_k: k = 1 of 2 attention ranks), 2 references each
    assert job_counts(out) == {"tokenize": 1, "tokenize_all": 1, "train": 16, "train_variant": 1, "infer": 6,
                               "fault_reference": 4, "fault_trials": 12, "collect": 1, "report": 1, "all": 1,
                               "total": 44}
    cmds = shell_commands(out)
    # the sweep: three sizes per parallel strategy (ma_sep's own list adds 3 ranks), the training
    # run at the training world size (4; single's 1)
    swept = re.findall(r"--out results/runs/scaling/(\w+)/ws=(\d+)/", "\n".join(cmds))
    assert {s: sorted(int(w) for t, w in swept if t == s) for s, _ in swept} == {
        "tp": [1, 2], "pp": [1, 2], "tp_pp": [1, 2], "ep_dp": [1, 2], "ma_sep": [2, 3]}
    train = sorted(c for c in cmds if " masep train " in c and "results/runs/train/" in c)
    assert len(train) == 6
    single = [c for c in train if "parallel.strategy=single" in c]
    assert single and single[0].startswith(f"OMP_NUM_THREADS={BUDGET} masep train --config tiny --set ")
    assert "parallel.world_size=1 train.seed=0 --out results/runs/train/single/ws=1/seed=0 " \
           "> logs/train/single/ws=1/seed=0.log 2>&1" in single[0]
    # the sweep at 3 ranks: degrees lowered to fit, the nearest global batch 3 replicas divide (8 -> 6)
    sweep = shell_commands(snakemake(project, "-n", "-p", "scaling_all", "--config", "scaling_world_sizes=[3]"))
    assert any("parallel.strategy=tp parallel.world_size=4 " in c and "parallel.world_size=3 parallel.tp=1 "
               "train.global_batch=6 train.seed=0 --out results/runs/scaling/tp/ws=3/seed=0 " in c for c in sweep)
    assert any("parallel.world_size=3 parallel.attn_replicas=2 parallel.attn_tp=1 parallel.moe_ranks=1 " in c
               for c in sweep)
    # the fault trials: also a target of their own
    faults = shell_commands(snakemake(project, "-n", "-p", "faults_all"))
    trial = [c for c in faults if "--out results/runs/faults/ma_sep/kill_attention_k1/trial=0 " in c]
    assert trial and "rm -rf results/runs/faults/ma_sep/kill_attention_k1/trial=0 && " in trial[0]
    assert all(f" {s} " in trial[0] for s in ("fault.kind=kill_attention_k", "fault.count=1", "fault.seed=0",
                                             "launch.max_restarts=1", "--experiment faults"))
    assert any("parallel.strategy=ma_sep parallel.world_size=4 " in c for c in train)
    infer = sorted(c for c in cmds if " masep infer " in c and "--experiment faults" not in c)
    assert len(infer) == 6 and all("'infer.context_lengths=[512, 1024, 2048, 4096]'" in c for c in infer)
    assert any("--checkpoint results/runs/train/single/ws=1/seed=0 --out results/runs/infer/single/ws=1/seed=0/"
               "rep=0/ctx=all results/runs/infer/single/ws=1/seed=0/rep=1/ctx=all > " in c for c in infer)
    paper = [c for c in cmds if "--out results/runs/ablation/ma_sep+paper/seed=0 " in c]
    assert len(paper) == 1 and " --experiment ablation " in paper[0]
    assert " ma.rebalance_every=5 " in paper[0] and "ma.rebalance=true train.grad_compression=int8 " in paper[0]
    # a project without committed peer benchmark files loads none (`--peer` alone)
    assert any(" ".join(c.split()) == "masep collect --runs results/runs --db results/masep.duckdb --peer "
               "2> logs/collect.log > results/collect.txt" for c in cmds), [c for c in cmds if "collect" in c]
    assert "masep report --db results/masep.duckdb --out reports > logs/report.log 2>&1" in cmds


STUB_MASEP = """#!/usr/bin/env bash
# masep stand-in: records its call, fails where told, else writes run.json into --out
out=; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
echo "$out" >> "$STUB_CALLS"
[ "$out" = "$STUB_FAIL" ] && { echo "deliberate failure of $out"; exit 3; }
mkdir -p "$out" && echo '{"trial": "'"$out"'"}' > "$out/run.json"
"""


def test_fault_trials_job_keeps_the_trials_that_ended(project, tmp_path):
    """One job runs a kind's trials in turn. Run again (Snakemake deletes its outputs first), it
    restores the trials that ended from their kept record and runs the rest, also in a moved
    project; a changed command runs them all again; a failing trial fails the job, its log's end
    in the job's log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "masep").write_text(STUB_MASEP)
    (bin_dir / "masep").chmod(0o755)
    calls = tmp_path / "calls.txt"

    def job(fault_set: str = "", fail: str = "", root: Path = project) -> tuple[subprocess.CompletedProcess, list[str]]:
        out = snakemake(root, "-n", "-p", "results/runs/faults/ep_dp/stop/trial=1/run.json", "--forcerun",
                        "fault_trials", "--config", f"faults={{strategies: [ep_dp], kinds: [stop], trials: 3{fault_set}}}")
        [command] = [c for c in shell_commands(out) if "/stop/trial=0" in c]
        calls.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_CALLS": str(calls),
               "STUB_FAIL": fail}
        (root / "logs/faults/ep_dp/stop").mkdir(parents=True, exist_ok=True)
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=root, env=env,
                             capture_output=True, text=True)
        return run, calls.read_text().split() if calls.exists() else []

    trials = [project / f"results/runs/faults/ep_dp/stop/trial={k}" for k in range(3)]
    log = project / "logs/faults/ep_dp/stop/trials.log"
    run, called = job()
    assert run.returncode == 0 and len(called) == 3, run.stderr
    assert log.read_text().splitlines() == ["trial 0: done", "trial 1: done", "trial 2: done"]
    for t in trials:  # what Snakemake does to a job's outputs before running it again
        (t / "run.json").unlink()
    (trials[1] / "run.json").parent.joinpath("partial.parquet").write_text("x")
    for kept in trials[1].glob(".run-*.json"):  # trial 1 was interrupted: no record kept
        kept.unlink()
    run, called = job()
    assert run.returncode == 0 and called == ["results/runs/faults/ep_dp/stop/trial=1"], run.stderr
    assert log.read_text().splitlines() == ["trial 0: kept", "trial 1: done", "trial 2: kept"]
    assert all((t / "run.json").exists() for t in trials) and not (trials[1] / "partial.parquet").exists()
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    shutil.copytree(project, moved, symlinks=True)
    for t in trials:
        (moved / t.relative_to(project) / "run.json").unlink()
    run, called = job(root=moved)
    assert run.returncode == 0 and called == [], run.stderr
    assert (moved / log.relative_to(project)).read_text().splitlines() == ["trial 0: kept", "trial 1: kept", "trial 2: kept"]
    # another command (here: another fault setting) runs every trial again
    run, called = job(fault_set=", set: [train.steps=7]")
    assert run.returncode == 0 and len(called) == 3, run.stderr
    run, called = job(fail="results/runs/faults/ep_dp/stop/trial=1")
    assert run.returncode == 1 and called[-1] == "results/runs/faults/ep_dp/stop/trial=1"
    assert "trial 1 failed; the end of its log, logs/faults/ep_dp/stop/trial=1.log:" in log.read_text()
    assert "deliberate failure of results/runs/faults/ep_dp/stop/trial=1" in log.read_text()


def test_infer_jobs_per_context(project):
    counts = job_counts(snakemake(project, "-n", "--config", "infer_jobs=per_context", "strategies=[single]",
                                  "scaling_world_sizes=[]"))
    assert counts["infer"] == 8 and counts["train"] == 1


def test_dry_run_at_paper_scale(project):
    out = snakemake(project, "-n", "-p", "--configfile", "config/workflow-paper.yaml")
    # 50 training runs; the sweep at 4-32 GPUs: 8 sizes each, ep_dp only at 4, 8, 16 (16 experts),
    # at 16 the training run itself; decoding per training seed: 10 TPOT repeats per strategy and context
    # tokenize: a job per ten shards 00000-00009 ... 01010-01019, one per shard of 01020-01023
    assert job_counts(out) == {"tokenize_ten": 102, "tokenize": 4, "tokenize_all": 1, "train": 80, "train_variant": 10, "infer": 200, "collect": 1,
                               "report": 1, "all": 1, "fault_reference": 10,  # training and decoding
                               "fault_trials": 57,  # a job runs a kind's 20 trials
                               "total": 1318 - 1024 + 106 + 10 + 57}
    tokenize = [c for c in shell_commands(out) if c.startswith("masep tokenize ")]
    assert any(" --shard 1010 --shard 1011 " in c and " --shard 1019 --threads " in c
               and c.endswith("> logs/tokenize/shard-0101x.log 2>&1") for c in tokenize)
    assert sum(" --shard 1023 " in c for c in tokenize) == 1
    outs = re.findall(r"--out results/runs/infer/(\w+)/ws=16/seed=\d+/rep=0/ctx=(\d+) ", "\n".join(shell_commands(out)))
    assert len(outs) == 200 and min(outs.count(o) for o in set(outs)) == 10
    # 12 GPUs: tp 4 x dp 3, global batch 1032 (the nearest to 1024 that 3 x 8 divides)
    assert any("parallel.world_size=12 parallel.tp=4 train.global_batch=1032 " in c for c in shell_commands(out))


def test_named_targets_and_cli_config(project):
    counts = job_counts(snakemake(project, "-n", "train_all", "--config", "seeds=[0,1,2]"))
    assert counts == {"tokenize": 1, "tokenize_all": 1, "train": 18, "train_all": 1, "total": 21}
    counts = job_counts(snakemake(project, "-n", "collect", "--config", "context_lengths=[512]",
                                  "strategies=[single]", "faults={'study': false}"))
    assert counts == {"tokenize": 1, "tokenize_all": 1, "train": 1, "train_variant": 1, "infer": 1, "collect": 1,
                      "total": 6}  # faults.study false: the fault trials are not in the study
    # the ablation: plain ma_sep and its variants
    counts = job_counts(snakemake(project, "-n", "ablation"))
    assert counts == {"tokenize": 1, "tokenize_all": 1, "train": 1, "train_variant": 3, "ablation": 1, "total": 7}
    # one experiment, by its file; fresh=true empties its run folder first
    out = snakemake(project, "-n", "-p", "results/runs/infer/single/ws=1/seed=0/rep=0/ctx=2048/run.json",
                    "--config", "fresh=true")
    assert job_counts(out) == {"tokenize": 1, "tokenize_all": 1, "train": 1, "infer": 1, "total": 4}
    assert any(c.startswith("rm -rf results/runs/infer/single/ws=1/seed=0/rep=0/ctx=2048 results/runs/infer/single/"
                            f"ws=1/seed=0/rep=1/ctx=2048 && OMP_NUM_THREADS={BUDGET} masep infer ") for c in shell_commands(out))
    out = snakemake(project, "-n", "-p", "results/runs/infer/single/ws=1/seed=0/rep=1/ctx=2048/run.json",
                    "--config", "fresh=true", "infer_jobs=per_context")  # the study's DAG: one job per repeat
    assert any(c.startswith(f"rm -rf results/runs/infer/single/ws=1/seed=0/rep=1/ctx=2048 && OMP_NUM_THREADS={BUDGET} "
                            "masep infer ") for c in shell_commands(out))


def test_slurm_profile(project):
    out = snakemake(project, "-n", "-p", "--profile", "slurm", "train_all")
    assert "Using profiles slurm and workflow specific profile profiles/default" in out.stderr
    train = [c for c in shell_commands(out) if "masep train" in c]
    # jobs wait on SLURM, they do not compute here: no thread pinning, one core each
    assert train and all(c.startswith("masep train --config tiny --set ") and " launch.executor=slurm " in c
                         for c in train)
    block = re.search(r"rule train:(.*?)Shell command", out.stdout + out.stderr, flags=re.S)[1]
    assert "threads:" not in block  # Snakemake prints threads only when more than one
    # the same profile by path
    assert job_counts(snakemake(project, "-n", "--profile", "profiles/slurm"))["train"] == 16


def test_lint_is_clean(project):
    out = snakemake(project, "--lint")
    assert out.returncode == 0, out.stderr
    assert "Lints for" not in out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


@pytest.mark.parametrize("config, named", [
    (["bogus=1"], "bogus"),                      # the schema
    (["launch={partition: 7}"], "partition"),    # the schema, after --config's strings are typed
    (["set=[model.hidden=-64]"], "model.hidden"),  # masep's own config check
    (["strategies=[ep_dp]", "world_size={ep_dp: 3}"],  # masep's layout check
     "strategy ep_dp: parallel.world_size: world size 3 does not divide 16 experts"),
])
def test_bad_config_fails_the_dry_run_naming_the_key(project, config, named):
    out = snakemake(project, "-n", "--config", *config)
    assert out.returncode != 0
    assert named in out.stdout + out.stderr


@pytest.mark.parametrize("change, named", [
    ({"executor": "cloud"}, "executor"),
    ({"seeds": [-1]}, "seeds"),
    ({"strategies": ["magic"]}, "strategies"),
    ({"world_size": {"tp": 0}}, "world_size"),
    ({"overrides": {"tp": ["no equals sign"]}}, "overrides"),
    ({"shards": "0-"}, "shards"),
    ({"context_lengths": []}, "context_lengths"),
    ({"fresh": "yes"}, "fresh"),
    ({"scaling_world_sizes": {"magic": [2]}}, "scaling_world_sizes"),
])
def test_schema_names_the_bad_key(change, named):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(ROOT / "workflow/schemas/config.schema.yaml")
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    validate(dict(config), schema)  # the embedded default is valid
    with pytest.raises(WorkflowError) as e:
        validate({**config, **change}, schema)
    assert f"On instance['{named}']" in str(e.value)


def test_config_defaults_come_from_the_schema():
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for key in ("set", "world_size", "overrides", "launch", "tokenize_threads", "fresh", "faults"):
        del config[key]
    validate(config, str(ROOT / "workflow/schemas/config.schema.yaml"), set_default=True)
    assert (config["set"], config["world_size"], config["overrides"], config["launch"],
            config["tokenize_threads"], config["fresh"]) == ([], {}, {}, {}, 2, False)
    assert config["faults"]["trials"] == 0


def test_environment_yml_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower(): Requirement(r).specifier for r in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {"pytorch": "torch"}  # conda-forge name -> PyPI name
    found: dict[str, SpecifierSet] = {}
    python = None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for r in dep["pip"]:
                req = Requirement(r)
                found[req.name.lower()] = req.specifier
        else:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep)
            name, spec = m[1].lower(), m[2].replace(" ", "")
            if name == "python":
                python = SpecifierSet(spec)
            elif name != "pip":
                found[conda_names.get(name, name)] = SpecifierSet(spec)
    assert found == wanted
    assert python == SpecifierSet(project["requires-python"])


def _runtime_missing() -> str | None:
    try:
        importlib.import_module("masep.commands.train")
        importlib.import_module("masep.commands.infer")
    except ImportError as e:
        return f"masep train/infer not available yet ({e})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 5 minutes alone on 2 cores; run_tests.sh runs a second file beside it
@pytest.mark.skipif(_runtime_missing() is not None, reason=str(_runtime_missing()))
def test_end_to_end_embedded_default(project):
    # The embedded default, shortened: part of the sample, few steps, two short contexts, and two
    # strategies (the reference and a 4-rank one; tests/slurm runs all of them on SLURM).
    (project / "short.yaml").write_text(yaml.safe_dump({
        "set": ["data.max_docs=200", "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1",
                "train.warmup_steps=1", "infer.new_tokens=4", "infer.warmup_tokens=1"],
        "strategies": ["single", "ma_sep"], "context_lengths": [32, 64], "scaling_world_sizes": [],
        "infer_repeats": 2, "faults": {"strategies": [], "kinds": [], "trials": 0, "set": []},
        "variants": {"ma_sep+paper": {"study": False}}}))  # the ablation has its own test
    out = snakemake(project, "--configfile", "short.yaml", timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with duckdb.connect(str(project / "results" / "masep.duckdb"), read_only=True) as con:
        assert con.execute("SELECT experiment, strategy, world_size, status FROM runs ORDER BY run_dir").fetchall() == [
            ("infer", "ma_sep", 4, "completed"), ("infer", "ma_sep", 4, "completed"),
            ("infer", "single", 1, "completed"), ("infer", "single", 1, "completed"),
            ("train", "ma_sep", 4, "completed"), ("train", "single", 1, "completed")]
        # the two repeats of a strategy: one job (one rank start-up), two runs; TPOT's n is 2
        assert con.execute("SELECT strategy, count(DISTINCT run_id), count(DISTINCT run_json ->> 'job_id') FROM runs "
                           "WHERE experiment = 'infer' GROUP BY 1 ORDER BY 1").fetchall() == [("ma_sep", 2, 1), ("single", 2, 1)]
        assert con.execute("SELECT DISTINCT strategy, n FROM repeat_stats WHERE metric = 'tpot_ms' "
                           "ORDER BY 1").fetchall() == [("ma_sep", 2), ("single", 2)]
        assert con.execute("SELECT strategy, count(*), count(DISTINCT step), count(DISTINCT rank), min(loss) > 0 "
                           "FROM steps JOIN runs USING (run_id) GROUP BY 1 ORDER BY 1").fetchall() == [
            ("ma_sep", 24, 6, 4, True), ("single", 6, 6, 1, True)]
        # every rank of a run reports the same global loss
        assert con.execute("SELECT count(*) FROM (SELECT run_id, step FROM steps GROUP BY ALL "
                           "HAVING max(loss) - min(loss) > 1e-9)").fetchone() == (0,)
        assert con.execute("SELECT count(*) > 0 FROM eval WHERE val_loss > 0").fetchone() == (True,)
        assert con.execute("SELECT DISTINCT strategy, context_len FROM inference JOIN runs USING (run_id) "
                           "WHERE tpot_ms > 0 ORDER BY 1, 2").fetchall() == [
            ("ma_sep", 32), ("ma_sep", 64), ("single", 32), ("single", 64)]
        summary = con.execute("SELECT strategy, tokens_per_s, final_loss FROM run_summary "
                              "WHERE experiment = 'train' ORDER BY 1").fetchall()
        assert [s for s, _, _ in summary] == ["ma_sep", "single"]
        assert all(tps > 0 and loss > 0 for _, tps, loss in summary)
    for f in ("index.html", "figures/loss_curves.png", "figures/loss_curves.svg", "figures/throughput.svg",
              "figures/tpot.svg"):
        assert (project / "reports" / f).stat().st_size > 0, f
    assert "<h2>Inference" in (project / "reports/index.html").read_text()
    # nothing left to do; Snakemake's own report embeds the registered figures
    assert "Nothing to be done" in snakemake(project, "-n", "--configfile", "short.yaml").stdout
    out = snakemake(project, "--configfile", "short.yaml", "--report", "reports/snakemake-report.html")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (project / "reports/snakemake-report.html").stat().st_size > 0
    # re-running one experiment by naming it
    counts = job_counts(snakemake(project, "-n", "results/runs/train/single/ws=1/seed=0/run.json",
                                  "--configfile", "short.yaml", "--forcerun", "train"))
    assert counts == {"train": 1, "total": 1}
    # A failed collect (a damaged rank file) keeps the database and loses its summary, so a plain
    # `snakemake` runs collect again instead of "Nothing to be done".
    db = project / "results" / "masep.duckdb"
    before = db.read_bytes()
    damaged = project / "results/runs/train/ma_sep/ws=4/seed=0/steps-rank2.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    out = snakemake(project, "--configfile", "short.yaml", "--forcerun", "collect")
    assert out.returncode != 0 and f"{damaged.relative_to(project)}: damaged (" in (project / "logs/collect.log").read_text()
    assert db.read_bytes() == before and not (project / "results/collect.txt").exists()
    assert job_counts(snakemake(project, "-n", "--configfile", "short.yaml")) == {"collect": 1, "report": 1, "all": 1,
                                                                               "total": 3}
