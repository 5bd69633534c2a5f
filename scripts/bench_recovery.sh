#!/bin/bash
# Recovery of a lost ma_sep attention rank (kill_attention) and MoE rank (kill_moe): in-job
# (ma.failover=true) against the full restart from the last checkpoint (ma.failover=false), CPU
# ranks over gloo, 4 ranks (2 attention replicas + 2 MoE ranks), SIGKILL from outside at a
# seeded step (masep.faults).
#   scripts/bench_recovery.sh OUT TOKENS_DIR [IN_JOB_TRIALS] [RESTART_TRIALS]   (each per kind)
# TOKENS_DIR: `masep tokenize --config tiny --set data.tokens_dir=TOKENS_DIR data.max_docs=400 --shard 0`.
# Prints one line per trial and p50/max recovery (kill to the next completed step) per kind and mode;
# the faults rows go to OUT/faults.json. Run it on an otherwise idle machine.
set -u
OUT=$(realpath -m "$1"); TOKENS=$(realpath "$2"); N_IN_JOB=${3:-10}; N_RESTART=${4:-3}
export CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1
M="python3 -m masep.cli"
mkdir -p "$OUT/runs"
COMMON="data.tokens_dir=$TOKENS data.max_docs=400 train.steps=8 train.checkpoint_every=3 train.eval_every=4
 train.log_every=1 train.global_batch=8 data.seq_len=32 model.experts=6 parallel.timeout_s=10 model.expert_dropout=0.0"
$M train --config tiny --strategy ma_sep --world-size 4 --set $COMMON launch.log_dir="$OUT/logs/ref" ma.failover=true \
  --out "$OUT/runs/ref" > "$OUT/ref.log" 2>&1 || { tail -30 "$OUT/ref.log"; exit 1; }
trial() {  # kind failover seed
  $M train --config tiny --strategy ma_sep --world-size 4 --set $COMMON launch.log_dir="$OUT/logs/$1-$2-$3" \
    launch.max_restarts=1 fault.kind=$1 fault.reference="$OUT/runs/ref" ma.failover=$2 fault.seed=$3 \
    --out "$OUT/runs/$1/failover=$2/seed=$3" > "$OUT/$1-$2-$3.log" 2>&1
  echo "$1 ma.failover=$2 fault.seed=$3 rc=$?: $(grep -h "fault $1" "$OUT/$1-$2-$3.log" | tail -1 | sed 's/^ *//')"
}
for kind in kill_attention kill_moe; do
  for s in $(seq 1 "$N_IN_JOB"); do trial $kind true "$s"; done
  for s in $(seq 1 "$N_RESTART"); do trial $kind false "$s"; done
done
OUT="$OUT" python3 - <<'PY'
import glob, json, os, statistics
import pyarrow.parquet as pq
rows = [r for p in sorted(glob.glob(os.environ["OUT"] + "/runs/*/failover=*/seed=*/faults-rank0.parquet"))
        for r in pq.read_table(p).to_pylist()]
for kind in ("kill_attention", "kill_moe"):
    for mode in ("in_job", "full_restart"):
        xs = sorted(r["recovery_s"] for r in rows
                    if r["kind"] == kind and r["recovery_mode"] == mode and r["recovery_s"] is not None)
        if xs:
            print(f"{kind} {mode}: n {len(xs)}, recovery p50 {statistics.median(xs):.2f} s, max {xs[-1]:.2f} s; "
                  f"all {[round(x, 2) for x in xs]}")
bad = [r for r in rows if r["final_loss_abs_diff"] is None or r["final_loss_abs_diff"] > 1e-5
       or r["batches_lost"] or r["batches_repeated"]]
print(f"{len(rows) - len(bad)} of {len(rows)} trials: final loss equal to the reference, no batch lost or repeated")
with open(os.environ["OUT"] + "/faults.json", "w") as f:
    json.dump(rows, f, default=str, indent=1)
PY
