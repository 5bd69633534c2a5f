-- Append one kind of per-rank Parquet file ({table}: steps, experts, eval, inference) to its
-- declared table, matching columns by name. $files: the kind's files in complete run folders
-- (absolute paths, sorted); $root: the runs root. Rows are stored in file order, which a scan of
-- one file list and UNION ALL preserve: the same inputs give the same database without a sort.
CREATE OR REPLACE TABLE {table} AS
SELECT * FROM {table}
UNION ALL BY NAME
SELECT * EXCLUDE (filename), substr(filename, length($root) + 2) AS source
FROM read_parquet($files, union_by_name = true, filename = true, hive_partitioning = false);
