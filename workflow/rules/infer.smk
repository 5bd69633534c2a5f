rule infer:
    """Decode at one context length (or, for ctx=all, at each in turn) with the weights of the
    infer_seed training run."""
    input:
        train=f"{RUNS}/train/{{strategy}}/seed={INFER_SEED}/run.json",
    output:
        run=f"{RUNS}/infer/{{strategy}}/ctx={{ctx}}/run.json",
    log:
        "logs/infer/{strategy}/ctx={ctx}.log",
    threads: lambda wc: WORLD[wc.strategy]
    params:
        args=lambda wc: masep_args(
            strategy_overrides(wc.strategy)
            + [f"train.seed={INFER_SEED}", f"infer.context_lengths={json.dumps(infer_contexts(wc.ctx))}"]
        ),
        checkpoint=lambda wc, input: os.path.dirname(input.train),
        outdir=lambda wc, output: os.path.dirname(output.run),
        prefix=lambda wc, output: fresh_prefix(os.path.dirname(output.run))
        + local_threads_env(WORLD[wc.strategy]),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep infer {params.args} --checkpoint {params.checkpoint:q} "
        "--out {params.outdir:q} > {log} 2>&1"


rule infer_all:
    input:
        INFER_RUNS,
