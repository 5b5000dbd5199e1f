"""Metrics: ``metrics.jsonl``, TensorBoard events (tensorboardX) and the MFU estimate.

MFU (model FLOPs utilisation) = model FLOPs per second / peak FLOPs of the devices.
Model FLOPs per trained token follow the PaLM appendix formula:

    flops_per_token = 6 * N_matmul + 12 * L * H * Dh * S

``N_matmul``: parameters of every matrix multiplication of the forward pass (all
attention and MLP kernels, plus the ``d_model x vocab`` output projection; the
embedding lookup is not a matmul), ``6 = 2`` (forward) ``+ 4`` (backward) FLOPs per
parameter per token; ``12 * L * H * Dh * S`` the attention scores and weighted sum
(forward and backward) over the full row length ``S = seq_len`` (the work XLA does,
since a packed row attends over its whole length with a block-diagonal mask). Tokens
counted: the real (non-padding) tokens of the step. Rematerialised forward passes are
not counted (that would be hardware, not model, FLOPs utilisation). Peak: the config's
``peak_tflops_per_device``, else a table of dense bf16 peaks by device kind; with no
peak known (e.g. CPU) MFU is reported as null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scas_jax.models.config import ModelConfig

# dense bf16 peak TFLOP/s per device, by a substring of jax's device_kind
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def matmul_params(cfg: ModelConfig) -> int:
    d, f, h, kv, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * h * dh + 2 * d * kv * dh + h * dh * d
    mlp = 3 * d * f
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def peak_flops(devices, configured_tflops: float = 0.0) -> float | None:
    """Total peak FLOP/s of ``devices`` (None when unknown)."""
    n = len(devices)
    if configured_tflops > 0:
        return configured_tflops * 1e12 * n
    kind = str(getattr(devices[0], "device_kind", ""))
    for key, tflops in PEAK_TFLOPS.items():
        if key.lower() in kind.lower():
            return tflops * 1e12 * n
    return None


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.file = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (written by a run killed after its last
        checkpoint), so a resumed run's log has each step once."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if int(row.get("step", 0)) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}", v, step)

    def write_event(self, step: int, record: dict[str, Any], scalars: dict[str, float],
                    prefix: str = "selection") -> None:
        """One JSON line ``{"step": step, **record}`` (nested values allowed) and the
        ``scalars`` as TensorBoard ``<prefix>/<name>``."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for k, v in scalars.items():
            if v is not None:
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
