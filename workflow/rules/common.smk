import hashlib
import json
import re
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from masep.config import ConfigError, load_config
from masep.parallel.layout import make_layout


def normalize_cli_config(cfg):
    """`--config seeds='[0,1]'` arrives as strings: give numbers and booleans back their type."""

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, str):
            if re.fullmatch(r"-?\d+", v):
                return int(v)
            if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?", v):
                return float(v)
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


def variant_overrides(variant):
    """A variant's strategy's overrides, then its own."""
    v = config["variants"][variant]
    return strategy_overrides(v["strategy"]) + list(v.get("overrides", []))


def local_threads_env(threads, world_size):
    """Local ranks share the job's cores: one OpenMP/intra-op thread share each."""
    if config["executor"] != "local":
        return ""
    return f"OMP_NUM_THREADS={max(1, threads // world_size)} "


def fresh_prefix(outdir):
    return f"rm -rf {shlex.quote(outdir)} && " if config["fresh"] else ""


normalize_cli_config(config)
validate(config, "../schemas/config.schema.yaml", set_default=True)

PRESETS = [config["preset"]] if isinstance(config["preset"], str) else list(config["preset"])
SHARDS = shard_list(config["shards"])
STRATEGIES = list(config["strategies"])
VARIANTS = list(config["variants"])
WORLD = {s: config["world_size"].get(s, 1) for s in set(STRATEGIES) | {v["strategy"] for v in config["variants"].values()}}
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
VARIANT_RUNS = expand(f"{RUNS}/ablation/{{variant}}/seed={{seed}}/run.json", variant=VARIANTS, seed=SEEDS)
STUDY_VARIANT_RUNS = expand(f"{RUNS}/ablation/{{variant}}/seed={{seed}}/run.json", seed=SEEDS,
                            variant=[v for v in VARIANTS if config["variants"][v]["study"]])
INFER_RUNS = expand(f"{RUNS}/infer/{{strategy}}/ctx={{ctx}}/run.json", strategy=STRATEGIES, ctx=INFER_CTX)


def infer_contexts(ctx):
    """The context lengths an infer job measures: its own, or all of them for ctx=all."""
    return CONTEXTS if ctx == "all" else [int(ctx)]


wildcard_constraints:
    shard=r"\d{5}",
    ctx=r"\d+|all",
    strategy="|".join(re.escape(s) for s in STRATEGIES),
    seed=r"\d+",
    variant="|".join(re.escape(v) for v in VARIANTS) or "(?!)",
