"""The experiment's settings: one flat dataclass read from YAML; every field has a
default that runs. An unknown key is an error naming the file and the nearest valid key;
an unknown arm or teacher is an error listing the valid ones."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from scas_jax.errors import ScasError
from scas_jax.data.yaml_file import read_yaml as read_yaml_file

# arms that need no teacher name; ``teacher:<name>`` adds one per teacher
FIXED_ARMS = ("base", "scas_min", "scas_groups", "nll_min", "scas_no_diag_min", "strongest",
              "random", "dynamic", "scas_min_other")
TEACHER_PREFIX = "teacher:"
# arms whose choice comes from the base student's scores, and the score field they rank by
SCORED_ARMS = {"scas_min": "scas_score", "scas_groups": "scas_score", "nll_min": "answer_mean_nll",
               "scas_no_diag_min": "scas_score_no_diag"}
# arms whose answers depend on the run's seed (the others pick the same answers every seed)
SEEDED_ARMS = ("scas_groups", "random", "dynamic")
# arms that need ``other_student`` (they rank by the OTHER student's scores, ``OUT/scored_other``)
OTHER_ARMS = ("scas_min_other",)
BUNDLED_POOL = "gsm8k"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of ``scas-jax experiment`` (see ``docs/experiment.md``)."""

    # what
    student: str = "smollm2"  # anything load_student takes; converted once into OUT/student
    chat_template: str = ""  # the student's: chatml|gemma|plain|FILE.jinja; "" = its tokenizer's own
    # a second student (student comparison): scores the same training pool (OUT/scored_other);
    # "" = none. Enables the arm scas_min_other and OUT/comparison.json
    other_student: str = ""
    other_chat_template: str = ""  # the other student's template (as chat_template)
    # cross-training: run the experiment twice, OUT/<student>/ then OUT/<other_student>/ with the
    # roles swapped (sharing the conversions, split and scores), and write OUT/cross_training.*
    both_roles: bool = False
    pool: str = BUNDLED_POOL  # a pool directory, or "gsm8k" (the bundled one)
    teachers: tuple = ()  # the teachers used (candidates, held-out answers); () = all of the pool
    arms: tuple = ("base", "scas_min", "nll_min", "strongest", "random")
    # questions and their split (seeded, by id)
    questions: int = 0  # the first N question ids of the pool (sorted); 0 = all
    min_verified: int = 1  # a question takes part when it has >= this many verified answers
    heldout_questions: int = 40  # held out for evaluation (never trained on)
    train_questions: int = 0  # training questions (from the rest); 0 = all the rest
    split_seed: int = 0
    seeds: tuple = (0, 1)  # training seeds (data order; random/groups/dynamic draws)
    # training: every arm gets one answer per training question, the same steps and settings
    batch_size: int = 8  # answers per step (one answer per packed row; rounded up to the devices)
    grad_accum: int = 1  # micro-batches per step (same step, less memory: Gemma's 262k vocabulary)
    epochs: int = 1
    steps: int = 0  # 0: epochs * ceil(train questions / batch_size)
    seq_len: int = 0  # 0: the longest training candidate (prompt + answer), rounded up to 64
    learning_rate: float = 5e-5
    # both_roles: the learning rate when other_student is trained (role 2); 0 = learning_rate.
    # Every arm of a student shares its learning rate; the students need not share one.
    other_learning_rate: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    # scoring (the base student, once) and the SCAS arms
    lambda_scas: float = 0.5
    num_groups: int = 5  # scas_groups trains on a random answer of the lowest group
    score_batch_tokens: int = 4096
    max_length: int = 4096
    rescore_every: int = 10  # dynamic: rescore the next K steps' candidates every K steps
    # evaluation
    generate_accuracy: bool = False  # also greedy answers, judged (accuracy)
    max_new_tokens: int = 384
    eval_batch_size: int = 16
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    compare_to: str = "scas_min"  # paired differences of every arm against this one
    keep_models: bool = False  # keep each run's fine-tuned float32 checkpoint
    mesh: str = "data=-1"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def pool_dir(self) -> Path:
        if self.pool == BUNDLED_POOL:
            from scas_jax.assets import GSM8K_POOL

            return Path(GSM8K_POOL)
        return Path(self.pool)


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
_INTS = {n for n, f in FIELDS.items() if isinstance(f.default, int) and not isinstance(f.default, bool)}


def _bad(where: str, msg: str) -> ScasError:
    return ScasError(f"{where}: {msg}")


