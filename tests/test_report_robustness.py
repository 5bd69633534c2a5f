"""The report's Robustness section from constructed fault rows: recovery p50/p95 beside the
paper's 2.3 s / 8.7 s, the expert-failure success rate beside its 99.2%, the degradation figure
with its fit, and "not measured here" where a value is NULL or the faults table has no rows."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pyarrow as pa
import pyarrow.parquet as pq

from masep.results.collect import collect
from helpers import render_section, write_sample_run

FIGURE = ("figures/robustness_degradation.png", "figures/robustness_degradation.svg")


def _trial(strategy, kind, recovery_s, failed=1, before=None, after=None, **more):
    return {"run_id": f"faults/{strategy}/{kind}/{recovery_s}/{failed}", "strategy": strategy, "kind": kind,
            "failed_ranks": failed, "t_injected_unix_s": 1.0, "detection_s": 0.5, "recovery_s": recovery_s,
            "recovery_mode": "full_restart", "restarts": 1, "steps_replayed": 1, "batches_lost": 0,
            "batches_repeated": 0, "batches_mismatched": 0, "throughput_before_tok_s": before,
            "throughput_after_tok_s": after, "final_loss_abs_diff": 0.0, "requests_total": None,
            "requests_correct": None, "requests_retried": None, "requests_lost": None, **more}


def _cells(html_text: str, *lead: str) -> list[str]:
    """The cells of the first table row that starts with `lead`."""
    for row in re.findall(r"<tr>(.*?)</tr>", html_text):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        if cells[:len(lead)] == list(lead):
            return cells
    raise AssertionError(f"no row {lead}")


def test_robustness_section_from_fault_rows(tmp_path):
    runs = tmp_path / "runs"
    rows = {"ma_sep": [_trial("ma_sep", "kill_attention_k", 1.0 + k, failed=1, before=400.0, after=300.0 + k)
                       for k in range(2)]
                      + [_trial("ma_sep", "kill_attention_k", 2.0, failed=2, before=400.0, after=200.0),
                         _trial("ma_sep", "kill_moe_decode", 4.0, requests_total=3, requests_correct=3,
                                requests_retried=1, requests_lost=0, final_loss_abs_diff=None),
                         _trial("ma_sep", "kill_moe_decode", 6.0, requests_total=3, requests_correct=2,
                                requests_retried=1, requests_lost=1, final_loss_abs_diff=None)],
            "tp_pp": [_trial("tp_pp", "kill_attention", 8.0, before=500.0),
                      _trial("tp_pp", "kill_checkpoint", None)]}
    for strategy, trials in rows.items():
        folder = write_sample_run(runs, "faults", strategy, "trials", world_size=4)
        pq.write_table(pa.Table.from_pylist(trials), folder / "faults-rank0.parquet")
    db = tmp_path / "masep.duckdb"
    collect(runs, db)
    out = tmp_path / "reports"
    section, written = render_section(db, "robustness", out)
    assert {str(p.relative_to(out)) for p in written} == set(FIGURE)
    svg = ET.parse(out / FIGURE[1]).getroot()
    assert svg.tag.endswith("svg") and "R^2 = " in (out / FIGURE[1]).read_text()
    assert "<img src='figures/robustness_degradation.svg'" in section
    # recovery p50 / p95 per strategy and kind, the paper's 2.3 s (ma_sep) / 8.7 s (baseline) beside
    assert _cells(section, "ma_sep", "kill_moe_decode") == ["ma_sep", "kill_moe_decode", "full_restart", "2", "1",
                                                            "0.5", "5", "5.9", "2.3"]
    assert _cells(section, "tp_pp", "kill_attention")[6:] == ["8", "8", "8.7"]
    assert _cells(section, "tp_pp", "kill_checkpoint")[6:] == ["not measured here: no step or token completed after "
                                                          "the fault"] * 2 + ["not measured here: no paper claim "
                                                                              "(a checkpoint-write fault)"]
    # the expert-failure success rate beside the paper's 99.2%
    expert = section[section.index("Expert failure"):section.index("Degradation")]
    assert _cells(expert, "ma_sep") == ["ma_sep", "kill_moe_decode", "2", "1", "50", "99.2", "2", "1"]
    # the degradation curve: 0 failed = before the fault, then after recovery; a line and its R^2
    curve = section[section.index("Degradation"):section.index("Every trial")]
    assert _cells(curve, "ma_sep", "0")[:3] == ["ma_sep", "0", "3"] and _cells(curve, "ma_sep", "0")[3] == "400"
    assert _cells(curve, "ma_sep", "2")[3:5] == ["200", "-99.9"]  # the least-squares slope of the 6 points
    # tp_pp: no throughput after its fault, one failed-rank count: no line, no R^2
    assert _cells(curve, "tp_pp", "0")[5] == "not measured here: one distinct failed-rank count (no line to fit)"


def test_robustness_section_without_fault_rows(tmp_path):
    runs = tmp_path / "runs"
    write_sample_run(runs, "train", "single", "seed=0", steps=3)
    db = tmp_path / "masep.duckdb"
    collect(runs, db)  # the faults view exists, with no rows
    out = tmp_path / "reports"
    section, written = render_section(db, "robustness", out)
    assert "not measured here: no fault trials in this database" in section
    assert "2.3" in section and "8.7" in section and "99.2" in section  # the paper's figures still shown
    assert not written and not (out / FIGURE[0]).exists()
