# Fault experiments (config `faults`): per strategy an uninterrupted reference run, then one
# training run per fault kind and trial, into which the launcher injects the fault (masep.faults)
# at a step drawn from the trial number, with launch.max_restarts=1. Targets:
#   <runs>/faults/<strategy>/reference/run.json
#   <runs>/faults/<strategy>/<kind>/trial=<k>/run.json   (snakemake faults_all: every trial)
# kill_attention_k<k>: k attention ranks at once, k = 1 .. half of them (the degradation curve).

FAULTS = config["faults"]


def fault_kinds(strategy):
    """The kinds of one strategy, kill_attention_k expanded to kill_attention_k1 .. k<n/2>."""
    layout = make_layout(load_config(PRESETS, strategy_overrides(strategy)))
    n_attention = len(layout.attention_ranks) if layout.moe_ranks else layout.world_size - 1
    kinds = []
    for kind in FAULTS["kinds"]:
        ks = range(1, max(1, n_attention // 2) + 1) if kind == "kill_attention_k" else [None]
        kinds += [kind if k is None else f"{kind}{k}" for k in ks]
    return kinds


def fault_overrides(strategy):
    return strategy_overrides(strategy) + list(FAULTS["set"])


def fault_settings(kind, trial, reference):
    """masep overrides of one trial: kill_attention_k<k> -> fault.kind=kill_attention_k, fault.count=k."""
    m = re.fullmatch(r"(kill_attention_k)(\d+)", kind)
    return [f"fault.kind={m[1] if m else kind}", f"fault.count={m[2] if m else 1}", f"fault.seed={trial}",
            f"fault.reference={reference}", "launch.max_restarts=1"]


FAULT_RUNS = [
    f"{RUNS}/faults/{strategy}/{kind}/trial={trial}/run.json"
    for strategy in FAULTS["strategies"]
    for kind in fault_kinds(strategy)
    for trial in range(FAULTS["trials"])
]


rule fault_reference:
    """The run every trial of a strategy is compared with: same schedule, no fault."""
    input:
        tokens=TOKENS_DONE,
    output:
        run=f"{RUNS}/faults/{{strategy}}/reference/run.json",
    log:
        "logs/faults/{strategy}/reference.log",
    threads: lambda wc: WORLD[wc.strategy]
    params:
        args=lambda wc: masep_args(fault_overrides(wc.strategy)),
        outdir=lambda wc, output: os.path.dirname(output.run),
        env=lambda wc, threads: local_threads_env(threads, WORLD[wc.strategy]),
    conda:
        CONDA_ENV
    shell:
        "rm -rf {params.outdir:q} && {params.env}masep train {params.args} --experiment faults "
        "--out {params.outdir:q} > {log} 2>&1"


rule fault_trial:
    """One fault trial, always from an empty run folder (its record is of its own fault)."""
    input:
        tokens=TOKENS_DONE,
        reference=f"{RUNS}/faults/{{strategy}}/reference/run.json",
    output:
        run=f"{RUNS}/faults/{{strategy}}/{{kind}}/trial={{trial}}/run.json",
    log:
        "logs/faults/{strategy}/{kind}/trial={trial}.log",
    wildcard_constraints:
        kind=r"kill_attention|kill_moe|kill_attention_k\d+|stop|kill_checkpoint",
        trial=r"\d+",
    threads: lambda wc: WORLD[wc.strategy]
    params:
        args=lambda wc, input: masep_args(fault_overrides(wc.strategy)
                                          + fault_settings(wc.kind, wc.trial, os.path.abspath(os.path.dirname(input.reference)))),
        outdir=lambda wc, output: os.path.dirname(output.run),
        env=lambda wc, threads: local_threads_env(threads, WORLD[wc.strategy]),
    conda:
        CONDA_ENV
    shell:
        "rm -rf {params.outdir:q} && {params.env}masep train {params.args} --experiment faults "
        "--out {params.outdir:q} > {log} 2>&1"


rule faults_all:
    input:
        FAULT_RUNS,
