"""Compute dtypes by backend, and the matmul precision that makes float32 mean float32.

``auto`` (the default of ``scas-jax score --dtype``, ``ScoreConfig.dtype`` and the train
config's ``compute_dtype``/``score_dtype``) resolves by the JAX backend: bfloat16 on GPU
and TPU, float32 on CPU (where bfloat16 is no faster and moves the NLLs). Configs and
manifests record the resolved name, never ``auto``.

Matmul precision. XLA's default precision lets a float32 matmul run as one bfloat16
pass on TPU and as TF32 on recent NVIDIA GPUs, so "float32" would not be float32 there.
:func:`matmul_precision` is the one setting: a float32 run traces its jitted step under
``jax.default_matmul_precision("highest")`` (true float32 products everywhere, including
the hand-written VJPs, since the whole step is traced inside it); a bfloat16 run keeps
the default (its bfloat16 operands are exact in any pass, and its float32 side products
keep the fast path). On CPU float32 is float32 either way.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

from scas_jax.errors import ScasError

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16")
ACCELERATOR_BACKENDS = ("gpu", "tpu", "cuda", "rocm")


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a GPU/TPU ``backend``, ``"float32"`` otherwise;
    a concrete name is returned as is. ``backend`` defaults to ``jax.default_backend()``
    (only consulted for ``auto``)."""
    if dtype in COMPUTE_DTYPES:
        return dtype
    if dtype != "auto":
        raise ScasError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "bfloat16" if str(backend).lower() in ACCELERATOR_BACKENDS else "float32"


def matmul_precision(dtype: str):
    """The context to trace a step of compute ``dtype`` under (see the module docs)."""
    import jax

    if resolve_dtype(dtype) == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def with_matmul_precision(fn: Callable, dtype: str) -> Callable:
    """``fn`` (a jitted function) called, hence traced and compiled, under
    :func:`matmul_precision` of ``dtype``."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with matmul_precision(dtype):
            return fn(*args, **kwargs)

    return call
