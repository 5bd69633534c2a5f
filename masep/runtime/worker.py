"""What one rank does in a `masep train` or `masep infer` job (the GPU benchmark, `masep.bench`,
reuses its run record, decoding and thread set-up).

Each rank writes its own `<kind>-rank<R>.parquet` files into the run folder; rank 0 writes
`run.json` last, once every rank has finished (the folder's completion marker). Rows written
before a checkpoint survive a kill; a resumed run keeps the rows before its checkpoint's step
and continues from there.
"""
from __future__ import annotations

import math
import statistics
import time
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from masep.config import Config
from masep.errors import ExpectedError
from masep.parallel.base import GlobalBatch
from masep.parallel.layout import make_layout
from masep.provenance import git_commit, package_versions
from masep.runtime import checkpoint
from masep.runtime.distributed import DistInfo, report_progress
from masep.runtime.trainer import Trainer
from masep.telemetry import writer as w
from masep.telemetry.memory import peak_bytes
from masep.telemetry.mfu import flops_record
from masep.telemetry.nvml import RunTelemetry


class ResumeError(ExpectedError, RuntimeError):
    """A resume would lose rows written before its checkpoint."""


def _check_rows_before(path: Path, rows: list[dict], start: int) -> None:
    missing = sorted(set(range(start)) - {r["step"] for r in rows})
    if missing:
        raise ResumeError(f"{path}: rows of {len(missing)} step(s) before the checkpoint's step {start} "
                          f"are missing (first: step {missing[0]}); they cannot be recomputed from the "
                          f"checkpoint: start this run afresh (Snakemake: --config fresh=true; "
                          f"masep train: delete {path.parent})")


