# Fault experiments (config `faults`): per strategy an uninterrupted reference run, then one
# training run per fault kind and trial, into which the launcher injects the fault (masep.faults)
# at a step drawn from the trial number, with launch.max_restarts=1. Decoding kinds
# (kill_moe_decode) are `masep infer` runs (initial weights) against an uninterrupted decoding
# reference, the fault after a drawn number of decoded tokens. Targets:
#   <runs>/faults/<strategy>/reference/run.json          (reference_decode: of the decoding kinds)
#   <runs>/faults/<strategy>/<kind>/trial=<k>/run.json   (one job runs a kind's trials in turn;
#                                                         snakemake faults_all: every trial)
# kill_attention_k<k>: k attention ranks at once, k = 1 .. half of them (the degradation curve).
# `faults.overrides` gives one strategy's fault runs their own settings (ma_sep: ma.failover, so
# a lost attention or MoE rank is recovered in the job and any other loss by the restart).

from masep.faults import workflow_kinds

FAULTS = config["faults"]
# Fault strategies need not be among `strategies`: give them their ranks too.
for _strategy in FAULTS["strategies"]:
    WORLD.setdefault(_strategy, config["world_size"].get(_strategy, 1))
FAULT_STRATEGY = "|".join(re.escape(s) for s in FAULTS["strategies"]) or "^$"


FAULT_RUNS = [
    f"{RUNS}/faults/{strategy}/{kind}/trial={trial}/run.json"
    for strategy in FAULTS["strategies"]
    for kind in workflow_kinds(make_layout(load_config(PRESETS, strategy_overrides(strategy))),
                               FAULTS.get("kinds_by_strategy", {}).get(strategy, FAULTS["kinds"]))
    for trial in range(FAULTS["trials"])
]


rule fault_reference:
    """The run every trial of a strategy is compared with: same schedule, no fault."""
    input:
        tokens=TOKENS_DONE,
    output:
        run=f"{RUNS}/faults/{{strategy}}/{{reference}}/run.json",
    log:
        "logs/faults/{strategy}/{reference}.log",
    wildcard_constraints:
        strategy=FAULT_STRATEGY,
        reference="reference|reference_decode",
    threads: CPU_THREADS
    params:
        args=lambda wc: masep_args(fault_overrides(wc.strategy)),
        command=lambda wc: fault_command(wc.reference),
        outdir=lambda wc, output: os.path.dirname(output.run),
        env=lambda wc, threads: local_threads_env(WORLD[wc.strategy], threads),
    conda:
        CONDA_ENV
    shell:
        "rm -rf {params.outdir:q} && {params.env}masep {params.command} {params.args} --experiment faults "
        "--out {params.outdir:q} > {log} 2>&1"


rule fault_trials:
    """Every trial of one strategy and fault kind, in turn: at the paper's 20 trials of 57 kinds,
    a job per trial would double the study's DAG and its dry run. A job run again keeps the trials
    that ended (see trial_command) and runs the rest; `fresh=true` runs them all."""
    input:
        tokens=TOKENS_DONE,
        reference=lambda wc: f"{RUNS}/faults/{wc.strategy}/{fault_reference(wc.kind)}/run.json",
    output:
        runs=expand(f"{RUNS}/faults/{{{{strategy}}}}/{{{{kind}}}}/trial={{trial}}/run.json",
                    trial=range(FAULTS["trials"])),
    log:
        "logs/faults/{strategy}/{kind}/trials.log",
    wildcard_constraints:
        strategy=FAULT_STRATEGY,
        kind=r"kill_attention|kill_moe|kill_attention_k\d+|stop|kill_checkpoint|kill_moe_decode",
    threads: CPU_THREADS
    params:
        trials=lambda wc, threads: "; ".join(trial_command(wc.strategy, wc.kind, k, threads)
                                             for k in range(FAULTS["trials"])),
    conda:
        CONDA_ENV
    shell:
        "({params.trials}) > {log} 2>&1"


rule faults_all:
    input:
        FAULT_RUNS,
