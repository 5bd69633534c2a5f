"""The report's study sections, one per subject, each built from the paper-shaped views
(masep/results/sql/63_paper_tables.sql and later): every row of the paper beside our
measurement and their ratio, or "not measured here: <reason>" where the database holds NULL;
a figure (SVG and PNG under figures/, always written: masep.report.FIGURES; the page shows it
where something was measured); the runs a section used,
their data source, and a warning where they ran on CPU ranks (not comparable with the paper's
16-GPU figures).

A section whose view is absent (an older database, or an experiment this study did not run)
says so instead of failing: Robustness without a `faults` table, Balancing without
`balance_events`.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from masep.report.render import NOT_MEASURED, Table, _fmt, _html_table, _no_data, _query, _strategy_colors, save_figure

NOT_HERE = "not measured here"
EFFICIENCY_THRESHOLD_PCT = 80.0
SOURCES = {"sample": "the embedded C4 sample (data.source=sample)", "local": "C4 shards from a local folder",
           "hub": "C4 from the Hugging Face Hub"}


def _exists(con, name: str) -> bool:
    return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0] > 0


def _rows(con, sql: str, params=None) -> list[dict]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


# ------------------------------------------------------------------ shared pieces


def provenance(con, metrics: list[str], experiments: tuple[str, ...] | None = None) -> str:
    """Which runs measured `metrics` (a value, not NULL), their data source, and the CPU warning."""
    runs = _rows(con, """
        SELECT DISTINCT ri.run_dir, ri.on_gpu, r.config ->> '$.data.source' AS source, r.config ->> '$.name' AS model
        FROM run_values v JOIN run_info ri USING (run_id) JOIN runs r USING (run_id)
        WHERE v.value IS NOT NULL AND list_contains(?, v.metric)
          AND (? IS NULL OR list_contains(?, ri.experiment))
        ORDER BY 1""", [metrics, list(experiments) if experiments else None, list(experiments or [])])
    if not runs:
        return f"<p class='src'>Runs used: none ({NOT_HERE}: no run of this database measured these figures).</p>"
    names = ", ".join(f"<code>{html.escape(r['run_dir'] or '?')}</code>" for r in runs)
    sources = sorted({SOURCES.get(r["source"], f"data.source={r['source']}") for r in runs})
    parts = [f"<p class='src'>Runs used ({len(runs)}): {names}. Data: {html.escape('; '.join(sources))}.</p>"]
    cpu = sorted({r["model"] or "?" for r in runs if not r["on_gpu"]})
    if cpu:
        parts.append(f"<p class='warn'>Measured on CPU ranks (model preset {html.escape(', '.join(cpu))}): "
                     "not comparable with the paper's 16-GPU numbers; a ratio says how far apart the two are, "
                     "not which strategy is better.</p>")
    return "\n".join(parts)


def _blank(v):
    """A coordinate the row does not have is empty, not "not measured"."""
    return "" if v is None else v


def claims_html(rows: list[dict]) -> str:
    """The paper's rows beside ours: measured, or the reason it is not."""
    out = []
    for r in rows:
        ours = _fmt(r["measured"]) if r["measured"] is not None else f"{NOT_HERE}: {r['reason'] or 'no value'}"
        ratio = (_fmt(r["ratio"], 3) if r["ratio"] is not None
                 else "no paper claim" if r["paper_claim"] is None else NOT_MEASURED)
        out.append((r["metric"], r["strategy"], _blank(r["world_size"]), _blank(r["x"]), r["unit"], r["paper_label"] or "",
                    r["paper_claim"] if r["paper_claim"] is not None else "", ours, ratio, r["runs"]))
    table = _html_table(Table(["metric", "strategy", "GPUs (ours)", "x", "unit", "paper's label", "paper",
                               "ours", "ours / paper", "runs"], out))
    return table.replace("<td class=''>not measured here", "<td class='nm'>not measured here")


