"""The report in headless Chromium: every section there, every image loads and plots data, no
console error, nothing fetched from the network. Skips where Chromium is absent, except under
CI=true (scripts/run_tests.sh installs it there)."""
from __future__ import annotations

import os
import shutil

import pytest

from masep.report.render import render
from masep.report.sections import SECTIONS
from masep.results.collect import collect
from helpers import write_sample_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SECTION_IDS = [k for k in SECTIONS if k != "balancing"]


def _browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium/chromedriver are missing: scripts/run_tests.sh installs them")
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))


def _study(tmp_path):
    """A small study that fills every figure: strategies at two world sizes, two seeds, decoding."""
    runs = tmp_path / "runs"
    for strategy, sizes in (("single", (1,)), ("tp", (2, 4)), ("tp_pp", (2, 4)), ("ma_sep", (2, 4))):
        for ws in sizes:
            for seed in (0, 1):
                write_sample_run(runs, "train", strategy, f"ws={ws}/seed={seed}", world_size=ws, seed=seed,
                                 steps=10, evals=[(10, 3.5 + seed / 10)])
        for seed in (0, 1):
            write_sample_run(runs, "infer", strategy, f"ws={sizes[-1]}/seed={seed}/rep=0/ctx=all",
                             world_size=sizes[-1], seed=seed, contexts=(512, 2048))
    db = tmp_path / "masep.duckdb"
    collect(runs, db)
    return db


def test_report_in_chromium(tmp_path):
    driver = _browser(tmp_path)
    out = tmp_path / "reports"
    render(_study(tmp_path), out)
    try:
        driver.get((out / "index.html").as_uri())
        ids = driver.execute_script("return [...document.querySelectorAll('section[id]')].map(s => s.id)")
        assert [i for i in SECTION_IDS if i not in ids] == []
        images = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0,"
            " Number(i.dataset.points)])")
        assert len(images) >= len(SECTION_IDS) - 3  # Statistics and Robustness are tables
        assert [src for src, ok, _ in images if not ok] == [], "images that did not render"
        assert [src for src, _, points in images if not points > 0] == [], "figures without data"
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
        assert [u for u in fetched if not u.startswith("file:")] == [], "the page must work offline"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()