def cpu_threads(info: DistInfo) -> None:
    """Share the cores among this node's CPU ranks: oversubscribed intra-op thread pools
    make small CPU kernels hundreds of times slower. OMP_NUM_THREADS, where set (the workflow
    gives every strategy the same budget through it), is the number. Set through torch, which
    also sets MKL's: Snakemake exports MKL_NUM_THREADS as the job's threads, and MKL's own pool
    beside one rank per core made CPU steps 3-4x slower."""
    import os

    if torch.device(info.device).type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        wanted = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0
                              else max(1, cores // max(info.local_world_size, 1)))


def _barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


def _datasets(cfg: Config):
    from masep.data.batches import TokenDataset
    from masep.data.shards import shard_dirs

    dirs = shard_dirs(cfg, contents=False)  # the job checked the contents before starting the ranks
    train = TokenDataset(dirs, "train", cfg.data.seq_len, cfg.data.packing)
    val = TokenDataset(dirs, "val", cfg.data.seq_len, cfg.data.packing)
    return train, val


def _as_batch(b) -> GlobalBatch:
    inputs, targets, mask = b
    return GlobalBatch(inputs, targets, mask.float())


def batch_crc32(batch) -> int:
    """Fingerprint of a step's token ids (inputs, then targets): shows which data a step saw."""
    inputs, targets, _ = batch
    return zlib.crc32(targets.numpy().tobytes(), zlib.crc32(inputs.numpy().tobytes()))


def run_record(cfg: Config, out_dir: Path, experiment: str, info: DistInfo, started_at: str,
               status: str, extra: Optional[dict] = None) -> dict:
    layout = make_layout(cfg)
    return {
        "run_id": run_id_of(out_dir), "experiment": experiment, "strategy": cfg.parallel.strategy,
        "seed": cfg.train.seed, "world_size": cfg.parallel.world_size, "config": cfg.to_dict(),
        "layout": layout.to_dict(), "versions": package_versions(), "git_commit": git_commit(),
        "host": w.host(), "hardware": w.hardware(), "device": str(info.device), "status": status,
        "started_at": started_at, "ended_at": w.now_iso(), "slurm_job_id": info.slurm_job_id,
        "job_id": info.job_id, **(extra or {}),
    }


def run_id_of(out_dir: Path) -> str:
    """Stable id: the run folder from its experiment folder on (e.g. train/tp/ws=4/seed=0): the
    parts from the one before the last strategy folder, else the last three."""
    from masep.config import STRATEGIES

    parts = Path(out_dir).resolve().parts
    at = [i for i, p in enumerate(parts[1:], 1) if p in STRATEGIES]
    return "/".join(parts[at[-1] - 1:] if at else parts[-3:])


# ------------------------------------------------------------------ training


def train_rank(cfg: Config, out_dir: Path, info: DistInfo, experiment: str = "train") -> dict:
    out_dir = Path(out_dir)
    rank, t = info.rank, cfg.train
    cpu_threads(info)
    started_at = w.now_iso()
    train_ds, val_ds = _datasets(cfg)
    trainer = Trainer(cfg, rank, info.device)
    ckpt_dir = out_dir / "checkpoint"
    start = trainer.resume(ckpt_dir)
    run_id = run_id_of(out_dir)
    files = {k: out_dir / f"{k}-rank{rank}.parquet" for k in ("steps", "experts", "eval", "memory")}
    # Keep rows from before the checkpoint we resume from; drop any written after it.
    rows = {k: [r for r in w.read_parquet_rows(p) if r.get("step", -1) < start] for k, p in files.items()}
    if start:
        _check_rows_before(files["steps"], rows["steps"], start)
        if rank == 0:
            _check_rows_before(files["experts"], rows["experts"], start)
            print(f"resuming from step {start} ({ckpt_dir})", flush=True)
    telemetry = RunTelemetry(out_dir, run_id, rank, info.device, t.steps)  # NVML / RAPL sampler thread

    def flush() -> None:
        for k, p in files.items():
            w.write_parquet(p, rows[k])
        trainer.strategy.write_rows(out_dir, run_id)
        telemetry.write(rows["steps"])
        if trainer.failover is not None and trainer.failover.events:  # ma.failover: one row per regroup
            w.write_parquet(out_dir / f"recovery-rank{rank}.parquet",
                            [{"run_id": run_id, **e} for e in trainer.failover.events])

    batches = train_ds.batches(t.global_batch, t.seed, start)
    t_begin = time.perf_counter()
    for step in range(start, t.steps):
        batch = next(batches)
        row = trainer.train_step(_as_batch(batch))
        rows["steps"].append({"run_id": run_id, **row, "t_end_unix_s": time.time(),  # aligns telemetry
                              "batch_crc32": batch_crc32(batch)})
        report_progress(step, "train")
        stats, lead = trainer.last_stats, trainer.strategy.is_lead()  # rank 0, or the first survivor
        if lead:
            tpe = stats.tokens_per_expert
            rows["experts"] += [{"run_id": run_id, "step": step, "layer": l, "expert": e, "tokens": int(tpe[l, e])}
                                for l in range(tpe.shape[0]) for e in range(tpe.shape[1])]
        if step == start:
            rows["memory"].append({"run_id": run_id, "step": step, "rank": rank, **trainer.memory_at_first_step})
        last = step + 1 == t.steps
        if (step + 1) % t.eval_every == 0 or last:
            val_loss, val_ppl = trainer.evaluate((_as_batch(b) for b in val_ds.batches(t.global_batch, t.seed)),
                                                 t.eval_batches)
            if lead:
                rows["eval"].append({"run_id": run_id, "step": step, "val_loss": val_loss, "val_ppl": val_ppl})
                print(f"step {step + 1}/{t.steps} val_loss {val_loss:.4f} val_ppl {val_ppl:.1f}", flush=True)
        if lead and ((step + 1) % t.log_every == 0 or last or step == start):
            done = step + 1 - start
            eta = (time.perf_counter() - t_begin) / done * (t.steps - step - 1)
            print(f"step {step + 1}/{t.steps} loss {row['loss']:.4f} lb {row['lb_loss']:.4f} "
                  f"z {row['z_loss']:.3f} tok/s {row['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)
        if (step + 1) % t.checkpoint_every == 0 or last:
            flush()  # rows first: a checkpoint never runs ahead of the rows it covers
            report_progress(step, "checkpoint")
            trainer.save(ckpt_dir)
    telemetry.stop()
    flush()
    if trainer.failover is not None:
        trainer.failover.stop()
    _barrier(trainer.strategy.world_group)
    lead = trainer.strategy.is_lead()
    if lead and cfg.fault.kind != "none":
        _write_faults(cfg, out_dir, run_id, rows["steps"], start)
    if lead:
        w.atomic_write_json(out_dir / "run.json", run_record(
            cfg, out_dir, experiment, info, started_at, "completed",
            {"resumed_from_step": start or None, "steps_completed": t.steps, "files": w.file_manifest(out_dir),
             "flops": flops_record(cfg, info.device)}))
    return {"rank": rank, "final_loss": rows["steps"][-1]["loss"] if rows["steps"] else None}


def _write_faults(cfg: Config, out_dir: Path, run_id: str, steps: list[dict], start: int) -> None:
    """faults-rank0.parquet: what the injector did (faults.json) and what this run shows of it
    (its step rows, and the survivors' recovery rows under ma.failover)."""
    import json

    from masep import faults

    record_path = out_dir / faults.RECORD
    if not record_path.exists():
        raise FileNotFoundError(f"{record_path}: no fault record of fault.kind={cfg.fault.kind}; run this "
                                f"trial through `masep train` (its launcher injects the fault)")
    ref = Path(cfg.fault.reference) if cfg.fault.reference else None
    recovery = [r for p in sorted(out_dir.glob("recovery-rank*.parquet")) for r in w.read_parquet_rows(p)]
    rows = faults.fault_rows(run_id, json.loads(record_path.read_text()), steps, cfg.train.steps, start, ref,
                             recovery)
    w.write_parquet(out_dir / "faults-rank0.parquet", rows)
    print(faults.describe(rows[0]), flush=True)


# ------------------------------------------------------------------ inference


def _prompt(val_ds, context_len: int, batch: int) -> torch.Tensor:
    """`batch` prompts of `context_len` consecutive held-out tokens (wrapping if the split is short)."""
    need = context_len * batch
    parts, have = [], 0
    for s in range(len(val_ds.dirs)):  # opens only the shards the prompts need
        parts.append(torch.from_numpy(val_ds.shard_tokens(s)[:need - have].astype("int64")))
        have += len(parts[-1])
        if have >= need:
            break
    tokens = torch.cat(parts)
    flat = tokens.repeat(math.ceil(need / len(tokens)))[:need]
    return flat.view(batch, context_len)


def serving(trainer: Trainer):
    """The trainer's strategy ready to decode: eval mode, no optimizer, bf16 weights where it
    computes in bf16 (as served)."""
    strategy = trainer.strategy
    strategy.train(False)
    del trainer.opt
    if strategy.compute_dtype() == torch.bfloat16:
        strategy.cast_parameters(torch.bfloat16)
    return strategy


class DecodeProgress:
    """Called as each token arrives (`Strategy.generate(on_token=...)`): counts the job's decoded
    tokens, keeps when the current request's first one arrived, and, with `report`, tells a fault
    injector outside the rank (`report_progress`, phase "decode"; off by default: a file write per
    token would show in TPOT)."""

    def __init__(self, report: bool):
        self.report, self.tokens, self.first_at = report, 0, None

    def __call__(self) -> None:
        self.tokens += 1
        self.first_at = self.first_at or time.time()
        if self.report:
            report_progress(self.tokens, "decode")


def decode_row(strategy, cfg: Config, run_id: str, rank: int, ctx: int, prompt,
               on_token: Optional[DecodeProgress] = None):
    """The inference row of one request (prompt batch) at context `ctx`: prefill time and TPOT of
    `infer.new_tokens` greedy tokens, after `infer.warmup_tokens` untimed ones; and its Generation."""
    i = cfg.infer
    if i.warmup_tokens:
        strategy.generate(prompt, i.warmup_tokens, on_token)
    gen = strategy.generate(prompt, i.new_tokens, on_token)
    times = gen.token_s
    tpot = statistics.fmean(times) if times else float("nan")
    if rank == 0:
        print(f"context {ctx}: prefill {gen.prefill_s * 1e3:.1f} ms, TPOT {tpot * 1e3:.2f} ms", flush=True)
    return {
        "run_id": run_id, "rank": rank, "context_len": ctx, "batch": i.batch, "new_tokens": i.new_tokens,
        "prefill_ms": gen.prefill_s * 1e3, "tpot_ms": tpot * 1e3,
        "tpot_p50_ms": statistics.median(times) * 1e3 if times else None,
        "tpot_p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3 if times else None,
        "tokens_per_s": i.batch / tpot if times else None,
        "tokens_per_s_per_gpu": i.batch / tpot / cfg.parallel.world_size if times else None,
        "peak_mem_bytes": peak_bytes(strategy.device)[0],
    }, gen


def decode_rows(strategy, cfg: Config, run_id: str, rank: int, prompts) -> list[dict]:
    """One inference row per (context length, prompt) of `prompts` (`decode_row`)."""
    return [decode_row(strategy, cfg, run_id, rank, ctx, prompt)[0] for ctx, prompt in prompts]


def infer_rank(cfg: Config, out_dirs: list[Path], checkpoint_run: Optional[Path], info: DistInfo,
               experiment: str = "infer", resumed: bool = False) -> dict:
    """Decode one request per context length into each of `out_dirs` in turn (repeated trials
    of one job: one rank start-up and one checkpoint load for all). After each request, every
    rank writes its inference rows, then rank 0 records the request's tokens in
    `requests-rank0.parquet`: a restarted job (`resumed`, after a lost rank) skips the folders
    finished (run.json) and the requests recorded, and decodes the rest again, the first of them
    (in flight when the job was lost) marked retried."""
    rank = info.rank
    cpu_threads(info)
    _, val_ds = _datasets(cfg)
    trainer = Trainer(cfg, rank, info.device)
    source = "initial weights (seed)"
    if checkpoint_run is not None:
        path = checkpoint.latest_checkpoint(Path(checkpoint_run) / "checkpoint")
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {checkpoint_run}/checkpoint")
        checkpoint.load(path, trainer.strategy, None, rank)
        source = str(path)
    if rank == 0 and not resumed:  # run.json marks a trial of this job done (a restart skips it)
        for out_dir in out_dirs:
            (out_dir / "run.json").unlink(missing_ok=True)
    strategy, rows = serving(trainer), 0
    for out_dir in out_dirs:
        if resumed and (out_dir / "run.json").exists():
            continue  # finished before the job was lost
        rows += _decode_trial(cfg, strategy, val_ds, out_dir, source, info, experiment, resumed)
        resumed = False  # the folders after it start afresh
    return {"rank": rank, "rows": rows}


def _decode_trial(cfg: Config, strategy, val_ds, out_dir: Path, source: str, info: DistInfo,
                  experiment: str, resumed: bool) -> int:
    """One decoding trial into `out_dir` (see `infer_rank`); the number of inference rows."""
    rank, i = info.rank, cfg.infer
    started_at = w.now_iso()
    run_id = run_id_of(out_dir)
    rows_path, requests_path = out_dir / f"inference-rank{rank}.parquet", out_dir / "requests-rank0.parquet"
    # Every rank reads rank 0's record before the first request's collectives: they agree on what is done.
    if rank == 0 and not resumed:
        requests_path.unlink(missing_ok=True)  # a record of an earlier job in this folder
    requests = w.read_parquet_rows(requests_path) if resumed else []
    done = {r["request"] for r in requests}
    rows = [r for r in w.read_parquet_rows(rows_path) if resumed and r["context_len"] in
            {ctx for n, ctx in enumerate(i.context_lengths) if n in done}]
    if done and rank == 0:
        print(f"resuming: {len(done)} of {len(i.context_lengths)} request(s) already decoded ({requests_path})",
              flush=True)
    progress, retry = DecodeProgress(cfg.fault.kind != "none"), resumed
    for n, ctx in enumerate(i.context_lengths):
        if n in done:
            continue
        t_start, progress.first_at = time.time(), None
        row, gen = decode_row(strategy, cfg, run_id, rank, ctx, _prompt(val_ds, ctx, i.batch), progress)
        first = _first_token_at(progress.first_at)
        rows.append(row)
        w.write_parquet(rows_path, rows)
        _barrier()  # every rank's row is written before rank 0 marks the request done
        if rank == 0:
            requests += [{"run_id": run_id, "request": n, "row": b, "context_len": ctx,
                          "tokens": gen.tokens[b].tolist(), "retried": retry, "t_start_unix_s": t_start,
                          "t_first_token_unix_s": first, "t_end_unix_s": time.time()}
                         for b in range(gen.tokens.shape[0])]
            w.write_parquet(requests_path, requests)
        retry = False
    _barrier()
    if rank == 0 and cfg.fault.kind != "none":
        _write_decode_faults(cfg, out_dir, run_id, requests)
    if rank == 0:
        w.atomic_write_json(out_dir / "run.json", run_record(
            cfg, out_dir, experiment, info, started_at, "completed",
            {"weights": source, "files": w.file_manifest(out_dir)}))
    _barrier()  # the next trial starts after this one's record
    return len(rows)


def _first_token_at(mine: Optional[float]) -> Optional[float]:
    """When the request's first decoded token arrived at any rank (not every rank decodes rows)."""
    t = torch.tensor([mine if mine is not None else math.inf], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if math.isinf(t.item()) else t.item()


def _write_decode_faults(cfg: Config, out_dir: Path, run_id: str, requests: list[dict]) -> None:
    """faults-rank0.parquet of a decoding trial (faults.json and the requests decoded)."""
    import json

    from masep import faults

    record_path = out_dir / faults.RECORD
    if not record_path.exists():
        raise FileNotFoundError(f"{record_path}: no fault record of fault.kind={cfg.fault.kind}; run this "
                                f"trial through `masep infer` (its launcher injects the fault)")
    ref = Path(cfg.fault.reference) if cfg.fault.reference else None
    rows = faults.decode_fault_rows(run_id, json.loads(record_path.read_text()), requests,
                                    len(cfg.infer.context_lengths) * cfg.infer.batch, ref)
    w.write_parquet(out_dir / "faults-rank0.parquet", rows)
    print(faults.describe(rows[0]), flush=True)
