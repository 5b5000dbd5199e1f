"""Accelerator attention kernels behind :func:`scas_jax.models.attention.attention`.

Same semantics as :mod:`scas_jax.models.attention` (a query at ``i`` attends a key at
``j`` iff their segment ids are equal, ``j <= i`` and, with a sliding window,
``i - j < window``; padding is segment 0), expressed in the forms the vendor kernels
take:

- ``cudnn`` (NVIDIA GPU): :func:`jax.nn.dot_product_attention` with
  ``implementation="cudnn"`` (cuDNN flash attention). ``is_causal=True`` lets cuDNN
  skip the upper triangle; the segment mask goes in as a boolean ``mask
  [batch, 1, seq, seq]`` (cuDNN adds it as a bias, broadcast over heads); a static
  sliding window is ``local_window_size=(window - 1, 0)``, a traced one (Gemma 3's
  per-layer windows inside the layer scan) is folded into the mask. Grouped-query
  heads are passed as they are (the API groups ``heads // kv_heads`` queries per key
  head). cuDNN takes bfloat16/float16 only and a head dim that is a multiple of 8 and
  at most 128 (256 on Hopper and later); an odd length is padded by one position
  (cuDNN's backward with a bias needs even lengths).
- ``splash`` (TPU): the Pallas splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``) with ``SegmentIds`` and a
  ``CausalMask`` (a ``LocalMask`` of ``(window - 1, 0)`` with a sliding window), one
  MQA kernel per key/value head (its ``heads // kv_heads`` query heads), vmapped over
  key/value heads and the batch. The sequence is padded to a multiple of 128 (padding
  gets segment id -1). A traced window cannot build a static splash mask, and a Pallas
  call is not partitioned across a multi-device mesh: both fall back to blockwise.
  Imported lazily, only when used.

:func:`choose_impl` is the backend-aware rule behind ``impl="auto"``, a pure function
of (backend, length, dtype, head dim, ...) so it is tested for every backend on CPU.
Where a requested kernel does not apply, :func:`resolve` falls back to ``blockwise``
(``auto``: to the CPU rule) and logs the reason once.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

IMPLS = ("xla", "blockwise", "auto", "cudnn", "splash")
CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCK = 128
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning("%s", msg)


def cpu_rule(seq: int, block: int) -> str:
    """The portable choice: ``blockwise`` when ``seq > 2 * block``, else ``xla``."""
    return "blockwise" if seq > 2 * block else "xla"


def cudnn_unsupported(dtype, head_dim: int, head_dim_max: int = 256) -> str | None:
    """Why cuDNN flash attention cannot take these operands, or None."""
    name = jnp.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        return f"cuDNN flash attention needs bfloat16/float16 operands, not {name}"
    if head_dim % 8 or head_dim > head_dim_max:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= {head_dim_max}, not {head_dim}"
    return None


def choose_impl(backend: str, seq: int, dtype, head_dim: int, *, block: int = 128,
                static_window: bool = True, splash_available: bool = True,
                cudnn_head_dim_max: int = 256, devices: int = 1,
                requested: str = "auto") -> tuple[str, str | None]:
    """``(implementation, fallback reason or None)`` for ``requested`` on ``backend``.

    ``auto``: GPU (CUDA) -> ``cudnn`` where cuDNN takes the operands; TPU -> ``splash``
    where the kernel is importable, the window static and there is one device (a Pallas
    call is not partitioned by the compiler; a multi-chip mesh would need a shard_map
    around it, not wired yet); otherwise (and on CPU) the
    portable rule (``blockwise`` past ``2 * block`` tokens, else ``xla``). A requested
    ``cudnn``/``splash`` that does not apply falls back to ``blockwise``; ``xla`` and
    ``blockwise`` are returned as they are.
    """
    backend = str(backend).lower()
    if requested in ("xla", "blockwise"):
        return requested, None
    if requested not in ("auto", "cudnn", "splash"):
        raise ValueError(f"unknown attention implementation {requested!r}")
    fallback = "blockwise" if requested != "auto" else cpu_rule(seq, block)
    want = requested
    if requested == "auto":
        want = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend)
        if want is None:
            return fallback, None
    if want == "cudnn":
        if backend not in ("gpu", "cuda"):
            return fallback, f"cudnn attention needs an NVIDIA GPU (backend {backend})"
        why = cudnn_unsupported(dtype, head_dim, cudnn_head_dim_max)
        return (fallback, why) if why else ("cudnn", None)
    if backend != "tpu":
        return fallback, f"splash attention needs a TPU (backend {backend})"
    if not splash_available:
        return fallback, "the Pallas splash-attention kernel is not importable"
    if not static_window:
        return fallback, "splash attention needs a static sliding window (per-layer windows are traced)"
    if devices > 1:
        return fallback, f"splash attention is wired for one device, not a {devices}-device mesh"
    return "splash", None


@functools.lru_cache(maxsize=None)
def splash_available() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cudnn_head_dim_max() -> int:
    try:
        cc = jax.devices()[0].compute_capability
        return 256 if tuple(int(x) for x in str(cc).split(".")) >= (9, 0) else 128
    except Exception:  # noqa: BLE001
        return 128


def is_static(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


def current_backend() -> str:
    """``jax.default_backend()``, with an AMD GPU named ``rocm`` (no cuDNN there)."""
    backend = jax.default_backend()
    if backend == "gpu":
        try:
            if "rocm" in jax.devices()[0].client.platform_version.lower():
                return "rocm"
        except Exception:  # noqa: BLE001
            pass
    return backend


def device_count() -> int:
    return jax.device_count()


def resolve(impl: str, q, sliding_window, block: int, backend: str | None = None) -> str:
    """The implementation to trace for ``impl`` given the operands (logs a fallback once)."""
    backend = backend or current_backend()
    chosen, why = choose_impl(
        backend, q.shape[1], q.dtype, q.shape[3], block=block,
        static_window=is_static(sliding_window),
        splash_available=splash_available() if str(backend).lower() == "tpu" else False,
        cudnn_head_dim_max=_cudnn_head_dim_max() if str(backend).lower() in ("gpu", "cuda") else 256,
        devices=device_count() if str(backend).lower() == "tpu" else 1,
        requested=impl)
    if why:
        _log_once(f"attention {impl!r}: using {chosen!r}: {why}")
    return chosen


# ---------------------------------------------------------------------------- cuDNN


def segment_mask(segment_ids, sliding_window=None):
    """Boolean ``[batch, 1, seq, seq]``: same segment (and, for a traced window, inside
    it). Causality is left to ``is_causal``; a static window to ``local_window_size``."""
    ok = segment_ids[:, :, None] == segment_ids[:, None, :]
    if sliding_window is not None and not is_static(sliding_window):
        idx = jnp.arange(segment_ids.shape[1])
        ok &= (idx[:, None] - idx[None, :]) < sliding_window
    return ok[:, None]


def cudnn_attention(q, k, v, segment_ids, sliding_window=None, implementation="cudnn"):
    """Through :func:`jax.nn.dot_product_attention`; ``implementation="xla"`` runs the
    same mask/layout translation through JAX's reference path (tested on CPU)."""
    b, t, h, d = q.shape
    pad = t % 2
    if pad:  # cuDNN's backward with a bias needs even lengths; own segment, never seen
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    window = None
    if sliding_window is not None and is_static(sliding_window):
        window = (int(sliding_window) - 1, 0)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=segment_mask(segment_ids, sliding_window), scale=float(d) ** -0.5,
        is_causal=True, local_window_size=window, implementation=implementation)
    return out[:, :t]


