"""`masep report`: figures and an HTML page from the results database (plus the committed GPU
benchmark runs), and nothing else.

Writes `<out>/index.html` and, under `<out>/figures/`, one PNG and one SVG per figure: loss
curves per strategy, training throughput per strategy, TPOT by context length, and the study
sections' (`masep.report.FIGURES` names them all). Each figure has
a table of the numbers it plots. A value the database does not hold is shown as "not
measured", never as zero; an empty or partial database still renders (a figure without data
says so). Every file is written to a temporary name beside it and renamed into place.

The one input besides the database: the committed GPU benchmark runs (`--bench`, a runs root,
default `bench/runs` where it exists), each shown as the table of `masep.bench.table`.
"""
from __future__ import annotations

import html
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

NOT_MEASURED = "not measured"
NOT_APPLICABLE = {"slurm_job_id": "not applicable (local run)"}  # NULL columns that are not missing data
# Fixed ids and no timestamps in SVGs: the same database renders the same files.
matplotlib.rcParams["svg.hashsalt"] = "masep"


class ReportError(RuntimeError):
    pass


@dataclass
class Table:
    columns: list[str]
    rows: list[tuple]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NOT_MEASURED
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def _query(con, sql: str) -> Table:
    cur = con.execute(sql)
    return Table([d[0] for d in cur.description], cur.fetchall())


def _strategy_colors(strategies: list[str]) -> dict[str, str]:
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(sorted(strategies))}


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: {NOT_MEASURED}", ha="center", va="center", transform=ax.transAxes,
            fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: Figure, figdir: Path, name: str) -> list[Path]:
    """`<name>.png` and `<name>.svg` under `figdir`, each written atomically."""
    paths = []
    for fmt in ("png", "svg"):
        path = figdir / f"{name}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {"Software": None}
        _atomic_write(path, lambda tmp, fmt=fmt, meta=meta: fig.savefig(tmp, format=fmt, dpi=120, metadata=meta))
        paths.append(path)
        fig.set_layout_engine("none")  # the SVG keeps the PNG's layout: computing it again doubled the time
    return paths


# ------------------------------------------------------------------ figures


