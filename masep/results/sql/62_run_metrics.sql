-- Every figure of the paper's Section 4.6, measured per run, as one long table `run_metrics`
-- (run_id, metric, x, value, unit, reason, method), built once by `masep collect`: a value is
-- what the run measured, or NULL and `reason` says why. The paper-shaped views (63_paper_tables.sql) aggregate it.
--
-- Steady state: timing figures leave out the first ceil(10%) of a run's steps (at least one),
-- as run_summary does; routing, loss and memory figures use every step.

-- Kinds a study may not have produced yet (a study without GPU telemetry, an inference-only
-- study, run folders from before these files existed): empty stand-ins, so that every view
-- answers. Where `masep collect` loaded the kind, the table is kept as it is.
CREATE VIEW IF NOT EXISTS memory AS
SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS step, NULL::BIGINT AS rank,
       NULL::BIGINT AS params_bytes, NULL::BIGINT AS grads_bytes, NULL::BIGINT AS optimizer_bytes,
       NULL::BIGINT AS peak_bytes, NULL::VARCHAR AS peak_method, NULL::VARCHAR AS source
WHERE false;

CREATE VIEW IF NOT EXISTS telemetry AS
SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS rank, NULL::VARCHAR AS host,
       NULL::DOUBLE AS segment_start_s, NULL::DOUBLE AS t_s, NULL::DOUBLE AS gpu_util,
       NULL::DOUBLE AS mem_util, NULL::DOUBLE AS power_w, NULL::BIGINT AS energy_mj,
       NULL::BIGINT AS mem_used_bytes, NULL::DOUBLE AS cpu_energy_j, NULL::VARCHAR AS gpu_reason,
       NULL::VARCHAR AS energy_reason, NULL::VARCHAR AS cpu_energy_reason, NULL::VARCHAR AS source
WHERE false;

CREATE VIEW IF NOT EXISTS energy_window AS
SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS rank, NULL::VARCHAR AS host,
       NULL::DOUBLE AS segment_start_s, NULL::BIGINT AS warmup_steps, NULL::BIGINT AS first_step,
       NULL::BIGINT AS last_step, NULL::BIGINT AS steps, NULL::BIGINT AS tokens,
       NULL::DOUBLE AS window_start_s, NULL::DOUBLE AS window_end_s, NULL::DOUBLE AS window_s,
       NULL::BIGINT AS samples, NULL::DOUBLE AS gpu_util_mean, NULL::DOUBLE AS mem_util_mean,
       NULL::DOUBLE AS power_mean_w, NULL::DOUBLE AS gpu_energy_j, NULL::DOUBLE AS cpu_energy_j,
       NULL::VARCHAR AS gpu_reason, NULL::VARCHAR AS energy_reason, NULL::VARCHAR AS cpu_energy_reason,
       NULL::VARCHAR AS source
WHERE false;

-- One row per run: what the metric views need from run.json. config_key identifies a
-- configuration across seeds (the resolved config without train.seed, launch and the
-- inference context list), so that repeat_stats can say when it pools different ones.
CREATE VIEW run_info AS
SELECT run_id, experiment, strategy, seed, world_size, run_dir,
       coalesce(run_json ->> 'device', '') LIKE 'cuda%'                AS on_gpu,
       run_json -> 'flops'                                              AS flops,
       TRY_CAST(config ->> '$.model.lb_coef' AS DOUBLE)                 AS lb_coef,
       TRY_CAST(config ->> '$.model.z_coef' AS DOUBLE)                  AS z_coef,
       left(md5(CAST(json_merge_patch(coalesce(config, '{}'::JSON),
            '{"train": {"seed": null}, "launch": null, "infer": {"context_lengths": null}}') AS VARCHAR)), 8)
                                                                        AS config_key
FROM runs;

-- Step rows after warm-up (every rank).
CREATE VIEW steady_steps AS
SELECT s.* FROM steps s JOIN run_steps w USING (run_id) WHERE s.step > w.last_warmup_step;

