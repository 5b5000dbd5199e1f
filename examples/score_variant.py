"""A new SCAS score variant in about ten lines, run over the bundled GSM8K pool with the
packed, sharded scorer (scas_jax.api). See docs/api.md.

    python examples/score_variant.py --limit 20 --out variant_scores.jsonl

The variant: per answer, the NLL-weighted mean cosine of its tokens' target-layer rows
to the answer's mean direction (how much the hard tokens agree with the rest). It is
printed beside scas_score, computed in the same pass by the same functions the CLI uses.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from scas_jax import api

S = api.ScoreConfig().max_segments  # sequences per packed row, at most


# ---- the variant: a pure function (params, packed batch) -> per-sequence values [B, S]
def variant(cfg, params, batch):
    nll, unit = api.token_outputs(params, batch, cfg=cfg)                # [B, T], [B, T, d]
    stats = api.segment_stats(nll, unit, batch, max_segments=S)          # [B, S], [B, S, d]
    mean_dir = api.l2_normalise(stats["a_vec_sum"])                      # answer mean direction
    cos = api.segment_dot(unit, mean_dir, batch["segment_ids"])          # [B, T]
    w = jnp.where(batch["nll_answer_mask"], nll, 0.0)                    # weight: token NLL
    seg = batch["segment_ids"]
    weighted = api.segment_sum(w * cos, seg, S) / jnp.maximum(api.segment_sum(w, seg, S), 1e-12)
    return {"nll_weighted_cosine": weighted, "scas_score": api.fields(stats)["scas_score"]}
# ----


def main() -> None:
    import functools

    from scas_jax.assets import GSM8K_POOL
    from scas_jax.data.pool import read_pool
    from scas_jax.loader import load_student
    from scas_jax.parallel import batch_divisor, make_mesh, shard_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=20, help="first N rows of each teacher file")
    ap.add_argument("--mesh", default="data=-1")
    ap.add_argument("--out", default=None, help="write one JSON line per answer here")
    args = ap.parse_args()

    st = load_student("smollm2")
    mesh = make_mesh(args.mesh)
    pool = read_pool(GSM8K_POOL, limit=args.limit)  # verified answers, as `scas-jax score` reads them
    cands = [c for f in pool.files for c in f.rows]
    prepared = api.prepare([c.row for c in cands], st.tokenizer, api.ScoreConfig(),
                           row_multiple=batch_divisor(mesh))
    values = api.map_segments(functools.partial(variant, st.cfg), shard_params(st.params, mesh),
                              prepared, mesh=mesh)
    rows = [{"id": c.row["id"], "teacher_name": c.teacher, **{k: float(v) for k, v in val.items()}}
            for c, val in zip(cands, values) if val is not None]

    a = np.array([r["nll_weighted_cosine"] for r in rows])
    b = np.array([r["scas_score"] for r in rows])
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    print(f"{len(rows)} answers ({len(prepared.plans)} packed batches on {dict(mesh.shape)}); "
          f"Spearman(nll_weighted_cosine, scas_score) = {np.corrcoef(rank(a), rank(b))[0, 1]:.3f}")
    for r in rows[:5]:
        print(f"  {r['id']} {r['teacher_name']:<24} nll_weighted_cosine {r['nll_weighted_cosine']:.4f}  "
              f"scas_score {r['scas_score']:.4f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
