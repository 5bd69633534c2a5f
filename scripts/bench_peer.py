"""masep beside torchtitan's MoE on one GPU, in one process, on the h200 preset's shapes.

    python scripts/bench_peer.py --out bench/peer-torchtitan-DATE     (writes DATE.json and DATE.md)

Needs torchtitan 0.2.2 from PyPI with its pure-Python needs beside a CUDA torch (README, "GPU tests
and the peer benchmark").
Rows, each with the same tokens, the same FLOP formula (masep.telemetry.flops) and the GPU's peak
as masep takes it (masep.telemetry.mfu.peak_for):
  moe_layer   forward+backward of one MoE layer (router, top-2 of 16 experts, dropless in both),
              masep and torchtitan alternated call by call;
  train_step  a whole optimizer step of the 4-layer model: masep's Trainer, torchtitan's Qwen3 MoE
              decoder driven by hand (its Trainer needs a tokenizer and a dataset), same AdamW, same
              bf16 autocast over fp32 weights, same micro-batches; one model after the other, since
              two 5.5 B-parameter models with AdamW state do not fit one GPU;
  decode      one new token at batch 1 after a 2048-token context: masep's captured decode step;
              torchtitan has no KV-cache decode, so its figure is a full forward over the context.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from masep.config import load_config  # noqa: E402
from masep.model import MoE  # noqa: E402
from masep.parallel.base import GlobalBatch  # noqa: E402
from masep.provenance import git_commit, package_versions  # noqa: E402
from masep.telemetry.flops import train_flops_per_token  # noqa: E402
from masep.telemetry.mfu import group_train_flops_per_token, peak_for  # noqa: E402

DEV = torch.device("cuda")


def timed(fn, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn`, each call between two synchronisations."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def profile_table(fn, title: str, rows: int = 25) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return f"=== {title}\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows) + "\n"


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------ torchtitan


def import_titan():
    """torchtitan's model classes. Its model packages import the whole trainer on the way (dataset
    loaders, which need HF `datasets`); the benchmark feeds random tokens, so where `datasets` is
    missing the data module is replaced by an empty one and the qwen3 package's trainer-spec
    `__init__` is skipped: the model code itself runs unchanged."""
    import importlib.util
    import os
    import types

    if importlib.util.find_spec("datasets") is None:
        data = types.ModuleType("torchtitan.hf_datasets.text_datasets")
        data.build_text_dataloader = data.build_text_validation_dataloader = None
        sys.modules[data.__name__] = data
    import torchtitan.models as models

    pkg = types.ModuleType("torchtitan.models.qwen3")
    pkg.__path__ = [os.path.join(models.__path__[0], "qwen3")]
    sys.modules.setdefault(pkg.__name__, pkg)
    from torchtitan.models.moe import MoE, MoEArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
    from torchtitan.models.qwen3.model.model import Qwen3Model
    return MoE, MoEArgs, Qwen3Model, Qwen3ModelArgs


def titan_args(m, seq_len: int):
    """torchtitan's Qwen3 MoE decoder at masep's shapes: full multi-head attention (kv heads = heads,
    causal SDPA), softmax top-2 router renormalised like masep's, SwiGLU experts, no shared expert,
    untied head. Differences it keeps: RMSNorm on q and k (Qwen3), an aux-loss-free balancing bias
    instead of masep's load-balancing and z losses."""
    _, MoEArgs, _, Qwen3ModelArgs = import_titan()
    moe = MoEArgs(num_experts=m.experts, num_shared_experts=0, top_k=m.top_k, score_func="softmax",
                  route_norm=True, score_before_experts=False)
    return Qwen3ModelArgs(dim=m.hidden, n_layers=m.layers, n_heads=m.heads, n_kv_heads=m.heads,
                          head_dim=m.head_dim, vocab_size=m.padded_vocab, rope_theta=m.rope_theta,
                          max_seq_len=max(seq_len, 4096), attn_type="sdpa", moe_enabled=True,
                          moe_inter_dim=m.expert_hidden, moe_args=moe)


# ------------------------------------------------------------------ rows


