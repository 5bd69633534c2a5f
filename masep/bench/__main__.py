"""GPU benchmark of one strategy: `torchrun --nproc_per_node N -m masep.bench --config h200 --out ROOT ...`.

Training steps on synthetic batches, then (`--decode`) decoding at each context length, written
as one ordinary run folder `ROOT/bench/<label>/<UTC stamp>/` (experiment `bench`) by the code
training and inference runs use: step rows, NVML/RAPL telemetry with steady-state energy
windows, memory rows, inference rows, `run.json` last. Warm-up is the first 10% of the steps
(at least one), as in every run. Needs torch and pyarrow (pynvml for energy); not submitit,
DuckDB, datasets or Snakemake, which GPU machines may lack.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from masep.bench import synthetic_batches
from masep.config import load_config
from masep.runtime.distributed import init_distributed, shutdown_distributed
from masep.runtime.trainer import Trainer
from masep.runtime.worker import cpu_threads, decode_rows, run_id_of, run_record, serving
from masep.telemetry import writer as w
from masep.telemetry.mfu import flops_record
from masep.telemetry.nvml import RunTelemetry


def _profile(device, path: Path, fn) -> None:
    """torch.profiler's table of one call of `fn` (rank 0 writes it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
    if path is not None:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m masep.bench")
    ap.add_argument("--config", default="h200")
    ap.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    ap.add_argument("--steps", type=int, default=12, help="training steps, warm-up included")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--label", default=None, help="run name (default: the strategy)")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of one step and one decode here")
    ap.add_argument("--out", required=True, help="runs root")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(args.config, args.overrides + [f"parallel.world_size={world}"])
    info = init_distributed(cfg.parallel.timeout_s)
    cpu_threads(info)
    stamp = [time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())]
    dist.broadcast_object_list(stamp, src=0)  # one folder for every rank
    label = args.label or cfg.parallel.strategy
    out_dir = Path(args.out) / "bench" / label / stamp[0]
    run_id, rank, device = run_id_of(out_dir), info.rank, info.device
    started_at = w.now_iso()
    torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(cfg, rank, device)
    batches = synthetic_batches(cfg, cfg.train.seed)
    telemetry = RunTelemetry(out_dir, run_id, rank, device, args.steps)
    steps = [{"run_id": run_id, **trainer.train_step(next(batches)), "t_end_unix_s": time.time()}
             for _ in range(args.steps)]
    telemetry.stop()
    telemetry.write(steps)
    w.write_parquet(out_dir / f"steps-rank{rank}.parquet", steps)
    w.write_parquet(out_dir / f"memory-rank{rank}.parquet",
                    [{"run_id": run_id, "step": 0, "rank": rank, **trainer.memory_at_first_step}])
    profile = Path(args.profile) if args.profile else None
    if profile:
        _profile(device, profile / f"train-{label}.txt" if rank == 0 else None,
                 lambda: trainer.train_step(next(batches)))
    extra = {"steps_completed": args.steps, "flops": flops_record(cfg, device)}
    if args.decode:
        strategy = serving(trainer)

        def prompts():
            for ctx in cfg.infer.context_lengths:
                g = torch.Generator().manual_seed(ctx)
                yield ctx, torch.randint(0, cfg.model.vocab_size, (cfg.infer.batch, ctx), generator=g)

        w.write_parquet(out_dir / f"inference-rank{rank}.parquet", decode_rows(strategy, cfg, run_id, rank, prompts()))
        if profile:
            ctx, prompt = next(prompts())
            _profile(device, profile / f"decode-{label}.txt" if rank == 0 else None,
                     lambda: strategy.generate(prompt, 4))
        extra["decode_path"] = strategy.decode_path()  # after decoding: a failed compile shows here
    dist.barrier()
    if rank == 0:
        w.atomic_write_json(out_dir / "run.json", run_record(cfg, out_dir, "bench", info, started_at,
                                                             "completed", extra))
        print(f"masep.bench: {out_dir}", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
