"""Per-token log-probabilities without holding ``[batch, seq, vocab]`` in float32.

The sequence is cut into chunks of ``chunk`` positions; each chunk's logits
``[batch, chunk, vocab]`` are formed, reduced to ``logsumexp`` and the target's logit,
and dropped. Under ``jax.checkpoint`` the backward pass recomputes a chunk's logits
instead of storing them, so training memory is bounded the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import lm_head, softcap

# Positions of a row per log-softmax chunk (a chunk's logits: ``[batch, chunk, vocab]``
# float32). 128 against 256: the same values bit for bit, one ``[chunk, 49,152]`` buffer
# of 25 instead of 50 MB on a one-row SmolLM2 pass, and no slower (docs/benchmarks.md).
VOCAB_CHUNK = 128


def target_logprobs(
    params: dict, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, chunk: int = VOCAB_CHUNK
) -> jax.Array:
    """``log softmax(hidden[b, t] @ W)[targets[b, t]]`` as float32 ``[batch, seq]``.

    ``hidden [batch, seq, d_model]`` is the final normed hidden state at the position
    that *predicts* ``targets [batch, seq]`` (shift before calling).
    """
    b, t, d = hidden.shape
    w, spec = lm_head(params, cfg, hidden.dtype)
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk)

    @jax.checkpoint
    def one(hc, yc):
        logits = softcap(cfg, jnp.einsum(spec, hc, w, preferred_element_type=jnp.float32))
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
        return tgt - lse

    out = jax.lax.map(lambda xs: one(*xs), (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :t]


def next_token_nll(
    params: dict, cfg: ModelConfig, hidden: jax.Array, tokens: jax.Array, chunk: int = VOCAB_CHUNK
) -> jax.Array:
    """``nll[b, p] = -log p(tokens[b, p] | tokens[b, :p])`` for ``p >= 1``; ``nll[:, 0] = 0``.

    Packed rows: a position whose predecessor belongs to another sequence gets a
    meaningless value, so callers mask it (the first token of every sequence).
    """
    lp = target_logprobs(params, cfg, hidden[:, :-1], tokens[:, 1:], chunk)
    return jnp.pad(-lp, ((0, 0), (1, 0)))
