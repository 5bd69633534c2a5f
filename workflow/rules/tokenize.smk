rule tokenize:
    """Tokenize one C4 shard; its manifest (written last) marks the shard done."""
    input:
        corpus=lambda wc: corpus_files([wc.shard]),
    output:
        manifest=f"{TOKENS}/shard-{{shard}}/manifest.json",
    log:
        "logs/tokenize/shard-{shard}.log",
    wildcard_constraints:
        shard="|".join(SINGLE_SHARDS) or "(?!)",
    threads: config["tokenize_threads"]
    params:
        args=lambda wc, threads: tokenize_args([wc.shard], threads),
    conda:
        CONDA_ENV
    shell:
        "masep tokenize {params.args} --no-progress > {log} 2>&1"


rule tokenize_ten:
    """Tokenize shards <tens>0 to <tens>9 in one job (see SHARD_TENS). Snakemake leaves their
    manifests in place (update): masep tokenize keeps each shard whose manifest matches its input
    and builds the others."""
    input:
        corpus=lambda wc: corpus_files(ten_shards(wc.tens)),
    output:
        update(expand(f"{TOKENS}/shard-{{{{tens}}}}{{d}}/manifest.json", d=range(10))),
    log:
        "logs/tokenize/shard-{tens}x.log",
    wildcard_constraints:
        tens="|".join(SHARD_TENS) or "(?!)",
    threads: config["tokenize_threads"]
    params:
        args=lambda wc, threads: tokenize_args(ten_shards(wc.tens), threads),
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
