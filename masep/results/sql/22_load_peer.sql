-- The peer benchmark files ($files: scripts/bench_peer.py's STEM.json, as given to `masep collect
-- --peer`): their measured rows, then a row per part the script could not run (its "errors",
-- "<part>: <exception>"), figures NULL and the exception as the reason.
INSERT INTO peer_benchmark BY NAME
WITH files AS (
    SELECT json AS j, filename AS source FROM read_json_objects($files, filename = true, format = 'auto')
), measured AS (
    SELECT source, j, unnest(CAST(j -> 'rows' AS JSON[])) AS r,
           generate_subscripts(CAST(j -> 'rows' AS JSON[]), 1) AS i FROM files
), rows AS (
    SELECT source, j, i,
           r ->> 'row' AS workload, r ->> 'impl' AS implementation,
           TRY_CAST(r ->> 'tokens' AS BIGINT) AS tokens, TRY_CAST(r ->> 'n' AS BIGINT) AS n,
           TRY_CAST(r ->> 'median_s' AS DOUBLE) AS median_s, TRY_CAST(r ->> 'tokens_per_s' AS DOUBLE) AS tokens_per_s,
           TRY_CAST(r ->> 'mfu' AS DOUBLE) AS mfu, TRY_CAST(r ->> 'peak_mem_gib' AS DOUBLE) AS peak_mem_gib,
           r ->> 'note' AS note,
           CASE WHEN r ->> 'mfu' IS NULL THEN 'MFU: scripts/bench_peer.py counts FLOPs of training rows only' END AS reason
    FROM measured
    UNION ALL
    SELECT source, j, 1000000 + i, split_part(e, ': ', 1), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           'not measured: ' || substr(e, length(split_part(e, ': ', 1)) + 3)
    FROM (SELECT source, j, unnest(CAST(j -> 'errors' AS VARCHAR[])) AS e,
                 generate_subscripts(CAST(j -> 'errors' AS VARCHAR[]), 1) AS i FROM files)
)
SELECT * EXCLUDE (j, i),
       max(tokens_per_s) FILTER (WHERE implementation = 'masep') OVER w
           / max(tokens_per_s) FILTER (WHERE implementation <> 'masep') OVER w AS masep_over_peer,
       j ->> 'device' AS device,
       TRY_CAST(j ->> 'peak_flops' AS DOUBLE) / 1e12 AS peak_tflops,
       j ->> 'peak_source' AS peak_source,
       j -> 'versions' AS versions,
       j ->> 'git_commit' AS git_commit,
       TRY_CAST(j ->> 'date' AS TIMESTAMPTZ) AS measured_at,
       j ->> 'command' AS command
FROM rows
WINDOW w AS (PARTITION BY source, workload)
ORDER BY source, i;
