"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Every random draw uses an explicit key per row and step: ``fold_in(row_key, step)``.
A row's key comes from the caller (derived from a seed and the row's own identity, not
its place in a batch), so a row draws the same tokens whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from scas_jax.errors import ScasError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (hashable: a static argument of the jitted loop).

    temperature: 0 is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the ``top_k`` most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches
      ``top_p`` (1.0: all). Applied after ``top_k``, as transformers does.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ScasError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ScasError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ScasError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def row_keys(seed: int, row_ids) -> jax.Array:
    """uint32 key data ``[rows, 2]``: ``fold_in(PRNGKey(seed), row_id)`` for each row id."""
    base = jax.random.PRNGKey(int(seed))
    ids = jnp.asarray(row_ids, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


def sample_next(logits: jax.Array, keys: jax.Array, step: jax.Array, sc: SamplingConfig) -> jax.Array:
    """Next tokens ``int32[batch]`` from float32 ``logits [batch, vocab]``.

    keys: uint32 ``[batch, 2]`` row keys; step: int32 scalar (folded into each key).
    """
    if sc.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.float32(sc.temperature)
    vocab = logits.shape[-1]
    k = min(sc.top_k, vocab) if sc.top_k else vocab
    if k < vocab or sc.top_p < 1.0:
        vals, idx = jax.lax.top_k(logits, k)  # sorted, most likely first
        if sc.top_p < 1.0:
            probs = jax.nn.softmax(vals, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            vals = jnp.where(before < sc.top_p, vals, -jnp.inf)  # the first one always stays
    else:
        vals, idx = logits, None

    def draw(key, v):
        return jax.random.categorical(jax.random.fold_in(key, step), v)

    choice = jax.vmap(draw)(keys, vals)
    if idx is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
