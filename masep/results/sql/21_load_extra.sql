-- A Parquet kind without a declared table (e.g. faults, telemetry): a table named after the
-- file prefix, with the files' own columns. Same parameters as 20_load_measurements.sql.
CREATE TABLE {table} AS
SELECT * EXCLUDE (filename), substr(filename, length($root) + 2) AS source
FROM read_parquet($files, union_by_name = true, filename = true, hive_partitioning = false);
