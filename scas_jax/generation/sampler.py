"""A jitted key/value-cache sampler for every supported family.

One call of the compiled loop (:func:`generate_tokens`) takes a left-padded batch of
prompts, runs one prefill pass over the whole prompt (writing the cache), then decodes
one token per row per step under ``lax.while_loop`` until every row has produced a stop
token or ``max_new_tokens`` tokens. The cache (:mod:`scas_jax.models.kv_cache`:
``[layers, batch, kv_heads, max_len, head_dim]``, or one such buffer per layer on CPU)
is an argument of the compiled loop, donated, and handed back, so consecutive batches
of one shape reuse one buffer.

Shapes are static and few: prompts are sorted by length and cut into batches of
``batch_size`` rows (short batches are filled with one-token dummy rows), each batch is
left-padded to the smallest *bucket* that holds its longest prompt, and the loop
compiles once per ``(batch_size, bucket, max_new_tokens, sampling)``
(:attr:`Sampler.compilations`). RoPE positions come from the padding mask, so a
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
                                      unstack_layers)

# Padded prompt lengths: steps of 16 up to 256, of 32 up to 512, then about 1.25x apart.
# Padding costs in proportion twice: in the compute-bound prefill and in every decode
# step (each cache slot is read per step); each bucket used compiles once (~1 s for
# SmolLM2 on 2 cores).
DEFAULT_BUCKETS = (*range(16, 257, 16), *range(288, 513, 32), 640, 768, 1024, 1280, 1536, 2048,
                   2560, 3072, 4096, 5120, 6144, 8192)
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


def generate_tokens(
    params: dict,
    tokens: jax.Array,
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
    """Prefill, then decode under ``lax.while_loop``.

    Args:
      tokens: int32 ``[batch, P]`` left-padded prompts; valid: bool ``[batch, P]`` (False
        on padding; every row has at least one valid token, the last).
      keys: uint32 ``[batch, 2]`` row keys (:func:`scas_jax.generation.sampling.row_keys`).
      stop_ids: int32 ``[n_stop]`` (n_stop >= 1; a stop id of -1 never matches).
      cache: ``{"k", "v"}`` ``[layers, batch, kv_heads, max_len, head_dim]`` (``layout=
        "per_layer"``: tuples of ``[batch, kv_heads, max_len, head_dim]``, and ``params``
        from :func:`scas_jax.models.kv_cache.unstack_layers`), max_len >= P +
        max_new_tokens; its old contents are never read.
    Returns:
      (out int32 ``[batch, max_new_tokens]`` (``pad_id`` after a row stopped), n int32
      ``[batch]`` tokens generated including the stop token, stopped bool ``[batch]``,
      the cache).
    """
    b, p = tokens.shape
    max_len = cache["k"][0].shape[2] if layout == "per_layer" else cache["k"].shape[3]
    kv_valid = jnp.concatenate([valid, jnp.ones((b, max_len - p), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    prompt_len = valid.astype(jnp.int32).sum(axis=1)
    is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=1)  # noqa: E731

    logits, cache = next_token_logits(params, cfg, tokens, positions, cache, jnp.int32(0), kv_valid,
                                      valid, prefill=True, dtype=dtype, layout=layout)
    tok = sample_next(logits, keys, jnp.int32(0), sampling)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_stop(tok)
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

    _, _, out, done, n, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, n, cache))
    return out, n, done, cache


class Sampler:
    """Generate from token-id prompts with one set of parameters.

    ``batch_size`` rows per compiled call (rounded up to a multiple of the mesh's batch
    shards); ``buckets``: the padded prompt lengths; ``layout``: the cache layout
    (:mod:`scas_jax.models.kv_cache`; default by backend: ``"per_layer"`` on CPU, which
    keeps an unstacked copy of the layer weights for the sampler's lifetime).
    ``compilations`` counts the compiled loops; ``cache_shapes`` lists the cache shapes
    allocated (:func:`~scas_jax.models.kv_cache.cache_shape`, both layouts).
    """

    def __init__(self, params: dict, cfg: ModelConfig, *, mesh=None, dtype: str = "float32",
                 batch_size: int = 16, buckets: Sequence[int] = DEFAULT_BUCKETS, pad_id: int = 0,
                 layout: str | None = None):
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
        self.batch_size = -(-max(1, int(batch_size)) // divisor) * divisor
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.pad_id = int(pad_id)
        self._compiled: dict[tuple, Any] = {}
        self._cache: tuple[tuple, dict] | None = None
        self.cache_shapes: list[tuple[int, ...]] = []

    @property
    def compilations(self) -> int:
        return len(self._compiled)

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

    def _executable(self, args: tuple, max_new_tokens: int, sampling: SamplingConfig):
        tokens = args[1]
        key = (tuple(tokens.shape), max_new_tokens, sampling, len(args[4]))
        if key not in self._compiled:
            fn = jax.jit(
                lambda params, tokens, valid, keys, stop_ids, cache: generate_tokens(
                    params, tokens, valid, keys, stop_ids, cache, cfg=self.cfg,
                    max_new_tokens=max_new_tokens, sampling=sampling, dtype=self.dtype,
                    pad_id=self.pad_id, layout=self.layout),
                donate_argnums=(5,),
            )
            self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key]

    def _place(self, host: dict[str, np.ndarray]) -> dict:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in host.items()}
        from scas_jax.parallel import put_rows

        return put_rows(self.mesh, host)

    def generate_batch(self, prompts: Sequence[Sequence[int]], row_ids: Sequence[int], *,
                       max_new_tokens: int, sampling: SamplingConfig, seed: int,
                       stop_ids: Sequence[int]) -> list[Generation]:
        """One compiled call for at most ``batch_size`` prompts (see :meth:`generate`)."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"generate_batch takes 1..{self.batch_size} prompts, got {len(prompts)}")
        longest = max(len(p) for p in prompts)
        width = bucket_for(longest, self.buckets)
        rows = self.batch_size
        tokens = np.full((rows, width), self.pad_id, np.int32)
        valid = np.zeros((rows, width), bool)
        tokens[:, -1] = self.pad_id
        valid[:, -1] = True  # dummy rows: one token
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ScasError("an empty prompt cannot be generated from")
            tokens[i, width - len(p):] = np.asarray(p, np.int32)
            valid[i, width - len(p):] = True
        ids = list(row_ids) + [0] * (rows - len(prompts))
        keys = np.asarray(row_keys(seed, ids))
        placed = self._place({"tokens": tokens, "valid": valid, "keys": keys})
        stops = jnp.asarray(np.asarray(list(stop_ids) or [-1], np.int32))
        cache = self._cache_for(rows, width + max_new_tokens)
        args = (self.params, placed["tokens"], placed["valid"], placed["keys"], stops, cache)
        out, n, stopped, cache = self._executable(args, max_new_tokens, sampling)(*args)
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
