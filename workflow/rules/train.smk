rule train:
    """Train one strategy with one seed at one world size (experiment train: the study's runs;
    scaling: the sweep's runs at other sizes); run.json (written last by rank 0) marks the run
    done. The job resumes from the newest checkpoint in its run folder unless config fresh=true."""
    input:
        tokens=TOKENS_DONE,
    output:
        run=f"{RUNS}/{TRAIN_RUN}/run.json",
    log:
        f"logs/{TRAIN_RUN}.log",
    # One core per rank; Snakemake lowers this to --cores when the machine has fewer.
    threads: lambda wc: int(wc.ws)
    params:
        args=lambda wc: masep_args(run_overrides(wc.experiment, wc.strategy, int(wc.ws)) + [f"train.seed={wc.seed}"]),
        outdir=lambda wc, output: os.path.dirname(output.run),
        prefix=lambda wc, output: fresh_prefix(os.path.dirname(output.run))
        + local_threads_env(int(wc.ws)),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep train {params.args} --out {params.outdir:q} > {log} 2>&1"


rule train_all:
    input:
        TRAIN_RUNS,


rule scaling_all:
    """The scaling sweep (config scaling_world_sizes)."""
    input:
        SCALING_RUNS,
