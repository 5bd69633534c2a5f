-- Summary views over the tables. Throughput excludes warm-up: the first 10% of a run's steps
-- (at least one step); a run with a single step therefore has no throughput (NULL).
-- Per-step job figures are the ones rank 0 reports (every strategy has a rank 0; per-rank
-- detail stays in `steps`). `steps` is a view over the run folders' files: what is read again and
-- again (the loss curve, the per-run summary) is a table built once here.

CREATE TABLE loss_curve AS
SELECT r.experiment, r.strategy, r.seed, s.run_id, s.step,
       avg(s.loss)    AS loss,      -- mean over the ranks that report a loss at this step
       avg(s.lb_loss) AS lb_loss,
       avg(s.z_loss)  AS z_loss,
       any_value(s.lr) FILTER (WHERE s.rank = 0) AS lr
FROM steps s JOIN runs r USING (run_id)
GROUP BY ALL
ORDER BY s.run_id, s.step;

-- One row per run with step rows: its number of distinct steps and the last warm-up step (the
-- ceil(10%)-th smallest). A table built once, so that views over steady steps filter with a
-- join instead of ranking every step row.
CREATE TABLE run_steps AS
SELECT run_id, count(*) AS steps, CAST(ceil(0.1 * count(*)) AS BIGINT) AS warmup_steps_excluded,
       list_sort(list(step))[CAST(ceil(0.1 * count(*)) AS BIGINT)] AS last_warmup_step
FROM (SELECT DISTINCT run_id, step FROM steps WHERE step IS NOT NULL)
GROUP BY run_id
ORDER BY run_id;

CREATE TABLE run_summary AS
WITH throughput AS (
    SELECT run_id, any_value(w.steps) AS steps, any_value(w.warmup_steps_excluded) AS warmup_steps_excluded,
           -- the throughput definition of every view: tokens over time of rank 0's steady steps
           sum(tokens) FILTER (WHERE rank = 0 AND step > w.last_warmup_step)
               / sum(step_time_s) FILTER (WHERE rank = 0 AND step > w.last_warmup_step) AS tokens_per_s,
           avg(step_time_s)  FILTER (WHERE rank = 0 AND step > w.last_warmup_step) AS step_time_s,
           max(peak_mem_bytes)                        AS peak_mem_bytes_max_rank,
           -- every rank reports the step's global count: take rank 0's
           sum(dropped_tokens) FILTER (WHERE rank = 0)  AS dropped_tokens
    FROM steps s JOIN run_steps w USING (run_id) GROUP BY run_id
),
final_loss AS (
    SELECT run_id, arg_max(loss, step) AS final_loss, max(step) AS final_step
    FROM loss_curve WHERE loss IS NOT NULL GROUP BY run_id
),
final_eval AS (
    SELECT run_id, arg_max(val_loss, step) AS final_val_loss, arg_max(val_ppl, step) AS final_val_ppl
    FROM eval GROUP BY run_id
)
SELECT r.run_id, r.experiment, r.strategy, r.seed, r.world_size, r.status, r.run_dir,
       t.steps, t.warmup_steps_excluded, t.tokens_per_s, t.step_time_s,
       t.peak_mem_bytes_max_rank, t.dropped_tokens,
       f.final_step, f.final_loss, e.final_val_loss, e.final_val_ppl,
       epoch(r.ended_at) - epoch(r.started_at) AS wall_s
FROM runs r
LEFT JOIN throughput t USING (run_id)
LEFT JOIN final_loss f USING (run_id)
LEFT JOIN final_eval e USING (run_id)
WHERE r.experiment = 'train'
ORDER BY r.run_id;

CREATE VIEW tpot_by_context AS
SELECT r.strategy, i.context_len, i.run_id,
       median(i.tpot_ms)      FILTER (WHERE i.rank = 0) AS tpot_ms,
       median(i.prefill_ms)   FILTER (WHERE i.rank = 0) AS prefill_ms,
       median(i.tokens_per_s) FILTER (WHERE i.rank = 0) AS tokens_per_s,
       count(*) FILTER (WHERE i.rank = 0)               AS samples
FROM inference i JOIN runs r USING (run_id)
WHERE r.experiment <> 'faults'  -- a decoding fault trial's TPOT includes its restart
GROUP BY ALL;
