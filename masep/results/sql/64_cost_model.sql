-- A cost model of one training step, calibrated on the measured runs, predicting the paper's
-- model on 4-32 GPUs beyond the machines we ran on:
--   step = compute + communication x (1 - overlap)
--   compute = FLOPs per step (the run's FLOP record) / (ranks x per-rank FLOP rate)
--   communication = sum over collective kinds k of alpha_k + beta_k x bytes_k (bytes per rank
--                   and step from the layout and model dimensions, cost_volumes below)
--   overlap = the share of communication hidden behind compute (compute + comm - step) / comm
-- Rate, alpha, beta and overlap are fitted per hardware (the device name, or 'cpu') on every
-- measured training run with steady steps (regr_slope / regr_intercept over the runs of a
-- kind; a single point gives beta = time / bytes). A hardware without measured runs takes its
-- rate and links from cost_hardware (documented figures). Recalibrate: run the scaling sweep
-- on the new machines, `masep collect`; their runs become that hardware's fit.

-- Hardware we predict for: per-GPU FLOP rate (bf16) and the links' bandwidth per GPU.
CREATE VIEW cost_hardware AS
SELECT * FROM (VALUES
    ('H200', 0.476 * 790e12, 'MFU 47.6% of the measured 790 TFLOP/s dense bf16 rate (bench/h200-single-v5.json)',
     450e9, 50e9, 8, 10e-6, 'NVLink 4 450 GB/s per direction in a node of 8; 400 Gb/s InfiniBand per GPU across nodes; 10 us per collective'),
    ('A100', 0.476 * 312e12, 'the H200''s MFU (47.6%) of the A100''s 312 TFLOP/s dense bf16 (datasheet)',
     300e9, 25e9, 8, 10e-6, 'NVLink 3 300 GB/s per direction in a node of 8; 200 Gb/s InfiniBand per GPU across nodes; 10 us per collective')
) t(hardware, rate_flops, rate_source, intra_bytes_s, inter_bytes_s, gpus_per_node, latency_s, link_source);

-- Bytes each rank sends per step by collective kind, from the layout and model dimensions
-- (b bytes per activation; gradients fp32): ring all-reduce moves 2(n-1)/n of the buffer.
--   attn_allreduce: 4 per layer (2 forward, 2 backward) of the replica's tokens x hidden
--   moe_dispatch:   dispatch + combine, forward and backward, of tokens x top_k x hidden
--   grad_sync:      the rank's gradients over the data-parallel replicas
--   p2p:            activations and their gradients across each pipeline boundary
CREATE MACRO cost_volume(kind, strategy, W, tp, pp, dp, attn_tp, L, h, k, params, tokens, b) AS
    CASE kind
        WHEN 'attn_allreduce' THEN
            CASE WHEN strategy IN ('tp', 'tp_pp') AND tp > 1 THEN 4 * L * (tokens / dp) * h * b * 2 * (tp - 1) / tp
                 WHEN strategy = 'ma_sep' AND attn_tp > 1 THEN 4 * L * (tokens / dp) * h * b * 2 * (attn_tp - 1) / attn_tp
                 ELSE 0 END
        WHEN 'moe_dispatch' THEN
            CASE WHEN strategy = 'ep_dp' AND W > 1 THEN 4 * L * (tokens / W) * k * h * b * (W - 1) / W
                 WHEN strategy = 'ma_sep' THEN 4 * L * (tokens / W) * k * h * b
                 ELSE 0 END
        WHEN 'grad_sync' THEN
            CASE WHEN dp > 1 THEN 2 * (dp - 1) / dp * 4 * params / (tp * pp) ELSE 0 END
        WHEN 'p2p' THEN
            CASE WHEN pp > 1 THEN 2 * (tokens / dp) * h * b * (pp - 1) / pp ELSE 0 END
    END;

CREATE MACRO cost_params(L, h, E, f, V) AS L * (4 * h * h + E * 3 * h * f + h * E) + 2 * V * h;

-- One row per measured training run: degrees, dimensions, steady-state means (rank 0's step
-- time; compute and communication averaged over ranks).
CREATE TABLE cost_runs AS
WITH s AS (
    SELECT run_id, avg(compute_s) AS compute_s,
           avg(comm_attn_allreduce_s) AS attn_allreduce, avg(comm_moe_dispatch_s) AS moe_dispatch,
           avg(comm_grad_sync_s) AS grad_sync, avg(comm_p2p_s) AS p2p,
           avg(coalesce(comm_attn_allreduce_s, 0) + coalesce(comm_moe_dispatch_s, 0) + coalesce(comm_grad_sync_s, 0)
               + coalesce(comm_p2p_s, 0)) AS comm_s,
           avg(step_time_s) FILTER (WHERE rank = 0) AS step_s, avg(tokens) FILTER (WHERE rank = 0) AS tokens
    FROM steady_steps GROUP BY run_id
)
SELECT ri.run_id, ri.strategy, ri.world_size AS W,
       CASE WHEN ri.on_gpu THEN coalesce(ri.flops ->> 'gpu_name', 'gpu') ELSE 'cpu' END AS hardware,
       coalesce(r.config ->> '$.name', '?') AS model,
       CASE WHEN ri.on_gpu THEN 2 ELSE 4 END AS b,
       coalesce(TRY_CAST(r.layout ->> 'tp' AS BIGINT), 1) AS tp, coalesce(TRY_CAST(r.layout ->> 'pp' AS BIGINT), 1) AS pp,
       coalesce(TRY_CAST(r.layout ->> 'dp' AS BIGINT), 1) AS dp,
       coalesce(TRY_CAST(r.layout ->> 'attn_tp' AS BIGINT), 1) AS attn_tp,
       CAST(r.config ->> '$.model.layers' AS DOUBLE) AS L, CAST(r.config ->> '$.model.hidden' AS DOUBLE) AS h,
       CAST(r.config ->> '$.model.top_k' AS DOUBLE) AS k,
       cost_params(CAST(r.config ->> '$.model.layers' AS DOUBLE), CAST(r.config ->> '$.model.hidden' AS DOUBLE),
                   CAST(r.config ->> '$.model.experts' AS DOUBLE), CAST(r.config ->> '$.model.expert_hidden' AS DOUBLE),
                   coalesce(TRY_CAST(r.config ->> '$.model.vocab_size' AS DOUBLE), 50257)) AS params,
       s.tokens, CAST(ri.flops ->> 'train_flops_per_token' AS DOUBLE) * s.tokens AS flops_step,
       s.compute_s, s.comm_s, s.step_s, s.attn_allreduce, s.moe_dispatch, s.grad_sync, s.p2p
FROM run_info ri JOIN runs r USING (run_id) JOIN s USING (run_id)
WHERE ri.experiment IN ('train', 'bench') AND s.step_s IS NOT NULL
ORDER BY ri.run_id;

CREATE VIEW cost_kinds AS SELECT unnest(['attn_allreduce', 'moe_dispatch', 'grad_sync', 'p2p']) AS kind;

-- Measured seconds and modelled bytes per run and kind.
CREATE VIEW cost_observations AS
SELECT c.run_id, c.hardware, k.kind,
       cost_volume(k.kind, c.strategy, c.W, c.tp, c.pp, c.dp, c.attn_tp, c.L, c.h, c.k, c.params, c.tokens, c.b) AS bytes,
       CASE k.kind WHEN 'attn_allreduce' THEN c.attn_allreduce WHEN 'moe_dispatch' THEN c.moe_dispatch
                   WHEN 'grad_sync' THEN c.grad_sync ELSE c.p2p END AS seconds
FROM cost_runs c, cost_kinds k;

-- The fit per hardware: FLOP rate per rank (median over runs), alpha/beta per kind, overlap.
CREATE VIEW cost_fit AS
WITH rate AS (
    SELECT hardware, median(flops_step / (W * compute_s)) AS rate_flops, count(*) AS runs,
           greatest(0, least(1, avg(greatest(0, compute_s + comm_s - step_s) / nullif(comm_s, 0)))) AS overlap
    FROM cost_runs WHERE flops_step IS NOT NULL AND compute_s > 0 GROUP BY hardware
),
ab AS (
    SELECT hardware, kind, count(*) AS points,
           CASE WHEN count(DISTINCT bytes) >= 2 AND regr_slope(seconds, bytes) > 0 THEN regr_slope(seconds, bytes)
                ELSE sum(seconds) / nullif(sum(bytes), 0) END AS beta,
           CASE WHEN count(DISTINCT bytes) >= 2 AND regr_slope(seconds, bytes) > 0
                THEN greatest(0, regr_intercept(seconds, bytes)) ELSE 0 END AS alpha
    FROM cost_observations WHERE bytes > 0 AND seconds IS NOT NULL GROUP BY ALL
)
SELECT r.hardware, r.rate_flops, r.runs, coalesce(r.overlap, 0) AS overlap, ab.kind, ab.points, ab.alpha, ab.beta
FROM rate r LEFT JOIN ab USING (hardware);

-- The paper's model (config/paper.yaml: 4 layers, hidden 4096, 32 heads, 16 experts of 16384,
-- top-2, vocabulary 50257, global batch 1024 x 2048 tokens; train FLOPs per token 12,713,459,712
-- = masep.telemetry.flops.train_flops_per_token) on 4-32 GPUs, with the degrees the scaling
-- sweep gives (workflow/rules/common.smk scaled_overrides: the paper's tp 8, pp 2, attn_tp 4,
-- MoE ranks half the GPUs, each lowered to the largest that divides; ep_dp only where the GPUs
-- divide the 16 experts).
CREATE MACRO cost_pow2_divisor(n, cap) AS
    CASE WHEN cap >= 8 AND n % 8 = 0 THEN 8 WHEN cap >= 4 AND n % 4 = 0 THEN 4 WHEN cap >= 2 AND n % 2 = 0 THEN 2 ELSE 1 END;

