"""One typed configuration for every masep command.

A config is built from YAML files (later files override earlier ones) and dotted
command-line overrides (``model.hidden=128``). Unknown keys, wrong types and values
that do not fit together fail at once with a `ConfigError` naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from masep.errors import ExpectedError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def yaml_load(text: str):
    """YAML through libyaml's parser where PyYAML has it (~10x faster: a workflow dry-run resolves
    thousands of overrides, e.g. the paper's 1,024-shard list); invalid YAML is parsed again by
    the pure-Python parser, so its error message is the same on every machine."""
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.safe_load(text)


STRATEGIES = ("single", "tp", "pp", "tp_pp", "ep_dp", "ma_sep")


class ConfigError(ExpectedError, ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # GPT-2 BPE; the paper's 50,265 is not GPT-2's size
    vocab_pad_multiple: int = 128
    layers: int = 4
    hidden: int = 4096
    heads: int = 32
    experts: int = 16
    top_k: int = 2
    expert_hidden: int = 16384
    expert_activation: str = "swiglu"  # swiglu | gelu
    capacity_factor: Optional[float] = 1.0  # null: dropless
    lb_coef: float = 0.01
    z_coef: float = 0.001
    expert_dropout: float = 0.1
    dropout: float = 0.0
    max_seq_len: int = 4224  # longest position the model (RoPE) serves, prefill + decode
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class DataConfig:
    source: str = "sample"  # sample | local | hub
    local_dir: Optional[str] = None  # mirror holding en/c4-train.XXXXX-of-01024.json.gz
    shards: list[int] = field(default_factory=lambda: [0])
    hub_streaming: bool = True
    max_docs: Optional[int] = None  # cap per shard (None: whole shard)
    tokens_dir: str = "data/tokens"
    val_fraction: float = 0.1
    split_seed: int = 1234
    seq_len: int = 2048
    packing: bool = False
    verify_checksums: bool = False  # jobs re-hash every shard file (default: sizes + sampled fingerprint)


@dataclass
class TrainConfig:
    steps: int = 50000
    global_batch: int = 1024  # sequences per optimizer step
    micro_batch: int = 8  # sequences per forward pass on one data-parallel replica
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5000
    decay_steps: int = 50000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    eval_every: int = 1000
    eval_batches: int = 4
    checkpoint_every: int = 1000
    log_every: int = 10
    deterministic: bool = True
    # Data-parallel gradient reduction: none (fp32 all-reduce) | int8 (block-wise int8 with
    # per-block scales and error feedback, masep.parallel.grad_compression)
    grad_compression: str = "none"


@dataclass
class InferConfig:
    context_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    batch: int = 1
    new_tokens: int = 32
    warmup_tokens: int = 4
    # On a GPU, decode steps without collectives (single; tp with tp=1) replay one captured graph per token
    cuda_graph: bool = True
    # torch.compile of single's decode step (fused small kernels): eager (not compiled) | default | max-autotune
    # (max-autotune also tunes the expert matrix-vector kernels; compiling takes minutes, not seconds)
    compile: str = "default"


@dataclass
class ParallelConfig:
    strategy: str = "single"
    world_size: int = 1
    tp: int = 1  # tensor-parallel degree (tp, tp_pp)
    pp: int = 1  # pipeline stages (pp, tp_pp)
    in_flight: int = 4  # ma_sep: micro-batches of a replica in flight at once (pp and tp_pp run 1F1B)
    attn_tp: int = 1  # ma_sep: head-parallel degree inside one attention replica
    attn_replicas: int = 1  # ma_sep: attention replicas, each taking a share of the tokens
    moe_ranks: int = 1  # ma_sep: ranks holding the experts
    timeout_s: float = 120.0  # collective timeout: a dead peer fails the run within this


@dataclass
class MaConfig:
    """MA Separation's balancing (masep.parallel.balance): every `rebalance_every` steps, when the
    predicted max/mean - 1 of the MoE ranks' times exceeds `threshold`, experts move between them."""
    rebalance: bool = False
    rebalance_every: int = 100
    threshold: float = 0.05
    # The lever across the groups: the output head (vocabulary projection and cross-entropy) split
    # by vocabulary rows between the attention ranks and the MoE ranks; sync points move the cut.
    head_split: bool = False
    # In-job recovery (masep.parallel.regroup): survivors of a lost attention replica or MoE rank regroup and go on
    failover: bool = False
    failover_stale_s: float = 1.0  # a rank whose heartbeat stood still this long counts as lost
    # Test-only levers (never in a study): every sync point applies a random placement (and, with
    # `head_split`, a random cut, also at the start), so tests see experts and head rows move;
    # an expert's seconds of sleep per (layer, micro-batch) it serves, so tests
    # can make one MoE rank slower.
    debug_shuffle_placement: bool = False
    debug_expert_delay_s: dict[int, float] = field(default_factory=dict)
    # Seconds slept per micro-batch by the head's forward, shared by the ranks computing it in
    # proportion to their vocabulary rows (with `head_split`), so tests can make the head slow.
    debug_head_delay_s: float = 0.0


