"""A/B benchmark of GPU-path versions on one GPU, interleaved in one process (docs/PERF_NOTES.md).

    python scripts/bench_variants.py OUT_DIR [--config h200] [--steps 6] [--skip-train] [--skip-decode]

Training: the weight-cast versions (a fresh autocast-style cast per use, as before, versus one
cast per weight version with fp32 gradient accumulation by hook) at the preset's micro-batch and
at twice it, each run twice in alternation so the spread between repeats shows the noise. Decode
at batch 1: the eager cached forward and the fixed-shape step (without and with a CUDA graph,
compiled, max-autotuned), each timed
per token and streamed; all must produce the same greedy tokens. Prints a table and writes OUT_DIR/variants.json and
profiler tables of one step of the cast-once version and of the graphed decode.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from masep.bench import decode_bound_ms, synthetic_batches
from masep.config import load_config
from masep.model import build_model
from masep.model import moe_transformer as mt
from masep.parallel.base import StaticDecoder, stream_tokens
from masep.parallel.layout import make_layout
from masep.parallel.single import SingleRank
from masep.runtime.trainer import Trainer
from masep.telemetry.flops import mfu
from masep.telemetry.mfu import peak_for

_cast_once = mt.compute_weight
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _cast_per_use(p, dtype=None):
    """The previous behaviour: autocast's cast (cached only inside one autocast region) or an
    explicit `.to`, so every micro-batch casts again and backpropagates through the cast."""
    if dtype is None:
        if not torch.is_autocast_enabled(p.device.type):
            return p
        dtype = torch.get_autocast_dtype(p.device.type)
    return p.to(dtype)


def train_variant(cfg_name, overrides, cast, steps, profile_dir=None):
    mt.compute_weight = cast
    try:
        cfg = load_config(cfg_name, overrides)
        trainer = Trainer(cfg, 0, DEVICE)
        batches = synthetic_batches(cfg, 0)
        for _ in range(2):
            trainer.train_step(next(batches))
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows = [trainer.train_step(next(batches)) for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0
        if profile_dir is not None:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                trainer.train_step(next(batches))
            Path(profile_dir, "train-cast-once.txt").write_text(
                prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
        med = statistics.median(r["step_time_s"] for r in rows)
        tps = rows[0]["tokens"] / med
        times = [r["step_time_s"] for r in rows]
        gpu_peak = peak_for(DEVICE)[0]  # this GPU model's peak; None (MFU not measured) without one
        out = {"step_ms": med * 1e3, "spread_ms": (max(times) - min(times)) * 1e3, "tok_s": tps,
               "mfu": mfu(tps, cfg.model, cfg.data.seq_len, 1, gpu_peak) if gpu_peak else None,
               "peak_gib": peak / 2**30, "loss_last": rows[-1]["loss"]}
    except torch.OutOfMemoryError as e:
        out = {"error": f"out of memory: {str(e)[:120]}"}
    finally:
        mt.compute_weight = _cast_once
        trainer = None  # noqa: F841
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return out


def time_decode(cfg, model, ctx, new_tokens, mode, profile_dir=None):
    """TPOT of one decode `mode` (median over tokens 3..): each token timed to completion (the
    host reads it before queuing the next) and, for the fixed-shape modes, streamed
    (`stream_tokens`: the next token queued before the host waits). Returns (first new_tokens ids, TPOT ms,
    streamed TPOT ms or None)."""
    device = DEVICE
    if mode == "generate":  # the strategies' own path (`SingleRank.generate`: streamed, graph per call)
        prompt = torch.randint(0, cfg.model.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        strategy = SingleRank(cfg, make_layout(cfg), 0, device, model)
        strategy.generate(prompt, cfg.infer.warmup_tokens)
        gen = strategy.generate(prompt, new_tokens)
        return gen.tokens[0].tolist(), statistics.median(gen.token_s[2:]) * 1e3, None
    prompt = torch.randint(0, cfg.model.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).to(device)
    caches = model.new_caches(1, ctx + 2 * new_tokens + 8, dtype=torch.bfloat16)  # + streamed + profiled tokens
    streamed = None
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits, _ = model(prompt, 0, caches, last_only=True)
        ids = logits[:, -1].argmax(-1)
        toks, times = [ids.clone()], []
        if mode == "eager":
            for i in range(new_tokens - 1):
                sync()
                t = time.perf_counter()
                logits, _ = model(ids[:, None], ctx + i, caches, last_only=True)
                ids = logits[:, -1].argmax(-1)
                sync()
                times.append(time.perf_counter() - t)
                toks.append(ids.clone())
        else:
            step = model.decode_step
            if mode.startswith("compiled"):  # inductor fuses the small kernels; the graph is ours
                step = torch.compile(model.decode_step, dynamic=False, fullgraph=True,
                                     mode="max-autotune-no-cudagraphs" if mode == "compiled-autotune" else None)
            t_build = time.perf_counter()
            dec = StaticDecoder(lambda i, p: step(i, p, caches), ids[:, None],
                                torch.tensor([ctx], device=device), mode != "static")
            print(f"decoder {mode} ready in {time.perf_counter() - t_build:.1f} s", flush=True)
            for i in range(new_tokens - 1):
                sync()
                t = time.perf_counter()
                ids = dec()
                sync()
                times.append(time.perf_counter() - t)
                toks.append(ids.clone())
            _, stream_times = stream_tokens(dec, new_tokens - 1)
            streamed = statistics.median(stream_times[2:]) * 1e3
            if profile_dir is not None and mode != "static":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(4):
                        dec()
                    sync()
                Path(profile_dir, f"decode-{mode}-{ctx}.txt").write_text(
                    prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    return torch.cat(toks).tolist(), statistics.median(times[2:]) * 1e3, streamed


def accuracy_check(cfg, model, modes, ctx=512):
    """Relative error of one decode step's logits against an fp32 reference: the same prompt
    prefilled into a KV cache, then one cached step (a token routed on its own, as decoding
    routes it; a full forward would route it among the prompt's tokens, under other capacity
    limits). Compared: the bf16 eager cached forward and the fixed-shape step per mode."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.model.vocab_size, (1, ctx + 1), generator=g).to(DEVICE)
    V, pos = cfg.model.vocab_size, torch.tensor([ctx], device=DEVICE)
    out = {}
    with torch.no_grad():
        ref_model = build_model(cfg.model, 0, DEVICE).eval()  # same seed: the same weights, fp32
        caches = ref_model.new_caches(1, ctx + 64)
        ref_model(ids[:, :ctx], 0, caches)
        ref = ref_model(ids[:, ctx:], ctx, caches, last_only=True)[0][0, -1, :V].double()
        del ref_model, caches
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            for mode in ["eager"] + list(modes):
                caches = model.new_caches(1, ctx + 64, dtype=torch.bfloat16)
                model(ids[:, :ctx], 0, caches)
                if mode == "eager":
                    got = model(ids[:, ctx:], ctx, caches, last_only=True)[0][0, -1]
                else:
                    fn = model.decode_logits
                    if mode.startswith("compiled"):
                        fn = torch.compile(fn, dynamic=False, fullgraph=True,
                                           mode="max-autotune-no-cudagraphs" if mode.startswith("compiled-autotune")
                                           else None)
                    got = fn(ids[:, ctx:], pos, caches)[0]
                got = got[:V].double()
                out[mode] = {"rel_err_vs_fp32": float((got - ref).norm() / ref.norm()),
                             "argmax": int(got.argmax())}
    out["fp32_argmax"] = int(ref.argmax())
    out["fp32_top2_gap"] = float(ref.topk(2).values.diff().abs())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", default="h200")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--accuracy-only", action="store_true", help="decode: only the fp32-reference check")
    ap.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    ap.add_argument("--decode-modes", nargs="*", default=["eager", "static", "graph", "compiled", "graph", "compiled"])
    ap.add_argument("--accuracy-modes", nargs="*", default=None,
                    help="modes of the fp32-reference check (default: the decode modes but eager and graph)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = ["train.deterministic=false", "train.global_batch=32"] + args.overrides
    results = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "train": [], "decode": []}
    if not args.skip_train:
        plan = [("per-use cast", "train.micro_batch=4", _cast_per_use),
                ("cast once", "train.micro_batch=4", _cast_once),
                ("cast once", "train.micro_batch=8", _cast_once)] * 2  # each twice, alternated
        for i, (name, micro, cast) in enumerate(plan):
            r = train_variant(args.config, base + [micro], cast, args.steps, out if i == 1 else None)
            r.update(variant=name, micro=micro)
            results["train"].append(r)
            print(json.dumps(r), flush=True)
    if not args.skip_decode:
        cfg = load_config(args.config, base)
        model = build_model(cfg.model, 0, DEVICE).eval()
        for p in model.parameters():  # bf16 weights, fp32 rotary tables: as the strategies serve
            p.data = p.data.to(torch.bfloat16)
        try:
            modes = args.accuracy_modes if args.accuracy_modes is not None else [
                m for m in dict.fromkeys(args.decode_modes) if m not in ("eager", "graph")]
            results["accuracy"] = accuracy_check(cfg, model, modes)
        except Exception as e:  # noqa: BLE001
            results["accuracy"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("accuracy", json.dumps(results["accuracy"]), flush=True)
        if args.accuracy_only:
            args.decode_modes = []
        for ctx in cfg.infer.context_lengths[::max(len(cfg.infer.context_lengths) - 1, 1)]:
            bound = decode_bound_ms(cfg, ctx, 1)
            toks = {}
            for mode in args.decode_modes:
                try:
                    t, tpot, streamed = time_decode(cfg, model, ctx, 64, mode, out if ctx == 512 else None)
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                    print(f"{mode} at {ctx}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                toks.setdefault(mode, t)
                r = {"context": ctx, "mode": mode, "tpot_ms": tpot, "bound_ms": bound, "x_bound": tpot / bound,
                     "tpot_streamed_ms": streamed, "x_bound_streamed": streamed / bound if streamed else None,
                     "same_tokens_as_eager": t == toks["eager"],
                     "first_mismatch": next((j for j, (a, b) in enumerate(zip(t, toks["eager"])) if a != b), None)}
                results["decode"].append(r)
                print(json.dumps(r), flush=True)
                (out / "variants.json").write_text(json.dumps(results, indent=1))  # kept if a later mode hangs
    (out / "variants.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | micro | step ms | spread | tok/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results["train"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['micro']} | {r['error']} |")
        else:
            mfu_cell = "not measured" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
            print(f"| {r['variant']} | {r['micro']} | {r['step_ms']:.0f} | {r['spread_ms']:.0f} | {r['tok_s']:.0f} | "
                  f"{mfu_cell} | {r['peak_gib']:.1f} |")
    print("\n| ctx | decode | TPOT ms | streamed ms | bound ms | x bound (streamed) | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results["decode"]:
        st = f"{r['tpot_streamed_ms']:.3f}" if r["tpot_streamed_ms"] else "-"
        xs = f" ({r['x_bound_streamed']:.2f})" if r["x_bound_streamed"] else ""
        print(f"| {r['context']} | {r['mode']} | {r['tpot_ms']:.3f} | {st} | {r['bound_ms']:.3f} | "
              f"{r['x_bound']:.2f}{xs} | {r['same_tokens_as_eager']} ({r['first_mismatch']}) |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
