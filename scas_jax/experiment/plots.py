"""Figures of ``results.json``: per-arm bars with their 95 % intervals, teacher shares."""

from __future__ import annotations

from pathlib import Path


def _bars(arms: list[dict], key: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a["arm"] for a in arms if a[key] is not None]
    vals = [a[key] for a in arms if a[key] is not None]
    cis = [a[f"{key}_ci"] or [v, v] for a, v in zip([a for a in arms if a[key] is not None], vals)]
    err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), vals, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    lo = min(c[0] for c in cis)
    hi = max(c[1] for c in cis)
    pad = (hi - lo) * 0.3 or abs(hi) * 0.05 or 0.05
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(f"{ylabel} per arm (95% bootstrap interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shares(arms: list[dict], teachers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [a for a in arms if a["teacher_shares"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 3.5), 3.6))
    bottom = [0.0] * len(rows)
    for t in teachers:
        vals = [a["teacher_shares"].get(t, 0.0) for a in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=t)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), [a["arm"] for a in rows], rotation=35, ha="right")
    ax.set_ylabel("share of training answers")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title("Teacher shares per arm", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figures(arms: list[dict], teachers: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "heldout_nll.png"]
    _bars(arms, "heldout_nll", "held-out NLL (nats)", paths[0])
    if any(a["accuracy"] is not None for a in arms):
        paths.append(out / "accuracy.png")
        _bars(arms, "accuracy", "greedy accuracy", paths[-1])
    paths.append(out / "teacher_shares.png")
    _shares(arms, teachers, paths[-1])
    return paths
