"""The report's figures (matplotlib, Agg backend). Each function writes one PNG and returns its path."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def teacher_colors(teachers: list[str]) -> dict[str, Any]:
    """One stable colour per teacher (sorted names), shared by every figure."""
    cmap = plt.get_cmap("tab10" if len(teachers) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(sorted(teachers))}


def _hbox(ax, data: list, **kwargs) -> dict:
    """Horizontal box plots (``orientation=`` from matplotlib 3.10, ``vert=False`` before)."""
    style = {"patch_artist": True, "widths": 0.6, "flierprops": {"markersize": 2, "alpha": 0.5},
             "medianprops": {"color": "black"}, **kwargs}
    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    if (major, minor) >= (3, 10):
        return ax.boxplot(data, orientation="horizontal", **style)
    return ax.boxplot(data, vert=False, **style)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def score_distribution(path: Path, name: str, values: dict[str, list[float]], colors: dict[str, Any]) -> Path:
    """Horizontal box plots of one score field, one box per teacher, lowest median on top."""
    teachers = [t for t in values if values[t]]
    teachers.sort(key=lambda t: (statistics.median(values[t]), t), reverse=True)  # position 1 is the bottom
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(teachers))))
    if teachers:
        box = _hbox(ax, [values[t] for t in teachers])
        for patch, t in zip(box["boxes"], teachers):
            patch.set_facecolor(colors[t])
            patch.set_alpha(0.75)
        ax.set_yticks(range(1, len(teachers) + 1), teachers)
    ax.set_title(f"{name} per teacher (box: quartiles, line: median)")
    ax.set_xlabel(f"{name}" + ("  (lower = lower estimated learning cost)" if "score" in name else ""))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def stacked_shares(path: Path, title: str, table: dict[str, dict[str, float]], colors: dict[str, Any]) -> Path:
    """One horizontal 100% bar per row of ``table`` ({label: {teacher: share}})."""
    labels = list(table)
    teachers = sorted({t for shares in table.values() for t in shares})
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.5 * len(labels)))
    left = [0.0] * len(labels)
    for t in teachers:
        widths = [table[label].get(t, 0.0) for label in labels]
        ax.barh(range(len(labels)), widths, left=left, color=colors.get(t), label=t, edgecolor="white")
        for i, w in enumerate(widths):
            if w >= 0.07:
                ax.text(left[i] + w / 2, i, f"{w:.0%}", ha="center", va="center", fontsize=8)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of selected rows")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _save(fig, path)


def agreement_heatmap(path: Path, labels: list[str], matrix: list[list[tuple[int, int]]]) -> Path:
    """Pairwise share of common items on which two selections chose the same teacher."""
    n = len(labels)
    values = [[(s / c if c else float("nan")) for s, c in row] for row in matrix]
    longest = max((len(label) for label in labels), default=10) + 5
    fig, ax = plt.subplots(figsize=(2.5 + 0.08 * longest + 0.9 * n, 1.5 + 0.7 * n))
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            v = values[i][j]
            ax.text(j, i, "–" if v != v else f"{v:.0%}", ha="center", va="center",
                    color="white" if v == v and v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(n), [f"({i + 1})" for i in range(n)])
    ax.set_yticks(range(n), [f"({i + 1}) {label}" for i, label in enumerate(labels)])
    ax.set_title("same teacher chosen (share of common items)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def teacher_overview(path: Path, teachers: list[str], accuracy: dict[str, float | None],
                     words: dict[str, list[int]], colors: dict[str, Any]) -> Path:
    """Left: accuracy (None: unknown, drawn as an empty bar); right: answer length in words."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.45 * len(teachers)), sharey=True)
    ys = range(len(teachers))
    acc = [accuracy.get(t) or 0.0 for t in teachers]
    a1.barh(ys, acc, color=[colors[t] for t in teachers])
    for y, t in zip(ys, teachers):
        a1.text(min(acc[y] + 0.01, 0.9), y, "unknown" if accuracy.get(t) is None else f"{acc[y]:.1%}", va="center", fontsize=8)
    a1.set_xlim(0, 1)
    a1.set_xlabel("accuracy (correct / all answers judged)")
    a1.set_title("accuracy")
    box = _hbox(a2, [words[t] or [0] for t in teachers], positions=list(ys))
    for patch, t in zip(box["boxes"], teachers):
        patch.set_facecolor(colors[t])
        patch.set_alpha(0.75)
    a1.set_yticks(list(ys), teachers)
    a1.set_ylim(len(teachers) - 0.5, -0.5)  # first teacher on top
    a2.set_xlabel("answer length (words)")
    a2.set_title("answer length")
    a2.grid(axis="x", alpha=0.3)
    return _save(fig, path)
