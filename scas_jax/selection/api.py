"""``select()``: read a pool, run one strategy, write SFT files, dataset_info and a manifest.

Layout of the outputs (``OUT`` is ``output_dir``):

- ``groups``: ``OUT/<score_key>/<G>_groups/`` with ``group_<g>.jsonl`` for every g,
  ``selected_group_<g>.jsonl``, ``dataset_info.json``, ``manifest.json``;
- ``min``: ``OUT/<score_key>/min_score_selected.jsonl``, ``dataset_info.json``,
  ``manifest.json`` (beside any ``<G>_groups/`` directories);
- ``strongest``: ``OUT/strongest/``; ``teacher``: ``OUT/teacher/<NAME>/``;
  ``random``: ``OUT/random/seed_<seed>/``; each with ``<name>.jsonl``,
  ``dataset_info.json`` and ``manifest.json``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from scas_jax import __version__
from scas_jax.errors import ScasError
from scas_jax.data.files import SCORES, discover_pool, input_sha256, require_score_files
from scas_jax.data.jsonl import read_json
from scas_jax.io_utils import publish_dir, publish_files
from scas_jax.selection.candidates import Pool, drop_unverified, load_pool, skip_summary
from scas_jax.selection.rows import dataset_info, output_row
from scas_jax.selection.strategies import (
    Choice,
    select_groups,
    select_min,
    select_random,
    select_strongest,
    require_distinct_top,
    select_teacher,
    strength_order,
    teacher_accuracy_from_flags,
    tied_teachers,
)

SCORE_STRATEGIES = ("groups", "min")
BASELINES = ("strongest", "teacher", "random")
STRATEGIES = SCORE_STRATEGIES + BASELINES
GROUPING_CONVENTION = "ascending score; group_1 is the lowest-cost group"


def teacher_share(choices: Iterable[Choice]) -> dict[str, dict[str, float]]:
    """``{teacher: {"rows": n, "share": n / total}}``, most frequent first."""
    counts = Counter(str(c.candidate.teacher) for c in choices)
    total = sum(counts.values())
    return {t: {"rows": n, "share": round(n / total, 6)} for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def read_teacher_accuracy(path: str | Path) -> dict[str, float]:
    """Accuracy per teacher from a JSON object, in [0, 1].

    Either ``{"teacher": accuracy}`` or the file ``scas-jax verify`` writes,
    ``{"teacher": {"correct": c, "incorrect": i, "undecided": u, "total": n, "accuracy": c / n}}``.
    """
    path = Path(path)
    data = read_json(path, "teacher accuracy file")
    if not isinstance(data, dict) or not data:
        raise ScasError(f'{path}: expected a JSON object {{"teacher": accuracy, ...}}')
    out = {}
    for name, value in data.items():
        if isinstance(value, dict):
            if "accuracy" not in value:
                raise ScasError(f"{path}: teacher {name!r} has no \"accuracy\" field")
            value = value["accuracy"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ScasError(f"{path}: accuracy of teacher {name!r} must be a number in [0, 1], got {value!r}")
        out[str(name)] = float(value)
    return out


def _check_args(strategy: str, num_groups: int, selected_group: int, teacher: str | None,
                teacher_accuracy: str | Path | None) -> None:
    if strategy not in STRATEGIES:
        raise ScasError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "groups":
        if num_groups < 1:
            raise ScasError(f"--num-groups must be >= 1, got {num_groups}")
        if not 1 <= selected_group <= num_groups:
            raise ScasError(f"--selected-group must be between 1 and --num-groups ({num_groups}), got {selected_group}")
    if strategy == "teacher" and not teacher:
        raise ScasError("--strategy teacher needs --teacher NAME")
    if strategy != "teacher" and teacher:
        raise ScasError("--teacher only applies to --strategy teacher")
    if strategy != "strongest" and teacher_accuracy is not None:
        raise ScasError("--teacher-accuracy only applies to --strategy strongest")


def select(
    input_dir: str | Path,
    output_dir: str | Path,
    strategy: str = "groups",
    *,
    score_key: str = "scas_score",
    num_groups: int = 5,
    selected_group: int = 1,
    seed: int = 42,
    teacher: str | None = None,
    teacher_accuracy: str | Path | None = None,
    verified_only: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run one selection strategy and write its files; returns the manifest.

    ``verified_only`` defaults to False for ``groups``/``min`` (the reference selects
    among every scored row) and True for the baselines (verified answers only).
    ``teacher_accuracy`` (``strongest`` only): a JSON file of accuracies per teacher,
    e.g. ``teacher_accuracy.json`` from ``verify`` on the full pool; without it the
    accuracies come from the pool's flags, and a tie at the top is an error. The
    manifest's ``order_source`` says which (``"flags"`` or the file's path).
    Nothing is written when any check fails.
    """
    _check_args(strategy, num_groups, selected_group, teacher, teacher_accuracy)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if verified_only is None:
        verified_only = strategy in BASELINES
    if strategy in SCORE_STRATEGIES:
        files = require_score_files(input_dir)
        row_score_key: str | None = score_key
        pool = load_pool(files, score_key=score_key, require_score=True, verified_only=verified_only)
    else:
        files = discover_pool(input_dir)
        row_score_key = score_key if files[0].kind == SCORES else None
        pool = load_pool(files, score_key=row_score_key, require_score=False, verified_only=False)

    params: dict[str, Any] = {"score_key": row_score_key, "verified_only": verified_only}
    if strategy == "groups":
        params.update(num_groups=num_groups, selected_group=selected_group, seed=seed)
    elif strategy == "random":
        params["seed"] = seed
    elif strategy == "teacher":
        params["teacher"] = teacher
    extra: dict[str, Any] = {}
    accuracy: dict[str, float] | None = None
    if strategy == "strongest":
        if teacher_accuracy is not None:
            accuracy = read_teacher_accuracy(teacher_accuracy)
            params["teacher_accuracy_file"] = str(teacher_accuracy)
            extra["order_source"] = str(teacher_accuracy)
        else:
            accuracy = teacher_accuracy_from_flags(pool)
            require_distinct_top(accuracy)
            extra["order_source"] = "flags"
        extra["teacher_accuracy"] = {t: round(accuracy[t], 6) for t in strength_order(accuracy)}
        extra["teacher_order"] = strength_order(accuracy)
        ties = tied_teachers(accuracy)
        if ties:
            extra["ties_broken_by_name"] = ties
    if strategy == "teacher" and teacher not in pool.teachers():
        raise ScasError(f"unknown teacher {teacher!r}; teachers in {input_dir}: {', '.join(pool.teachers()) or 'none'}")
    if strategy in BASELINES and verified_only:
        pool = drop_unverified(pool)
        if strategy == "teacher" and teacher not in pool.teachers():
            raise ScasError(f"teacher {teacher!r} has no verified answers in {input_dir} (pass --include-unverified to use them all)")
    if not pool.items:
        raise ScasError(f"no candidates left in {input_dir} after skipping rows ({skip_summary(pool.skipped)})")

    header = {
        "strategy": strategy,
        "parameters": params,
        "input_dir": str(input_dir),
        "input_kind": files[0].kind,
        "input_files": [str(input_dir / f.path.name) for f in files],
        "input_checksums": {f.path.name: "sha256:" + input_sha256(f) for f in files},
        "rows_read": pool.rows_read,
        "candidates": pool.candidates,
        "skipped": dict(sorted(pool.skipped.items())),
        "items": len(pool.items),
    }

    if strategy == "groups":
        return _write_groups(pool, output_dir, header, score_key, num_groups, selected_group, seed, overwrite)
    if strategy == "min":
        choices = select_min(pool)
        name = "min_score_selected"
        dest = output_dir / score_key
        manifest = {
            **header,
            "output_dir": str(dest),
            "score_key": score_key,
            **_selected_summary(name, choices),
        }
        publish_files(dest, _files(name, choices, score_key, manifest), overwrite=overwrite)
        return manifest
    if strategy == "strongest":
        choices = select_strongest(pool, accuracy)
        name, dest = "strongest_selected", output_dir / "strongest"
    elif strategy == "teacher":
        choices, without = select_teacher(pool, teacher)
        extra["items_without_teacher"] = without
        safe = safe_name(teacher)
        name, dest = f"teacher_{safe}_selected", output_dir / "teacher" / safe
    else:
        choices = select_random(pool, seed)
        name, dest = f"random_seed_{seed}_selected", output_dir / "random" / f"seed_{seed}"
    manifest = {**header, "output_dir": str(dest), **extra, **_selected_summary(name, choices)}
    publish_dir(dest, _files(name, choices, row_score_key, manifest), overwrite=overwrite)
    return manifest


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (for paths)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"


