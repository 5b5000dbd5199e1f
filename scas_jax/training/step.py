"""The optimiser, the train state and the jitted train step.

``train_step(state, batch) -> (state, metrics)`` is a pure function under ``jax.jit``
with explicit shardings: parameters and the AdamW moments follow the rule table of
:mod:`scas_jax.parallel`, the batch ``[grad_accum, micro, seq]`` is sharded over
``('data', 'fsdp')`` on its micro axis, metrics are replicated.

Loss normalisation. With micro-batches ``m = 1..A`` and per-token losses ``l_{m,t}``
with weights ``w_{m,t}`` (1 on answer targets), the step minimises

    L = sum_{m,t} w_{m,t} l_{m,t} / sum_{m,t} w_{m,t}

i.e. the mean over *all* answer tokens of the step, not a mean of per-micro-batch
means. The denominator is known before the forward pass (it is a sum of the batch's
weights), so each micro-batch contributes ``grad(sum_t w l / N)`` and the
accumulated gradient is exactly the gradient of ``L``: ``A x B`` rows and ``1 x AB``
rows give the same update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import decode
from scas_jax.models.loss import target_logprobs
from scas_jax.parallel import BATCH_AXES, param_spec, path_str, put_rows
from scas_jax.training.config import TrainConfig

BATCH_FIELDS = ("tokens", "targets", "positions", "segment_ids", "weights")


class TrainState(NamedTuple):
    """step: int32 scalar (optimiser steps taken); params: float32 master weights;
    opt_state: the optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


