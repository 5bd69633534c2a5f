-- Tables of the results database, with the columns the run folders promise
-- (docs/ARCHITECTURE.md). collect loads each kind's Parquet files into a table of these columns
-- first (steps and experts: a view over the files), then the columns files add; a column a
-- file lacks is NULL. A study that has produced no file of a kind keeps the empty table.

CREATE TABLE runs (
    run_id        VARCHAR,
    experiment    VARCHAR,   -- train | infer | ...
    strategy      VARCHAR,
    seed          BIGINT,
    world_size    BIGINT,
    config        JSON,      -- resolved masep config
    versions      JSON,
    git_commit    VARCHAR,
    host          VARCHAR,
    hardware      JSON,
    status        VARCHAR,
    started_at    TIMESTAMPTZ,
    ended_at      TIMESTAMPTZ,
    slurm_job_id  VARCHAR,
    layout        JSON,
    run_dir       VARCHAR,   -- folder under the runs root, e.g. train/single/seed=0
    run_json      JSON       -- the whole run.json, for fields not lifted into columns
);

CREATE TABLE steps (
    run_id                VARCHAR,
    step                  BIGINT,
    rank                  BIGINT,
    tokens                BIGINT,
    loss                  DOUBLE,
    lb_loss               DOUBLE,
    z_loss                DOUBLE,
    lr                    DOUBLE,
    grad_norm             DOUBLE,
    step_time_s           DOUBLE,
    tokens_per_s          DOUBLE,
    dropped_tokens        BIGINT,
    peak_mem_bytes        BIGINT,
    compute_s             DOUBLE,
    comm_attn_allreduce_s DOUBLE,
    comm_moe_dispatch_s   DOUBLE,
    comm_grad_sync_s      DOUBLE,
    comm_p2p_s            DOUBLE,
    idle_s                DOUBLE,
    t_end_unix_s          DOUBLE,
    source                VARCHAR  -- file the row came from, relative to the runs root
);

CREATE TABLE experts (
    run_id  VARCHAR,
    step    BIGINT,
    layer   BIGINT,
    expert  BIGINT,
    tokens  BIGINT,
    source  VARCHAR
);

CREATE TABLE eval (
    run_id    VARCHAR,
    step      BIGINT,
    val_loss  DOUBLE,
    val_ppl   DOUBLE,
    source    VARCHAR
);

CREATE TABLE inference (
    run_id       VARCHAR,
    rank         BIGINT,
    context_len  BIGINT,
    batch        BIGINT,
    new_tokens   BIGINT,
    prefill_ms   DOUBLE,
    tpot_ms      DOUBLE,
    tokens_per_s DOUBLE,
    source       VARCHAR
);

-- The committed peer benchmark (scripts/bench_peer.py's STEM.json, `masep collect --peer`): one row
-- per workload and implementation, or per workload the script could not measure (figures NULL).
CREATE TABLE peer_benchmark (
    workload         VARCHAR,   -- moe_layer (one MoE layer forward+backward) | train_step | decode
    implementation   VARCHAR,   -- masep | the peer (torchtitan)
    tokens           BIGINT,    -- tokens per timed call
    n                BIGINT,    -- timed calls
    median_s         DOUBLE,
    tokens_per_s     DOUBLE,    -- tokens over the median call
    mfu              DOUBLE,    -- masep.telemetry.flops per token x tokens/s over peak_tflops, both implementations
    peak_mem_gib     DOUBLE,    -- torch.cuda.max_memory_allocated
    masep_over_peer  DOUBLE,    -- masep's tokens/s over the peer's, same workload and file
    note             VARCHAR,   -- what each implementation ran
    reason           VARCHAR,   -- why a figure of the row is NULL
    device           VARCHAR,
    peak_tflops      DOUBLE,
    peak_source      VARCHAR,
    versions         JSON,      -- python, torch, cuda, the peer's version, ...
    git_commit       VARCHAR,   -- masep's commit
    measured_at      TIMESTAMPTZ,
    command          VARCHAR,
    source           VARCHAR    -- the JSON file
);
