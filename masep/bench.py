"""GPU benchmark of one strategy: `torchrun --nproc_per_node N -m masep.bench --config h200 ...`.

Runs under torchrun alone (no submitit, DuckDB or datasets needed on the GPU machine): warm-up
steps, timed training steps, then decoding at each context length. Every rank measures its own
step rows (compute / communication by kind / idle, peak memory); rank 0 adds MFU, energy per
token from NVML's energy counter (summed over the job's GPUs, over the timed window only) and
decode TPOT against the HBM bound, and writes one JSON file that `scripts/bench_gpu.sh` turns
into a table and `masep collect` can ingest as a run folder (`masep.bench_ingest`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from masep.config import load_config
from masep.model import analytic_parameter_count
from masep.parallel.base import GlobalBatch
from masep.provenance import git_commit, package_versions
from masep.telemetry.flops import mfu
from masep.telemetry.mfu import flops_record

HBM_BYTES_PER_S = 4.24e12  # device-to-device copy rate measured on an H200 (bytes read + written)


def init() -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Under torchrun a process group exists even for one rank: strategies other than `single`
    # build their groups from it (tp with tp=1 or ep_dp on one GPU run their code paths alone).
    if world > 1 or "MASTER_ADDR" in os.environ:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=300),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


class Energy:
    """NVML total-energy counter (mJ) of this rank's GPU; None where NVML is missing."""

    def __init__(self, device: torch.device):
        self.handle, self.reason = None, None
        if device.type != "cuda":
            self.reason = "no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                u = pynvml.nvmlDeviceGetUUID(h)
                u = u.decode() if isinstance(u, bytes) else u
                if u.replace("GPU-", "") == uuid.replace("GPU-", ""):
                    self.handle = h
            if self.handle is None:
                self.reason = "GPU not found in NVML"
            self._nvml = pynvml
        except Exception as e:  # noqa: BLE001 - any NVML failure means "not measured"
            self.reason = f"NVML unavailable: {type(e).__name__}"

    def read_mj(self):
        if self.handle is None:
            return None
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


def synthetic_batches(cfg, seed: int):
    """Uniform random tokens (the GPU machine has no corpus); same on every rank."""
    g = torch.Generator().manual_seed(seed)
    G, T = cfg.train.global_batch, cfg.data.seq_len
    while True:
        x = torch.randint(0, cfg.model.vocab_size, (G, T + 1), generator=g)
        yield GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(G, T))


def gather_rows(rows: list[dict], world: int) -> list[dict]:
    if world == 1:
        return rows
    out: list = [None] * world
    dist.all_gather_object(out, rows)
    return [r for part in out for r in part]


