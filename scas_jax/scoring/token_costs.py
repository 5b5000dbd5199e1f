"""``scas-jax score --per-token``: every answer token's NLL and SCAS cost.

``<teacher>_token_costs.jsonl`` beside the score files, one line per scored row, in the
order of ``<teacher>_scas_scores.jsonl``::

    {"id": ..., "teacher_name": ..., "tokens": [str], "nll": [float], "cost": [float]}

over the row's answer positions (``answer_mask``: answer tokens that are not special).
``tokens[i]`` is the token decoded alone (``tokenizer.decode([id])``; a character cut
between two byte-level tokens shows as U+FFFD). ``cost[i]`` is
:func:`scas_jax.api.token_costs`: ``sum(cost) == scas_score`` of the score file (float32
on device, so within about 1e-6 relative). ``nll[i]`` is the loss of predicting the
token (0 for a sequence's first position, which is never an answer token in practice).
A row that could not be scored gets empty lists and its ``scas_scoring_error``.

The costs come from a second pass over the same packed batches as the scores (another
compiled program: one forward pass each), on one process; the mesh may have any shape.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from scas_jax.errors import ScasError

SUFFIX = "_token_costs.jsonl"


def token_costs_file_name(teacher: str) -> str:
    return f"{teacher}{SUFFIX}"


def check_supported() -> None:
    """ScasError when ``--per-token`` cannot run here (several processes)."""
    import jax

    if jax.process_count() > 1:
        raise ScasError("--per-token runs on one process; score on one host to get token costs")


@functools.lru_cache(maxsize=None)
def _compiled(model_cfg, max_segments: int, tap: str, lambda_scas: float, dtype: str,
              attn_impl: str, vocab_chunk: int):
    import jax

    from scas_jax import api

    def fn(params, batch):
        out = api.scas_token_costs(params, batch, cfg=model_cfg, max_segments=max_segments, tap=tap,
                                   lambda_scas=lambda_scas, dtype=jax.numpy.dtype(dtype),
                                   attn_impl=attn_impl, vocab_chunk=vocab_chunk)
        return {"nll": out["nll"], "cost": out["cost"]}

    return jax.jit(fn)


def item_token_costs(params: dict, model_cfg, prepared, cfg, mesh=None) -> dict[int, dict[str, np.ndarray]]:
    """``{item: {"ids", "nll", "cost"}}`` over each scored item's answer positions
    (``prepared``: :func:`scas_jax.scoring.scorer.prepare`'s output; ``cfg``: its
    ScoreConfig)."""
    from scas_jax import api
    from scas_jax.scoring.scorer import executable

    fn = _compiled(model_cfg, cfg.max_segments, cfg.target_layer, float(cfg.lambda_scas), cfg.dtype,
                   cfg.attn_impl, cfg.vocab_chunk)
    out = {}
    for plan, batch in api.packed_batches(prepared, mesh):
        res = {k: np.asarray(v) for k, v in executable(fn, params, batch)(params, batch).items()}
        for r, row in enumerate(plan.rows):
            offset = 0
            for item in row:
                e = prepared.encoded[item]
                span = slice(offset, offset + e.length)
                keep = np.asarray(e.answer_mask, bool)
                out[item] = {"ids": np.asarray(e.ids)[keep], "nll": res["nll"][r, span][keep],
                             "cost": res["cost"][r, span][keep]}
                offset += e.length
    return out


def token_rows(items: list, prepared, costs: dict[int, dict], tokenizer) -> dict[str, list[dict]]:
    """``{teacher: [line, ...]}`` in item order; ``items[i] = (teacher, candidate)``."""
    per_teacher: dict[str, list[dict]] = {}
    for i, (teacher, cand) in enumerate(items):
        line: dict[str, Any] = {"id": cand.row.get("id"), "teacher_name": cand.teacher}
        if isinstance(prepared.encoded[i], str):
            line.update(tokens=[], nll=[], cost=[], scas_scoring_error=prepared.encoded[i])
        else:
            c = costs[i]
            line.update(tokens=tokenizer.batch_decode([[int(t)] for t in c["ids"]]),
                        nll=[float(x) for x in c["nll"]], cost=[float(x) for x in c["cost"]])
        per_teacher.setdefault(teacher, []).append(line)
    return per_teacher


def write_for_run(output_dir: Path, items: list, prepared, st, params, cfg, mesh) -> dict[str, str]:
    """Compute and write every teacher's token-cost file (main process); returns
    ``{teacher: path}`` for the manifest."""
    from scas_jax.io_utils import write_jsonl_atomic
    from scas_jax.parallel import is_main_process

    check_supported()
    costs = item_token_costs(params, st.cfg, prepared, cfg, mesh)
    paths = {}
    for teacher, lines in token_rows(items, prepared, costs, st.tokenizer).items():
        path = Path(output_dir) / token_costs_file_name(teacher)
        if is_main_process():
            write_jsonl_atomic(path, lines)
        paths[teacher] = str(path)
    return paths
