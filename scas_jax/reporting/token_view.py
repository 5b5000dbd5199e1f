"""The report's token view: answers with every token shaded by its SCAS cost.

Reads the ``<teacher>_token_costs.jsonl`` files that ``scas-jax score --per-token``
writes beside the score files. For a few questions (those whose cheapest and costliest
answers differ most in ``scas_score``), the cheapest and the costliest answers are shown
side by side, each token shaded by its cost on one scale per question (red: costly,
blue: negative cost, i.e. a token pointing away from the rest of the answer and the
question). Writes ``token_costs.html`` (hover a token for its cost and NLL) and a PNG.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scas_jax.data.jsonl import iter_jsonl
from scas_jax.data.rows import id_key
from scas_jax.scoring.token_costs import SUFFIX

EXAMPLES = 4  # questions shown
PNG_EXAMPLES = 2  # of which drawn in the PNG
PNG_LINES = 18  # text lines per answer in the PNG


@dataclass(frozen=True)
class Answer:
    teacher: str
    score: float
    tokens: list[str]
    cost: list[float]
    nll: list[float]


@dataclass(frozen=True)
class Example:
    id: Any
    cheapest: Answer
    costliest: Answer

    @property
    def scale(self) -> float:
        """The largest |cost| of the two answers: one colour scale per question."""
        return max((abs(c) for a in (self.cheapest, self.costliest) for c in a.cost), default=0.0) or 1.0


def token_files(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(f"*{SUFFIX}"))


def load_token_costs(directory: str | Path) -> dict[tuple[str, str], dict]:
    """``{(id key, teacher): line}`` over every token-cost file of ``directory``."""
    out = {}
    for path in token_files(directory):
        for _, line in iter_jsonl(path):
            if line.get("id") is not None and line.get("tokens"):
                out[(id_key(line["id"]), str(line.get("teacher_name")))] = line
    return out


def choose_examples(index: dict[str, list[tuple[str, dict]]], costs: dict[tuple[str, str], dict],
                    n: int = EXAMPLES) -> list[Example]:
    """The ``n`` questions with the widest ``scas_score`` gap between their cheapest and
    costliest answers that have token costs (ties: by id key)."""
    candidates = []
    for key, answers in index.items():
        usable = []
        for teacher, row in answers:
            s = row.get("scas_score")
            line = costs.get((key, teacher))
            if line is None or row.get("scas_scoring_error") or not isinstance(s, (int, float)) or not math.isfinite(s):
                continue
            usable.append(Answer(teacher, float(s), [str(t) for t in line["tokens"]],
                                 [float(c) for c in line["cost"]], [float(x) for x in line["nll"]]))
        if len(usable) >= 2:
            usable.sort(key=lambda a: (a.score, a.teacher))
            lo, hi = usable[0], usable[-1]
            candidates.append((-(hi.score - lo.score) / max(abs(hi.score), 1e-12), key,
                               Example(answers[0][1].get("id"), lo, hi)))
    candidates.sort(key=lambda c: (c[0], c[1]))
    return [c[2] for c in candidates[:n]]


def _rgb(cost: float, scale: float) -> tuple[float, float, float, float]:
    """Red for positive costs, blue for negative, transparent at 0."""
    x = max(-1.0, min(1.0, cost / scale))
    return (0.84, 0.15, 0.16, abs(x)) if x >= 0 else (0.12, 0.47, 0.71, abs(x))


def _span(tok: str, cost: float, nll: float, scale: float) -> str:
    r, g, b, a = _rgb(cost, scale)
    text = html.escape(tok).replace("\n", "↵<br>")
    return (f'<span style="background: rgba({int(255 * r)},{int(255 * g)},{int(255 * b)},{a:.3f})" '
            f'title="cost {cost:.4g} · nll {nll:.3f}">{text}</span>')


def write_html(path: Path, examples: list[Example]) -> Path:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SCAS token costs</title><style>",
             "body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
             ".pair{display:flex;gap:1.5em;margin-bottom:2em}.ans{flex:1;border:1px solid #ccc;padding:.6em}"
             ".text{font-family:monospace;white-space:pre-wrap;line-height:1.5}"
             "h3{margin:.2em 0}.meta{color:#555;font-size:90%}</style></head><body>",
             "<h1>Answers shaded by SCAS cost per token</h1>",
             "<p>For each question: its cheapest (left) and costliest (right) answer by <code>scas_score</code>. "
             "A token's cost is its share of the score (the costs of an answer sum to its score): red = costly, "
             "blue = negative; one colour scale per question. Hover a token for its cost and NLL.</p>"]
    for ex in examples:
        parts.append(f"<h2>{html.escape(str(ex.id))}</h2><div class='pair'>")
        for label, a in (("cheapest", ex.cheapest), ("costliest", ex.costliest)):
            spans = "".join(_span(t, c, x, ex.scale) for t, c, x in zip(a.tokens, a.cost, a.nll))
            parts.append(f"<div class='ans'><h3>{label}: {html.escape(a.teacher)}</h3>"
                         f"<div class='meta'>scas_score {a.score:.4g} · sum of token costs {sum(a.cost):.4g} · "
                         f"{len(a.tokens)} answer tokens · mean token NLL "
                         f"{(sum(a.nll) / len(a.nll) if a.nll else 0):.3f}</div><div class='text'>{spans}</div></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _lines(a: Answer, width: int) -> list[list[tuple[int, str, float]]]:
    """Tokens laid out on a fixed character grid: lines of (column, text, cost)."""
    lines: list[list[tuple[int, str, float]]] = [[]]
    col = 0
    for tok, cost in zip(a.tokens, a.cost):
        pieces = tok.split("\n")
        for k, piece in enumerate(pieces):
            if k > 0:
                lines.append([])
                col = 0
            if col + len(piece) > width and col > 0:
                lines.append([])
                col = 0
            if piece:
                lines[-1].append((col, piece, cost))
                col += len(piece)
    return lines


def write_png(path: Path, examples: list[Example], fontsize: float = 8.0) -> Path:
    """The first examples drawn side by side, on a monospace grid that fits the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = examples[:PNG_EXAMPLES]
    panel_in = 7.6  # panel width, inches
    width = int(panel_in * 72 / (0.602 * fontsize))  # DejaVu Sans Mono advance: 0.602 em
    laid = [[_lines(a, width) for a in (ex.cheapest, ex.costliest)] for ex in shown]
    n_lines = [min(PNG_LINES, max(len(x) for x in pair)) for pair in laid]
    line_in = 1.45 * fontsize / 72
    fig, axes = plt.subplots(len(shown), 2, figsize=(2 * panel_in + 0.6, sum(n * line_in + 0.55 for n in n_lines) + 0.4),
                             squeeze=False, gridspec_kw={"height_ratios": [n * line_in + 0.55 for n in n_lines]})
    for row, ex, pair, n in zip(axes, shown, laid, n_lines):
        for ax, (label, a), lines in zip(row, (("cheapest", ex.cheapest), ("costliest", ex.costliest)), pair):
            ax.set_xlim(0, width)
            ax.set_ylim(n, 0)
            ax.axis("off")
            for y, line in enumerate(lines[:n]):
                for col, text, cost in line:
                    ax.add_patch(Rectangle((col, y + 0.05), len(text), 0.9, color=_rgb(cost, ex.scale), lw=0))
                ax.text(0, y + 0.5, _joined(line), family="DejaVu Sans Mono", fontsize=fontsize, va="center", ha="left",
                        parse_math=False)
            more = " …" if len(lines) > n else ""
            ax.set_title(f"{ex.id} · {label}: {a.teacher} · scas_score {a.score:.4g} "
                         f"({len(a.tokens)} tokens){more}", fontsize=9, loc="left")
    fig.suptitle("answer tokens shaded by SCAS cost (red: costly, blue: negative; one scale per question)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _joined(line: list[tuple[int, str, float]]) -> str:
    """One grid line as a string (the pieces at their columns)."""
    out = ""
    for col, text, _ in line:
        out += " " * (col - len(out)) + text
    return out


def render(scores_dir: str | Path, index: dict[str, list[tuple[str, dict]]], out_dir: Path,
           fig_dir: Path) -> dict[str, Any] | None:
    """Write ``out_dir/token_costs.html`` and ``fig_dir/token_costs.png`` when
    ``scores_dir`` has token-cost files with at least one question of two answers;
    returns a summary for report.json, else None."""
    if not token_files(scores_dir):
        return None
    examples = choose_examples(index, load_token_costs(scores_dir))
    if not examples:
        return None
    write_html(out_dir / "token_costs.html", examples)
    write_png(fig_dir / "token_costs.png", examples)
    return {"html": "token_costs.html", "png": "figures/token_costs.png",
            "examples": [{"id": ex.id, "cheapest": ex.cheapest.teacher, "costliest": ex.costliest.teacher}
                         for ex in examples]}