CREATE VIEW cost_paper_layouts AS
WITH l AS (
    SELECT s.strategy, g.gpus AS W,
           CASE s.strategy WHEN 'tp' THEN cost_pow2_divisor(g.gpus, 8)
                           WHEN 'tp_pp' THEN cost_pow2_divisor(g.gpus, 8) ELSE 1 END AS tp,
           CASE WHEN s.strategy = 'ma_sep' THEN cost_pow2_divisor(16, g.gpus // 2) * (CASE WHEN g.gpus >= 32 THEN 2 ELSE 1 END) END AS moe
    FROM (SELECT unnest(['tp', 'pp', 'tp_pp', 'ep_dp', 'ma_sep']) AS strategy) s,
         (SELECT unnest([4, 8, 12, 16, 20, 24, 28, 32]) AS gpus) g
    WHERE s.strategy <> 'ep_dp' OR 16 % g.gpus = 0
)
SELECT strategy, W, tp,
       CASE WHEN strategy IN ('pp', 'tp_pp') AND (W // tp) % 2 = 0 THEN 2 ELSE 1 END AS pp,
       CASE WHEN strategy = 'ma_sep' AND (W - moe) % 4 = 0 THEN 4 ELSE 1 END AS attn_tp, moe
FROM l;

CREATE VIEW cost_model AS
WITH rate AS (SELECT DISTINCT hardware, rate_flops, runs, overlap FROM cost_fit),
-- measured runs, predicted with their own hardware's fit
measured_kinds AS (
    SELECT o.run_id, CASE WHEN o.bytes > 0 THEN coalesce(f.alpha, 0) + coalesce(f.beta, 0) * o.bytes ELSE 0 END AS seconds
    FROM cost_observations o LEFT JOIN cost_fit f USING (hardware, kind)
),
measured AS (
    SELECT c.strategy, c.hardware, c.W AS gpus, c.model, c.run_id,
           c.flops_step / (c.W * r.rate_flops) AS compute_s, m.comm_s, r.overlap, c.step_s AS measured_step_s,
           'fitted on ' || r.runs || ' ' || c.hardware || ' run(s)' AS calibration
    FROM cost_runs c JOIN (SELECT run_id, sum(seconds) AS comm_s FROM measured_kinds GROUP BY run_id) m USING (run_id)
    LEFT JOIN rate r USING (hardware)
),
paper AS (
    SELECT l.*, h.*, 1024 * 2048 AS tokens, 12713459712.0 * 1024 * 2048 AS flops_step,
           CASE l.strategy WHEN 'ma_sep' THEN (l.W - l.moe) // l.attn_tp WHEN 'ep_dp' THEN l.W
                ELSE l.W // (l.tp * l.pp) END AS dp,
           cost_params(4.0, 4096.0, 16.0, 16384.0, 50257.0) AS params,
           (SELECT min(r.hardware) FROM rate r WHERE r.hardware LIKE '%' || h.hardware || '%' AND r.runs >= 2) AS fitted_as
    FROM cost_paper_layouts l, cost_hardware h
),
paper_kinds AS (
    SELECT p.strategy, p.hardware, p.W, k.kind,
           cost_volume(k.kind, p.strategy, p.W, p.tp, p.pp, p.dp, p.attn_tp, 4.0, 4096.0, 2.0, p.params, p.tokens, 2.0) AS bytes,
           p.latency_s, CASE WHEN p.W > p.gpus_per_node THEN p.inter_bytes_s ELSE p.intra_bytes_s END AS bytes_s,
           f.alpha, f.beta
    FROM paper p CROSS JOIN cost_kinds k LEFT JOIN cost_fit f ON f.hardware = p.fitted_as AND f.kind = k.kind
),
predicted AS (
    SELECT p.strategy, p.hardware, p.W AS gpus, 'paper' AS model, NULL AS run_id,
           p.flops_step / (p.W * coalesce(r.rate_flops, p.rate_flops)) AS compute_s, k.comm_s,
           coalesce(r.overlap, (SELECT overlap FROM rate WHERE hardware = 'cpu'), 0) AS overlap,
           NULL::DOUBLE AS measured_step_s,
           CASE WHEN r.hardware IS NOT NULL THEN 'fitted on ' || r.runs || ' ' || r.hardware || ' run(s)'
                ELSE 'not fitted (no ' || p.hardware || ' runs): ' || p.rate_source || '; ' || p.link_source
                     || '; overlap as fitted on the CPU runs' END AS calibration
    FROM paper p
    JOIN (SELECT strategy, hardware, W,
                 sum(CASE WHEN bytes > 0 THEN coalesce(alpha, latency_s) + bytes * coalesce(beta, 1 / bytes_s) ELSE 0 END) AS comm_s
          FROM paper_kinds GROUP BY ALL) k USING (strategy, hardware, W)
    LEFT JOIN rate r ON r.hardware = p.fitted_as
)
SELECT strategy, hardware, gpus, model, run_id,
       compute_s AS predicted_compute_s, comm_s AS predicted_comm_s, overlap,
       compute_s + comm_s * (1 - overlap) AS predicted_step_s, measured_step_s,
       100 * (compute_s + comm_s * (1 - overlap) - measured_step_s) / measured_step_s AS error_pct,
       calibration
FROM (SELECT * FROM measured UNION ALL BY NAME SELECT * FROM predicted)
ORDER BY model DESC, hardware, strategy_order(strategy), gpus;
