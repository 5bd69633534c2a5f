-- MA Separation's balancing (masep/parallel/balance.py): `balance_events` holds one row per sync
-- point, rank, side and lever (balance_events-rank<R>.parquet); runs without balancing have none.
-- lever 'experts': expert placement inside the MoE group (the MoE ranks' expert seconds);
-- lever 'head': the output head's vocabulary cut between the groups (every rank's busy seconds,
-- imbalance over the two groups; files written before the head lever have lever NULL: experts).
CREATE VIEW IF NOT EXISTS balance_events AS
SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS step, NULL::BIGINT AS rank, NULL::VARCHAR AS side,
       NULL::DOUBLE AS predicted_before_s, NULL::DOUBLE AS measured_before_s,
       NULL::DOUBLE AS predicted_after_s, NULL::DOUBLE AS measured_after_s,
       NULL::DOUBLE AS imbalance_before, NULL::DOUBLE AS imbalance_after,
       NULL::DOUBLE AS predicted_imbalance_before, NULL::DOUBLE AS predicted_imbalance_after,
       NULL::BOOLEAN AS plan_applied, NULL::BIGINT AS moves, NULL::DOUBLE AS migration_ms,
       NULL::VARCHAR AS lever, NULL::VARCHAR AS source
WHERE false;

-- The time predictors' mean absolute percentage error per run, lever, side and sync point, on the
-- window they had not yet trained on (predicted_before_s against measured_before_s), in percent.
CREATE VIEW predictor_accuracy AS
SELECT run_id, coalesce(lever, 'experts') AS lever, side, step,
       count(*) AS ranks,
       100 * avg(abs(predicted_before_s - measured_before_s) / measured_before_s) AS mape_pct
FROM balance_events
WHERE measured_before_s > 0 AND predicted_before_s IS NOT NULL
GROUP BY run_id, coalesce(lever, 'experts'), side, step
ORDER BY run_id, lever, side, step;

-- MA Separation's ablation (the workflow's `variants`): plain ma_sep (experiment train) beside
-- ma_sep + rebalancing, + int8 gradients and both (the paper's configuration; experiment
-- ablation), one row per run: speed and gradient-sync time of rank 0's steady steps, final
-- loss, and the MoE ranks' sync points (NULL without balancing).
CREATE TABLE ma_ablation AS
WITH r AS (
    SELECT run_id, experiment, seed, world_size,
           coalesce(TRY_CAST(config ->> '$.ma.rebalance' AS BOOLEAN), false) AS rebalance,
           coalesce(config ->> '$.train.grad_compression', 'none') AS grad_compression
    FROM runs
    WHERE strategy = 'ma_sep' AND experiment IN ('train', 'ablation')
),
speed AS (
    SELECT run_id, avg(tokens_per_s) AS tokens_per_s, avg(step_time_s) AS step_time_s,
           avg(comm_grad_sync_s) AS grad_sync_s
    FROM steady_steps WHERE rank = 0 GROUP BY run_id
),
final AS (SELECT run_id, arg_max(loss, step) AS final_loss FROM steps WHERE rank = 0 GROUP BY run_id),
sync AS (
    SELECT run_id, count(DISTINCT step) AS sync_points,
           count(DISTINCT step) FILTER (WHERE plan_applied) AS plans_applied,
           arg_max(imbalance_before, step) AS last_moe_imbalance,
           avg(migration_ms) AS migration_ms
    FROM balance_events WHERE side = 'moe' AND coalesce(lever, 'experts') = 'experts' GROUP BY run_id
),
head AS (
    SELECT run_id, arg_min(imbalance_before, step) AS first_group_imbalance,
           arg_max(imbalance_before, step) AS last_group_imbalance
    FROM balance_events WHERE lever = 'head' AND rank = 0 GROUP BY run_id
)
SELECT r.run_id, r.experiment, r.seed, r.world_size,
       CASE WHEN r.rebalance AND r.grad_compression = 'int8' THEN 'paper (rebalance + int8)'
            WHEN r.rebalance THEN '+ rebalance' WHEN r.grad_compression = 'int8' THEN '+ int8'
            ELSE 'plain' END AS variant,
       r.rebalance, r.grad_compression, speed.tokens_per_s, speed.step_time_s, speed.grad_sync_s,
       final.final_loss, sync.sync_points, sync.plans_applied, sync.last_moe_imbalance, sync.migration_ms,
       head.first_group_imbalance, head.last_group_imbalance
FROM r LEFT JOIN speed USING (run_id) LEFT JOIN final USING (run_id) LEFT JOIN sync USING (run_id)
     LEFT JOIN head USING (run_id)
ORDER BY r.seed, r.rebalance, r.grad_compression = 'int8', r.run_id;