def loss_figure(con) -> tuple[Figure, Table]:
    # At most ~1,000 points per run (means over buckets of steps): a paper-length run has 50,000.
    curves = con.execute("""
        WITH c AS (SELECT strategy, seed, step, loss FROM loss_curve WHERE experiment = 'train' AND loss IS NOT NULL),
        w AS (SELECT strategy, seed, greatest(1, CAST(ceil((max(step) + 1) / 1000) AS BIGINT)) AS width
              FROM c GROUP BY ALL)
        SELECT strategy, seed, min(step), avg(loss) FROM c JOIN w USING (strategy, seed)
        GROUP BY strategy, seed, step // width ORDER BY 1, 2, 3""").fetchall()
    evals = con.execute("SELECT r.strategy, r.seed, e.step, e.val_loss FROM eval e JOIN runs r USING (run_id) "
                    "WHERE e.val_loss IS NOT NULL ORDER BY 1, 2, 3").fetchall()
    table = _query(con, "SELECT strategy, seed, steps, final_step, final_loss, final_val_loss, final_val_ppl "
                        "FROM run_summary ORDER BY strategy, seed")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if not curves:
        _no_data(ax, "training loss")
    else:
        colors = _strategy_colors(sorted({c[0] for c in curves}))
        labelled: set[str] = set()
        evals_of = {key: list(rows) for key, rows in itertools.groupby(evals, key=lambda e: (e[0], e[1]))}
        for (strategy, seed), rows in itertools.groupby(curves, key=lambda c: (c[0], c[1])):
            pts = list(rows)
            ax.plot([p[2] for p in pts], [p[3] for p in pts], color=colors[strategy], lw=1, alpha=0.8,
                    label=strategy if strategy not in labelled else None)
            labelled.add(strategy)
            val = [(e[2], e[3]) for e in evals_of.get((strategy, seed), [])]
            if val:
                ax.plot([v[0] for v in val], [v[1] for v in val], "o", color=colors[strategy], ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (lines), validation loss (dots)")
        ax.legend(title="strategy")
        ax.grid(alpha=0.3)
    ax.set_title("Loss by strategy (one line per seed)")
    return fig, table


def throughput_figure(con) -> tuple[Figure, Table]:
    table = _query(con, """
        SELECT strategy, any_value(world_size) AS world_size, count(*) AS runs,
               count(tokens_per_s) AS runs_measured,
               avg(tokens_per_s) AS tokens_per_s_mean, min(tokens_per_s) AS tokens_per_s_min,
               max(tokens_per_s) AS tokens_per_s_max, avg(step_time_s) AS step_time_s_mean
        FROM run_summary GROUP BY strategy ORDER BY strategy""")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if not table.rows:
        _no_data(ax, "training throughput")
    else:
        names = [r[0] for r in table.rows]
        means = [r[4] for r in table.rows]
        colors = _strategy_colors(names)
        xs = range(len(names))
        heights = [m if m is not None else 0.0 for m in means]
        lo = [m - r[5] if m is not None else 0.0 for m, r in zip(means, table.rows)]
        hi = [r[6] - m if m is not None else 0.0 for m, r in zip(means, table.rows)]
        bars = ax.bar(xs, heights, color=[colors[n] for n in names], yerr=[lo, hi], capsize=4)
        for x, m, bar in zip(xs, means, bars):
            if m is None:  # no bar of height zero pretending to be a measurement
                bar.set_visible(False)
                ax.text(x, 0, NOT_MEASURED, ha="center", va="bottom", rotation=90, color="0.4")
        ax.set_xticks(list(xs), [f"{n}\n(W={r[1]})" for n, r in zip(names, table.rows)])
        ax.set_ylabel("tokens/s (rank 0, after warm-up)")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("Training throughput by strategy (mean over seeds; bars: min-max)")
    return fig, table


def tpot_figure(con) -> tuple[Figure, Table]:
    data = con.execute("SELECT strategy, context_len, avg(tpot_ms) FROM tpot_by_context "
                   "GROUP BY ALL ORDER BY 1, 2").fetchall()
    strategies = sorted({d[0] for d in data})
    contexts = sorted({d[1] for d in data})
    by = {(d[0], d[1]): d[2] for d in data}
    table = Table(["strategy"] + [f"TPOT ms @ {c}" for c in contexts],
                  [tuple([s] + [by.get((s, c)) for c in contexts]) for s in strategies])
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    measured = [d for d in data if d[2] is not None]
    if not measured:
        _no_data(ax, "TPOT")
    else:
        colors = _strategy_colors(strategies)
        for s in strategies:
            pts = [(c, by[(s, c)]) for c in contexts if by.get((s, c)) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[s], label=s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("TPOT (ms/token, rank 0, median)")
        ax.legend(title="strategy")
        ax.grid(alpha=0.3)
    ax.set_title("Time per output token by context length")
    return fig, table


# ------------------------------------------------------------------ HTML


def _html_table(t: Table) -> str:
    if not t.rows:
        return f"<p class='nm'>No rows: {NOT_MEASURED}.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)

    def cell(column: str, v) -> str:
        if v is None and column in NOT_APPLICABLE:
            return f"<td>{NOT_APPLICABLE[column]}</td>"
        return f"<td class='{'nm' if _fmt(v) == NOT_MEASURED else ''}'>{html.escape(_fmt(v))}</td>"

    body = "".join("<tr>" + "".join(cell(c, v) for c, v in zip(t.columns, row)) + "</tr>" for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>masep report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 2em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.nm {{ color: #888; font-style: italic; }}
td.nm {{ text-align: left; min-width: 12em; }}
img {{ max-width: 100%; }}
.src {{ font-size: 0.85em; color: #444; }}
.warn {{ background: #fff4d6; padding: 0.3em 0.6em; }}
</style></head><body>
<h1>masep: MoE training and inference by parallel strategy</h1>
<p>From <code>{db}</code>: {n_train} training run(s), {n_infer} inference run(s).
Values the database does not hold are shown as <span class="nm">{nm}</span>.</p>
{study}
{sections}
<h2>Runs</h2>
{runs}
{bench}
</body></html>
"""

CAPTIONS = {
    "loss_curves": ("Loss curves", "Training loss per step (mean over the ranks that report it) and "
                    "validation loss, per strategy and seed."),
    "throughput": ("Throughput", "Tokens of rank 0's steps after warm-up (the first 10% of steps) "
                   "over their time, averaged over seeds: table1_performance's throughput. On CPU "
                   "ranks it shows the pipeline at work, not the paper's 16-GPU comparison."),
    "tpot": ("Inference: time per output token", "Median TPOT on rank 0 per context length."),
}


BENCH_TITLE = "GPU benchmark (committed results)"

def bench_section(bench: str | Path | None) -> str:
    """One table per benchmark run folder under `bench` (by run id), with its date, device,
    torch version and git commit; "not measured" without runs."""
    runs = []
    if bench is not None:
        from masep.bench.table import build, find_runs  # imports torch: only where there are runs to read

        try:
            runs = find_runs(Path(bench))
        except (OSError, ValueError) as e:
            raise ReportError(f"--bench: cannot read {bench}: {e}") from e
    parts = [f"<h2>{html.escape(BENCH_TITLE)}</h2>"]
    if not runs:
        where = f" in <code>{html.escape(str(bench))}</code>" if bench is not None else ""
        parts.append(f"<p class='nm'>No benchmark run{where}: {NOT_MEASURED}.</p>")
        return "\n".join(parts)
    parts.append("<p>Run folders written by <code>python -m masep.bench</code> (under torchrun, on synthetic "
                 "batches), one table per run; <code>masep collect --runs</code> loads the same folders.</p>")
    for run in runs:
        try:
            t = build([run])
        except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            raise ReportError(f"--bench: {run['run_id']}: a broken benchmark run ({type(e).__name__}: {e})") from e
        parts.append(f"<h3>{html.escape(run['run_id'])}</h3>\n<p>{html.escape(t.header)}</p>")
        parts.append(_html_table(Table(t.columns, [tuple(r) for r in t.rows])))
        if t.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(parts)


from masep.report.sections import SECTIONS  # noqa: E402  (uses the helpers above)


def render(db: str | Path, out: str | Path, bench: str | Path | None = None) -> list[Path]:
    db, out = Path(db), Path(out)
    if not db.exists():
        raise ReportError(f"--db: no database at {db}; build it with `masep collect`")
    if bench is not None and not Path(bench).is_dir():
        raise ReportError(f"--bench: {bench} is not a folder")
    bench_html = bench_section(bench)
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as e:
        raise ReportError(f"cannot open {db}: {str(e).splitlines()[0]}") from e
    con.execute("SET enable_progress_bar = false")  # a slow view must not print bars into the job log
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = []
    with con:
        try:
            figures = {"loss_curves": loss_figure(con), "throughput": throughput_figure(con),
                       "tpot": tpot_figure(con)}
            study_sections = [(name, sec.render(con, figdir)) for name, sec in SECTIONS.items()]
            runs = _query(con, "SELECT run_dir, experiment, strategy, seed, world_size, status, host, "
                               "git_commit, slurm_job_id FROM runs ORDER BY run_dir")
            n_train, n_infer = con.execute("SELECT count(*) FILTER (WHERE experiment = 'train'), "
                                       "count(*) FILTER (WHERE experiment = 'infer') FROM runs").fetchone()
        except duckdb.Error as e:
            raise ReportError(f"{db}: {str(e).splitlines()[0]} (rebuild it with `masep collect`)") from e
    for name, (fig, table) in figures.items():
        written += save_figure(fig, figdir, name)
        title, caption = CAPTIONS[name]
        points = sum(isinstance(v, float) for row in table.rows for v in row[1:])
        sections.append(f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(caption)}</p>\n"
                        f"<img src='figures/{name}.svg' alt='{html.escape(title)}' data-points='{points}'>\n"
                        f"<p><a href='figures/{name}.png'>PNG</a> · <a href='figures/{name}.svg'>SVG</a></p>\n"
                        f"{_html_table(table)}")
    for name, (body, files) in study_sections:
        written += files
    page = PAGE.format(db=html.escape(str(db)), n_train=n_train, n_infer=n_infer, nm=NOT_MEASURED,
                       study="\n".join(body for _, (body, _) in study_sections),
                       sections="\n".join(sections), runs=_html_table(runs), bench=bench_html)
    index = out / "index.html"
    _atomic_write(index, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    written.append(index)
    return written
