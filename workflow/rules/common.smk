import collections
import functools
import hashlib
import json
import re
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from masep.config import DECODE_FAULT_KINDS, ConfigError, load_config, parse_number
from masep.data.c4 import shard_path
from masep.faults import trial_overrides
from masep.parallel.layout import make_layout
from masep.report import FIGURES, SECTION_FIGURES


def normalize_cli_config(cfg):
    """`--config seeds='[0,1]'` arrives as strings: give numbers and booleans back their type."""

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, str):
            if parse_number(v) is not None:
                return parse_number(v)
            if v in ("true", "false"):
                return v == "true"
            if v == "null":
                return None
        return v

    for key in list(cfg):
        if key not in ("preset", "set", "overrides", "shards"):
            cfg[key] = fix(cfg[key])
    if isinstance(cfg.get("shards"), list):
        cfg["shards"] = fix(cfg["shards"])
    return cfg


def shard_list(value):
    if isinstance(value, str):
        first, last = (int(x) for x in value.split("-"))
        if not 0 <= first <= last <= 1023:
            raise WorkflowError(f"config shards: {value!r} is not a range within 0-1023")
        return list(range(first, last + 1))
    return sorted(value)


def masep_args(overrides):
    """`--config ... --set ...` of one masep command, shell-quoted."""
    args = [a for p in PRESETS for a in ("--config", p)]
    if overrides:
        args += ["--set", *overrides]
    return shlex.join(args)


def strategy_overrides(strategy):
    return list(_strategy_overrides(strategy))


@functools.cache  # every job's params ask, and the shard list alone is 1,024 numbers at paper scale
def _strategy_overrides(strategy):
    return tuple(COMMON_SET + [
        f"data.shards={json.dumps(SHARDS)}",
        f"parallel.strategy={strategy}",
        f"parallel.world_size={WORLD[strategy]}",
    ] + list(config["overrides"].get(strategy, [])))


def fault_overrides(strategy):
    """A strategy's overrides, then the fault runs' (`faults.set`, `faults.overrides`)."""
    return strategy_overrides(strategy) + config["faults"]["set"] + list(config["faults"].get("overrides", {}).get(strategy, []))


def fault_reference(kind):
    """The uninterrupted run a fault kind's trials compare with."""
    return "reference_decode" if kind in DECODE_FAULT_KINDS else "reference"


def fault_command(kind):
    """The masep command of a fault run: decoding kinds and their reference decode, the rest train."""
    return "infer" if kind in DECODE_FAULT_KINDS or kind == "reference_decode" else "train"


def trial_command(strategy, kind, trial, threads):
    """One trial's shell line. A trial runs from an empty folder (its record is of its own fault);
    when it ends, a copy of its run.json named by its command is kept beside it, from which a
    later job of the same command restores the run.json (Snakemake deletes a job's outputs before
    running it) instead of running the trial again."""
    outdir = f"{RUNS}/faults/{strategy}/{kind}/trial={trial}"
    log = f"logs/faults/{strategy}/{kind}/trial={trial}.log"
    # relative, like every path of a job: a moved project keeps its commands, and so its ended trials
    reference = f"{RUNS}/faults/{strategy}/{fault_reference(kind)}"
    command = (f"{local_threads_env(WORLD[strategy], threads)}masep {fault_command(kind)} "
               f"{masep_args(fault_overrides(strategy) + trial_overrides(kind, trial, reference))} "
               f"--experiment faults --out {shlex.quote(outdir)}")
    done = shlex.quote(f"{outdir}/.run-{hashlib.sha1(command.encode()).hexdigest()[:12]}.json")
    run, q_out, q_log = (shlex.quote(x) for x in (f"{outdir}/run.json", outdir, log))
    ran = (f"rm -rf {q_out} && {command} > {q_log} 2>&1 && cp {run} {done} && echo 'trial {trial}: done' "
           f"|| {{ echo 'trial {trial} failed; the end of its log, {log}:'; tail -n 30 {q_log}; exit 1; }}")
    if config["fresh"]:
        return ran
    return f"if [ -e {done} ]; then cp {done} {run} && echo 'trial {trial}: kept'; else {ran}; fi"


