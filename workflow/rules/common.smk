import hashlib
import json
import re
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from masep.config import ConfigError, load_config, parse_number
from masep.data.c4 import shard_path
from masep.parallel.layout import make_layout


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
    return COMMON_SET + [
        f"data.shards={json.dumps(SHARDS)}",
        f"parallel.strategy={strategy}",
        f"parallel.world_size={WORLD[strategy]}",
    ] + list(config["overrides"].get(strategy, []))


def local_threads_env(world_size):
    """Every local job gets the same CPU budget, CPU_THREADS intra-op threads over its ranks, so
    that strategies are timed on equal terms (single's one rank does not get more threads than
    the four ranks of another strategy together)."""
    if config["executor"] != "local":
        return ""
    return f"OMP_NUM_THREADS={max(1, CPU_THREADS // world_size)} "


def fresh_prefix(outdir):
    return f"rm -rf {shlex.quote(outdir)} && " if config["fresh"] else ""


normalize_cli_config(config)
validate(config, "../schemas/config.schema.yaml", set_default=True)

PRESETS = [config["preset"]] if isinstance(config["preset"], str) else list(config["preset"])
SHARDS = shard_list(config["shards"])
STRATEGIES = list(config["strategies"])
WORLD = {s: config["world_size"].get(s, 1) for s in STRATEGIES}
CPU_THREADS = max(WORLD.values())  # threads per local job: one per rank of the widest strategy
SEEDS = list(config["seeds"])
CONTEXTS = list(config["context_lengths"])
# per_context: one inference job per strategy and context length (the study's DAG);
# per_strategy: one job per strategy measuring every context length in turn (ctx=all), which
# saves the rank start-up of all but one job on small machines.
INFER_CTX = [str(c) for c in CONTEXTS] if config["infer_jobs"] == "per_context" else ["all"]
INFER_SEED = config["infer_seed"]
COMMON_SET = list(config["set"]) + [f"launch.executor={config['executor']}"] + [
    f"launch.{k}={json.dumps(v)}" for k, v in sorted(config["launch"].items())
]

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
FIGURES = ["loss_curves", "throughput", "tpot"]

SHARD_IDS = [f"{i:05d}" for i in SHARDS]
# Marker of "every shard of this config is tokenized", named by the shard set so that studies
# with different shards can share a tokens folder.
TOKENS_DONE = f"{TOKENS}/shards-{hashlib.sha1(json.dumps(SHARDS).encode()).hexdigest()[:10]}.done"
MANIFESTS = expand(f"{TOKENS}/shard-{{shard}}/manifest.json", shard=SHARD_IDS)
TRAIN_RUNS = expand(f"{RUNS}/train/{{strategy}}/seed={{seed}}/run.json", strategy=STRATEGIES, seed=SEEDS)
INFER_RUNS = expand(f"{RUNS}/infer/{{strategy}}/ctx={{ctx}}/run.json", strategy=STRATEGIES, ctx=INFER_CTX)


def corpus_file(wc):
    """The local or embedded C4 file a tokenize job reads (none for the Hub): an input, so that
    replacing it makes Snakemake tokenize the shard again."""
    path = shard_path(BASE.data, int(wc.shard))
    return [] if path is None else str(path)


def infer_contexts(ctx):
    """The context lengths an infer job measures: its own, or all of them for ctx=all."""
    return CONTEXTS if ctx == "all" else [int(ctx)]


wildcard_constraints:
    shard=r"\d{5}",
    ctx=r"\d+|all",
    strategy="|".join(re.escape(s) for s in STRATEGIES),
    seed=r"\d+",
