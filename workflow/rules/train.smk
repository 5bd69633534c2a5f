rule train:
    """Train one strategy with one seed; run.json (written last by rank 0) marks the run done.
    The job resumes from the newest checkpoint in its run folder unless config fresh=true."""
    input:
        tokens=TOKENS_DONE,
    output:
        run=f"{RUNS}/train/{{strategy}}/seed={{seed}}/run.json",
    log:
        "logs/train/{strategy}/seed={seed}.log",
    # One core per rank; Snakemake lowers this to --cores when the machine has fewer.
    threads: lambda wc: WORLD[wc.strategy]
    params:
        args=lambda wc: masep_args(strategy_overrides(wc.strategy) + [f"train.seed={wc.seed}"]),
        outdir=lambda wc, output: os.path.dirname(output.run),
        prefix=lambda wc, output: fresh_prefix(os.path.dirname(output.run))
        + local_threads_env(WORLD[wc.strategy]),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep train {params.args} --out {params.outdir:q} > {log} 2>&1"


rule train_all:
    input:
        TRAIN_RUNS,