def decode_bound_ms(cfg, context_len: int, batch: int) -> float:
    """Bytes a decode step must read at least (bf16 weights a token touches + its KV cache) over HBM bandwidth."""
    c = analytic_parameter_count(cfg.model)
    m = cfg.model
    up = 2 * m.expert_hidden if m.expert_activation == "swiglu" else m.expert_hidden
    per_expert = m.hidden * up + m.expert_hidden * m.hidden
    experts_touched = min(m.experts, m.top_k * batch)
    weights = c["attention"] + c["routers"] + c["head"] + c["norms"] + m.layers * experts_touched * per_expert
    kv = 2 * m.layers * context_len * m.hidden * batch
    return (2 * weights + 2 * kv) / HBM_BYTES_PER_S * 1e3


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="h200")
    ap.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--label", default=None)
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of one step and one decode here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rank, world, device = init()
    cfg = load_config(args.config, args.overrides + [f"parallel.world_size={world}"])
    from masep.runtime.trainer import Trainer
    from masep.telemetry.timing import COMM_KINDS

    torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(cfg, rank, device)
    batches = synthetic_batches(cfg, cfg.train.seed)
    energy = Energy(device)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    e0, t0 = energy.read_mj(), time.perf_counter()
    rows = [trainer.train_step(next(batches)) for _ in range(args.steps)]
    wall = time.perf_counter() - t0
    e1 = energy.read_mj()
    mem = trainer.memory()
    rows = [{**r, "peak_mem_bytes": mem["peak_bytes"]} for r in rows]
    joules = (e1 - e0) / 1e3 if e0 is not None else None
    energies = gather_rows([{"rank": rank, "joules": joules, "reason": energy.reason}], world)
    all_rows = gather_rows(rows, world)

    if args.profile and rank == 0:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof_ctx = torch.profiler.profile(activities=activities) if args.profile else None
    if prof_ctx is not None:
        with prof_ctx:
            trainer.train_step(next(batches))
        if rank == 0:
            table = prof_ctx.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                                  else "self_cpu_time_total", row_limit=30)
            (Path(args.profile) / f"train-{args.label or cfg.parallel.strategy}.txt").write_text(table)
            print(table[:6000])
    decode, decode_path = [], None
    if args.decode:
        strategy = trainer.strategy
        del trainer.opt
        for _, p in strategy.named_parameters():
            p.grad = None
        strategy.train(False)
        if strategy.compute_dtype() == torch.bfloat16:
            strategy.cast_parameters(torch.bfloat16)  # serve bf16 weights, as inference does
        for ctx in cfg.infer.context_lengths:
            g = torch.Generator().manual_seed(ctx)
            prompt = torch.randint(0, cfg.model.vocab_size, (cfg.infer.batch, ctx), generator=g)
            strategy.generate(prompt, cfg.infer.warmup_tokens)
            gen = strategy.generate(prompt, cfg.infer.new_tokens)
            tpot = statistics.median(gen.token_s) * 1e3
            if args.profile and ctx == cfg.infer.context_lengths[0]:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    strategy.generate(prompt, 4)
                if rank == 0:
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                    (Path(args.profile) / f"decode-{args.label or cfg.parallel.strategy}.txt").write_text(table)
                    print(table[:6000])
            bound = decode_bound_ms(cfg, ctx, cfg.infer.batch)
            decode.append({"context_len": ctx, "batch": cfg.infer.batch, "prefill_ms": gen.prefill_s * 1e3,
                           "tpot_ms": tpot, "tpot_mean_ms": statistics.fmean(gen.token_s) * 1e3,
                           "hbm_bound_ms": bound, "tpot_over_bound": tpot / bound})
        decode_path = strategy.decode_path()  # after decoding: a failed compile shows here

    if rank == 0:
        step_times = [r["step_time_s"] for r in all_rows if r["rank"] == 0]
        med = statistics.median(step_times)
        tokens = all_rows[0]["tokens"]
        tps = tokens / med
        total_j = sum(e["joules"] for e in energies) if all(e["joules"] is not None for e in energies) else None
        measured_tokens = sum(r["tokens"] for r in all_rows if r["rank"] == 0)
        comm = {k: statistics.median(r[f"comm_{k}_s"] for r in all_rows if r["rank"] == 0) for k in COMM_KINDS}
        flops = flops_record(cfg, device)
        summary = {
            "label": args.label or cfg.parallel.strategy, "strategy": cfg.parallel.strategy, "world_size": world,
            "config": cfg.to_dict(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "step_time_median_s": med, "step_time_min_s": min(step_times), "step_time_max_s": max(step_times),
            "tokens_per_step": tokens, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
            # The peak of this GPU model (None, and MFU None, where masep knows none: a CPU run).
            "mfu": mfu(tps, cfg.model, cfg.data.seq_len, world, flops["peak_flops_per_gpu"])
            if flops["peak_flops_per_gpu"] else None,
            "peak_flops": flops["peak_flops_per_gpu"], "peak_reason": flops["peak_reason"],
            "energy_j": total_j, "energy_per_token_j": total_j / measured_tokens if total_j else None,
            "energy_reason": None if total_j else "; ".join(sorted({str(e["reason"]) for e in energies})),
            "timed_wall_s": wall, "comm_median_s": comm,
            "compute_median_s": statistics.median(r["compute_s"] for r in all_rows if r["rank"] == 0),
            "idle_median_s": statistics.median(r["idle_s"] for r in all_rows if r["rank"] == 0),
            "peak_mem_bytes_by_rank": {r["rank"]: r["peak_mem_bytes"] for r in all_rows},
            "energy_j_by_rank": {e["rank"]: e["joules"] for e in energies},
            "energy_reason_by_rank": {e["rank"]: e["reason"] for e in energies},
            "timed_steps": args.steps, "timed_tokens": measured_tokens,
            "flops": flops, "versions": package_versions(), "git_commit": git_commit(),
            "decode": decode, "decode_path": decode_path, "steps": all_rows,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1, default=str))
        print(f"[{summary['label']}] step {med * 1e3:.1f} ms  tok/s/GPU {tps / world:.0f}  "
              f"MFU {_pct(summary['mfu'])}  peak {max(summary['peak_mem_bytes_by_rank'].values()) / 2**30:.1f} GiB"
              + "".join(f"  ctx{d['context_len']}: {d['tpot_ms']:.2f} ms ({d['tpot_over_bound']:.2f}x bound)"
                        for d in decode), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