@dataclass
class LaunchConfig:
    executor: str = "local"  # local | slurm | debug
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    mem_gb: Optional[int] = None
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    max_requeues: int = 3
    # After a rank is lost, relaunch the job's ranks from the newest checkpoint this many times
    # (full restart in the same `masep train`); 0: the first lost rank ends the run.
    max_restarts: int = 0
    wait_timeout_s: float = 7200.0
    log_dir: str = "logs/submitit"
    # ma.failover: the address the ranks reach the launcher-hosted rendezvous store at under
    # SLURM (None: this host's name); the local executor's ranks use 127.0.0.1.
    store_host: Optional[str] = None


FAULT_KINDS = ("none", "kill_attention", "kill_moe", "kill_attention_k", "stop", "kill_checkpoint",
               "kill_moe_decode")
DECODE_FAULT_KINDS = ("kill_moe_decode",)  # injected into `masep infer`; their steps count decoded tokens


@dataclass
class FaultConfig:
    """One fault the launcher injects into a training run from outside its ranks (masep.faults):
    at a step drawn with `seed` from [min_step, max_step], a signal to the chosen rank(s). The
    kinds of DECODE_FAULT_KINDS go into `masep infer`, where a step is one decoded token."""
    kind: str = "none"  # one of FAULT_KINDS
    count: int = 1  # kill_attention_k: attention ranks killed at once
    seed: int = 0
    min_step: int = 1
    max_step: int = 0  # 0: train.steps - 2
    reference: Optional[str] = None  # run folder of the uninterrupted reference run


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ma: MaConfig = field(default_factory=MaConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    runs_dir: str = "results/runs"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading

# A number as people write it: YAML 1.1 (PyYAML) reads `1e-3` or `.5e2` as strings, so
# every config path (YAML, --set, Snakemake --config) turns them into numbers through this.
NUMBER = re.compile(r"[-+]?(\d[\d_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def parse_number(text: str) -> int | float | None:
    """`text` as an int (plain integer notation) or float (any other number notation), else None."""
    t = text.strip()
    if not NUMBER.fullmatch(t):
        return None
    t = t.replace("_", "")
    return int(t) if re.fullmatch(r"[-+]?\d+", t) else float(t)



def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type annotation `tp`, converting only lossless cases."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args[0] in (int, str) and all(type(v) is args[0] for v in value):
            return list(value)  # nothing to convert (e.g. the paper's 1,024 shard ids)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str) and parse_number(value) is not None:
        value = parse_number(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e3 or 1.0e3 steps
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


@functools.cache  # a workflow dry-run merges thousands of overrides into the same classes
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Apply a nested mapping onto dataclass instance `obj`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        tp = hints[k]
        if _is_dataclass_type(tp):
            _merge(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(v, tp, key))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key.path=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"{item}: empty key")
    return key.split("."), copy.deepcopy(_yaml_value(raw)) if raw != "" else ""


@functools.cache  # the same overrides (e.g. the paper's 1,024-shard list) recur in every job's config
def _yaml_value(raw: str) -> Any:
    return yaml_load(raw)


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for p in reversed(path):
        out = {p: out}
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (`tiny`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    if p.exists():
        return p
    raise ConfigError(f"config: no such file or preset {str(name_or_path)!r} (presets: "
                      f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def load_yaml_chain(path: Path, seen: tuple = ()) -> list[dict]:
    """A YAML file may name `base:` presets it extends; returns the chain, base first."""
    if path in seen:
        raise ConfigError(f"base: cycle through {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    chain: list[dict] = []
    base = data.pop("base", None)
    for b in ([base] if isinstance(base, str) else (base or [])):
        chain += load_yaml_chain(resolve_config_path(b), seen + (path,))
    return chain + [data]


def load_config(paths: list[str | Path] | str | Path | None = None,
                overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Build and validate a config: defaults <- YAML files <- mapping <- dotted overrides."""
    cfg = Config()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths or []:
        for layer in load_yaml_chain(resolve_config_path(p)):
            _merge(cfg, layer)
    if data:
        _merge(cfg, data)
    for item in overrides or []:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a run's run.json)."""
    cfg = Config()
    _merge(cfg, d)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def keeps_expert_copies(cfg) -> bool:
    """`ma.failover`: ma_sep's MoE ranks keep copies of each other's experts, so a lost one is
    recovered in the job; not with one MoE rank, nor with `ma.rebalance` (its placement assumes
    E/M experts a rank)."""
    p = cfg.parallel
    return cfg.ma.failover and p.strategy == "ma_sep" and p.moe_ranks > 1 and not cfg.ma.rebalance


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    m, d, t, i, p, l = cfg.model, cfg.data, cfg.train, cfg.infer, cfg.parallel, cfg.launch
    for key in ("layers", "hidden", "heads", "experts", "top_k", "expert_hidden", "vocab_size",
                "vocab_pad_multiple", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _require(m.hidden % m.heads == 0, "model.heads", f"{m.heads} heads do not divide hidden {m.hidden}")
    _require(m.head_dim % 2 == 0, "model.heads", f"head dim {m.head_dim} must be even (rotary positions)")
    _require(m.top_k <= m.experts, "model.top_k", f"top-k {m.top_k} exceeds {m.experts} experts")
    _require(m.expert_activation in ("swiglu", "gelu"), "model.expert_activation", "must be swiglu or gelu")
    _require(m.capacity_factor is None or m.capacity_factor > 0, "model.capacity_factor",
             "must be positive, or null for dropless")
    for key in ("expert_dropout", "dropout"):
        _require(0.0 <= getattr(m, key) < 1.0, f"model.{key}", "must be in [0, 1)")
    _require(m.vocab_size <= 65536, "model.vocab_size", "token shards are uint16: at most 65536")
    _require(d.source in ("sample", "local", "hub"), "data.source", "must be sample, local or hub")
    _require(d.source != "local" or bool(d.local_dir), "data.local_dir", "required when data.source is local")
    _require(all(0 <= s < 1024 for s in d.shards) and len(d.shards) > 0, "data.shards",
             "shard indices must lie in 0..1023")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _require(d.seq_len > 1, "data.seq_len", "must be at least 2")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    for key in ("steps", "global_batch", "micro_batch", "eval_every", "eval_batches",
                "checkpoint_every", "log_every"):
        _require(getattr(t, key) > 0, f"train.{key}", "must be positive")
    _require(t.global_batch % t.micro_batch == 0, "train.micro_batch",
             f"{t.micro_batch} does not divide train.global_batch {t.global_batch}")
    _require(t.lr > 0, "train.lr", "must be positive")
    _require(0 <= t.warmup_steps <= t.decay_steps, "train.warmup_steps", "must lie in [0, train.decay_steps]")
    _require(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", "must be auto, fp32 or bf16")
    _require(t.grad_compression in ("none", "int8"), "train.grad_compression", "must be none or int8")
    _require(cfg.ma.rebalance_every > 0, "ma.rebalance_every", "must be positive")
    _require(not cfg.ma.rebalance or p.strategy == "ma_sep", "ma.rebalance",
             "only ma_sep rebalances (it moves experts between its MoE ranks); set it to false")
    _require(not cfg.ma.failover or p.strategy == "ma_sep", "ma.failover",
             "only ma_sep recovers in the job (its attention replicas regroup); set it to false")
    _require(cfg.ma.failover_stale_s > 0, "ma.failover_stale_s", "must be positive")
    _require(not (cfg.ma.failover and cfg.ma.head_split), "ma.failover",
             "in-job recovery does not yet carry the output head's split (ma.head_split); set one to false")
    _require(all(0 <= e < m.experts and s >= 0 for e, s in cfg.ma.debug_expert_delay_s.items()),
             "ma.debug_expert_delay_s", f"keys are expert ids in 0..{m.experts - 1}, values seconds >= 0")
    _require(not cfg.ma.head_split or p.strategy == "ma_sep", "ma.head_split",
             "only ma_sep splits the output head between its groups; set it to false")
    _require(not (cfg.ma.head_split and m.tie_embeddings), "ma.head_split",
             "the output head shares its matrix with the embedding (model.tie_embeddings); set one to false")
    _require(cfg.ma.debug_head_delay_s >= 0, "ma.debug_head_delay_s", "must not be negative")
    _require(cfg.ma.threshold >= 0, "ma.threshold", "must not be negative")
    _require(cfg.infer.compile in ("eager", "default", "max-autotune"), "infer.compile",
             "must be eager, default or max-autotune")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _require(len(i.context_lengths) > 0 and all(c > 0 for c in i.context_lengths),
             "infer.context_lengths", "must be positive")
    _require(max(i.context_lengths) + i.new_tokens + i.warmup_tokens <= m.max_seq_len,
             "infer.context_lengths",
             f"longest context {max(i.context_lengths)} + {i.warmup_tokens + i.new_tokens} new tokens "
             f"exceeds model.max_seq_len {m.max_seq_len}")
    _require(i.batch > 0 and i.new_tokens > 0, "infer.batch", "batch and new_tokens must be positive")
    _require(p.strategy in STRATEGIES, "parallel.strategy", f"must be one of {', '.join(STRATEGIES)}")
    _require(p.world_size > 0, "parallel.world_size", "must be positive")
    _require(l.executor in ("local", "slurm", "debug"), "launch.executor", "must be local, slurm or debug")
    _require(l.max_requeues >= 0, "launch.max_requeues", "must not be negative")
    _require(l.max_restarts >= 0, "launch.max_restarts", "must not be negative")
    f = cfg.fault
    _require(f.kind in FAULT_KINDS, "fault.kind", f"must be one of {', '.join(FAULT_KINDS)}")
    _require(f.count >= 1, "fault.count", "must be positive")
    _require(0 <= f.min_step and (f.max_step == 0 or f.min_step <= f.max_step < t.steps
                                  or f.kind in DECODE_FAULT_KINDS), "fault.max_step",
             f"need 0 <= fault.min_step <= fault.max_step < train.steps ({t.steps}), or max_step 0")
    # Layout fit (degrees dividing heads, experts, layers, world) is checked by
    # masep.parallel.layout when a strategy is chosen, before any process starts.