def variant_overrides(variant):
    """A variant's strategy's overrides, then its own."""
    v = config["variants"][variant]
    return strategy_overrides(v["strategy"]) + list(v.get("overrides", []))


def local_threads_env(world_size, threads):
    """Every local job gets the same CPU budget, `threads` intra-op threads over its ranks, so
    that strategies are timed on equal terms (single's one rank does not get more threads than
    the four ranks of another strategy together). A job reserves CPU_THREADS, which Snakemake
    lowers to the cores there are: no job's threads run beside another's on the same cores."""
    if config["executor"] != "local":
        return ""
    return f"OMP_NUM_THREADS={max(1, threads // world_size)} "


def fresh_prefix(*outdirs):
    return f"rm -rf {' '.join(map(shlex.quote, outdirs))} && " if config["fresh"] else ""


normalize_cli_config(config)
validate(config, "../schemas/config.schema.yaml", set_default=True)

FORK_SERVER = []


def start_fork_server():
    """The local ranks of every job fork from one process that has imported torch and masep
    (masep.runtime.forkserver): started with this run, ended with it."""
    from masep.runtime import forkserver

    if BASE.launch.executor == "local" and forkserver.usable(BASE.launch):
        FORK_SERVER.append(forkserver.Server())
        os.environ.update(FORK_SERVER[-1].env)


def stop_fork_server():
    while FORK_SERVER:
        FORK_SERVER.pop().stop()


PRESETS = [config["preset"]] if isinstance(config["preset"], str) else list(config["preset"])
SHARDS = shard_list(config["shards"])
STRATEGIES = list(config["strategies"])
VARIANTS = list(config["variants"])
WORLD = {s: config["world_size"].get(s, 1) for s in set(STRATEGIES) | {v["strategy"] for v in config["variants"].values()}}
CPU_THREADS = max(WORLD.values())  # threads per local job: one per rank of the widest strategy
SEEDS = list(config["seeds"])
CONTEXTS = list(config["context_lengths"])
# per_context: one inference job per strategy, seed, repeat and context length (the study's DAG);
# per_strategy: one job per strategy and seed decoding every context length (ctx=all) and every
# repeat in turn, which saves the rank start-up of all but one job on small machines.
INFER_CTX = [str(c) for c in CONTEXTS] if config["infer_jobs"] == "per_context" else ["all"]
# Inference decodes with the weights of each of these training seeds (default: every seed),
# infer_repeats times each: the repeats of repeat_stats' TPOT rows.
INFER_SEEDS = list(config.get("infer_seeds") or SEEDS)
INFER_REPEATS = list(range(config["infer_repeats"]))
# The sweep's sizes per strategy: scaling_world_sizes, one list for every strategy or a list per strategy.
SCALING_WS = {s: list(config["scaling_world_sizes"].get(s, []) if isinstance(config["scaling_world_sizes"], dict)
                      else config["scaling_world_sizes"]) for s in STRATEGIES}
SCALING_SET = list(config["scaling_set"])
COMMON_SET = list(config["set"]) + [f"launch.executor={config['executor']}"] + [
    f"launch.{k}={json.dumps(v)}" for k, v in sorted(config["launch"].items())
]

def _largest_divisor(n, limit, *must_divide):
    """The largest d <= limit dividing n and every `must_divide`."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0 and all(m % d == 0 for m in must_divide))


def scaled_overrides(strategy, ws):
    """A copy of _scaled_overrides(strategy, ws), which every scaling job's params ask for."""
    over = _scaled_overrides(strategy, ws)
    return None if over is None else list(over)