def _selected_summary(name: str, choices: list[Choice]) -> dict[str, Any]:
    return {
        "selected_file": f"{name}.jsonl",
        "selected_rows": len(choices),
        "teacher_share": teacher_share(choices),
        "scas_jax_version": __version__,
    }


def _files(name: str, choices: list[Choice], score_key: str | None, manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {
        f"{name}.jsonl": [output_row(c, score_key) for c in choices],
        "dataset_info.json": dataset_info([name]),
        "manifest.json": manifest,
    }


def _write_groups(pool: Pool, output_dir: Path, header: dict[str, Any], score_key: str, num_groups: int,
                  selected_group: int, seed: int, overwrite: bool) -> dict[str, Any]:
    by_group, missing = select_groups(pool, num_groups, seed)
    names = [f"group_{g}" for g in by_group]
    selected_name = f"selected_group_{selected_group}"
    selected = by_group[selected_group]
    dest = output_dir / score_key / f"{num_groups}_groups"
    manifest = {
        **header,
        "output_dir": str(dest),
        # the reference's manifest keys
        "score_key": score_key,
        "num_groups": num_groups,
        "selected_group": selected_group,
        "seed": seed,
        "group_counts": {f"{n}.jsonl": len(by_group[g]) for g, n in zip(by_group, names)},
        "selected_count": len(selected),
        "missing_groups": {str(g): n for g, n in missing.items()},
        "grouping_convention": GROUPING_CONVENTION,
        # ours
        **_selected_summary(selected_name, selected),
        "teacher_share_by_group": {f"group_{g}": teacher_share(rows) for g, rows in by_group.items()},
    }
    files: dict[str, Any] = {f"{n}.jsonl": [output_row(c, score_key) for c in by_group[g]] for g, n in zip(by_group, names)}
    files[f"{selected_name}.jsonl"] = [output_row(c, score_key) for c in selected]
    files["dataset_info.json"] = dataset_info(names + [selected_name])
    files["manifest.json"] = manifest
    publish_dir(dest, files, overwrite=overwrite)
    return manifest