# ---------------------------------------------------------------------------- splash


def splash_geometry(t: int, sliding_window=None):
    """``(padded length, block, (left, right) window or None)`` for the splash kernel."""
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    blk = next(bs for bs in (512, 256, 128) if tp % bs == 0)
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    return tp, blk, window


def splash_segment_ids(segment_ids, tp: int):
    """Segment ids padded to ``tp`` (padding: -1, its own segment), int32."""
    pad = tp - segment_ids.shape[1]
    return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)


@functools.lru_cache(maxsize=64)
def _splash_kernel(tp: int, blk: int, group: int, window, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        one = sa.CausalMask((tp, tp))
    else:
        one = sa.LocalMask((tp, tp), window_size=window, offset=0)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    return sa.make_splash_mqa_single_device(
        mask=sa.MultiHeadMask([one] * group), block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, sliding_window=None, interpret=False):
    """Pallas splash attention (TPU; ``interpret=True`` runs it anywhere, slowly)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    tp, blk, window = splash_geometry(t, sliding_window)
    kernel = _splash_kernel(tp, blk, g, window, bool(interpret))
    widths = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q = jnp.pad(q * jnp.asarray(d**-0.5, q.dtype), widths)
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
    seg = splash_segment_ids(segment_ids, tp)
    qg = q.reshape(b, tp, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, T, d]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, T, d]

    def one_row(qr, kr, vr, sr):
        ids = sa.SegmentIds(q=sr, kv=sr)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kg, vg, seg)  # [b, kvh, g, T, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t].astype(q.dtype)


def reference_mask_np(segment_ids: np.ndarray, sliding_window=None) -> np.ndarray:
    """The ``[batch, seq, seq]`` boolean mask of the module semantics (numpy, for tests)."""
    t = segment_ids.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (j <= i)
    if sliding_window is not None:
        ok &= (i - j) < sliding_window
    return ok
