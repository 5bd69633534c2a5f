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
    # The local budget (local_threads_env); Snakemake lowers it to --cores when there are fewer.
    threads: CPU_THREADS
    params:
        args=lambda wc: masep_args(run_overrides(wc.experiment, wc.strategy, int(wc.ws)) + [f"train.seed={wc.seed}"]),
        outdir=lambda wc, output: os.path.dirname(output.run),
        prefix=lambda wc, output, threads: fresh_prefix(os.path.dirname(output.run))
        + local_threads_env(int(wc.ws), threads),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep train {params.args} --out {params.outdir:q} > {log} 2>&1"


rule train_variant:
    """One labelled run of the ablation (config `variants`): its strategy's overrides plus its own,
    recorded as experiment `ablation`."""
    input:
        tokens=TOKENS_DONE,
    output:
        run=f"{RUNS}/ablation/{{variant}}/seed={{seed}}/run.json",
    log:
        "logs/ablation/{variant}/seed={seed}.log",
    threads: CPU_THREADS
    params:
        args=lambda wc: masep_args(variant_overrides(wc.variant) + [f"train.seed={wc.seed}"]),
        outdir=lambda wc, output: os.path.dirname(output.run),
        prefix=lambda wc, output, threads: fresh_prefix(os.path.dirname(output.run))
        + local_threads_env(WORLD[config["variants"][wc.variant]["strategy"]], threads),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep train {params.args} --experiment ablation --out {params.outdir:q} > {log} 2>&1"


rule ablation:
    """Every variant's runs (and plain ma_sep's, train_all's), for the ablation in SQL (`ma_ablation`)."""
    input:
        VARIANT_RUNS,
        [f"{RUNS}/train/{s}/ws={WORLD[s]}/seed={k}/run.json" for k in SEEDS
         for s in STRATEGIES if any(v["strategy"] == s for v in config["variants"].values())],


rule train_all:
    input:
        TRAIN_RUNS,


rule scaling_all:
    """The scaling sweep (config scaling_world_sizes)."""
    input:
        SCALING_RUNS,