-- Tokens routed per run, layer and expert over all steps, as a share of the layer's routed tokens.
CREATE TABLE expert_shares AS
WITH t AS (
    SELECT run_id, layer, expert, sum(tokens) AS tokens FROM experts GROUP BY ALL
)
SELECT run_id, layer, expert, tokens,
       tokens / nullif(sum(tokens) OVER (PARTITION BY run_id, layer), 0) AS share
FROM t
ORDER BY run_id, layer, expert;

CREATE TABLE run_metrics AS
WITH
-- Training figures come from training runs and from GPU benchmark runs (`python -m masep.bench`:
-- steps of synthetic batches, so no quality figures for them).
train AS (SELECT * FROM run_info WHERE experiment IN ('train', 'bench')),
-- One pass over the steady steps (a view over the run files) for every per-run mean below.
-- Speed: rank 0's steady steps (rank 0 waits for every rank at the end of a step, and `tokens`
-- is the global batch's), tokens over time. Communication by kind as a share of step time: sum
-- over ranks and steady steps of the kind's seconds over the sum of step seconds. Router losses:
-- means over steady steps.
steady AS (
    SELECT run_id,
           sum(tokens) FILTER (WHERE rank = 0) / sum(step_time_s) FILTER (WHERE rank = 0) AS throughput,
           avg(step_time_s) FILTER (WHERE rank = 0) AS step_time_s,
           100 * sum(comm_attn_allreduce_s) / sum(step_time_s) AS attn,
           100 * sum(comm_moe_dispatch_s)   / sum(step_time_s) AS moe,
           100 * sum(comm_grad_sync_s)      / sum(step_time_s) AS grad,
           100 * sum(comm_p2p_s)            / sum(step_time_s) AS p2p,
           100 * sum(idle_s)                / sum(step_time_s) AS idle,
           100 * sum(compute_s)             / sum(step_time_s) AS compute,
           avg(lb_loss) AS lb, avg(z_loss) AS z
    FROM steady_steps GROUP BY run_id
),
speed_rows AS (
    SELECT t.run_id, m.metric, m.value, m.unit,
           CASE WHEN m.value IS NULL THEN 'no steady-state step (warm-up only)' END AS reason
    FROM train t LEFT JOIN steady s USING (run_id),
    LATERAL (VALUES ('throughput_tok_s', s.throughput, 'tokens/s'),
                    ('tps_per_gpu', s.throughput / t.world_size, 'tokens/s/GPU'),
                    ('step_time_s', s.step_time_s, 's')) AS m(metric, value, unit)
),
-- MFU from the FLOP record of run.json (masep/telemetry/mfu.py).
mfu_rows AS (
    SELECT t.run_id, m.metric, m.value * 100 AS value, '%' AS unit,
           CASE WHEN m.value IS NOT NULL THEN NULL
                WHEN t.flops IS NULL THEN 'run.json has no FLOP record'
                WHEN t.flops ->> 'peak_reason' IS NOT NULL THEN t.flops ->> 'peak_reason'
                WHEN s.throughput IS NULL THEN 'no steady-state step (warm-up only)'
                ELSE m.missing END AS reason,
           'model FLOPs (3 x forward, masep/telemetry/flops.py) / (GPUs x ' ||
               coalesce(t.flops ->> 'peak_source', 'peak') || ')' AS method
    FROM train t LEFT JOIN steady s USING (run_id),
    LATERAL (VALUES
        ('mfu_pct', s.throughput * CAST(t.flops ->> 'train_flops_per_token' AS DOUBLE)
                    / (CAST(t.flops ->> 'gpus' AS DOUBLE) * CAST(t.flops ->> 'peak_flops_per_gpu' AS DOUBLE)), NULL),
        ('mfu_attention_group_pct', s.throughput * CAST(t.flops ->> 'attention_group_flops_per_token' AS DOUBLE)
                    / (CAST(t.flops ->> 'attention_group_gpus' AS DOUBLE) * CAST(t.flops ->> 'peak_flops_per_gpu' AS DOUBLE)),
                    'one group: only ma_sep splits attention and experts'),
        ('mfu_moe_group_pct', s.throughput * CAST(t.flops ->> 'moe_group_flops_per_token' AS DOUBLE)
                    / (CAST(t.flops ->> 'moe_group_gpus' AS DOUBLE) * CAST(t.flops ->> 'peak_flops_per_gpu' AS DOUBLE)),
                    'one group: only ma_sep splits attention and experts')
    ) AS m(metric, value, missing)
),
-- Kinds a strategy never calls are 0; a column the run did not record is NULL. The paper's
-- parameter broadcast has no counterpart: every rank builds the same initial weights from the
-- seed, so that row is NULL with the reason.
comm_rows AS (
    SELECT t.run_id, m.metric, m.value, '%' AS unit,
           CASE WHEN m.value IS NOT NULL THEN NULL
                WHEN m.metric = 'comm_param_bcast_pct'
                    THEN 'not measured: no strategy broadcasts parameters (every rank builds the seed''s weights)'
                WHEN c.run_id IS NULL THEN 'no steady-state step (warm-up only)'
                ELSE 'not recorded in the step rows' END AS reason,
           'sum over ranks and steady steps of the kind''s time / sum of step time' AS method
    FROM train t LEFT JOIN steady c USING (run_id),
    LATERAL (VALUES ('comm_attn_allreduce_pct', c.attn), ('comm_moe_dispatch_pct', c.moe),
                    ('comm_grad_sync_pct', c.grad), ('comm_param_bcast_pct', NULL::DOUBLE),
                    ('comm_p2p_pct', c.p2p),
                    ('comm_total_pct', c.attn + c.moe + c.grad + c.p2p),
                    ('idle_pct', c.idle), ('compute_pct', c.compute)) AS m(metric, value)
),
-- Load balance: spread of the ranks' execution (compute) time within a step, averaged over steps.
balance AS (
    SELECT run_id, avg(sd) AS sd, avg(sd / nullif(mu, 0)) AS cv, max(ranks) AS ranks
    FROM (SELECT run_id, step, stddev_pop(compute_s) AS sd, avg(compute_s) AS mu, count(*) AS ranks
          FROM steady_steps GROUP BY run_id, step)
    GROUP BY run_id
),
balance_rows AS (
    SELECT t.run_id, m.metric, CASE WHEN b.ranks > 1 THEN m.value END AS value, m.unit,
           CASE WHEN b.ranks > 1 AND m.value IS NOT NULL THEN NULL
                WHEN b.run_id IS NULL THEN 'no steady-state step (warm-up only)'
                WHEN b.ranks <= 1 THEN 'one rank: no spread'
                ELSE 'compute_s not recorded' END AS reason,
           'population std over ranks of compute_s per steady step, mean over steps' AS method
    FROM train t LEFT JOIN balance b USING (run_id),
    LATERAL (VALUES ('exec_time_std_s', b.sd, 's'), ('exec_time_cv', b.cv, 'std/mean')) AS m(metric, value, unit)
),
-- Router losses (the weighted terms are what the loss adds), dropped assignments over every step
-- (the ranks report the same global count; rank 0's).
dropped AS (
    SELECT run_id, sum(dropped_tokens) AS dropped FROM steps WHERE rank = 0 GROUP BY run_id
),
routed AS (
    SELECT run_id, sum(tokens) AS kept FROM expert_shares GROUP BY run_id
),
loss_rows AS (
    SELECT t.run_id, m.metric, m.value, m.unit,
           CASE WHEN m.value IS NULL THEN m.missing END AS reason
    FROM train t LEFT JOIN steady l USING (run_id) LEFT JOIN dropped d USING (run_id)
         LEFT JOIN routed r USING (run_id),
    LATERAL (VALUES
        ('lb_loss', l.lb, 'loss', 'no steady-state step with a load-balancing loss'),
        ('lb_loss_weighted', l.lb * t.lb_coef, 'loss', 'no load-balancing loss or coefficient'),
        ('z_loss', l.z, 'loss', 'no steady-state step with a z-loss'),
        ('z_loss_weighted', l.z * t.z_coef, 'loss', 'no z-loss or coefficient'),
        ('dropped_tokens', d.dropped, 'assignments', 'no step rows from rank 0'),
        ('dropped_pct', 100.0 * d.dropped / nullif(d.dropped + r.kept, 0), '%', 'no expert token counts')
    ) AS m(metric, value, unit, missing)
),
-- Expert utilisation per layer (shares of routed tokens), averaged over layers.
per_layer AS (
    SELECT run_id, layer, stddev_pop(share) AS sd, min(share) AS lo, max(share) AS hi,
           count(*) FILTER (WHERE tokens = 0) AS unused
    FROM expert_shares GROUP BY run_id, layer
),
-- experts rows are rank 0's global counts, one per (step, layer, expert): no per-expert sum first.
active AS (
    SELECT run_id, avg(n_active / n_experts) AS active
    FROM (SELECT run_id, step, layer, count(*) FILTER (WHERE tokens > 0) AS n_active,
                 count(*) AS n_experts
          FROM experts GROUP BY run_id, step, layer)
    GROUP BY run_id
),
expert_rows AS (
    SELECT t.run_id, m.metric, m.value, m.unit,
           CASE WHEN m.value IS NOT NULL THEN NULL
                WHEN e.run_id IS NULL THEN 'no expert token counts'
                ELSE m.missing END AS reason
    FROM train t
    LEFT JOIN (SELECT run_id, avg(sd) AS sd, avg(lo) AS lo, avg(hi) AS hi,
                      avg(hi / nullif(lo, 0)) AS ratio, sum(unused) AS unused,
                      count(*) FILTER (WHERE lo = 0) AS layers_with_unused
               FROM per_layer GROUP BY run_id) e USING (run_id)
    LEFT JOIN active a USING (run_id),
    LATERAL (VALUES
        ('expert_share_std', e.sd, 'fraction', NULL),
        ('expert_share_min_pct', 100 * e.lo, '%', NULL),
        ('expert_share_max_pct', 100 * e.hi, '%', NULL),
        ('imbalance_ratio', CASE WHEN e.layers_with_unused = 0 THEN e.ratio END, 'max/min',
         'an expert received no token: the ratio is unbounded'),
        ('experts_unused', e.unused, 'experts', NULL),
        ('experts_active_pct', 100 * a.active, '%', NULL)
    ) AS m(metric, value, unit, missing)
),
-- Quality: last training loss and last validation figures; wall-clock training time until
-- the loss first reaches the study's common target, the highest of the runs' lowest losses
-- (a loss every training run reaches).
curve AS (SELECT run_id, step, loss FROM loss_curve WHERE loss IS NOT NULL AND experiment = 'train'),
final AS (SELECT run_id, arg_max(loss, step) AS loss FROM curve GROUP BY run_id),
val AS (SELECT run_id, arg_max(val_loss, step) AS val_loss, arg_max(val_ppl, step) AS val_ppl
        FROM eval GROUP BY run_id),
target AS (SELECT max(lowest) AS target FROM (SELECT min(loss) AS lowest FROM curve GROUP BY run_id)),
reached AS (
    SELECT c.run_id, min(c.step) AS step FROM curve c, target WHERE c.loss <= target.target GROUP BY c.run_id
),
time_to AS (
    SELECT r.run_id, sum(s.step_time_s) AS seconds
    FROM reached r JOIN steps s ON s.run_id = r.run_id AND s.rank = 0 AND s.step <= r.step
    GROUP BY r.run_id
),
quality_rows AS (
    SELECT t.run_id, m.metric, m.value, m.unit, CASE WHEN m.value IS NULL THEN m.missing END AS reason,
           m.method
    FROM (SELECT * FROM train WHERE experiment = 'train') t LEFT JOIN final f USING (run_id)
         LEFT JOIN val v USING (run_id) LEFT JOIN time_to tt USING (run_id), target,
    LATERAL (VALUES
        ('final_train_loss', f.loss, 'nats', 'no loss recorded', NULL),
        ('final_train_ppl', exp(least(f.loss, 700)), 'ppl', 'no loss recorded', 'exp(final training loss)'),
        ('final_val_loss', v.val_loss, 'nats', 'no validation row', NULL),
        ('final_val_ppl', v.val_ppl, 'ppl', 'no validation row', NULL),
        ('time_to_target_loss_s', tt.seconds, 's', 'no loss recorded',
         'sum of step times until the loss first reaches ' || round(target.target, 4) ||
         ' (the highest of the training runs'' lowest losses)')
    ) AS m(metric, value, unit, missing, method)
),
-- Telemetry over each rank's steady-state windows (energy_window rows, one per rank and
-- process attempt). Energy per token of the run = sum over ranks of (rank energy / window
-- tokens); CPU (RAPL) energy counts one rank per host (the package counters are the host's).
window_rows AS (  -- typed as the writer types them (an all-NULL column can load as INTEGER)
    SELECT run_id, rank, CAST(host AS VARCHAR) AS host, CAST(tokens AS BIGINT) AS tokens,
           CAST(window_s AS DOUBLE) AS window_s, CAST(gpu_util_mean AS DOUBLE) AS gpu_util_mean,
           CAST(mem_util_mean AS DOUBLE) AS mem_util_mean, CAST(power_mean_w AS DOUBLE) AS power_mean_w,
           CAST(gpu_energy_j AS DOUBLE) AS gpu_energy_j, CAST(cpu_energy_j AS DOUBLE) AS cpu_energy_j,
           CAST(gpu_reason AS VARCHAR) AS gpu_reason, CAST(energy_reason AS VARCHAR) AS energy_reason,
           CAST(cpu_energy_reason AS VARCHAR) AS cpu_energy_reason
    FROM energy_window
),
rank_energy AS (
    SELECT run_id, rank, any_value(host) AS host,
           sum(gpu_energy_j) / nullif(sum(tokens) FILTER (WHERE gpu_energy_j IS NOT NULL), 0) AS gpu_j_per_token,
           sum(cpu_energy_j) / nullif(sum(tokens) FILTER (WHERE cpu_energy_j IS NOT NULL), 0) AS cpu_j_per_token,
           sum(gpu_util_mean * window_s) / nullif(sum(window_s) FILTER (WHERE gpu_util_mean IS NOT NULL), 0) AS gpu_util,
           sum(mem_util_mean * window_s) / nullif(sum(window_s) FILTER (WHERE mem_util_mean IS NOT NULL), 0) AS mem_util,
           sum(power_mean_w * window_s) / nullif(sum(window_s) FILTER (WHERE power_mean_w IS NOT NULL), 0) AS power_w,
           sum(window_s) AS window_s,
           any_value(gpu_reason) AS gpu_reason, any_value(energy_reason) AS energy_reason,
           any_value(cpu_energy_reason) AS cpu_energy_reason
    FROM window_rows GROUP BY run_id, rank
),
run_energy AS (
    SELECT run_id, count(*) AS ranks, count(gpu_j_per_token) AS ranks_with_energy,
           sum(gpu_j_per_token) AS gpu_j_per_token,
           sum(cpu_j_per_token) FILTER (WHERE host_lead) AS cpu_j_per_token,
           avg(gpu_util) AS gpu_util, avg(mem_util) AS mem_util, avg(power_w) AS power_w,
           avg(window_s) AS window_s,
           any_value(gpu_reason) AS gpu_reason, any_value(energy_reason) AS energy_reason,
           any_value(cpu_energy_reason) AS cpu_energy_reason
    FROM (SELECT *, rank = min(rank) OVER (PARTITION BY run_id, host) AS host_lead FROM rank_energy)
    GROUP BY run_id
),
energy_rows AS (
    SELECT t.run_id, m.metric, m.value, m.unit,
           CASE WHEN m.value IS NOT NULL THEN NULL
                WHEN e.run_id IS NULL THEN 'no telemetry recorded'
                WHEN e.ranks < t.world_size THEN 'telemetry from ' || e.ranks || ' of ' || t.world_size || ' ranks'
                ELSE coalesce(m.missing, 'not measured') END AS reason,
           m.method
    FROM train t LEFT JOIN run_energy e USING (run_id),
    LATERAL (VALUES
        ('gpu_util_pct', CASE WHEN e.ranks = t.world_size THEN e.gpu_util END, '%', e.gpu_reason,
         'NVML utilization.gpu: share of time a kernel ran, mean over steady windows and ranks'),
        ('mem_util_pct', CASE WHEN e.ranks = t.world_size THEN e.mem_util END, '%', e.gpu_reason,
         'NVML utilization.memory: share of time device memory was read or written (busy time, not bandwidth), mean over steady windows and ranks'),
        ('gpu_power_w', CASE WHEN e.ranks = t.world_size THEN e.power_w END, 'W', e.gpu_reason,
         'NVML power draw, mean over steady windows and ranks'),
        ('energy_per_token_mj',
         CASE WHEN e.ranks_with_energy = t.world_size AND e.ranks = t.world_size THEN 1e3 * e.gpu_j_per_token END,
         'mJ/token', coalesce(e.energy_reason, 'energy from ' || e.ranks_with_energy || ' of ' || t.world_size || ' ranks'),
         'NVML total-energy counter over each rank''s steady window / window tokens, summed over ranks (GPUs only)'),
        ('cpu_energy_per_token_mj', 1e3 * e.cpu_j_per_token, 'mJ/token', e.cpu_energy_reason,
         'RAPL package energy over the steady window / window tokens, one rank per host'),
        ('energy_window_s', e.window_s, 's', NULL, 'steady window per rank (mean over ranks)')
    ) AS m(metric, value, unit, missing, method)
),
-- Memory per GPU by component: the largest of the ranks (the GPU that limits the job).
-- Parameters, gradients and optimizer states are summed from the tensors a rank holds; the
-- peak is the allocator's high-water mark on GPU, the process's peak RSS on CPU.
mem_rank AS (
    SELECT * FROM memory
    QUALIFY row_number() OVER (PARTITION BY run_id, rank ORDER BY peak_bytes DESC, step DESC) = 1
),
mem AS (
    SELECT run_id, max(params_bytes) AS params, max(grads_bytes) AS grads, max(optimizer_bytes) AS opt,
           max(peak_bytes) AS peak,
           max(peak_bytes - params_bytes - grads_bytes - optimizer_bytes)
               FILTER (WHERE peak_method LIKE 'cuda%') AS activations,
           bool_and(peak_method LIKE 'cuda%') AS gpu_peak, any_value(peak_method) AS peak_method
    FROM mem_rank GROUP BY run_id
),
memory_rows AS (
    SELECT t.run_id, m.metric, m.value / 1e9 AS value, 'GB' AS unit,
           CASE WHEN m.value IS NOT NULL THEN NULL
                WHEN mem.run_id IS NULL THEN 'no memory rows'
                ELSE m.missing END AS reason,
           m.method
    FROM train t LEFT JOIN mem USING (run_id),
    LATERAL (VALUES
        ('mem_params_gb', mem.params, NULL, 'tensors held (max over ranks)'),
        ('mem_grads_gb', mem.grads, NULL, 'tensors held after the first backward (max over ranks)'),
        ('mem_optimizer_gb', mem.opt, NULL, 'AdamW state tensors (max over ranks)'),
        ('mem_activations_gb', CASE WHEN mem.gpu_peak THEN mem.activations END,
         'CPU peak is the whole process''s resident set (interpreter, libraries): activations are not separable',
         'allocator peak minus parameters, gradients and optimizer states (activations and temporaries; max over ranks)'),
        ('mem_comm_buffers_gb', NULL,
         'not measured: NCCL/gloo allocate their buffers outside the tensors counted here', NULL),
        ('mem_total_gb', mem.peak, NULL, mem.peak_method || ' (max over ranks)')
    ) AS m(metric, value, missing, method)
),
-- Inference: rank 0's figures per context length.
infer_rows AS (
    SELECT i.run_id, m.metric, i.context_len AS x, m.value, m.unit,
           CASE WHEN m.value IS NULL THEN 'not recorded' END AS reason, m.method
    FROM inference i JOIN run_info r USING (run_id),
    LATERAL (VALUES
        ('tpot_ms', i.tpot_ms, 'ms/token', 'mean time between decoded tokens reaching the host (streamed: next step queued before the host reads)'),
        ('prefill_ms', i.prefill_ms, 'ms', NULL),
        ('decode_tok_s', i.tokens_per_s, 'tokens/s', 'batch / TPOT')
    ) AS m(metric, value, unit, method)
    WHERE i.rank = 0 AND r.experiment IN ('infer', 'bench')
)
SELECT run_id, metric, CAST(NULL AS BIGINT) AS x, CAST(value AS DOUBLE) AS value, unit, reason,
       CAST(NULL AS VARCHAR) AS method FROM speed_rows
UNION ALL BY NAME SELECT * FROM mfu_rows
UNION ALL BY NAME SELECT * FROM comm_rows
UNION ALL BY NAME SELECT * FROM balance_rows
UNION ALL BY NAME SELECT * FROM loss_rows
UNION ALL BY NAME SELECT * FROM expert_rows
UNION ALL BY NAME SELECT * FROM quality_rows
UNION ALL BY NAME SELECT * FROM energy_rows
UNION ALL BY NAME SELECT * FROM memory_rows
UNION ALL BY NAME SELECT * FROM infer_rows
ORDER BY ALL;

-- Run metrics with the run's coordinates, and the improvements of ma_sep over tp_pp paired by
-- seed (same world size, and context length for TPOT), as the paper's Section 5.10 reports them.
CREATE VIEW improvement_metrics AS
SELECT * FROM (VALUES
    ('tpot_ms', 'tpot_reduction_pct', false),
    ('tps_per_gpu', 'tps_increase_pct', true),
    ('throughput_tok_s', 'throughput_increase_pct', true),
    ('gpu_util_pct', 'gpu_util_increase_pct', true),
    ('mem_util_pct', 'mem_util_increase_pct', true),
    ('energy_per_token_mj', 'energy_reduction_pct', false),
    ('time_to_target_loss_s', 'convergence_speedup_pct', false)
) AS t(metric, improvement, higher_is_better);

CREATE VIEW run_values AS
WITH base AS (
    SELECT r.experiment, r.strategy, r.world_size, r.seed, r.config_key, m.*
    FROM run_metrics m JOIN run_info r USING (run_id)
),
paired AS (
    SELECT a.experiment, 'ma_sep' AS strategy, a.world_size, a.seed, a.config_key,
           NULL::VARCHAR AS run_id, i.improvement AS metric, a.x,
           100 * CASE WHEN i.higher_is_better THEN a.value - b.value ELSE b.value - a.value END
               / nullif(b.value, 0) AS value,
           '%' AS unit,
           CASE WHEN a.value IS NULL OR b.value IS NULL THEN coalesce(a.reason, b.reason) END AS reason,
           'ma_sep vs tp_pp, same seed' AS method
    FROM base a
    JOIN base b ON a.strategy = 'ma_sep' AND b.strategy = 'tp_pp' AND a.metric = b.metric
               AND a.experiment = b.experiment AND a.world_size = b.world_size
               AND a.seed IS NOT DISTINCT FROM b.seed AND a.x IS NOT DISTINCT FROM b.x
    JOIN improvement_metrics i ON i.metric = a.metric
)
SELECT * FROM base UNION ALL BY NAME SELECT * FROM paired;