def row(name, impl, seconds, tokens, flops_per_token, peak, mem, note="") -> dict:
    med = statistics.median(seconds)
    tps = tokens / med
    return {"row": name, "impl": impl, "median_s": med, "min_s": min(seconds), "max_s": max(seconds),
            "n": len(seconds), "tokens": tokens, "tokens_per_s": tps,
            "mfu": tps * flops_per_token / peak if (peak and flops_per_token) else None,
            "peak_mem_gib": mem / 2**30 if mem is not None else None, "note": note}


def bench_moe_layer(cfg, args, peak, profiles: list) -> list[dict]:
    """One MoE layer, forward + backward, both implementations alternated call by call."""
    m = cfg.model
    torch.manual_seed(0)
    ours = MoE(m).to(DEV)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, m.init_std)
    TitanMoE = import_titan()[0]
    with torch.device(DEV):
        titan = TitanMoE(titan_args(m, cfg.data.seq_len).moe_args, m.hidden, m.expert_hidden)
    with torch.no_grad():
        titan.init_weights(m.init_std, DEV)
    x = torch.randn(args.layer_batch, cfg.data.seq_len, m.hidden, device=DEV, dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def run(layer):
        def step():
            xi = x.detach().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(grad)
            layer.zero_grad(set_to_none=True)
        return step

    steps = {"masep": run(ours), "torchtitan": run(titan)}
    for f in steps.values():
        timed(f, 3, 0)
    times = {k: [] for k in steps}
    for _ in range(args.iters):
        for k, f in steps.items():
            times[k] += timed(f, 0, 1)
    mems = {}
    for k, f in steps.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        f()
        torch.cuda.synchronize()
        mems[k] = torch.cuda.max_memory_allocated() - base
        profiles.append(profile_table(f, f"moe_layer {k}"))
    per_token = group_train_flops_per_token(m, cfg.data.seq_len)["moe"] / m.layers
    tokens = x.shape[0] * x.shape[1]
    note = {"masep": "dropless (capacity_factor null); fp32 router, load-balancing + z losses computed",
            "torchtitan": "dropless (no capacity factor in torchtitan); fp32 router; 3 grouped GEMMs (w1, w3, w2)"}
    return [row("moe_layer", k, times[k], tokens, per_token, peak, mems[k], note[k]) for k in steps]


def batches(cfg, n: int):
    g = torch.Generator().manual_seed(0)
    G, T = cfg.train.global_batch, cfg.data.seq_len
    for _ in range(n):
        x = torch.randint(0, cfg.model.vocab_size, (G, T + 1), generator=g)
        yield GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(G, T))


def bench_masep(cfg, args, peak, profiles: list) -> tuple[list[dict], list[dict]]:
    from masep.runtime.trainer import Trainer

    trainer = Trainer(cfg, 0, DEV)
    data = batches(cfg, args.warmup + args.steps + 1)
    for _ in range(args.warmup):
        trainer.train_step(next(data))
    torch.cuda.reset_peak_memory_stats()
    secs = [trainer.train_step(next(data))["step_time_s"] for _ in range(args.steps)]
    mem = torch.cuda.max_memory_allocated()
    profiles.append(profile_table(lambda: trainer.train_step(next(data)), "train_step masep"))
    tokens = cfg.train.global_batch * cfg.data.seq_len
    train = [row("train_step", "masep", secs, tokens, train_flops_per_token(cfg.model, cfg.data.seq_len), peak,
                 mem, f"Trainer.train_step: {cfg.train.global_batch // cfg.train.micro_batch} micro-batches, "
                 "grad clip, AdamW; eager")]
    strategy = trainer.strategy
    del trainer.opt
    for _, p in strategy.named_parameters():
        p.grad = None
    strategy.train(False)
    strategy.cast_parameters(torch.bfloat16)
    free()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(1))
    strategy.generate(prompt, cfg.infer.warmup_tokens)
    gen = strategy.generate(prompt, args.new_tokens)
    decode = [row("decode", "masep", gen.token_s, 1, None, None, torch.cuda.max_memory_allocated(),
                  f"{strategy.decode_path()}; KV cache, context {args.context}, batch 1, median of "
                  f"{len(gen.token_s)} tokens")]
    return train, decode


