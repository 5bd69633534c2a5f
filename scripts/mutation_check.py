#!/usr/bin/env python
"""Keep the test suite honest: apply known plausible defects, one at a time, to a copy of the
repository and check that the tests meant to catch each one fail.

    python scripts/mutation_check.py            # all defects (about 15 minutes on 2 busy cores)
    python scripts/mutation_check.py --only capacity_floor no_clipping

Each defect is a list of text patches, each a regular expression that must match exactly once
across the files of a glob (so a patch survives code moving between modules). A patch that no
longer applies is reported as "stale", never skipped silently: update the pattern to the code.
The tests of every defect are first run on the unmodified copy; a defect counts as caught only
when they pass there and fail with the defect. Exit status 1 when any defect survives or is stale.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Patch:
    glob: str  # files searched, relative to the repository root
    pattern: str  # regular expression (re.MULTILINE) that must match exactly once in them
    replacement: str  # re.sub replacement


@dataclass(frozen=True)
class Defect:
    name: str
    what: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]  # pytest arguments


MODEL, PARALLEL = "masep/model/**/*.py", "masep/parallel/**/*.py"
DEFECTS = (
    Defect("lb_f_from_kept", "route(): load-balancing f from the kept assignments, not the router's choices", (
        Patch(MODEL, r"^[ \t]*lb_loss = E \* \(f \* probs\.mean\(0\)\)\.sum\(\)\n", ""),
        Patch(MODEL, r"^([ \t]*)(tokens_per_expert = _count\(top_e\.reshape\(-1\), E, keep\.reshape\(-1\)\.long\(\)\)\n)",
              r"\1\2\1lb_loss = E * (tokens_per_expert.float() / (N * top_k) * probs.mean(0)).sum()\n"),
    ), ("tests/test_routing.py",)),
    Defect("capacity_floor", "expert_capacity(): int (floor) instead of ceil", (
        Patch(MODEL, r"math\.ceil\((factor \* n_tokens \* top_k / n_experts)\)", r"int(\1)"),
    ), ("tests/test_routing.py",)),
    Defect("token_major_queue", "route(): capacity queue token-major instead of choice-major", (
        Patch(MODEL, r"flat = top_e\.T\.reshape\(-1\)", "flat = top_e.reshape(-1)"),
        Patch(MODEL, r"keep = \(position < cap\)\.view\(top_k, N\)\.T", "keep = (position < cap).view(N, top_k)"),
    ), ("tests/test_routing.py",)),
    Defect("no_clipping", "trainer reports the gradient norm but does not clip", (
        Patch("masep/runtime/**/*.py", r"self\.strategy\.clip_gradients\(self\.cfg\.train\.grad_clip\)",
              "self.strategy.grad_norm()"),
    ), ("tests/test_training_behaviour.py", "-k", "clipping")),
    Defect("resume_data_from_zero", "worker resumes weights but restarts the data stream at step 0", (
        Patch("masep/runtime/**/*.py", r"(train_ds\.batches\(t\.global_batch, t\.seed), start\)", r"\1)"),
    ), ("tests/test_training_behaviour.py", "-k", "masep_train")),
    Defect("energy_all_tokens", "SQL energy per token divides by the tokens of windows without a reading", (
        Patch("masep/results/sql/*.sql",
              r"sum\(gpu_energy_j\) / nullif\(sum\(tokens\) FILTER \(WHERE gpu_energy_j IS NOT NULL\), 0\)",
              "sum(gpu_energy_j) / nullif(sum(tokens), 0)"),
    ), ("tests/test_aggregates.py", "-k", "energy")),
    Defect("report_null_as_zero", "the report averages a run without steady steps in as 0", (
        Patch("masep/report/**/*.py", r"avg\(tokens_per_s\) AS tokens_per_s_mean",
              "avg(coalesce(tokens_per_s, 0)) AS tokens_per_s_mean"),
    ), ("tests/test_aggregates.py", "-k", "report")),
    Defect("tp_moe_input_as_attn", "tp's exchange of MoE inputs timed as attn_allreduce", (
        Patch(PARALLEL, r"(copy_many_to_group\(\[x_flat, routing\.weight\], [^)\n]*)\"moe_dispatch\"\)",
              r'\1"attn_allreduce")'),
    ), ("tests/test_comm_attribution.py", "-k", "tp and not ep_dp")),
)


class Stale(Exception):
    pass


def copy_repo(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files: uncommitted edits included."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(root: Path, defect: Defect) -> dict[Path, str]:
    """Patch the copy; returns the original text of every changed file. Raises Stale (the
    copy left unchanged) when a patch does not match exactly once."""
    originals: dict[Path, str] = {}
    for patch in defect.patches:
        found = [(path, text) for path in sorted(root.glob(patch.glob)) for text in [path.read_text()]
                 for _ in re.finditer(patch.pattern, text, re.MULTILINE)]
        if len(found) != 1:
            restore(originals)
            raise Stale(f"{patch.pattern!r} matches {len(found)} times in {patch.glob}, not once")
        path, text = found[0]
        originals.setdefault(path, text)
        path.write_text(re.sub(patch.pattern, patch.replacement, text, count=1, flags=re.MULTILINE))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: int) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(root), "MASEP_SLURM": "off"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, [], f"timed out after {timeout_s} s"
    failed = [line.split()[1].split("::")[-1] for line in out.stdout.splitlines() if line.startswith("FAILED ")]
    return out.returncode, failed, (out.stdout + out.stderr)[-2000:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=[d.name for d in DEFECTS], help="these defects only")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    p.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail of every run")
    args = p.parse_args(argv)
    defects = [d for d in DEFECTS if not args.only or d.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        clean: dict[tuple[str, ...], tuple[int, str]] = {}
        for d in defects:
            if d.tests not in clean:
                rc, _, tail = run_tests(root, d.tests, args.timeout)
                clean[d.tests] = (rc, tail)
            if clean[d.tests][0] != 0:
                rows.append((d.name, " ".join(d.tests), "ERROR: tests fail without the defect"))
                print(clean[d.tests][1], file=sys.stderr)
                continue
            try:
                originals = apply(root, d)
            except Stale as e:
                rows.append((d.name, "-", f"STALE: {e}"))
                continue
            try:
                rc, failed, tail = run_tests(root, d.tests, args.timeout)
            finally:
                restore(originals)
            if args.verbose:
                print(f"--- {d.name}\n{tail}", file=sys.stderr)
            if rc == 1 and failed:
                rows.append((d.name, ", ".join(failed), "caught"))
            elif rc == 0:
                rows.append((d.name, "-", "SURVIVED"))
            else:
                rows.append((d.name, " ".join(d.tests), f"ERROR: pytest exit {rc}"))
                print(tail, file=sys.stderr)
            print(f"{d.name}: {rows[-1][2]}", file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows + [("defect", "caught by", "result")]) for i in range(3)]
    for row in [("defect", "caught by", "result")] + rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0 if all(r[2] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
