rule tokenize:
    """Tokenize one C4 shard; its manifest (written last) marks the shard done."""
    input:
        corpus=corpus_file,
    output:
        manifest=f"{TOKENS}/shard-{{shard}}/manifest.json",
    log:
        "logs/tokenize/shard-{shard}.log",
    threads: config["tokenize_threads"]
    params:
        args=lambda wc, threads: masep_args(COMMON_SET) + f" --shard {int(wc.shard)} --threads {threads}",
    conda:
        CONDA_ENV
    shell:
        "masep tokenize {params.args} --no-progress > {log} 2>&1"


rule tokenize_all:
    """Every shard of the config tokenized. Training jobs depend on this one marker instead of
    on each manifest: at 1024 shards x 50 runs, direct edges make the DAG 50 times larger."""
    input:
        MANIFESTS,
    output:
        touch(TOKENS_DONE),