def bench_titan(cfg, args, peak, profiles: list) -> tuple[list[dict], list[dict]]:
    m = cfg.model
    Qwen3Model = import_titan()[2]
    with torch.device(DEV):
        model = Qwen3Model(titan_args(m, cfg.data.seq_len))
    with torch.no_grad():
        model.init_weights(buffer_device=DEV)
    model.train()
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=True)
    data = batches(cfg, args.warmup + args.steps + 1)
    n_micro = t.global_batch // t.micro_batch

    def step():
        b = next(data).to(DEV)
        for i in range(n_micro):
            sl = slice(i * t.micro_batch, (i + 1) * t.micro_batch)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(b.inputs[sl])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b.targets[sl].flatten(), reduction="sum")
            (loss / b.inputs.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(step, args.warmup, args.steps)
    mem = torch.cuda.max_memory_allocated()  # no reset: warm-up steps hold the same state
    profiles.append(profile_table(step, "train_step torchtitan"))
    tokens = t.global_batch * cfg.data.seq_len
    train = [row("train_step", "torchtitan", secs, tokens, train_flops_per_token(m, cfg.data.seq_len), peak, mem,
                 f"Qwen3 MoE decoder (causal SDPA) driven by hand: {n_micro} micro-batches, "
                 "grad clip, fused AdamW; eager, as its Trainer runs without compile")]
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16).eval()
    free()
    prompt = torch.randint(0, m.vocab_size, (1, args.context), device=DEV, generator=None)

    @torch.no_grad()
    def next_token():
        return model(prompt)[:, -1].argmax(-1)

    secs = timed(next_token, 3, args.new_tokens)
    decode = [row("decode", "torchtitan", secs, 1, None, None, torch.cuda.max_memory_allocated(),
                  f"no KV-cache decode path in torchtitan: each token is a full forward over the "
                  f"{args.context}-token context")]
    return train, decode


# ------------------------------------------------------------------ table


def table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| row | impl | tokens/s | median ms | MFU | peak mem GiB | masep/torchtitan (tok/s) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = next((o for o in rows if o["row"] == r["row"] and o["impl"] == "torchtitan"), None)
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other and r["impl"] == "masep" else ""
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['row']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['median_s'] * 1e3:.2f} | {mfu} "
                     f"| {mem} | {ratio} | {r['note']} |")
    for e in result["errors"]:
        lines.append(f"\nNot measured: {e}")
    v = result["versions"]
    lines.append(f"\n{result['device']}; torch {v['torch']}, CUDA {v['cuda']}, torchtitan {v['torchtitan']}; "
                 f"masep {result['git_commit']}; peak {result['peak_flops'] / 1e12:.0f} TFLOP/s "
                 f"({result['peak_source']}); {result['date']}.\nCommand: `{result['command']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="h200")
    ap.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    ap.add_argument("--only", nargs="*", default=["moe_layer", "train_step"], choices=["moe_layer", "train_step"])
    ap.add_argument("--layer-batch", type=int, default=8, help="sequences through the MoE layer")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--commit", default=None, help="masep commit, where the checkout has no .git")
    ap.add_argument("--profile", default=None, help="write torch.profiler key averages here")
    args = ap.parse_args()

    import torchtitan  # noqa: F401  - fail early, with the import error, if the peer is missing
    from importlib import metadata

    cfg = load_config(args.config, ["model.capacity_factor=null", "model.expert_dropout=0.0",
                                    "train.deterministic=false", "infer.compile=default"])
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, source, name, reason = peak_for(DEV)
    result = {"device": name, "peak_flops": peak, "peak_source": source or reason, "rows": [], "errors": [],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": {**package_versions(), "torchtitan": metadata.version("torchtitan")},
              "git_commit": args.commit or git_commit(), "config": cfg.to_dict(),
              "command": "python " + " ".join(sys.argv)}
    profiles: list[str] = []
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run a row is reported, not fatal
            import traceback
            traceback.print_exc()
            result["errors"].append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        finally:
            free()  # the row's models are gone with its frame

    if "moe_layer" in args.only:
        result["rows"] += attempt("moe_layer", lambda: bench_moe_layer(cfg, args, peak, profiles)) or []
    if "train_step" in args.only:
        ours = attempt("masep train_step/decode", lambda: bench_masep(cfg, args, peak, profiles)) or ([], [])
        theirs = attempt("torchtitan train_step/decode", lambda: bench_titan(cfg, args, peak, profiles)) or ([], [])
        result["rows"] += ours[0] + theirs[0] + ours[1] + theirs[1]
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(table(result))
    if args.profile:
        Path(args.profile).write_text("".join(profiles))
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
