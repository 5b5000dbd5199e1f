"""A jitted key/value-cache sampler for every supported family.

A batch of prompts goes through two compiled calls: the prefill (:func:`prefill_tokens`),
one pass over every prompt writing the cache, with the prompts packed back to back
(the projections and MLPs then skip the padding; the attention runs on the left-padded
layout gathered from them) or left-padded; then the decode loop
(:func:`decode_tokens`), one token per row per step under ``lax.while_loop`` until
every row has produced a stop token or ``max_new_tokens`` tokens. The cache
(:mod:`scas_jax.models.kv_cache`: ``[layers, batch, kv_heads, max_len, head_dim]``, or
one such buffer per layer on CPU) is an argument of both calls, donated, and handed
back, so consecutive batches of one shape reuse one buffer.

Shapes are static and few: prompts are sorted by length and cut into batches of
``batch_size`` rows (short batches are filled with one-token dummy rows), each batch is
left-padded to the smallest *bucket* that holds its longest prompt, and the loop
compiles once per ``(batch_size, bucket, max_new_tokens, sampling)``
(:attr:`Sampler.compilations`), a packed prefill once per packed length (at most 8 per
bucket, :func:`packed_length`). RoPE positions come from the padding mask, so a
left-padded row computes what it computes alone. With a mesh
(:func:`scas_jax.parallel.make_mesh`) rows are sharded over ``("data", "fsdp")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.errors import ScasError
from scas_jax.generation.sampling import SamplingConfig, row_keys, sample_next
from scas_jax.models.config import ModelConfig
from scas_jax.models.kv_cache import (LAYOUTS, cache_shape, default_layout, init_cache, next_token_logits,
                                      pack_prompts, unstack_layers)

# Padded prompt lengths: steps of 16 up to 256, of 32 up to 512, then about 1.25x apart.
# Padding costs in proportion twice: in the compute-bound prefill and in every decode
# step (each cache slot is read per step); each bucket used compiles once (~1 s for
# SmolLM2 on 2 cores).
DEFAULT_BUCKETS = (*range(16, 257, 16), *range(288, 513, 32), 640, 768, 1024, 1280, 1536, 2048,
                   2560, 3072, 4096, 5120, 6144, 8192)
# How the prompts enter the prefill (:class:`Sampler`).
PREFILLS = ("packed", "padded")
# End-of-turn tokens of common chat templates; each is a stop token when the
# tokenizer has it (besides the tokenizer's own EOS).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result: generated ids (without the stop token), the stop token that
    ended it (None when it did not stop) and ``truncated`` (hit ``max_new_tokens``)."""

    tokens: tuple[int, ...]
    stop_token: int | None
    truncated: bool


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS id(s) and its chat template's end-of-turn ids, sorted."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in END_OF_TURN_TOKENS:
        tid = vocab.get(token)
        if tid is not None and tid != unk:
            ids.add(int(tid))
    return tuple(sorted(ids))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; ScasError past the largest."""
    for b in buckets:
        if length <= b:
            return b
    raise ScasError(f"a prompt of {length} tokens exceeds the largest prompt bucket ({max(buckets)})")


def cache_valid(valid: jax.Array, cache: dict, layout: str) -> jax.Array:
    """bool ``[batch, max_len]``: the prompts' padding mask ``valid [batch, P]`` followed
    by True on every slot after the prompts (the generated tokens')."""
    max_len = cache["k"][0].shape[2] if layout == "per_layer" else cache["k"].shape[3]
    b, p = valid.shape
    return jnp.concatenate([valid, jnp.ones((b, max_len - p), bool)], axis=1)


def prefill_tokens(
    params: dict,
    prompt: dict,
    keys: jax.Array,
    cache: dict,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    dtype=jnp.float32,
    layout: str = "stacked",
) -> tuple[jax.Array, dict]:
    """The prefill: one pass over every prompt, writing the cache; the first new token.

    Args:
      prompt: padded, ``{"tokens" int32 [batch, P], "valid" bool [batch, P]}``
        (left-padded prompts; every row has at least one valid token, the last); or
        packed, the arrays of :func:`scas_jax.models.kv_cache.pack_prompts` (``tokens``
        and ``positions`` ``[N]``, the prompts back to back; the projections and MLPs
        then run on ``N`` rather than ``batch * P`` tokens).
      keys: uint32 ``[batch, 2]`` row keys (:func:`scas_jax.generation.sampling.row_keys`).
      cache: ``{"k", "v"}`` ``[layers, batch, kv_heads, max_len, head_dim]`` (``layout=
        "per_layer"``: tuples of ``[batch, kv_heads, max_len, head_dim]``, and ``params``
        from :func:`scas_jax.models.kv_cache.unstack_layers`), max_len >= P; its old
        contents are never read.
    Returns:
      (the first new token int32 ``[batch]``, the cache holding the prompts at slots
      ``0 .. P-1``).
    """
    valid = prompt["valid"]
    kv_valid = cache_valid(valid, cache, layout)
    if "rows_index" in prompt:
        packing = {k: prompt[k] for k in ("rows_index", "packed_index", "last_index")}
        tokens, positions = prompt["tokens"][None], prompt["positions"][None]
    else:
        packing, tokens = None, prompt["tokens"]
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    logits, cache = next_token_logits(params, cfg, tokens, positions, cache, jnp.int32(0), kv_valid,
                                      valid, prefill=True, dtype=dtype, layout=layout, packing=packing)
    return sample_next(logits, keys, jnp.int32(0), sampling), cache


def decode_tokens(
    params: dict,
    first: jax.Array,
    valid: jax.Array,
    keys: jax.Array,
    stop_ids: jax.Array,
    cache: dict,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    sampling: SamplingConfig,
    dtype=jnp.float32,
    pad_id: int = 0,
    layout: str = "stacked",
) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """Decode after the prefill, one token per row per step, under ``lax.while_loop``.

    Args:
      first: int32 ``[batch]``, the prefill's token (:func:`prefill_tokens`); valid:
        bool ``[batch, P]``, the prompts' padding mask; keys as for the prefill;
        stop_ids: int32 ``[n_stop]`` (n_stop >= 1; a stop id of -1 never matches); cache:
        the prefill's, max_len >= P + max_new_tokens.
    Returns:
      (out int32 ``[batch, max_new_tokens]`` (``pad_id`` after a row stopped), n int32
      ``[batch]`` tokens generated including the stop token, stopped bool ``[batch]``,
      the cache).
    """
    b, p = valid.shape
    kv_valid = cache_valid(valid, cache, layout)
    prompt_len = valid.astype(jnp.int32).sum(axis=1)
    is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=1)  # noqa: E731
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_stop(first)
    n = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, out, done, n, cache = state
        pos = (prompt_len + step - 1)[:, None]
        logits, cache = next_token_logits(params, cfg, tok[:, None], pos, cache, p + step - 1, kv_valid,
                                          dtype=dtype, layout=layout)
        new = jnp.where(done, pad_id, sample_next(logits, keys, step, sampling))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        n = n + (~done).astype(jnp.int32)
        return step + 1, new, out, done | is_stop(new), n, cache

    _, _, out, done, n, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), first, out, done, n, cache))
    return out, n, done, cache


