"""Fault injection from outside the ranks, and what one fault trial measured.

`Injector` runs in the launching process (`masep train` with `fault.kind` set). It draws the
step and the target rank(s) from `fault.seed`, watches the ranks' progress files
(`masep.launch.report_progress`), and when a target rank has finished that step (for
`kill_checkpoint`: when it has started writing the checkpoint after it) sends the signal to the
pid its heartbeat file names. The code under test never decides to fail. What happened goes to
`<run folder>/faults.json`; the launcher adds when it found the rank lost and what it did.

Kinds (`fault.kind`): kill_attention (SIGKILL one attention rank), kill_moe (one MoE rank),
kill_attention_k (`fault.count` attention ranks at once, at most half of them), stop (SIGSTOP
one rank: a hang), kill_checkpoint (SIGKILL while the checkpoint is being written), and, in
`masep infer`, kill_moe_decode (SIGKILL one MoE rank while requests are being decoded, after a
seeded number of decoded tokens: the ranks that decode rows report each token as progress). `ma_sep`
has attention and MoE ranks; for the other strategies both mean any rank but rank 0, which
hosts the rendezvous store.

`fault_rows` (training) and `decode_fault_rows` (decoding) turn the record and the run's own
rows (for training also its in-job recovery rows) into the row of `faults-rank0.parquet` (rank 0,
or after its loss under ma.failover the lowest surviving rank, writes it before run.json).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Optional

from masep.config import DECODE_FAULT_KINDS
from masep.launch import heartbeat_path, progress_path

POLL_S = 0.005
RECORD = "faults.json"


class FaultError(RuntimeError):
    pass


def candidate_ranks(layout, kind: str) -> list[int]:
    if layout.moe_ranks:  # ma_sep
        return layout.moe_rank_list if kind in ("kill_moe", "kill_moe_decode") else layout.attention_ranks
    return list(range(1, layout.world_size))


def workflow_kinds(layout, kinds: list[str]) -> list[str]:
    """Kinds of the fault experiments, kill_attention_k expanded to kill_attention_k1 .. k<n/2>."""
    half = max(1, len(candidate_ranks(layout, "kill_attention")) // 2)
    return [k for kind in kinds
            for k in ([f"{kind}{n}" for n in range(1, half + 1)] if kind == "kill_attention_k" else [kind])]


def trial_overrides(kind: str, trial: int, reference: str) -> list[str]:
    """masep overrides of one trial of `workflow_kinds`: kill_attention_k<n> -> kind and count."""
    m = re.fullmatch(r"(kill_attention_k)(\d+)", kind)
    return [f"fault.kind={m[1] if m else kind}", f"fault.count={m[2] if m else 1}", f"fault.seed={trial}",
            f"fault.reference={reference}", "launch.max_restarts=1"]


def decode_tokens(cfg) -> tuple[int, int]:
    """(tokens a request streams, tokens the run streams): `masep infer` decodes one request
    (prompt batch) per context length, warm-up tokens included (`Strategy.generate` streams all
    but the prefill's token)."""
    i = cfg.infer
    per = max(i.warmup_tokens - 1, 0) + i.new_tokens - 1
    return per, per * len(i.context_lengths)


def plan(cfg, layout, job: str = "train") -> dict:
    """The seeded step (decoding: decoded token), target ranks and signal of `cfg.fault`."""
    f, steps = cfg.fault, cfg.train.steps
    decode = f.kind in DECODE_FAULT_KINDS
    if decode != (job == "infer"):
        raise FaultError(f"fault.kind={f.kind}: injected into `masep {'infer' if decode else 'train'}`, "
                         f"not `masep {job}`")
    rng = random.Random(f.seed)
    if decode:  # at the latest halfway through the last request: a request is always in flight
        per, total = decode_tokens(cfg)
        last = f.max_step or total - max(1, per // 2)
    else:
        last = f.max_step or steps - 2
    if decode and last < f.min_step:
        raise FaultError(f"fault.min_step={f.min_step}: no decoded token to inject at ({total} in all: "
                         f"infer.new_tokens={cfg.infer.new_tokens} per context length); decode more tokens")
    if last < f.min_step:
        raise FaultError(f"fault.min_step={f.min_step}: no step to inject at in a run of train.steps={steps}; "
                         f"lower fault.min_step or train more steps")
    if f.kind == "kill_checkpoint":
        every = cfg.train.checkpoint_every
        choices = [s for s in range(f.min_step, last + 1) if (s + 1) % every == 0]
        if not choices:
            raise FaultError(f"fault.kind=kill_checkpoint: no checkpoint between steps {f.min_step} and "
                             f"{last} (train.checkpoint_every={every}); widen fault.max_step")
        step = rng.choice(choices)
    else:
        step = rng.randint(f.min_step, last)
    ranks = candidate_ranks(layout, f.kind)
    count = f.count if f.kind == "kill_attention_k" else 1
    if not ranks or (f.kind == "kill_attention_k" and count > max(1, len(ranks) // 2)):
        raise FaultError(f"fault.count={count}: {cfg.parallel.strategy} has {len(ranks)} attention "
                         f"rank(s); at most half of them (and at least one) may fail")
    return {"kind": f.kind, "seed": f.seed, "step": step, "ranks": sorted(rng.sample(ranks, count)),
            "signal": "SIGSTOP" if f.kind == "stop" else "SIGKILL"}


class Injector:
    """Sends one planned fault to the first job it watches; records it in `run_dir/faults.json`."""

    def __init__(self, cfg, layout, run_dir: Path, job: str = "train"):
        self.plan = plan(cfg, layout, job)
        # Decoding: any rank that decodes rows reports the tokens (the target may only serve them).
        self.watched = list(range(layout.world_size)) if job == "infer" else self.plan["ranks"]
        self.path = Path(run_dir) / RECORD
        self.record: dict = {**self.plan, "strategy": cfg.parallel.strategy, "restarts": []}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, job) -> None:
        if "t_injected" in self.record:
            return  # one fault per run
        folder = job.paths.folder if job.num_tasks == 1 else job.task(0).paths.folder
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(Path(folder), str(job.job_id)),
                                        name="masep-fault-injector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _progress(self, folder: Path, job_id: str) -> list[dict]:
        found = []
        for rank in self.watched:
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(progress_path(folder, job_id, rank).read_text()))
        return found

    def _ready(self, folder: Path, job_id: str) -> bool:
        want, progress = self.plan["step"], self._progress(folder, job_id)
        if self.plan["kind"] in DECODE_FAULT_KINDS:
            return any(p["phase"] == "decode" and p["step"] >= want for p in progress)
        if len(progress) < len(self.watched):
            return False
        return all(p["step"] >= want if self.plan["kind"] != "kill_checkpoint" else (
            p["step"] == want and p["phase"] == "checkpoint") or p["step"] > want for p in progress)

    def _run(self, folder: Path, job_id: str) -> None:
        while not self._stop.is_set():
            if self._ready(folder, job_id):
                break
            time.sleep(POLL_S)
        else:
            return
        sig = getattr(signal, self.plan["signal"])
        hit = []
        for rank in self.plan["ranks"]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = int(json.loads(heartbeat_path(folder, job_id, rank).read_text())["pid"])
                progress = max(self._progress(folder, job_id) if self.plan["kind"] in DECODE_FAULT_KINDS
                               else [json.loads(progress_path(folder, job_id, rank).read_text())],
                               key=lambda p: p["step"])
                os.kill(pid, sig)
                hit.append({"rank": rank, "pid": pid, "step_done": progress["step"], "phase": progress["phase"]})
        self.record.update(t_injected=time.time(), hit=hit)
        self._save()
        unit = "decoded token" if self.plan["kind"] in DECODE_FAULT_KINDS else "step"
        targets = ", ".join(f"{h['rank']} (pid {h['pid']}, after {unit} {h['step_done']}, {h['phase']})" for h in hit)
        print(f"masep fault: sent {self.plan['signal']} to rank(s) {targets} "
              f"({self.plan['kind']}, seed {self.plan['seed']})", flush=True)

    def lost(self, err, restart: int) -> None:
        """The launcher found a rank lost (`err.detected_at`) and restarts the job."""
        self.record["restarts"].append({"restart": restart, "t_detected": err.detected_at,
                                        "message": str(err)})
        self._save()

    def _save(self) -> None:
        from masep.telemetry.writer import atomic_write_json  # imports torch: not at workflow parse time

        atomic_write_json(self.path, self.record)


def _median(xs: list) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _restarts_after_fault(record: dict) -> list[dict]:
    """The restarts after the injection (one before it, e.g. a rank that could not start,
    recovered nothing of the fault)."""
    t_inj = record.get("t_injected")
    return [r for r in record.get("restarts", []) if t_inj is not None and r["t_detected"] >= t_inj]


def _injected(run_id: str, record: dict, in_job: list[dict] = ()) -> dict:
    """The columns every trial has: what was injected, when, when it was found (the launcher's
    verdict before a restart, else the first survivor's error in the job), what was done."""
    t_inj, hit = record.get("t_injected"), record.get("hit", [])
    restarts = _restarts_after_fault(record)
    t_det = restarts[0]["t_detected"] if restarts else min((r["detected_unix_s"] for r in in_job), default=None)
    return {
        "run_id": run_id, "strategy": record["strategy"], "kind": record["kind"], "seed": record["seed"],
        "target_ranks": ",".join(str(h["rank"]) for h in hit) or None, "failed_ranks": len(hit),
        "signal": record["signal"], "planned_step": record["step"],
        "step_injected": max((h["step_done"] for h in hit), default=None),
        "phase_injected": hit[0]["phase"] if hit else None, "t_injected_unix_s": t_inj,
        "detection_s": t_det - t_inj if t_det is not None and t_inj is not None else None,
        "recovery_mode": "full_restart" if restarts else ("in_job" if in_job else None),
        "restarts": len(record.get("restarts", [])),
    }


def fault_rows(run_id: str, record: dict, rows: list[dict], steps: int, resumed_from: int,
               reference: Optional[Path], recovery: list[dict] = ()) -> list[dict]:
    """The faults row of one training trial from its record, the writing rank's final step rows
    and every rank's in-job recovery rows (`ma.failover`: `recovery-rank*.parquet`); the reference
    run (same schedule, no fault) gives the final loss and batch checksums to compare with."""
    t_inj = record.get("t_injected")
    in_job = [r for r in recovery if t_inj is not None and r["detected_unix_s"] >= t_inj]
    head = _injected(run_id, record, in_job)
    restarts = _restarts_after_fault(record)
    t_det = restarts[0]["t_detected"] if restarts else min((r["detected_unix_s"] for r in in_job), default=None)
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    after = sorted((r for r in rows if t_det is not None and r["t_end_unix_s"] > t_det),
                   key=lambda r: r["t_end_unix_s"])
    step_done = head["step_injected"]
    from masep.telemetry.writer import read_parquet_rows

    ref_rows = {r["step"]: r for r in read_parquet_rows(reference / "steps-rank0.parquet")} if reference else {}
    final = by_step.get(steps - 1, [{}])[-1].get("loss")
    ref_final = ref_rows.get(steps - 1, {}).get("loss")
    return [{
        **head,
        "recovery_s": after[0]["t_end_unix_s"] - t_inj if after and t_inj is not None else None,
        "resumed_from_step": resumed_from if restarts else None,
        "steps_replayed": (step_done + 1 - resumed_from if restarts and step_done is not None else
                           max((r["steps_redone"] for r in in_job), default=0)),
        "batches_completed": len(by_step),
        "batches_lost": sum(1 for s in range(steps) if s not in by_step),
        "batches_repeated": sum(len(v) - 1 for v in by_step.values()),
        "batches_mismatched": sum(1 for s, v in by_step.items()
                                  if s in ref_rows and v[-1]["batch_crc32"] != ref_rows[s]["batch_crc32"])
        if ref_rows else None,
        "throughput_before_tok_s": _median([r["tokens_per_s"] for r in rows
                                            if t_inj is not None and r["t_end_unix_s"] < t_inj]),
        "throughput_after_tok_s": _median([r["tokens_per_s"] for r in after[1:]]),
        "final_loss": final, "reference_final_loss": ref_final,
        "final_loss_abs_diff": abs(final - ref_final) if final is not None and ref_final is not None else None,
        "reference_run": str(reference) if reference else None,
    }]


def decode_fault_rows(run_id: str, record: dict, requests: list[dict], expected: int,
                      reference: Optional[Path]) -> list[dict]:
    """The faults row of one decoding trial (`planned_step`/`step_injected` count decoded
    tokens) from its record and rank 0's request rows (`requests-rank0.parquet`: one per prompt
    row, with its greedy tokens); correct = the same tokens as the reference run's (greedy
    decoding is deterministic). Recovery: the kill to the next token decoded after it."""
    head = _injected(run_id, record)
    t_inj = head["t_injected_unix_s"]
    from masep.telemetry.writer import read_parquet_rows

    ref = {(r["request"], r["row"]): r["tokens"] for r in read_parquet_rows(reference / "requests-rank0.parquet")} \
        if reference else {}
    after = [r["t_first_token_unix_s"] for r in requests
             if t_inj is not None and r["t_first_token_unix_s"] is not None and r["t_first_token_unix_s"] > t_inj]
    return [{
        **head,
        "recovery_s": min(after) - t_inj if after else None,
        "requests_total": expected,
        "requests_correct": sum(1 for r in requests if ref.get((r["request"], r["row"])) == list(r["tokens"]))
        if ref else None,
        "requests_retried": sum(1 for r in requests if r["retried"]),
        "requests_lost": expected - len({(r["request"], r["row"]) for r in requests}),
        "reference_run": str(reference) if reference else None,
    }]


def describe(row: dict) -> str:
    """One line: the rank, the fault, and what was done."""
    decode = row["kind"] in DECODE_FAULT_KINDS
    unit = "decoded token" if decode else "step"
    if row["t_injected_unix_s"] is None:
        return f"fault {row['kind']}: not injected (the run ended before {unit} {row['planned_step']})"
    recovery = "no token decoded after it" if row["recovery_s"] is None else f"in {row['recovery_s']:.2f} s"
    if decode:
        what = (f"recovered by restarting the inference job {recovery} (detected after {row['detection_s']:.2f} s)"
                if row["recovery_mode"] == "full_restart" else "the job went on without a restart")
        return (f"fault {row['kind']} ({row['signal']}) of rank(s) {row['target_ranks']} after {unit} "
                f"{row['step_injected']}: {what}; of {row['requests_total']} request(s) {row['requests_retried']} "
                f"retried, {row['requests_lost']} lost, {row['requests_correct']} equal to the reference")
    what = (f"recovered by full restart from step {row['resumed_from_step']} {recovery} "
            f"(detected after {row['detection_s']:.2f} s; {row['steps_replayed']} step(s) replayed)"
            if row["recovery_mode"] == "full_restart" else
            f"recovered in the job (the survivors regrouped, ma.failover) {recovery} (detected after "
            f"{row['detection_s']:.2f} s; {row['steps_replayed']} step(s) redone)"
            if row["recovery_mode"] == "in_job" else "no rank reported a loss")
    ref = ("" if row["final_loss_abs_diff"] is None else
           f"; final loss {row['final_loss']:.6f} vs reference {row['reference_final_loss']:.6f}")
    return (f"fault {row['kind']} ({row['signal']}) of rank(s) {row['target_ranks']} after step "
            f"{row['step_injected']}: {what}; {row['batches_lost']} batch(es) lost, "
            f"{row['batches_repeated']} repeated{ref}")
