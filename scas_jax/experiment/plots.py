"""Figures of ``results.json``: per-arm bars with their 95 % intervals beside the paired
differences to ``compare_to``; teacher shares per arm."""

from __future__ import annotations

from pathlib import Path


def _panel(ax, names: list[str], vals: list[float], cis: list, ylabel: str, title: str) -> None:
    cis = [c or [v, v] for v, c in zip(vals, cis)]
    err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
    ax.bar(range(len(names)), vals, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    lo, hi = min(c[0] for c in cis), max(c[1] for c in cis)
    pad = (hi - lo) * 0.3 or abs(hi) * 0.05 or 0.05
    ax.set_ylim(lo - pad, hi + pad)
    if lo < 0 < hi:
        ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=9)


def _bars(arms: list[dict], key: str, ylabel: str, path: Path) -> None:
    """Per-arm values with their 95 % intervals, and beside them the paired difference to
    ``compare_to`` (the interval to read when comparing arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [a for a in arms if a[key] is not None]
    names = [a["arm"] for a in shown]
    diff_key = f"{key}_diff"
    paired = [a for a in shown if a.get(diff_key) is not None]
    width = max(4.0, 0.7 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(2 * width if paired else width, 3.8), squeeze=False)
    _panel(axes[0][0], names, [a[key] for a in shown], [a[f"{key}_ci"] for a in shown], ylabel,
           f"{ylabel}, 95% bootstrap interval")
    if paired:
        ref = paired[0]["compare_to"]
        _panel(axes[0][1], [a["arm"] for a in paired], [a[diff_key] for a in paired],
               [a.get(f"{diff_key}_ci") for a in paired], f"minus {ref}", f"paired difference to {ref}")
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
