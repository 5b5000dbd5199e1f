"""``scas-jax experiment``: the CLI shell over :func:`scas_jax.experiment.runner.run_experiment`."""

from __future__ import annotations

import argparse


def _cmd(args: argparse.Namespace) -> int:
    from scas_jax.experiment.runner import run_experiment

    res = run_experiment(args.config, args.out, args.set or [], progress=not args.no_progress)
    ref = res["arms"][0]["compare_to"] if res["arms"] else ""
    both = "roles" in res  # both_roles: cross_training.json's content
    for a in res["arms"]:
        ci = a["heldout_nll_ci"] or [float("nan")] * 2
        who = f"{a['student']}: " if both else ""
        print(f"  {who + a['arm']:<40} held-out NLL {a['heldout_nll']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  "
              f"vs {ref} {a['heldout_nll_diff']:+.4f}")
    print(f"results: {args.out}/{'cross_training.md' if both else 'results.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "experiment", help="compare selection arms: train the student on each, evaluate on held-out questions",
        description="Split a pool's questions into training and held-out (seeded, by id), score the "
                    "training candidates once with the base student, train the student on one answer per "
                    "training question for every arm and seed (same steps and settings), evaluate each "
                    "on the held-out questions, and write results.json/.csv/.md and figures. Resumable: "
                    "a rerun skips the runs finished with the same settings.")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiment/smoke.yaml")
    p.add_argument("--out", required=True, help="working directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set student=runs/tiny --set 'seeds=[0,1,2]'")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
