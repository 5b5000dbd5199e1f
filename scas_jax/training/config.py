"""Training configuration: one flat dataclass, read from YAML plus ``key=value`` overrides.

Every field has a default that runs, so a config file names only what it changes.
Keys may be written plain (``learning_rate=1e-4``) or dotted by section
(``optim.learning_rate=1e-4``); the section prefix is documentation only, the last
dotted component names the field. An unknown key is an error naming the key and
where it came from (the file, or "command line").
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from scas_jax.errors import ScasError
from scas_jax.data.yaml_file import read_yaml as read_yaml_file

SCHEDULES = ("cosine", "constant")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # auto: models/precision.resolve_dtype
SELECTIONS = ("static", "dynamic")
DYNAMIC_STRATEGIES = ("min", "groups")
DEFAULT_TARGET_LAYER = "layers.-1.mlp.up_proj"  # = scas_jax.scoring.core.DEFAULT_TAP


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All knobs of ``scas-jax train``.

    Batch geometry: a step consumes ``batch_size`` packed rows of ``seq_len`` tokens,
    split into ``grad_accum`` micro-batches of ``batch_size // grad_accum`` rows each.
    The micro-batch must be a multiple of the mesh's ``data * fsdp`` size.
    """

    # optimiser (optax AdamW; weight decay on kernels and embeddings only)
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant (after the linear warmup)
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; <= 0 disables
    # batch geometry
    batch_size: int = 8  # packed rows per optimiser step
    grad_accum: int = 1
    seq_len: int = 1024
    max_segments: int = 64  # sequences per packed row at most
    drop_long: bool = True  # rows longer than seq_len: drop and count (else an error)
    # length of the run: ``steps`` wins when > 0, else ``epochs`` passes over the data
    steps: int = 0
    epochs: int = 1
    seed: int = 0
    # compute
    # auto: bfloat16 on GPU/TPU, float32 on CPU, resolved on construction (so the saved
    # config records the dtype used); master weights and optimiser state stay float32
    compute_dtype: str = "auto"
    remat: bool = False
    attn_impl: str = "auto"  # auto: flash-style blockwise (custom VJP) past 256 tokens, else dense
    logits_chunk: int = 256  # positions of each row per log-softmax chunk
    # vocabulary entries per log-softmax tile (forward and backward); 0: all at once
    logits_vocab_tile: int = 1024
    mesh: str = "data=-1"
    # data
    dataset: str = ""  # dataset name inside a LLaMA-Factory dataset_info.json
    eval_data: str = ""  # held-out SFT file for the evaluation loss
    eval_every: int = 0  # 0: evaluate only at the end (when eval_data is set)
    # chat template (--chat-template): chatml | gemma | plain | a Jinja file; "": the
    # tokenizer's own (scas_jax.data.chat); the final model's tokenizer keeps it
    chat_template: str = ""
    # bookkeeping
    checkpoint_every: int = 100
    max_to_keep: int = 3
    log_every: int = 1
    peak_tflops_per_device: float = 0.0  # for MFU; 0: guess from the device kind
    # selection: static trains on a fixed file (--data); dynamic (--candidate-dir) re-scores
    # the candidates of the next rescore_every steps' questions with the current params
    selection: str = "static"
    rescore_every: int = 100
    questions_per_step: int = 0  # dynamic: questions per step; 0 = batch_size
    dynamic_strategy: str = "min"  # min | groups (as `scas-jax select`)
    num_groups: int = 5
    selected_group: int = 1
    selection_seed: int = 42  # groups: random.Random(selection_seed + rescoring event index)
    score_key: str = "scas_score"
    lambda_scas: float = 0.5
    target_layer: str = DEFAULT_TARGET_LAYER
    include_unverified: bool = False  # dynamic: also candidates flagged teacher_correct=false
    score_batch_tokens: int = 4096
    score_max_segments: int = 16
    score_dtype: str = "auto"

    def __post_init__(self) -> None:
        from scas_jax.models.precision import resolve_dtype

        for name in ("compute_dtype", "score_dtype"):
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, resolve_dtype("auto"))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ScasError:
            return ScasError(f"train config: {msg}")

        if self.schedule not in SCHEDULES:
            raise bad(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad(f"compute_dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.selection not in SELECTIONS:
            raise bad(f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        for name in ("batch_size", "grad_accum", "seq_len", "max_segments", "epochs",
                     "log_every", "checkpoint_every", "rescore_every", "logits_chunk"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logits_vocab_tile < 0:
            raise bad(f"logits_vocab_tile must be >= 0 (0: the whole vocabulary at once), got {self.logits_vocab_tile}")
        if self.dynamic_strategy not in DYNAMIC_STRATEGIES:
            raise bad(f"dynamic_strategy {self.dynamic_strategy!r} is not one of {', '.join(DYNAMIC_STRATEGIES)}")
        if self.score_dtype not in COMPUTE_DTYPES:
            raise bad(f"score_dtype {self.score_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.num_groups < 1 or not 1 <= self.selected_group <= self.num_groups:
            raise bad(f"selected_group must be in 1..num_groups (num_groups={self.num_groups}, "
                      f"selected_group={self.selected_group})")
        if not 0.0 <= self.lambda_scas <= 1.0:
            raise bad(f"lambda_scas must be in [0, 1], got {self.lambda_scas}")
        from scas_jax.scoring.fields import METRIC_FIELDS

        if self.score_key not in METRIC_FIELDS:
            raise bad(f"score_key {self.score_key!r} is not a scoring field ({', '.join(METRIC_FIELDS)})")
        for name in ("score_batch_tokens", "score_max_segments"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "eval_every", "max_to_keep", "questions_per_step"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise bad(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.learning_rate < 0:
            raise bad("learning_rate must be >= 0")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def step_questions(self) -> int:
        """Dynamic selection: questions consumed per optimiser step."""
        return self.questions_per_step or self.batch_size


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    """Turn ``value`` (from YAML or a command-line string) into the field's type."""
    default = FIELDS[name].default
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        parsed = yaml.safe_load(value) if value.strip() else value
        value = parsed
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if value is None:
            return ""
        return str(value)
    except (TypeError, ValueError):
        raise ScasError(
            f"{where}: {name}={value!r} is not a valid {kind.__name__}"
        ) from None


def _field_name(key: str, where: str) -> str:
    prefix, _, name = str(key).rpartition(".")
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
        hint = f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`? " if close else ""
        raise ScasError(
            f"{where}: unknown config key {key!r}; {hint}"
            f"(known keys: {', '.join(sorted(FIELDS))}; see configs/train/default.yaml)"
        )
    return name


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Field values from a YAML file (nested sections allowed); errors name the file."""
    path = Path(path)
    tree = read_yaml_file(path, "config file") or {}
    if not isinstance(tree, dict):
        raise ScasError(f"{path}: expected a mapping of config keys")
    out: dict[str, Any] = {}
    for key, value in _flatten(tree):
        name = _field_name(key, str(path))
        out[name] = _coerce(name, value, f"{path}: key {key!r}")
    return out


def parse_overrides(items: Iterable[str], where: str = "command line") -> dict[str, Any]:
    """``["learning_rate=1e-4", "optim.b2=0.95"]`` -> field values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ScasError(f"{where}: override {item!r} is not key=value")
        key, value = item.split("=", 1)
        name = _field_name(key.strip(), where)
        out[name] = _coerce(name, value.strip(), f"{where}: {key.strip()}")
    return out


def merge(base: TrainConfig, values: dict[str, Any], where: str = "overrides") -> TrainConfig:
    """A new config with ``values`` (already field names) applied."""
    for key in values:
        _field_name(key, where)
    return dataclasses.replace(base, **values)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: TrainConfig | None = None,
) -> TrainConfig:
    """Defaults (or ``base``), then the YAML file, then ``key=value`` overrides."""
    cfg = base or TrainConfig()
    if path:
        cfg = merge(cfg, read_yaml(path), str(path))
    return merge(cfg, parse_overrides(overrides))


def config_from_dict(d: dict[str, Any], where: str = "checkpoint") -> TrainConfig:
    """Rebuild a saved config (``to_dict``); unknown keys are an error naming ``where``."""
    values = {}
    for k, v in d.items():
        name = _field_name(k, where)
        values[name] = _coerce(name, v, f"{where}: key {k!r}")
    return TrainConfig(**values)