# ------------------------------------------------------------------ optimiser


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` updates, then cosine decay to
    ``learning_rate * min_lr_ratio`` at ``total_steps`` (or constant).

    Warmup never wastes an update at zero: update ``i`` (0-based) of ``w`` warmup
    updates uses ``learning_rate * (i + 1) / w``, so the first one moves the weights
    and the last one reaches the peak.
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, decay_steps=max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio
        )
    if warmup == 0:
        return after

    def ramp(count):
        return peak * (jnp.minimum(count, warmup - 1) + 1) / warmup

    return optax.join_schedules([ramp, after], boundaries=[warmup])


def decay_mask(params) -> Any:
    """Weight decay on matrices only: ``kernel`` and ``embedding`` leaves (layers are
    stacked, so ``ndim`` cannot tell a norm scale ``[L, d]`` from a matrix)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: path_str(p).rsplit("/", 1)[-1] in ("kernel", "embedding"), params
    )


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


# ------------------------------------------------------------------ shardings


def _dict_path(path) -> str:
    """The parameter path inside an optimiser-state path (only its dict keys)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
    """Shardings of a (possibly abstract) state: every leaf shaped like a parameter takes
    the parameter's rule; scalars (step, Adam count) are replicated."""
    def one(path, x):
        shape = tuple(getattr(x, "shape", ()))
        if not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(_dict_path(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """``[grad_accum, micro, seq]`` arrays: the micro axis over ('data', 'fsdp')."""
    s = NamedSharding(mesh, P(None, BATCH_AXES, None))
    return {k: s for k in BATCH_FIELDS}


def init_state(params, optimizer, mesh) -> TrainState:
    """A sharded float32 train state at step 0 (parameters cast to float32)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    abstract = jax.eval_shape(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params
    )
    shardings = state_shardings(abstract, mesh)
    return jax.jit(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
        out_shardings=shardings,
    )(params)


# ------------------------------------------------------------------ loss and step


def micro_loss_sum(params, model_cfg: ModelConfig, cfg: TrainConfig, micro: dict) -> jax.Array:
    """``sum_t w_t * nll_t`` (float32 scalar) of one micro-batch ``[micro, seq]``."""
    dtype = jnp.dtype(cfg.compute_dtype)
    p = jax.tree.map(lambda x: x.astype(dtype), params) if dtype != jnp.float32 else params
    hidden, _ = decode(
        p, model_cfg, micro["tokens"], micro["positions"], micro["segment_ids"],
        dtype=dtype, attn_impl=cfg.attn_impl, remat=cfg.remat,
    )
    lp = target_logprobs(p, model_cfg, hidden, micro["targets"], cfg.logits_chunk,
                         cfg.logits_vocab_tile or None)
    return -jnp.sum(lp * micro["weights"])


def accumulated_grads(params, model_cfg: ModelConfig, cfg: TrainConfig, batch: dict, denom: jax.Array,
                      mesh) -> tuple[dict, jax.Array]:
    """``(sum over micro-batches of d loss_sum / d params / denom, sum of loss_sum)`` of a
    batch ``[grad_accum, micro, seq]``.

    With several micro-batches on a mesh whose ``data`` axis is larger than 1, the loop
    runs inside a ``shard_map`` that is manual over ``data`` (``fsdp`` and ``tp`` stay
    XLA's): each ``data`` shard adds up its own rows' gradients over the micro-batches and
    the shards' sums are reduced once, where XLA would all-reduce every micro-batch's
    gradient over ``data`` (``grad_accum`` times the traffic). One micro-batch keeps
    XLA's schedule (each layer's gradient reduced as the backward pass reaches it, which
    overlaps with the layers below on GPUs and TPUs).
    """
    def local(params, batch, denom):
        def accumulate(grads, micro):
            loss_sum, g = jax.value_and_grad(micro_loss_sum)(params, model_cfg, cfg, micro)
            return jax.tree.map(lambda a, b: a + b / denom, grads, g), loss_sum

        grads, loss_sums = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
        return grads, jnp.sum(loss_sums)

    accum = jax.tree.leaves(batch)[0].shape[0]
    if accum == 1 or mesh.shape["data"] == 1:
        return local(params, batch, denom)
    return jax.shard_map(
        lambda p, b, d: jax.lax.psum(local(p, b, d), "data"), mesh=mesh,
        in_specs=(P(), P(None, "data"), P()), out_specs=P(), axis_names={"data"}, check_vma=False,
    )(params, batch, denom)


def make_train_step(
    model_cfg: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
    mesh, state_sharding: TrainState, schedule: optax.Schedule,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step. ``batch`` holds :data:`BATCH_FIELDS`, each ``[grad_accum, micro, seq]``.

    Metrics (replicated float32 scalars): ``loss`` (mean NLL per answer token of the
    step), ``grad_norm`` (global norm before clipping), ``lr`` (the rate applied at this
    step), ``tokens`` (answer tokens of the step).
    """
    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # code that needs the mesh reads it there
            return _step(state, batch)

    def _step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        total = jnp.sum(batch["weights"])
        denom = jnp.maximum(total, 1.0)
        grads, loss_sum = accumulated_grads(state.params, model_cfg, cfg, batch, denom, mesh)
        grads = jax.lax.with_sharding_constraint(grads, state_sharding.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": total,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_shardings(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(model_cfg: ModelConfig, cfg: TrainConfig, mesh, param_sharding) -> Callable:
    """``(params, batch [1, rows, seq]) -> (sum of answer NLL, answer tokens)``."""

    def eval_fn(params, batch):
        micro = jax.tree.map(lambda x: x[0], batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return micro_loss_sum(params, model_cfg, cfg, micro), jnp.sum(micro["weights"])

    replicated = NamedSharding(mesh, P())
    return jax.jit(eval_fn, in_shardings=(param_sharding, batch_shardings(mesh)),
                   out_shardings=(replicated, replicated))


def to_step_batch(batch: dict, grad_accum: int) -> dict:
    """Host ``[batch_size, seq]`` arrays -> ``[grad_accum, micro, seq]`` (row ``a * micro + m``
    goes to micro-batch ``a``)."""
    out = {}
    for k in BATCH_FIELDS:
        x = batch[k]
        out[k] = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return out


def put_batch(batch: dict, mesh) -> dict:
    """Host arrays ``[A, micro, seq]`` of the whole global batch (every process builds the
    same one from the step index) -> global arrays with :func:`batch_shardings`; each
    process transfers only the micro-batch rows its devices hold, at their global index."""
    return put_rows(mesh, {k: batch[k] for k in BATCH_FIELDS}, axis=1)