def generate_tokens(params: dict, prompt: dict, keys: jax.Array, stop_ids: jax.Array, cache: dict, *,
                    cfg: ModelConfig, max_new_tokens: int, sampling: SamplingConfig, dtype=jnp.float32,
                    pad_id: int = 0, layout: str = "stacked") -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """:func:`prefill_tokens`, then :func:`decode_tokens` (one function to jit whole)."""
    first, cache = prefill_tokens(params, prompt, keys, cache, cfg=cfg, sampling=sampling, dtype=dtype,
                                  layout=layout)
    return decode_tokens(params, first, prompt["valid"], keys, stop_ids, cache, cfg=cfg,
                         max_new_tokens=max_new_tokens, sampling=sampling, dtype=dtype, pad_id=pad_id,
                         layout=layout)


def packed_length(total: int, rows: int, width: int) -> int:
    """The packed prefill's length for ``total`` prompt tokens: rounded up to a step of
    ``rows * width / 8`` (a multiple of 16), so one padded shape has at most 8 packed
    shapes (bounded compiles) and the packing wastes under an eighth of the padded work."""
    step = max(16, -(-rows * width // 8 // 16) * 16)
    return min(-(-total // step) * step, max(rows * width, total))


class Sampler:
    """Generate from token-id prompts with one set of parameters.

    ``batch_size`` rows per compiled call (rounded up to a multiple of the mesh's batch
    shards); ``buckets``: the padded prompt lengths; ``layout``: the cache layout
    (:mod:`scas_jax.models.kv_cache`; default by backend: ``"per_layer"`` on CPU, which
    keeps an unstacked copy of the layer weights for the sampler's lifetime).
    ``prefill``: ``"packed"`` (the prompts back to back, :func:`prefill_tokens`; the
    default unless rows are sharded over several devices) or ``"padded"``.
    ``compilations`` counts the compiled decode loops, ``prefill_compilations`` the
    compiled prefills (at most 8 per loop when packed, :func:`packed_length`);
    ``cache_shapes`` lists the cache shapes allocated
    (:func:`~scas_jax.models.kv_cache.cache_shape`, both layouts).
    """

    def __init__(self, params: dict, cfg: ModelConfig, *, mesh=None, dtype: str = "float32",
                 batch_size: int = 16, buckets: Sequence[int] = DEFAULT_BUCKETS, pad_id: int = 0,
                 layout: str | None = None, prefill: str | None = None):
        self.layout = layout or default_layout()
        if self.layout not in LAYOUTS:
            raise ScasError(f"unknown cache layout {self.layout!r}; one of {', '.join(LAYOUTS)}")
        self.params = unstack_layers(params) if self.layout == "per_layer" else params
        self.cfg, self.mesh = cfg, mesh
        self.dtype = jnp.dtype(dtype)
        divisor = 1
        if mesh is not None:
            from scas_jax.parallel import batch_divisor

            divisor = batch_divisor(mesh)
        self.prefill = prefill or ("packed" if divisor == 1 else "padded")
        if self.prefill not in PREFILLS:
            raise ScasError(f"unknown prefill {self.prefill!r}; one of {', '.join(PREFILLS)}")
        self.batch_size = -(-max(1, int(batch_size)) // divisor) * divisor
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.pad_id = int(pad_id)
        self._compiled: dict[tuple, Any] = {}
        self._compiled_prefill: dict[tuple, Any] = {}
        self._cache: tuple[tuple, dict] | None = None
        self.cache_shapes: list[tuple[int, ...]] = []

    @property
    def compilations(self) -> int:
        return len(self._compiled)

    @property
    def prefill_compilations(self) -> int:
        return len(self._compiled_prefill)

    def _cache_for(self, batch: int, max_len: int) -> dict:
        key = (batch, max_len)
        if self._cache is not None and self._cache[0] == key:
            cache = self._cache[1]
            self._cache = None
            return cache
        self._cache = None  # drop the old buffer before allocating the new one
        kw = {}
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            from scas_jax.parallel import BATCH_AXES

            spec = P(BATCH_AXES) if self.layout == "per_layer" else P(None, BATCH_AXES)
            kw["out_shardings"] = NamedSharding(self.mesh, spec)
        make = jax.jit(lambda: init_cache(self.cfg, batch, max_len, self.dtype, self.layout), **kw)
        self.cache_shapes.append(cache_shape(self.cfg, batch, max_len))
        return make()

    def _prefill_executable(self, args: tuple, sampling: SamplingConfig):
        cache_len = jax.tree.leaves(args[3])[0].shape[-2]
        key = (tuple(sorted((k, v.shape) for k, v in args[1].items())), cache_len, sampling)
        if key not in self._compiled_prefill:
            fn = jax.jit(
                lambda params, prompt, keys, cache: prefill_tokens(
                    params, prompt, keys, cache, cfg=self.cfg, sampling=sampling, dtype=self.dtype,
                    layout=self.layout),
                donate_argnums=(3,),
            )
            self._compiled_prefill[key] = fn.lower(*args).compile()
        return self._compiled_prefill[key]

    def _decode_executable(self, args: tuple, max_new_tokens: int, sampling: SamplingConfig):
        key = (tuple(args[2].shape), max_new_tokens, sampling, len(args[4]))
        if key not in self._compiled:
            fn = jax.jit(
                lambda params, first, valid, keys, stop_ids, cache: decode_tokens(
                    params, first, valid, keys, stop_ids, cache, cfg=self.cfg,
                    max_new_tokens=max_new_tokens, sampling=sampling, dtype=self.dtype,
                    pad_id=self.pad_id, layout=self.layout),
                donate_argnums=(5,),
            )
            self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key]

    def _place(self, host: dict[str, np.ndarray], rows: bool = True) -> dict:
        """Host arrays -> device arrays: sharded by row (``rows``) or replicated."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in host.items()}
        if not rows:
            from jax.sharding import NamedSharding, PartitionSpec as P

            return {k: jax.device_put(v, NamedSharding(self.mesh, P())) for k, v in host.items()}
        from scas_jax.parallel import put_rows

        return put_rows(self.mesh, host)

    def generate_batch(self, prompts: Sequence[Sequence[int]], row_ids: Sequence[int], *,
                       max_new_tokens: int, sampling: SamplingConfig, seed: int,
                       stop_ids: Sequence[int]) -> list[Generation]:
        """One compiled call for at most ``batch_size`` prompts (see :meth:`generate`)."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"generate_batch takes 1..{self.batch_size} prompts, got {len(prompts)}")
        if any(len(p) == 0 for p in prompts):
            raise ScasError("an empty prompt cannot be generated from")
        longest = max(len(p) for p in prompts)
        width = bucket_for(longest, self.buckets)
        rows = self.batch_size
        ids = list(row_ids) + [0] * (rows - len(prompts))
        keys = np.asarray(row_keys(seed, ids))
        if self.prefill == "packed":  # dummy rows: one pad token
            total = sum(len(p) for p in prompts) + rows - len(prompts)
            host = pack_prompts(prompts, width, rows, packed_length(total, rows, width), self.pad_id)
            valid = host.pop("valid")
            prompt = self._place(host, rows=False)
            placed = self._place({"valid": valid, "keys": keys})
            prompt["valid"] = placed["valid"]
        else:
            tokens = np.full((rows, width), self.pad_id, np.int32)
            valid = np.zeros((rows, width), bool)
            valid[:, -1] = True  # dummy rows: one pad token
            for i, p in enumerate(prompts):
                tokens[i, width - len(p):] = np.asarray(p, np.int32)
                valid[i, width - len(p):] = True
            placed = self._place({"tokens": tokens, "valid": valid, "keys": keys})
            prompt = {"tokens": placed["tokens"], "valid": placed["valid"]}
        stops = jnp.asarray(np.asarray(list(stop_ids) or [-1], np.int32))
        cache = self._cache_for(rows, width + max_new_tokens)
        args = (self.params, prompt, placed["keys"], cache)
        first, cache = self._prefill_executable(args, sampling)(*args)
        args = (self.params, first, prompt["valid"], placed["keys"], stops, cache)
        out, n, stopped, cache = self._decode_executable(args, max_new_tokens, sampling)(*args)
        self._cache = ((rows, width + max_new_tokens), cache)
        from scas_jax.parallel import to_host

        out, n, stopped = to_host((out, n, stopped))
        results = []
        for i in range(len(prompts)):
            k = int(n[i])
            if bool(stopped[i]):
                results.append(Generation(tuple(int(t) for t in out[i, :k - 1]), int(out[i, k - 1]), False))
            else:
                results.append(Generation(tuple(int(t) for t in out[i, :k]), None, True))
        return results

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 row_ids: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
                 on_batch=None) -> list[Generation]:
        """Generate for every prompt (lists of token ids), in input order.

        row_ids: one integer per prompt that seeds its random draws
          (``fold_in(PRNGKey(seed), row_id)``, then ``fold_in(., step)``); default: the
          prompt's index. Give stable ids to make a row's sample independent of the
          others in the call.
        on_batch: called as ``on_batch(indices, generations)`` after each batch.
        """
        if max_new_tokens < 1:
            raise ScasError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            gens = self.generate_batch([prompts[i] for i in idx], [row_ids[i] for i in idx],
                                       max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                       stop_ids=stop_ids)
            for i, g in zip(idx, gens):
                results[i] = g
            if on_batch is not None:
                on_batch(idx, gens)
        return results  # type: ignore[return-value]
