-- MA Separation's balancing (masep/parallel/balance.py): `balance_events` holds one row per sync
-- point, rank and side (balance_events-rank<R>.parquet); runs without balancing have none.
CREATE VIEW IF NOT EXISTS balance_events AS
SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS step, NULL::BIGINT AS rank, NULL::VARCHAR AS side,
       NULL::DOUBLE AS predicted_before_s, NULL::DOUBLE AS measured_before_s,
       NULL::DOUBLE AS predicted_after_s, NULL::DOUBLE AS measured_after_s,
       NULL::DOUBLE AS imbalance_before, NULL::DOUBLE AS imbalance_after,
       NULL::DOUBLE AS predicted_imbalance_before, NULL::DOUBLE AS predicted_imbalance_after,
       NULL::BOOLEAN AS plan_applied, NULL::BIGINT AS moves, NULL::DOUBLE AS migration_ms,
       NULL::VARCHAR AS source
WHERE false;

-- The time predictor's mean absolute percentage error per run, side and sync point, on the
-- window it had not yet trained on (predicted_before_s against measured_before_s), in percent.
CREATE VIEW predictor_accuracy AS
SELECT run_id, side, step,
       count(*) AS ranks,
       100 * avg(abs(predicted_before_s - measured_before_s) / measured_before_s) AS mape_pct
FROM balance_events
WHERE measured_before_s > 0 AND predicted_before_s IS NOT NULL
GROUP BY run_id, side, step
ORDER BY run_id, side, step;
