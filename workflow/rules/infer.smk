rule infer:
    """Decode at one context length (or, for ctx=all, at each in turn) with the weights of one
    training seed; rep numbers the repeated trials (infer_repeats), one job each (per_context)
    or all in one job (per_strategy)."""
    input:
        train=f"{RUNS}/train/{{strategy}}/ws={{ws}}/seed={{seed}}/run.json",
    output:
        runs=INFER_JOB_RUNS,
    log:
        f"logs/{INFER_JOB}.log",
    threads: CPU_THREADS
    params:
        args=lambda wc: masep_args(
            strategy_overrides(wc.strategy)
            + [f"train.seed={wc.seed}", f"infer.context_lengths={json.dumps(infer_contexts(wc.ctx))}"]
        ),
        checkpoint=lambda wc, input: os.path.dirname(input.train),
        outdirs=lambda wc, output: " ".join(shlex.quote(os.path.dirname(r)) for r in output.runs),
        prefix=lambda wc, output, threads: fresh_prefix(*(os.path.dirname(r) for r in output.runs))
        + local_threads_env(int(wc.ws), threads),
    conda:
        CONDA_ENV
    shell:
        "{params.prefix}masep infer {params.args} --checkpoint {params.checkpoint:q} "
        "--out {params.outdirs} > {log} 2>&1"


rule infer_all:
    input:
        INFER_RUNS,