@functools.cache  # resolves a whole masep config: once per (strategy, world size)
def _scaled_overrides(strategy, ws):
    """The masep overrides of `strategy` at world size `ws` of the scaling sweep, or None where
    the strategy cannot run there (single beyond 1 rank, ma_sep on 1, ep_dp where ws does not
    divide the experts). Degrees: the configured ones where they fit, else the largest that
    divides ws and the model (tp: heads and experts; pp: layers; ma_sep: MoE ranks in the
    configured share of the ranks, dividing the experts). Global batch: the configured one where
    the replicas divide its micro-batches, else the nearest that they divide (at least one
    micro-batch per pipeline stage); the run's config records it."""
    base = strategy_overrides(strategy) + SCALING_SET
    cfg = load_config(PRESETS, base)
    m, t, p, world = cfg.model, cfg.train, cfg.parallel, WORLD[strategy]
    deg, replicas, stages = {}, ws, 1
    if strategy == "single":
        return base if ws == 1 else None
    if strategy in ("tp", "tp_pp"):
        deg["tp"] = _largest_divisor(ws, p.tp, m.heads, m.experts)
        replicas //= deg["tp"]
    if strategy in ("pp", "tp_pp"):
        stages = deg["pp"] = _largest_divisor(replicas, p.pp, m.layers)
        replicas //= stages
    if strategy == "ep_dp" and m.experts % ws:
        return None
    if strategy == "ma_sep":
        if ws < 2:
            return None
        moe = _largest_divisor(m.experts, max(1, ws * p.moe_ranks // world))
        attn_tp = p.attn_tp if (ws - moe) % p.attn_tp == 0 else 1
        replicas = (ws - moe) // attn_tp
        deg.update(moe_ranks=moe, attn_tp=attn_tp, attn_replicas=replicas)
    unit = t.micro_batch * replicas
    batch = t.global_batch if (t.global_batch // t.micro_batch) % replicas == 0 \
        else unit * max(stages, round(t.global_batch / unit))
    return base + [f"parallel.world_size={ws}"] + [f"parallel.{k}={v}" for k, v in sorted(deg.items())] \
        + ([f"train.global_batch={batch}"] if batch != t.global_batch else [])


def run_overrides(experiment, strategy, ws):
    return strategy_overrides(strategy) if experiment == "train" else scaled_overrides(strategy, ws)


def check_masep_configs():
    """Resolve every masep config now, so that a bad override or an impossible layout fails the
    dry-run naming its key instead of failing a job hours into the study."""
    try:
        base = load_config(PRESETS, COMMON_SET)
    except ConfigError as e:
        raise WorkflowError(f"masep config from preset {PRESETS} and set/executor/launch: {e}")
    for strategy in STRATEGIES:
        try:
            make_layout(load_config(PRESETS, strategy_overrides(strategy)
                                    + [f"infer.context_lengths={json.dumps(CONTEXTS)}"]))
        except ConfigError as e:
            raise WorkflowError(f"masep config of strategy {strategy}: {e}")
        for ws in SCALING_WS[strategy]:
            try:
                over = scaled_overrides(strategy, ws)
                if over is not None:
                    make_layout(load_config(PRESETS, over))
            except ConfigError as e:
                raise WorkflowError(f"scaling: strategy {strategy} at world size {ws}: {e}")
    for variant in VARIANTS:
        try:
            make_layout(load_config(PRESETS, variant_overrides(variant)))
        except ConfigError as e:
            raise WorkflowError(f"masep config of variant {variant}: {e}")
    return base


BASE = check_masep_configs()
RUNS = BASE.runs_dir
TOKENS = f"{BASE.data.tokens_dir}/{BASE.data.source}"
DB = "results/masep.duckdb"
# What the collect job outputs: its summary line. Not the database itself, which Snakemake would
# delete before the job runs; masep collect replaces the database only by a complete new one.
COLLECTED = "results/collect.txt"
# Software of every rule (for the linter and --software-deployment-method conda; see environment.yml).
CONDA_ENV = "../../environment.yml"
REPORTS = "reports"

SHARD_IDS = [f"{i:05d}" for i in SHARDS]
# Marker of "every shard of this config is tokenized", named by the shard set so that studies
# with different shards can share a tokens folder.
TOKENS_DONE = f"{TOKENS}/shards-{hashlib.sha1(json.dumps(SHARDS).encode()).hexdigest()[:10]}.done"
MANIFESTS = expand(f"{TOKENS}/shard-{{shard}}/manifest.json", shard=SHARD_IDS)
# Ten shards whose ids differ in the last digit only (shard-0123x: 01230-01239) are one tokenize
# job where the config has all ten; any other shard is a job of its own. At 1,024 shards that is
# 106 jobs instead of 1,024, which made up 40% of the paper study's DAG and its dry run.
SHARD_TENS = sorted(t for t, n in collections.Counter(i[:-1] for i in set(SHARD_IDS)).items() if n == 10)
SINGLE_SHARDS = [i for i in SHARD_IDS if i[:-1] not in SHARD_TENS]
TRAIN_RUN = "{experiment}/{strategy}/ws={ws}/seed={seed}"
INFER_RUN = "infer/{strategy}/ws={ws}/seed={seed}/rep={rep}/ctx={ctx}"
TRAIN_RUNS = [f"{RUNS}/train/{s}/ws={WORLD[s]}/seed={k}/run.json" for s in STRATEGIES for k in SEEDS]
INFER_RUNS = [f"{RUNS}/infer/{s}/ws={WORLD[s]}/seed={k}/rep={r}/ctx={c}/run.json"
              for s in STRATEGIES for k in INFER_SEEDS for r in INFER_REPEATS for c in INFER_CTX]
# What one infer job writes (see INFER_CTX): one repeat's run, or (per_strategy) every repeat's.
INFER_JOB = INFER_RUN if config["infer_jobs"] == "per_context" else INFER_RUN.replace("rep={rep}/", "")
INFER_JOB_RUNS = [f"{RUNS}/{INFER_RUN}/run.json"] if INFER_JOB == INFER_RUN else [
    f"{RUNS}/{INFER_RUN.replace('{rep}', str(r))}/run.json" for r in INFER_REPEATS]
# The scaling sweep: each strategy at each of scaling_world_sizes where it can run (first seed);
# at its training world size the training run itself (throughput is a mean over steady steps, so
# the sweep's shorter scaling_set would only measure that size again).
SCALING_RUNS = [
    f"{RUNS}/train/{s}/ws={ws}/seed={SEEDS[0]}/run.json" if ws == WORLD[s]
    else f"{RUNS}/scaling/{s}/ws={ws}/seed={SEEDS[0]}/run.json"
    for s in STRATEGIES for ws in SCALING_WS[s] if scaled_overrides(s, ws) is not None
]

VARIANT_RUNS = expand(f"{RUNS}/ablation/{{variant}}/seed={{seed}}/run.json", variant=VARIANTS, seed=SEEDS)
STUDY_VARIANT_RUNS = expand(f"{RUNS}/ablation/{{variant}}/seed={{seed}}/run.json", seed=SEEDS,
                            variant=[v for v in VARIANTS if config["variants"][v]["study"]])


def ten_shards(tens):
    """The ids of shards <tens>0 to <tens>9 (see SHARD_TENS)."""
    return [f"{tens}{d}" for d in range(10)]


def tokenize_args(shard_ids, threads):
    """The arguments of `masep tokenize` for these shards."""
    return masep_args(COMMON_SET) + "".join(f" --shard {int(i)}" for i in shard_ids) + f" --threads {threads}"


def corpus_files(shard_ids):
    """The local or embedded C4 files tokenize jobs read (none for the Hub): inputs, so that
    replacing one makes Snakemake run its job again (which rebuilds that shard only)."""
    paths = (shard_path(BASE.data, int(i)) for i in shard_ids)
    return [str(p) for p in paths if p is not None]


def infer_contexts(ctx):
    """The context lengths an infer job measures: its own, or all of them for ctx=all."""
    return CONTEXTS if ctx == "all" else [int(ctx)]


wildcard_constraints:
    shard=r"\d{5}",
    ctx=r"\d+|all",
    strategy="|".join(re.escape(s) for s in STRATEGIES),
    seed=r"\d+",
    ws=r"\d+",
    rep=r"\d+",
    experiment="train|scaling",
    variant="|".join(re.escape(v) for v in VARIANTS) or "(?!)",
