-- The paper's tables and figures, measured beside claimed. Every view answers on any study:
-- a strategy without runs shows the paper's claim with measured NULL, a measured strategy the
-- paper does not report (ep_dp, single) shows measured with claim NULL, and a figure the
-- machine cannot measure is NULL with `reason`. Means are over the runs (seeds) of a strategy
-- and world size; `runs` counts the runs with a value.

-- Mean over runs per strategy, world size, metric and x; plus ma_sep's improvement over tp_pp
-- (from the two means, as the paper's tables compute it) and the variance across seeds of the
-- final training loss (5.5's "loss variance").
CREATE VIEW metric_means AS
WITH g AS (
    SELECT strategy, world_size, metric, x, any_value(unit) AS unit,
           avg(value) AS measured, count(value) AS runs,
           any_value(reason) FILTER (WHERE value IS NULL) AS reason,
           any_value(method) AS method,
           bool_and(run_id IN (SELECT run_id FROM run_info WHERE on_gpu)) AS on_gpu
    FROM run_values WHERE run_id IS NOT NULL
    GROUP BY ALL
),
improved AS (
    SELECT a.strategy, a.world_size, i.improvement AS metric, a.x, '%' AS unit,
           100 * CASE WHEN i.higher_is_better THEN a.measured - b.measured ELSE b.measured - a.measured END
               / nullif(b.measured, 0) AS measured,
           least(a.runs, b.runs) AS runs,
           CASE WHEN a.measured IS NULL OR b.measured IS NULL THEN coalesce(a.reason, b.reason) END AS reason,
           'ma_sep mean vs tp_pp mean' AS method, a.on_gpu AND b.on_gpu AS on_gpu
    FROM g a
    JOIN g b ON a.strategy = 'ma_sep' AND b.strategy = 'tp_pp' AND a.metric = b.metric
            AND a.world_size = b.world_size AND a.x IS NOT DISTINCT FROM b.x
    JOIN improvement_metrics i ON i.metric = a.metric
),
variance AS (
    SELECT strategy, world_size, 'loss_variance' AS metric, NULL::BIGINT AS x, 'nats^2' AS unit,
           var_samp(value) AS measured, count(value) AS runs,
           CASE WHEN count(value) < 2 THEN 'one run: a variance needs two seeds' END AS reason,
           'variance across seeds of the final training loss' AS method
    FROM run_values WHERE metric = 'final_train_loss' AND run_id IS NOT NULL
    GROUP BY ALL
)
SELECT * FROM g
UNION ALL BY NAME SELECT * FROM improved
UNION ALL BY NAME SELECT * FROM variance;

CREATE MACRO strategy_order(s) AS
    CASE s WHEN 'tp' THEN 1 WHEN 'pp' THEN 2 WHEN 'tp_pp' THEN 3 WHEN 'ma_sep' THEN 4
           WHEN 'ep_dp' THEN 5 WHEN 'single' THEN 6 ELSE 7 END;

-- The claims of one source beside the means of the same metric (and x): the measured rows of
-- every strategy for the metrics (and x values) the source claims, plus `extra` metrics the
-- paper does not report. Columns: metric, strategy, world_size, x, unit, paper_label, paper_claim,
-- measured, diff (measured - claim), ratio (measured / claim), runs, reason, method, note.
CREATE MACRO beside_claims(src, extra) AS TABLE
WITH c AS (
    SELECT * FROM paper_claims WHERE source = src AND stat = 'value'
),
m AS (
    SELECT * FROM metric_means mm
    WHERE list_contains(extra, mm.metric)
       OR EXISTS (SELECT 1 FROM c WHERE c.metric = mm.metric AND c.x IS NOT DISTINCT FROM mm.x)
),
metric_rank AS (
    SELECT metric, min(ord) AS o FROM c GROUP BY metric
)
SELECT coalesce(m.metric, c.metric) AS metric,
       coalesce(m.strategy, c.strategy) AS strategy,
       m.world_size,
       coalesce(m.x, c.x) AS x,
       coalesce(m.unit, c.unit) AS unit,
       c.paper_label,
       c.value AS paper_claim,
       m.measured,
       m.measured - c.value AS diff,
       m.measured / nullif(c.value, 0) AS ratio,
       coalesce(m.runs, 0) AS runs,
       CASE WHEN m.measured IS NOT NULL THEN NULL
            WHEN m.metric IS NULL THEN coalesce(
                c.not_measured,
                CASE WHEN EXISTS (SELECT 1 FROM run_info ri WHERE ri.strategy = c.strategy)
                     THEN 'not measured by this study''s runs of this strategy'
                     ELSE 'no run of this strategy in the study' END)
            ELSE coalesce(m.reason, 'not measured') END AS reason,
       m.method,
       -- A CPU run (the embedded default) measures the pipeline, not the paper's 16 GPUs.
       nullif(concat_ws('; ', CASE WHEN m.measured IS NOT NULL AND c.value IS NOT NULL AND NOT m.on_gpu
                                   THEN 'CPU run: not comparable with the paper''s 16-GPU figure' END,
                        c.note), '') AS note
FROM m FULL JOIN c ON c.metric = m.metric AND c.strategy = m.strategy AND c.x IS NOT DISTINCT FROM m.x
LEFT JOIN metric_rank r ON r.metric = coalesce(m.metric, c.metric)
ORDER BY coalesce(r.o, 100000 + list_position(extra, coalesce(m.metric, c.metric))),
         strategy_order(coalesce(m.strategy, c.strategy)), coalesce(m.strategy, c.strategy),
         coalesce(m.x, c.x), m.world_size NULLS FIRST, c.ord;

-- Table 1: TPOT (inference, context 2048), TPS per GPU and throughput (training, after
-- warm-up), GPU and memory-controller utilisation (NVML), the improvements of ma_sep over
-- tp_pp, and MFU (per GPU, and per group for ma_sep), which the paper does not report.
CREATE VIEW table1_performance AS
SELECT * FROM beside_claims('Table 1', ['mfu_pct', 'mfu_attention_group_pct', 'mfu_moe_group_pct']);

-- Table 2: communication time by kind as a share of step time (plus pipeline send/recv, idle
-- and compute, which the paper leaves out).
CREATE VIEW table2_communication AS
SELECT * FROM beside_claims('Table 2', ['comm_p2p_pct', 'idle_pct', 'compute_pct']);

-- Table 3: memory per GPU by component, GB (1e9 bytes), the largest rank of a run; per-rank
-- detail in memory_by_rank.
CREATE VIEW table3_memory AS
SELECT * FROM beside_claims('Table 3', []::VARCHAR[]);

-- Table 4: TPOT by context length, and ma_sep's reduction against tp_pp.
CREATE VIEW table4_tpot AS
SELECT * FROM beside_claims('Table 4', ['prefill_ms']);

-- Section 5.8: energy per token over steady-state windows (GPU: NVML; CPU: RAPL).
CREATE VIEW energy AS
SELECT * FROM beside_claims('Section 5.8', ['cpu_energy_per_token_mj', 'gpu_power_w', 'energy_window_s']);

-- Section 5.4 (besides the per-expert series in expert_utilization) and Section 4.6's load
-- balance: spread of execution time across ranks, router losses, dropped assignments.
CREATE VIEW load_balance AS
SELECT * FROM beside_claims('Section 5.4', ['exec_time_std_s', 'exec_time_cv', 'experts_unused', 'lb_loss',
                                            'z_loss', 'z_loss_weighted', 'dropped_tokens', 'dropped_pct'])
WHERE metric <> 'expert_share_pct';

-- Section 5.5's final-quality figures (the loss curve is in `convergence`).
CREATE VIEW model_quality AS
SELECT * FROM beside_claims('Section 5.5', ['final_train_loss', 'final_train_ppl', 'final_val_loss',
                                            'time_to_target_loss_s'])
WHERE metric <> 'train_loss';

-- Section 5.2: throughput against GPUs per strategy. Speedup is relative to the strategy's
-- smallest measured world size (`base_gpus`; the paper's base is 4), efficiency =
-- speedup x base_gpus / gpus.
CREATE VIEW scaling AS
WITH m AS (
    SELECT strategy, world_size AS gpus, measured AS throughput_tok_s, runs, reason
    FROM metric_means WHERE metric = 'throughput_tok_s'
),
b AS (
    SELECT strategy, min(gpus) AS base_gpus, arg_min(throughput_tok_s, gpus) AS base_throughput
    FROM m WHERE throughput_tok_s IS NOT NULL GROUP BY strategy
),
meas AS (
    SELECT m.*, b.base_gpus, m.throughput_tok_s / b.base_throughput AS speedup,
           100 * m.throughput_tok_s / b.base_throughput * b.base_gpus / m.gpus AS efficiency_pct
    FROM m LEFT JOIN b USING (strategy)
),
c AS (
    SELECT strategy, x AS gpus,
           max(value) FILTER (WHERE metric = 'speedup') AS paper_speedup,
           max(value) FILTER (WHERE metric = 'scaling_efficiency_pct' AND paper_label = 'Scaling Efficiency') AS paper_efficiency_pct
    FROM paper_claims WHERE source = 'Section 5.2' AND x IS NOT NULL GROUP BY ALL
)
SELECT coalesce(meas.strategy, c.strategy) AS strategy, coalesce(meas.gpus, c.gpus) AS gpus,
       coalesce(meas.runs, 0) AS runs, meas.throughput_tok_s, meas.base_gpus,
       meas.speedup, c.paper_speedup, meas.speedup - c.paper_speedup AS speedup_diff,
       meas.efficiency_pct, c.paper_efficiency_pct, meas.efficiency_pct - c.paper_efficiency_pct AS efficiency_diff,
       CASE WHEN meas.speedup IS NOT NULL THEN NULL
            WHEN meas.strategy IS NULL THEN 'no run of this strategy at this size'
            ELSE coalesce(meas.reason, 'no throughput at the base size') END AS reason
FROM meas FULL JOIN c ON meas.strategy = c.strategy AND meas.gpus = c.gpus
ORDER BY strategy_order(coalesce(meas.strategy, c.strategy)), 2;

-- Section 5.4: share of routed tokens (kept assignments, every step) per expert, per layer
-- and over all layers (layer NULL), mean over runs; expert_id counts from 1 as the paper does.
CREATE VIEW expert_utilization AS
WITH per_run AS (
    SELECT run_id, layer, expert, tokens, share FROM expert_shares
    UNION ALL
    SELECT run_id, NULL AS layer, expert, sum(tokens) AS tokens,
           sum(tokens) / nullif(sum(sum(tokens)) OVER (PARTITION BY run_id), 0) AS share
    FROM expert_shares GROUP BY run_id, expert
),
m AS (
    SELECT r.strategy, r.world_size, p.layer, p.expert, count(p.share) AS runs,
           sum(p.tokens) AS tokens, 100 * avg(p.share) AS share_pct
    FROM per_run p JOIN run_info r USING (run_id)
    GROUP BY ALL
),
c AS (
    SELECT strategy, x AS expert_id, value AS paper_share_pct, note
    FROM paper_claims WHERE metric = 'expert_share_pct'
)
SELECT coalesce(m.strategy, c.strategy) AS strategy, m.world_size, m.layer,
       coalesce(m.expert, c.expert_id - 1) AS expert, coalesce(m.expert + 1, c.expert_id) AS expert_id,
       coalesce(m.runs, 0) AS runs, m.tokens, m.share_pct, c.paper_share_pct,
       m.share_pct - c.paper_share_pct AS diff_pct_points,
       CASE WHEN m.strategy IS NULL THEN 'no run of this strategy in the study' END AS reason,
       c.note
FROM m FULL JOIN c ON c.strategy = m.strategy AND c.expert_id = m.expert + 1
ORDER BY strategy_order(coalesce(m.strategy, c.strategy)), m.world_size NULLS FIRST,
         m.layer NULLS FIRST, 5;

-- Section 5.5: training loss (and perplexity), validation loss and perplexity where evaluated,
-- router losses, per step, mean over runs, beside the paper's loss curve (its steps 0..50K).
CREATE VIEW convergence AS
WITH per_run AS (
    SELECT r.strategy, r.world_size, l.run_id, l.step, l.loss, l.lb_loss, l.z_loss, e.val_loss, e.val_ppl
    FROM loss_curve l JOIN run_info r USING (run_id)
    LEFT JOIN eval e ON e.run_id = l.run_id AND e.step = l.step
    WHERE r.experiment = 'train'
),
m AS (
    SELECT strategy, world_size, step, count(loss) AS runs, avg(loss) AS train_loss,
           avg(exp(least(loss, 700))) AS train_ppl, avg(val_loss) AS val_loss, avg(val_ppl) AS val_ppl,
           avg(lb_loss) AS lb_loss, avg(z_loss) AS z_loss
    FROM per_run GROUP BY ALL
),
c AS (
    SELECT strategy, x AS step, paper_label, value AS paper_train_loss, note
    FROM paper_claims WHERE metric = 'train_loss'
)
SELECT coalesce(m.strategy, c.strategy) AS strategy, m.world_size, coalesce(m.step, c.step) AS step,
       coalesce(m.runs, 0) AS runs, m.train_loss, m.train_ppl, m.val_loss, m.val_ppl, m.lb_loss, m.z_loss,
       c.paper_label, c.paper_train_loss, m.train_loss - c.paper_train_loss AS diff,
       CASE WHEN m.strategy IS NULL THEN 'no run of this strategy reached this step' END AS reason,
       c.note
FROM m FULL JOIN c ON c.strategy = m.strategy AND c.step = m.step
ORDER BY strategy_order(coalesce(m.strategy, c.strategy)), 3, m.world_size NULLS FIRST;

-- Per-rank detail of Table 3 and of the energy windows.
CREATE VIEW memory_by_rank AS
WITH m AS (
    SELECT * FROM memory
    QUALIFY row_number() OVER (PARTITION BY run_id, rank ORDER BY peak_bytes DESC, step DESC) = 1
)
SELECT r.strategy, r.seed, m.run_id, m.rank,
       CASE WHEN r.strategy <> 'ma_sep' THEN 'model'
            WHEN m.rank < CAST(r_layout.attn AS BIGINT) THEN 'attention' ELSE 'moe' END AS role,
       m.params_bytes / 1e9 AS params_gb, m.grads_bytes / 1e9 AS grads_gb,
       m.optimizer_bytes / 1e9 AS optimizer_gb,
       CASE WHEN m.peak_method LIKE 'cuda%'
            THEN (m.peak_bytes - m.params_bytes - m.grads_bytes - m.optimizer_bytes) / 1e9 END AS activations_gb,
       NULL::DOUBLE AS comm_buffers_gb,
       m.peak_bytes / 1e9 AS peak_gb, m.peak_method,
       CASE WHEN m.peak_method LIKE 'cuda%'
            THEN 'allocator peak minus parameters, gradients and optimizer states'
            ELSE 'not separable: the CPU peak is the whole process''s resident set' END AS activations_method,
       'not measured: NCCL/gloo allocate their buffers outside the tensors counted here' AS comm_buffers_reason
FROM m JOIN run_info r USING (run_id)
LEFT JOIN (SELECT run_id, TRY_CAST(layout ->> 'attn_tp' AS BIGINT) * TRY_CAST(layout ->> 'attn_replicas' AS BIGINT) AS attn
           FROM runs) r_layout USING (run_id)
ORDER BY m.run_id, m.rank;

CREATE VIEW energy_by_rank AS
SELECT r.strategy, r.seed, w.run_id, w.rank, w.host,
       count(*) AS windows, sum(w.steps) AS steps, sum(w.tokens) AS tokens, sum(w.window_s) AS window_s,
       sum(w.samples) AS samples,
       sum(w.gpu_energy_j) AS gpu_energy_j,
       1e3 * sum(w.gpu_energy_j) / nullif(sum(w.tokens) FILTER (WHERE w.gpu_energy_j IS NOT NULL), 0) AS gpu_energy_per_token_mj,
       sum(w.power_mean_w * w.window_s) / nullif(sum(w.window_s) FILTER (WHERE w.power_mean_w IS NOT NULL), 0) AS power_mean_w,
       sum(w.gpu_util_mean * w.window_s) / nullif(sum(w.window_s) FILTER (WHERE w.gpu_util_mean IS NOT NULL), 0) AS gpu_util_pct,
       sum(w.mem_util_mean * w.window_s) / nullif(sum(w.window_s) FILTER (WHERE w.mem_util_mean IS NOT NULL), 0) AS mem_util_pct,
       sum(CAST(w.cpu_energy_j AS DOUBLE)) AS cpu_energy_j,
       any_value(CAST(w.gpu_reason AS VARCHAR)) AS gpu_reason,
       any_value(CAST(w.energy_reason AS VARCHAR)) AS energy_reason,
       any_value(CAST(w.cpu_energy_reason AS VARCHAR)) AS cpu_energy_reason
FROM energy_window w JOIN run_info r USING (run_id)
GROUP BY ALL
ORDER BY w.run_id, w.rank;

-- Section 5.10: repeated runs (seeds) of one configuration -> mean, sample standard deviation
-- and the two-sided 95% Student t interval mean +- t(0.975, n-1) x std / sqrt(n), beside the
-- paper's statistics. `configs` > 1 says that runs of different configurations were pooled.
CREATE VIEW repeat_stats AS
WITH s AS (
    SELECT experiment, strategy, world_size, metric, x, any_value(unit) AS unit,
           count(*) AS runs, count(value) AS n, count(DISTINCT config_key) AS configs,
           list(seed ORDER BY seed) FILTER (WHERE value IS NOT NULL) AS seeds,
           avg(value) AS mean, stddev_samp(value) AS std,
           any_value(reason) FILTER (WHERE value IS NULL) AS reason
    FROM run_values GROUP BY ALL
),
c AS (
    SELECT metric, strategy, x,
           max(value) FILTER (WHERE stat = 'mean') AS paper_mean,
           max(value) FILTER (WHERE stat = 'std') AS paper_std,
           max(value) FILTER (WHERE stat = 'ci_low') AS paper_ci_low,
           max(value) FILTER (WHERE stat = 'ci_high') AS paper_ci_high,
           CAST(max(value) FILTER (WHERE stat = 'n') AS BIGINT) AS paper_n
    FROM paper_claims WHERE source = 'Section 5.10' GROUP BY ALL
)
SELECT s.experiment, coalesce(s.strategy, c.strategy) AS strategy, s.world_size,
       coalesce(s.metric, c.metric) AS metric, coalesce(s.x, c.x) AS x, s.unit,
       coalesce(s.runs, 0) AS runs, coalesce(s.n, 0) AS n, s.configs, s.seeds,
       s.mean, s.std, t.t AS t_crit,
       s.mean - t.t * s.std / sqrt(s.n) AS ci_low,
       s.mean + t.t * s.std / sqrt(s.n) AS ci_high,
       CASE WHEN s.metric IS NULL THEN 'no run of this strategy in the study'
            WHEN s.n = 0 THEN coalesce(s.reason, 'not measured')
            WHEN s.n = 1 THEN 'one run: no spread' END AS reason,
       c.paper_mean, c.paper_std, c.paper_ci_low, c.paper_ci_high, c.paper_n
FROM s
LEFT JOIN t_critical_95 t ON t.df = least(s.n - 1, 100)
FULL JOIN c ON c.metric = s.metric AND c.strategy = s.strategy AND c.x IS NOT DISTINCT FROM s.x
ORDER BY s.experiment NULLS LAST, strategy_order(coalesce(s.strategy, c.strategy)), s.world_size,
         coalesce(s.metric, c.metric), coalesce(s.x, c.x);