def claims_figure(rows: list[dict], title: str) -> tuple[Figure, int]:
    """One panel per metric: our mean (largest world size) beside the paper's claim, per
    strategy (and x); log scale where the two differ by orders of magnitude."""
    metrics = [m for m in dict.fromkeys(r["metric"] for r in rows)
               if any(r["measured"] is not None for r in rows if r["metric"] == m)][:9]
    n = len(metrics)
    cols = min(3, max(n, 1))
    fig = Figure(figsize=(3.6 * cols, 2.9 * max(1, -(-n // cols))), layout="constrained")
    if not metrics:
        fig.set_size_inches(7.2, 2.9)  # room for the section's title in one line
        _no_data(fig.add_subplot(), title)
        return fig, 0
    colors = _strategy_colors(sorted({r["strategy"] for r in rows if r["strategy"]}))
    points = 0
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(-(-n // cols), cols, i + 1)
        cats: dict[tuple, dict] = {}
        for r in rows:  # largest world size last: it wins
            if r["metric"] == metric and (r["measured"] is not None or r["paper_claim"] is not None):
                key = (r["strategy"], r["x"])
                prev = cats.get(key, {})
                if r["measured"] is not None or "measured" not in prev:
                    cats[key] = {**prev, "measured": r["measured"] if r["measured"] is not None else prev.get("measured"),
                                 "paper": r["paper_claim"] if r["paper_claim"] is not None else prev.get("paper")}
        labels = [f"{s}" + (f"\n{x}" if x is not None else "") for s, x in cats]
        xs = range(len(cats))
        ours = [c.get("measured") for c in cats.values()]
        paper = [c.get("paper") for c in cats.values()]
        ax.bar([x - 0.2 for x in xs], [v or 0 for v in ours], 0.4, label="ours",
               color=[colors.get(s, "C0") for s, _ in cats])
        ax.bar([x + 0.2 for x in xs], [v or 0 for v in paper], 0.4, label="paper", color="white",
               edgecolor="0.3", hatch="//")
        points += sum(v is not None for v in ours)
        vals = [abs(v) for v in ours + paper if v]
        if vals and min(v for v in ours + paper if v is not None) > 0 and max(vals) / min(vals) > 100:
            ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=7)
        unit = next((r["unit"] for r in rows if r["metric"] == metric and r["unit"]), "")
        ax.set_title(f"{metric} ({unit})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title + " (ours: solid; paper: hatched)", fontsize=10)
    return fig, points


def img_html(name: str, title: str, points: int) -> str:
    return (f"<img src='figures/{name}.svg' alt='{html.escape(title)}' data-points='{points}'>\n"
            f"<p><a href='figures/{name}.png'>PNG</a> · <a href='figures/{name}.svg'>SVG</a></p>")


# ------------------------------------------------------------------ sections


@dataclass
class Section:
    key: str
    title: str
    intro: str
    view: str | None = None  # a beside_claims view
    experiments: tuple[str, ...] | None = None

    def claim_rows(self, con) -> list[dict]:
        return _rows(con, f"SELECT * FROM {self.view}") if self.view and _exists(con, self.view) else []

    def extra(self, con, figdir: Path, rows: list[dict]) -> tuple[str, list[Path]]:
        return "", []

    def figure(self, con, rows: list[dict]) -> tuple[Figure, int] | None:
        return claims_figure(rows, self.title)

    def metrics(self, con, rows: list[dict]) -> list[str]:
        return sorted({r["metric"] for r in rows if r["metric"]})

    def render(self, con, figdir: Path) -> tuple[str, list[Path]]:
        rows = self.claim_rows(con)
        parts = [f"<section id='{self.key}'>", f"<h2>{html.escape(self.title)}</h2>", f"<p>{self.intro}</p>"]
        written: list[Path] = []
        fig = self.figure(con, rows)
        if fig is not None:
            fig, points = fig
            written += save_figure(fig, figdir, self.key)
            parts.append(img_html(self.key, self.title, points) if points
                         else f"<p class='nm'>No figure: {NOT_HERE} (no measured value).</p>")
        if self.view:
            parts.append(claims_html(rows) if rows or _exists(con, self.view)
                         else f"<p class='nm'>{NOT_HERE}: the database has no view {self.view} (rebuild it with "
                              "<code>masep collect</code>).</p>")
        more, files = self.extra(con, figdir, rows)
        parts.append(more)
        written += files
        parts.append(provenance(con, self.metrics(con, rows), self.experiments))
        parts.append("</section>")
        return "\n".join(p for p in parts if p), written


class PerformanceSection(Section):
    def extra(self, con, figdir, rows):
        """The committed peer benchmark (table peer_benchmark), one table per file."""
        parts = ["<h3>Beside a peer on one GPU (table peer_benchmark)</h3>"]
        files = _rows(con, "SELECT source, any_value(device) AS device, any_value(versions) AS versions, "
                           "any_value(git_commit) AS git_commit, any_value(peak_tflops) AS peak_tflops, "
                           "any_value(peak_source) AS peak_source, any_value(measured_at) AS measured_at, "
                           "any_value(command) AS command, list(DISTINCT implementation ORDER BY implementation) "
                           "FILTER (WHERE implementation <> 'masep') AS peers "
                           "FROM peer_benchmark GROUP BY source ORDER BY source") \
            if _exists(con, "peer_benchmark") else []
        if not files:
            return (parts[0] + f"\n<p class='nm'>No peer benchmark loaded: {NOT_MEASURED} (<code>masep collect "
                    "--peer bench/peer-*.json</code> loads scripts/bench_peer.py's results).</p>"), []
        for f in files:
            v = json.loads(f["versions"] or "{}")
            peers = ", ".join(f"{p} {v.get(p)}" for p in f["peers"] or [])
            parts.append(f"<p>{html.escape(f['source'])}: {html.escape(f['device'] or '?')}, torch "
                         f"{html.escape(str(v.get('torch')))}, CUDA {html.escape(str(v.get('cuda')))}, "
                         f"{html.escape(peers)}; masep {html.escape(f['git_commit'] or '?')}; measured "
                         f"{f['measured_at']}; MFU over {_fmt(f['peak_tflops'])} TFLOP/s "
                         f"({html.escape(f['peak_source'] or '?')}). Command: "
                         f"<code>{html.escape(f['command'] or '?')}</code></p>")
            quoted = f["source"].replace("'", "''")
            parts.append(_html_table(_query(
                con, "SELECT workload, implementation, CAST(round(tokens_per_s) AS BIGINT) AS \"tokens/s\", "
                     "median_s * 1e3 AS median_ms, mfu * 100 AS mfu_pct, peak_mem_gib, "
                     "masep_over_peer AS \"masep / peer (tokens/s)\", note, reason "
                     f"FROM peer_benchmark WHERE source = '{quoted}'")))
        return "\n".join(parts), []


class MemorySection(Section):
    def extra(self, con, figdir, rows):
        t = _query(con, "SELECT strategy, seed, rank, role, params_gb, grads_gb, optimizer_gb, activations_gb, "
                        "peak_gb, peak_method FROM memory_by_rank ORDER BY strategy_order(strategy), strategy, seed, run_id, rank")
        return "<h3>Per rank and role</h3>\n" + _html_table(t), []


class InferenceSection(Section):
    def figure(self, con, rows):
        stats = _rows(con, "SELECT strategy, world_size, x, n, mean, ci_low, ci_high FROM repeat_stats "
                           "WHERE metric = 'tpot_ms' AND n > 0 AND experiment = 'infer' ORDER BY strategy, x, world_size")
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
        if not stats:
            _no_data(ax, "TPOT")
            return fig, 0
        colors = _strategy_colors(sorted({s["strategy"] for s in stats} | {r["strategy"] for r in rows}))
        for s in sorted({s["strategy"] for s in stats}):
            pts = [p for p in stats if p["strategy"] == s]
            lo = [p["mean"] - p["ci_low"] if p["ci_low"] is not None else 0 for p in pts]
            hi = [p["ci_high"] - p["mean"] if p["ci_high"] is not None else 0 for p in pts]
            ax.errorbar([p["x"] for p in pts], [p["mean"] for p in pts], yerr=[lo, hi], fmt="o-", capsize=3,
                        color=colors[s], label=f"{s} (ours, n={min(p['n'] for p in pts)})")
        for s in sorted({r["strategy"] for r in rows if r["metric"] == "tpot_ms" and r["paper_claim"] is not None}):
            pts = sorted({(r["x"], r["paper_claim"]) for r in rows if r["strategy"] == s and r["metric"] == "tpot_ms"
                          and r["paper_claim"] is not None and r["x"] is not None})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=colors[s], alpha=0.7, label=f"{s} (paper)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("TPOT (ms/token)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        ax.set_title("TPOT: ours (mean, 95% CI) solid; paper's Table 4 dashed")
        return fig, len(stats)

    def extra(self, con, figdir, rows):
        t = _query(con, "SELECT strategy, world_size AS gpus, metric, x AS context, n, seeds, mean, ci_low, ci_high, "
                        "paper_mean, paper_ci_low, paper_ci_high, paper_n, reason FROM repeat_stats "
                        "WHERE metric IN ('tpot_ms', 'tpot_reduction_pct') AND (experiment = 'infer' OR experiment IS NULL) "
                        "ORDER BY metric, strategy_order(strategy), strategy, gpus, context")
        return "<h3>Repeats and 95% confidence intervals</h3>\n" + _html_table(t), []


class ScalingSection(Section):
    def claim_rows(self, con):
        return _rows(con, "SELECT * FROM scaling") if _exists(con, "scaling") else []

    def metrics(self, con, rows):
        return ["throughput_tok_s"]

    def cost_rows(self, con):
        return _rows(con, "SELECT * FROM cost_model ORDER BY model DESC, hardware, strategy, gpus, run_id") \
            if _exists(con, "cost_model") else []

    def figure(self, con, rows):
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        measured = [r for r in rows if r["speedup"] is not None]
        if not measured:
            _no_data(ax1, "scaling")
            return fig, 0
        strategies = sorted({r["strategy"] for r in rows})
        colors = _strategy_colors(strategies)
        for s in strategies:
            ours = [r for r in measured if r["strategy"] == s]
            paper = [r for r in rows if r["strategy"] == s and r["paper_speedup"] is not None]
            for ax, col, pcol in ((ax1, "speedup", "paper_speedup"), (ax2, "efficiency_pct", "paper_efficiency_pct")):
                if ours:
                    ax.plot([r["gpus"] for r in ours], [r[col] for r in ours], "o-", color=colors[s],
                            label=f"{s} (measured)")
                pp = [r for r in paper if r[pcol] is not None]
                if pp:
                    ax.plot([r["gpus"] for r in pp], [r[pcol] for r in pp], "s--", color=colors[s], alpha=0.6,
                            label=f"{s} (paper)")
        for ax, label in ((ax1, "speedup over the strategy's smallest size"), (ax2, "scaling efficiency (%)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("GPUs / ranks")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        ax2.axhline(EFFICIENCY_THRESHOLD_PCT, color="0.5", lw=0.8, ls=":")
        ax1.legend(fontsize=6, ncol=2)
        fig.suptitle("Scaling: measured (solid) and the paper's Section 5.2 series (dashed)", fontsize=10)
        return fig, len(measured)

    def extra(self, con, figdir, rows):
        parts = [self.findings(rows)]
        written: list[Path] = []
        cost = self.cost_rows(con)
        fig, points = cost_figure(cost)
        written += save_figure(fig, figdir, "cost_model")
        if cost:
            if points:
                parts.append("<h3>Cost model</h3>\n<p>Predicted step time (compute + alpha-beta communication - "
                             "overlap; <code>masep/results/sql/64_cost_model.sql</code>) beside the measured one where both "
                             "exist; beyond the machines we ran on, predicted only.</p>")
                parts.append(img_html("cost_model", "cost model", points))
            parts.append(self.cost_error(cost))
            parts.append(_html_table(Table(list(cost[0]), [tuple(r.values()) for r in cost])))
        else:
            parts.append(f"<p class='nm'>Cost model: {NOT_HERE} (the database has no cost_model view).</p>")
        return "\n".join(parts), written

    @staticmethod
    def cost_error(cost: list[dict]) -> str:
        """The model's error on the runs it was fitted on, per hardware (error_pct of cost_model)."""
        items = []
        for hw in sorted({r["hardware"] for r in cost if r["error_pct"] is not None}):
            errs = [abs(r["error_pct"]) for r in cost if r["hardware"] == hw and r["error_pct"] is not None]
            items.append(f"{hw}: mean |error| {sum(errs) / len(errs):.1f}% over {len(errs)} measured run(s), "
                         f"largest {max(errs):.1f}%")
        return ("<p>Cost model error on measured runs (predicted vs measured step time): "
                + html.escape("; ".join(items) or f"{NOT_HERE}: no measured run in the model") + ".</p>")

    @staticmethod
    def findings(rows: list[dict]) -> str:
        items = []
        for s in dict.fromkeys(r["strategy"] for r in rows):
            ours = [r for r in rows if r["strategy"] == s and r["efficiency_pct"] is not None]
            if not ours:
                continue
            below = [r["gpus"] for r in ours if r["efficiency_pct"] < EFFICIENCY_THRESHOLD_PCT]
            items.append(f"{s}: measured at {', '.join(str(r['gpus']) for r in ours)} ranks; efficiency "
                         + (f"first below {EFFICIENCY_THRESHOLD_PCT:.0f}% at {below[0]} ranks" if below
                            else f"stays at or above {EFFICIENCY_THRESHOLD_PCT:.0f}%"))
        tput = {(r["strategy"], r["gpus"]): r["throughput_tok_s"] for r in rows if r["throughput_tok_s"] is not None}
        even = sorted(g for (s, g), v in tput.items() if s == "ma_sep" and all(
            v >= w for (s2, g2), w in tput.items() if g2 == g and s2 not in ("ma_sep", "single")))
        items.append("break-even (ma_sep's throughput at least every other multi-rank strategy's at the same size): "
                     + (f"from {even[0]} ranks" if even else f"{NOT_HERE}: ma_sep never reaches it in these runs"))
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"

    def render(self, con, figdir):
        body, files = super().render(con, figdir)
        table = _query(con, "SELECT strategy, gpus, runs, throughput_tok_s, base_gpus, speedup, paper_speedup, "
                            "efficiency_pct, paper_efficiency_pct, reason FROM scaling") \
            if _exists(con, "scaling") else Table([], [])
        return body.replace("</section>", _html_table(table) + "\n</section>"), files


def cost_figure(cost: list[dict]) -> tuple[Figure, int]:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    if not cost:
        _no_data(fig.add_subplot(), "cost model")
        return fig, 0
    hardware = sorted({r["hardware"] for r in cost})
    axes = fig.subplots(1, len(hardware), squeeze=False)[0]
    colors = _strategy_colors(sorted({r["strategy"] for r in cost}))
    points = 0
    for ax, hw in zip(axes, hardware):
        for s in sorted({r["strategy"] for r in cost if r["hardware"] == hw}):
            pts = [r for r in cost if r["hardware"] == hw and r["strategy"] == s]
            pred = [r for r in pts if r["predicted_step_s"] is not None]
            meas = [r for r in pts if r["measured_step_s"] is not None]
            ax.plot([r["gpus"] for r in pred], [r["predicted_step_s"] for r in pred], ":", marker="x",
                    color=colors[s], label=f"{s} predicted")
            if meas:
                ax.plot([r["gpus"] for r in meas], [r["measured_step_s"] for r in meas], "o", color=colors[s],
                        label=f"{s} measured")
            points += len(pred)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(hw, fontsize=9)
        ax.set_xlabel("GPUs / ranks")
        ax.set_ylabel("step time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Cost model: predicted (dotted, x) and measured (dots)", fontsize=10)
    return fig, points


class EnergySection(Section):
    def extra(self, con, figdir, rows):
        t = _query(con, "SELECT strategy, seed, rank, host, windows, tokens, window_s, gpu_energy_per_token_mj, "
                        "power_mean_w, cpu_energy_j, coalesce(gpu_reason, energy_reason) AS gpu_reason, "
                        "cpu_energy_reason FROM energy_by_rank ORDER BY strategy_order(strategy), strategy, seed, run_id, rank")
        return "<h3>Per rank</h3>\n" + _html_table(t), []


class ExpertSection(Section):
    def figure(self, con, rows):
        data = _rows(con, "SELECT strategy, world_size, expert_id, share_pct, paper_share_pct FROM expert_utilization "
                          "WHERE layer IS NULL ORDER BY strategy, world_size NULLS FIRST, expert_id")
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
        ours = [d for d in data if d["share_pct"] is not None]
        if not ours:
            _no_data(ax, "expert utilisation")
            return fig, 0
        colors = _strategy_colors(sorted({d["strategy"] for d in data}))
        for s in sorted({d["strategy"] for d in ours}):
            ws = max(d["world_size"] for d in ours if d["strategy"] == s)
            pts = [d for d in ours if d["strategy"] == s and d["world_size"] == ws]
            ax.plot([d["expert_id"] for d in pts], [d["share_pct"] for d in pts], "o-", ms=3, color=colors[s],
                    label=f"{s} (W={ws})")
        paper = [d for d in data if d["paper_share_pct"] is not None]
        for s in sorted({d["strategy"] for d in paper}):
            pts = [d for d in paper if d["strategy"] == s]
            ax.plot([d["expert_id"] for d in pts], [d["paper_share_pct"] for d in pts], "s--", color=colors[s],
                    alpha=0.6, label=f"{s} (paper)")
        ax.set_xlabel("expert id (from 1, as the paper counts)")
        ax.set_ylabel("share of routed tokens (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.set_title("Expert utilisation over all layers: ours solid, paper's Section 5.4 dashed")
        return fig, len(ours)

    def render(self, con, figdir):
        body, files = super().render(con, figdir)
        fig, points = claims_figure(self.claim_rows(con), self.title)
        files += save_figure(fig, figdir, f"{self.key}_metrics")
        if points:
            body = body.replace("</section>", img_html(f"{self.key}_metrics", self.title, points) + "\n</section>")
        return body, files


class StatisticsSection(Section):
    def figure(self, con, rows):
        return None

    def metrics(self, con, rows):
        return [r[0] for r in con.execute("SELECT DISTINCT metric FROM repeat_stats WHERE n >= 2").fetchall()]

    def extra(self, con, figdir, rows):
        t = _query(con, "SELECT experiment, strategy, world_size AS gpus, metric, x, n, configs, mean, std, ci_low, "
                        "ci_high, paper_mean, paper_ci_low, paper_ci_high, paper_n, reason FROM repeat_stats "
                        "WHERE n >= 2 OR paper_n IS NOT NULL OR paper_mean IS NOT NULL "
                        "ORDER BY experiment NULLS LAST, strategy_order(strategy), strategy, gpus, metric, x")
        return ("<p>Rows with at least two repeats, or a paper statistic. Interval: mean ± t(0.975, n-1) × std / "
                "√n. <code>configs</code> &gt; 1 means runs of different configurations were pooled.</p>\n"
                + _html_table(t)), []


def _or_reason(v, reason: str, digits: int = 4) -> str:
    return _fmt(v, digits) if v is not None else f"{NOT_HERE}: {reason}"


def _reason_table(columns: list[str], rows: list[tuple]) -> str:
    return _html_table(Table(columns, rows)).replace("<td class=''>not measured here",
                                                     "<td class='nm'>not measured here")


class RobustnessSection(Section):
    """Fault trials (view robustness): recovery time p50/p95 per strategy and fault kind beside the
    paper's 2.3 s / 8.7 s, the expert-failure success rate beside its 99.2%, and the degradation
    curve (throughput against failed attention ranks, view robustness_degradation) as a figure."""

    def figure(self, con, rows):
        return None

    def extra(self, con, figdir, rows):
        claims = _query(con, "SELECT paper_label, strategy, value AS paper, unit, not_measured AS reason "
                             "FROM paper_claims WHERE source = 'Section 5.9' ORDER BY ord")
        paper = "\n<h3>The paper's Section 5.9</h3>\n" + _html_table(claims)
        trials = con.execute("SELECT count(*) FROM faults").fetchone()[0] if _exists(con, "faults") else 0
        if not trials:
            return (f"<p class='nm'>{NOT_HERE}: no fault trials in this database (the <code>faults</code> table "
                    "has no rows: run <code>snakemake faults_all</code>, then collect).</p>" + paper), []
        stats = _rows(con, "SELECT * FROM robustness ORDER BY strategy_order(strategy), strategy, kind, recovery_mode")
        no_step = "no step or token completed after the fault"
        recovery = [(r["strategy"], r["kind"], r["recovery_mode"] or f"{NOT_HERE}: not injected", r["trials"],
                     r["correct_trials"], _or_reason(r["detection_p50_s"], "no restart (the job was not found lost)", 3),
                     _or_reason(r["recovery_p50_s"], no_step, 3), _or_reason(r["recovery_p95_s"], no_step, 3),
                     _or_reason(r["paper_recovery_s"], "no paper claim (a checkpoint-write fault)"))
                    for r in stats]
        parts = ["<h3>Recovery time per strategy and fault kind (the paper: 2.3 s for MA Separation, 8.7 s "
                 "for its baseline)</h3>",
                 _reason_table(["strategy", "fault kind", "recovery", "trials", "correct", "detection p50 (s)",
                                "recovery p50 (s)", "recovery p95 (s)", "paper (s)"], recovery)]
        expert = [r for r in stats if r["paper_success_pct"] is not None]
        parts.append("<h3>Expert failure: trials that completed correctly (the paper: 99.2%)</h3>")
        parts.append(_reason_table(
            ["strategy", "fault kind", "trials", "correct", "success (%)", "paper (%)", "requests retried",
             "requests lost"],
            [(r["strategy"], r["kind"], r["trials"], r["correct_trials"], _fmt(r["success_pct"], 3),
              r["paper_success_pct"],
              _or_reason(r["requests_retried"], "a training trial (no requests)"),
              _or_reason(r["requests_lost"], "a training trial (no requests)")) for r in expert])
            if expert else f"<p class='nm'>{NOT_HERE}: no kill_moe or kill_moe_decode trial in this database.</p>")
        curve = _rows(con, "SELECT * FROM robustness_degradation")
        parts.append("<h3>Degradation: throughput against failed attention ranks</h3>")
        written: list[Path] = []
        if curve:
            written = save_figure(degradation_figure(curve), figdir, "robustness_degradation")
            parts.append(img_html("robustness_degradation", "degradation curve", len(curve)))
            parts.append(_reason_table(
                ["strategy", "failed ranks", "points", "throughput (tok/s)", "slope (tok/s per rank)", "R^2"],
                [(r["strategy"], r["failed_ranks"], r["points"], r["throughput_tok_s"], r["slope_tok_s_per_rank"],
                  _or_reason(r["r2"], "one distinct failed-rank count (no line to fit)")) for r in curve]))
        else:
            parts.append(f"<p class='nm'>{NOT_HERE}: no kill_attention or kill_attention_k trial with throughput "
                         "before and after the fault.</p>")
        parts.append("<h3>Every trial (table faults)</h3>\n" + _html_table(
            _query(con, "SELECT * FROM faults ORDER BY strategy, kind, run_id LIMIT 200")))
        return "\n".join(parts) + paper, written

    def metrics(self, con, rows):
        return []


def degradation_figure(curve: list[dict]) -> Figure:
    """Mean throughput per failed-rank count and each strategy's least-squares line with its R^2."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _strategy_colors(sorted({r["strategy"] for r in curve}))
    for s in sorted({r["strategy"] for r in curve}):
        pts = [r for r in curve if r["strategy"] == s]
        xs = [r["failed_ranks"] for r in pts]
        ax.plot(xs, [r["throughput_tok_s"] for r in pts], "o", color=colors[s], label=f"{s} (mean of trials)")
        fit = pts[0]
        if fit["slope_tok_s_per_rank"] is not None:
            line = [0, max(xs)]
            r2 = "" if fit["r2"] is None else f", R^2 = {fit['r2']:.3f}"
            ax.plot(line, [fit["intercept_tok_s"] + fit["slope_tok_s_per_rank"] * x for x in line], "--",
                    color=colors[s], label=f"{s} fit: {fit['slope_tok_s_per_rank']:.1f} tok/s per rank{r2}")
    ax.set_xlabel("failed attention ranks")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_xticks(sorted({r["failed_ranks"] for r in curve}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Degradation with failures (the paper: linear)")
    return fig


class BalancingSection(Section):
    def figure(self, con, rows):
        return None

    def extra(self, con, figdir, rows):
        if not _exists(con, "balance_events"):
            return f"<p class='nm'>{NOT_HERE}: no balancing events in this database.</p>", []
        ablation = _query(con, "SELECT variant, experiment, seed, tokens_per_s, step_time_s, grad_sync_s, final_loss, "
                               "sync_points, plans_applied, last_moe_imbalance, migration_ms, first_group_imbalance, "
                               "last_group_imbalance FROM ma_ablation")
        accuracy = _query(con, "SELECT run_id, lever, side, step, ranks, mape_pct FROM predictor_accuracy")
        events = _query(con, "SELECT * FROM balance_events ORDER BY run_id, step LIMIT 200")
        return ("<h3>Plain ma_sep beside its variants (view ma_ablation)</h3>\n" + _html_table(ablation)
                + "\n<h3>Time predictor error on windows it had not trained on (view predictor_accuracy)</h3>\n"
                + _html_table(accuracy) + "\n<h3>Balancing events</h3>\n" + _html_table(events)), []

    def metrics(self, con, rows):
        return []


SECTIONS: dict[str, Section] = {s.key: s for s in [
    PerformanceSection("performance", "Performance (Table 1)",
                       "Training throughput, tokens per second per GPU, utilisation, MFU and TPOT at context 2048, "
                       "beside the paper's Table 1 (16 GPUs); then masep beside a peer implementation on one GPU "
                       "(committed results of scripts/bench_peer.py).", "table1_performance"),
    Section("communication", "Communication (Table 2)",
            "Communication time by kind as a share of step time (sum over ranks and steady steps).",
            "table2_communication"),
    MemorySection("memory", "Memory (Table 3)",
                  "Memory per GPU by component (GB, the largest rank of a run), then per rank and role.",
                  "table3_memory"),
    InferenceSection("inference", "Inference (Table 4)",
                     "Time per output token by context length, mean over repeats with a 95% Student t interval.",
                     "table4_tpot", ("infer", "bench")),
    ScalingSection("scaling", "Scaling (Section 5.2)",
                   "Training throughput, speedup and efficiency against ranks per strategy (speedup relative to "
                   f"the strategy's smallest measured size; the threshold line is {EFFICIENCY_THRESHOLD_PCT:.0f}% "
                   "efficiency), with the paper's 4-32 GPU series and the cost model's prediction."),
    EnergySection("energy", "Energy (Section 5.8)",
                  "Energy per token over steady-state windows (GPU: NVML; CPU: RAPL), power, per rank. "
                  "PUE needs the facility's meter and CO2 the grid's carbon intensity: neither is visible "
                  "from inside a job.", "energy"),
    ExpertSection("load_balance", "Load balance and experts (Section 5.4)",
                  "Spread of execution time across ranks, router losses, dropped assignments, and each "
                  "expert's share of routed tokens.", "load_balance"),
    Section("model_quality", "Model quality (Section 5.5)",
            "Final training and validation loss and perplexity, and time to a common target loss.", "model_quality"),
    StatisticsSection("statistics", "Statistics (Section 5.10)",
                      "n, mean, standard deviation and 95% confidence interval per metric over repeated runs."),
    RobustnessSection("robustness", "Robustness (Section 5.9)", "Recovery from GPU, expert and attention failures."),
    BalancingSection("balancing", "Balancing and 8-bit gradients (Section 4.4)",
                     "The paper: a 3-layer network predicting execution time, a sync every 100 iterations "
                     "rebalancing when attention and MoE times differ by more than 5%, dynamic expert load "
                     "balancing, 8-bit gradient communication. Here: plain ma_sep beside its variants (the sync "
                     "interval is each run's ma.rebalance_every), the predictor's error and every event."),
]}
