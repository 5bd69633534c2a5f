import glob
import shlex
from pathlib import Path

# The committed GPU benchmark runs: the report shows them, so it re-renders when they change.
# Paths are relative to the project root.
BENCH_DIR = "bench/runs"
BENCH_FILES = sorted(glob.glob(f"{BENCH_DIR}/**/*.*", recursive=True))
# The committed peer benchmark tables (scripts/bench_peer.py): collect loads them into peer_benchmark.
PEER_FILES = sorted(glob.glob("bench/peer-*.json"))


rule collect:
    """Build the DuckDB database from every complete run folder under the runs root. The output
    is the summary line: a failed collect leaves the previous database in place and no summary,
    so the next `snakemake` runs collect again."""
    input:
        TRAIN_RUNS,
        INFER_RUNS,
        SCALING_RUNS,
        STUDY_VARIANT_RUNS,
        FAULT_RUNS if FAULTS.get("study", True) else [],
        peer=PEER_FILES,
    output:
        summary=COLLECTED,
    log:
        "logs/collect.log",
    params:
        # the runs root: <runs>/train/<strategy>/ws=<n>/seed=<k>/run.json
        runs=lambda wc, input: str(Path(input[0]).parents[4]),
        db=DB,
        peer=lambda wc, input: " ".join(shlex.quote(f) for f in input.peer),
    conda:
        CONDA_ENV
    shell:
        "masep collect --runs {params.runs:q} --db {params.db:q} --peer {params.peer} 2> {log} > {output.summary:q}"


rule report:
    """Figures and HTML from the database, plus the committed GPU benchmark runs."""
    input:
        collected=COLLECTED,
        bench=BENCH_FILES,
    output:
        index=f"{REPORTS}/index.html",
        # every figure masep report writes, so that a missing one renders the report again
        png=expand(f"{REPORTS}/figures/{{name}}.png", name=FIGURES),
        sections=report(
            expand(f"{REPORTS}/figures/{{name}}.svg", name=SECTION_FIGURES),
            caption="../report/sections.rst",
            category="Study sections",
        ),
        loss_curves=report(
            f"{REPORTS}/figures/loss_curves.svg",
            caption="../report/loss_curves.rst",
            category="Training",
        ),
        throughput=report(
            f"{REPORTS}/figures/throughput.svg",
            caption="../report/throughput.rst",
            category="Training",
        ),
        tpot=report(
            f"{REPORTS}/figures/tpot.svg",
            caption="../report/tpot.rst",
            category="Inference",
        ),
    log:
        "logs/report.log",
    params:
        out=lambda wc, output: os.path.dirname(output.index),
        db=DB,
        # the benchmark folder, named where it holds files (without, the section says "not measured")
        bench=f" --bench {BENCH_DIR}" if BENCH_FILES else "",
    conda:
        CONDA_ENV
    shell:
        "masep report --db {params.db:q} --out {params.out:q}{params.bench} > {log} 2>&1"