def _coerce(name: str, value: Any, where: str) -> Any:
    default = FIELDS[name].default
    if isinstance(default, tuple):
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _bad(where, f"{name} must be a list, got {value!r}")
        if name == "seeds":
            if not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise _bad(where, f"seeds must be a non-empty list of integers, got {value!r}")
            if len(set(value)) != len(value):
                raise _bad(where, f"seeds has duplicates: {value!r}")
        return tuple(str(v) if name != "seeds" else int(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _bad(where, f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise _bad(where, f"{name} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict, where: str = "experiment config") -> ExperimentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad(where, "expected a mapping of settings")
    values = {}
    for key, value in data.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _bad(where, f"unknown key {key!r}{hint} (valid keys: {', '.join(FIELDS)})")
        values[key] = _coerce(key, value, where)
    cfg = ExperimentConfig(**values)
    validate(cfg, where)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (None: the defaults), then ``key=value`` overrides (values in YAML)."""
    data: Any = {}
    where = "experiment config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ScasError(f"--config {path}: no such file")
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise _bad(where, "expected a mapping of settings")
    data = dict(data)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ScasError(f"--set {item!r}: expected KEY=VALUE")
        try:
            data[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            data[key.strip()] = value
    if overrides:
        where += " (with --set " + " ".join(overrides) + ")"
    return config_from_dict(data, where)


def validate(cfg: ExperimentConfig, where: str) -> None:
    if not cfg.arms:
        raise _bad(where, "arms is empty")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise _bad(where, f"arms has duplicates: {list(cfg.arms)}")
    for arm in cfg.arms:
        if arm not in FIXED_ARMS and not (arm.startswith(TEACHER_PREFIX) and len(arm) > len(TEACHER_PREFIX)):
            close = difflib.get_close_matches(arm, FIXED_ARMS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(where, f"unknown arm {arm!r}{hint}; valid arms: {', '.join(FIXED_ARMS)}, "
                              f"{TEACHER_PREFIX}<teacher>")
    for arm in cfg.arms:
        if arm in OTHER_ARMS and not cfg.other_student:
            valid = [a for a in FIXED_ARMS if a not in OTHER_ARMS]
            raise _bad(where, f"arm {arm!r} needs other_student (a second student whose scores choose its "
                              f"answers); without it the valid arms are: {', '.join(valid)}, "
                              f"{TEACHER_PREFIX}<teacher>")
    if cfg.other_chat_template and not cfg.other_student:
        raise _bad(where, "other_chat_template is set but other_student is not")
    if cfg.both_roles and not cfg.other_student:
        raise _bad(where, "both_roles needs other_student (the two students swap roles)")
    if cfg.other_learning_rate and not cfg.both_roles:
        raise _bad(where, "other_learning_rate is set but both_roles is not (only role 2 trains other_student)")
    from scas_jax.data.chat import chat_template_label

    for name in ("chat_template", "other_chat_template"):
        try:
            chat_template_label(getattr(cfg, name) or None, name)
        except ScasError as e:
            raise _bad(where, str(e)) from None
    if cfg.compare_to not in cfg.arms:
        raise _bad(where, f"compare_to {cfg.compare_to!r} is not one of the arms ({', '.join(cfg.arms)})")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise _bad(where, f"grad_accum must be >= 1 and divide batch_size {cfg.batch_size}, got {cfg.grad_accum}")
    for name in ("batch_size", "epochs", "min_verified", "heldout_questions", "bootstrap_samples",
                 "rescore_every", "num_groups", "max_new_tokens", "eval_batch_size",
                 "score_batch_tokens", "max_length"):
        if getattr(cfg, name) < 1:
            raise _bad(where, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("questions", "train_questions", "steps", "seq_len", "warmup_steps"):
        if getattr(cfg, name) < 0:
            raise _bad(where, f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        raise _bad(where, f"learning_rate must be > 0, got {cfg.learning_rate}")
    if not 0.0 <= cfg.lambda_scas <= 1.0:
        raise _bad(where, f"lambda_scas must be in [0, 1], got {cfg.lambda_scas}")
    if cfg.schedule not in ("cosine", "constant"):
        raise _bad(where, f"schedule {cfg.schedule!r} is not one of cosine, constant")


def check_teachers(cfg: ExperimentConfig, available: list[str], where: str) -> list[str]:
    """The teachers the experiment uses; an unknown one (in ``teachers`` or a
    ``teacher:<name>`` arm) is an error listing the pool's teachers."""
    used = list(cfg.teachers) or list(available)
    for t in used:
        if t not in available:
            raise _bad(where, f"unknown teacher {t!r} in teachers; the pool's teachers: {', '.join(available)}")
    for arm in cfg.arms:
        if arm.startswith(TEACHER_PREFIX):
            t = arm[len(TEACHER_PREFIX):]
            if t not in used:
                raise _bad(where, f"unknown teacher {t!r} in arm {arm!r}; valid teachers: {', '.join(used)}")
    return used
