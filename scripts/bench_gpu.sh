#!/usr/bin/env bash
# One call on a machine with 2 GPUs: the single-GPU model and every 2-GPU strategy on the h200
# preset, one after another in one job (same machine state), then one table.
#   scripts/bench_gpu.sh OUT_DIR [label ...]      (labels: single tp2 pp2 ep_dp2 ma_sep; on one GPU
#   also tp1 ep_dp1: those strategies' code paths with one rank, to set beside single)
# Writes one run folder per label, OUT_DIR/bench/<label>/<UTC stamp>/ (`masep collect --runs OUT_DIR` loads
# them), and prints their table (`python -m masep.bench.table OUT_DIR`).
set -uo pipefail
out=${1:?usage: scripts/bench_gpu.sh OUT_DIR [label ...]}
shift
labels=${*:-single tp2 pp2 ep_dp2 ma_sep}
mkdir -p "$out"
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# Batch sizes are the preset's unless GLOBAL_BATCH / MICRO_BATCH say otherwise.
common="train.deterministic=false${GLOBAL_BATCH:+ train.global_batch=$GLOBAL_BATCH}${MICRO_BATCH:+ train.micro_batch=$MICRO_BATCH}"
steps=${STEPS:-12}  # the first 10% (at least one) are warm-up
declare -A sets=(
  [single]="parallel.strategy=single"
  [tp2]="parallel.strategy=tp parallel.tp=2"
  [pp2]="parallel.strategy=pp parallel.pp=2"
  [ep_dp2]="parallel.strategy=ep_dp"
  [tp1]="parallel.strategy=tp parallel.tp=1"
  [ep_dp1]="parallel.strategy=ep_dp"
  [ma_sep]="parallel.strategy=ma_sep parallel.attn_tp=1 parallel.attn_replicas=1 parallel.moe_ranks=1 parallel.in_flight=${MA_INFLIGHT:-2}"
)
declare -A ranks=([single]=1 [tp2]=2 [pp2]=2 [ep_dp2]=2 [ma_sep]=2 [tp1]=1 [ep_dp1]=1)
for label in $labels; do
  echo "=== $label"
  timeout "${RUN_TIMEOUT:-420}" torchrun --standalone --nproc_per_node "${ranks[$label]}" -m masep.bench \
    --config h200 --set $common ${sets[$label]} ${EXTRA_SET:-} --steps "$steps" --decode \
    --label "$label" --out "$out" ${PROFILE:+--profile "$out/profile"} 2>&1 \
    | grep -vE "Warning|warnings.warn|^\s*$" | tail -40
done
python3 -m masep.bench.table "$out" | tee "$out/table.md"
