-- One row per complete run folder (one holding run.json).
-- $run_files: the run.json paths (absolute); $root: the runs root (absolute).
-- Timestamps may be ISO strings or Unix seconds.
INSERT INTO runs BY NAME
SELECT
    json ->> 'run_id'                                   AS run_id,
    json ->> 'experiment'                               AS experiment,
    json ->> 'strategy'                                 AS strategy,
    TRY_CAST(json ->> 'seed' AS BIGINT)                 AS seed,
    TRY_CAST(json ->> 'world_size' AS BIGINT)           AS world_size,
    json -> 'config'                                    AS config,
    json -> 'versions'                                  AS versions,
    json ->> 'git_commit'                               AS git_commit,
    json ->> 'host'                                     AS host,
    json -> 'hardware'                                  AS hardware,
    json ->> 'status'                                   AS status,
    CASE WHEN json_type(json -> 'started_at') IN ('DOUBLE', 'BIGINT', 'UBIGINT')
         THEN to_timestamp(CAST(json ->> 'started_at' AS DOUBLE))
         ELSE TRY_CAST(json ->> 'started_at' AS TIMESTAMPTZ) END AS started_at,
    CASE WHEN json_type(json -> 'ended_at') IN ('DOUBLE', 'BIGINT', 'UBIGINT')
         THEN to_timestamp(CAST(json ->> 'ended_at' AS DOUBLE))
         ELSE TRY_CAST(json ->> 'ended_at' AS TIMESTAMPTZ) END AS ended_at,
    json ->> 'slurm_job_id'                             AS slurm_job_id,
    json -> 'layout'                                    AS layout,
    substr(parse_dirpath(filename), length($root) + 2)  AS run_dir,
    json                                                AS run_json
FROM read_json_objects($run_files, filename = true, format = 'auto')
ORDER BY run_dir;
