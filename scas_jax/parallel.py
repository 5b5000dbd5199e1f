"""One mesh, named axes, and a short rule table that shards every parameter.

Mesh axes are ``("data", "fsdp", "tp")``. Batches shard their leading axis over
``("data", "fsdp")``. Parameters: each rule (a regex over the parameter path) names
the logical role of every dimension; ``tp`` takes the ``heads``/``mlp``/``vocab``
dimension, ``fsdp`` takes the largest remaining dimension (never the stacked
``layers`` axis); tensors under ``min_shard_elems`` elements are replicated. A
parameter that matches no rule is an error, so a new weight cannot silently end up
replicated (or mis-sharded).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scas_jax.errors import ScasError

AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tp"

# (path regex, logical role of each dimension). Paths are "a/b/c" joined.
RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"^embed_tokens/embedding$", ("vocab", "embed")),
    (r"^lm_head/kernel$", ("embed", "vocab")),
    (r"^norm/scale$", (None,)),
    (r"^layers/self_attn/(q_proj|k_proj|v_proj)/kernel$", ("layers", "embed", "heads")),
    (r"^layers/self_attn/(q_proj|k_proj|v_proj)/bias$", ("layers", "heads")),
    (r"^layers/self_attn/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"^layers/self_attn/o_proj/bias$", ("layers", None)),
    (r"^layers/self_attn/(q_norm|k_norm)/scale$", ("layers", None)),
    (r"^layers/mlp/(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"^layers/mlp/(gate_proj|up_proj)/bias$", ("layers", "mlp")),
    (r"^layers/mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"^layers/mlp/down_proj/bias$", ("layers", None)),
    (r"^layers/(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
     r"|post_feedforward_layernorm)/scale$", ("layers", None)),
)
TP_ROLES = ("heads", "mlp", "vocab")


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> sizes for all three axes; one axis may be ``-1`` (the rest)."""
    sizes = {a: 1 for a in AXES}
    given = {}
    for part in filter(None, (p.strip() for p in (spec or "data=-1").split(","))):
        if "=" not in part:
            raise ScasError(f"mesh spec {spec!r}: expected axis=size, got {part!r}")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in AXES:
            raise ScasError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(AXES)})")
        try:
            given[name] = int(value)
        except ValueError:
            raise ScasError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    fill = [a for a, v in given.items() if v == -1]
    if len(fill) > 1:
        raise ScasError(f"mesh spec {spec!r}: at most one axis may be -1")
    fixed = math.prod(v for v in given.values() if v != -1)
    if fill:
        if n_devices % fixed:
            raise ScasError(f"mesh spec {spec!r}: {n_devices} devices not divisible by {fixed}")
        given[fill[0]] = n_devices // fixed
    sizes.update(given)
    if math.prod(sizes.values()) != n_devices:
        raise ScasError(
            f"mesh spec {spec!r} uses {math.prod(sizes.values())} devices, but {n_devices} are present"
        )
    return sizes


def make_mesh(spec: str = "data=-1", devices=None) -> Mesh:
    """A ``Mesh`` over all (or the given) devices with axes ``("data", "fsdp", "tp")``."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)  # GSPMD propagation inside jit; shardings given at the edges
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _rule_for(path: str) -> tuple[str | None, ...]:
    for pattern, roles in RULES:
        if re.search(pattern, path):
            return roles
    raise ScasError(f"parameter {path!r} matches no sharding rule in scas_jax.parallel.RULES")


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, min_shard_elems: int = 2**14) -> P:
    """The ``PartitionSpec`` of one parameter, from the rule table."""
    roles = _rule_for(path)
    if len(roles) != len(shape):
        raise ScasError(f"parameter {path!r}: rule expects {len(roles)} dims, found shape {shape}")
    spec: list = [None] * len(shape)
    if math.prod(shape) < min_shard_elems:
        return P(*spec)
    tp, fsdp = mesh.shape["tp"], mesh.shape["fsdp"]
    for i, r in enumerate(roles):
        if r in TP_ROLES and tp > 1 and shape[i] % tp == 0:
            spec[i] = "tp"
            break
    if fsdp > 1:
        free = [i for i, r in enumerate(roles) if r != "layers" and spec[i] is None]
        for i in sorted(free, key=lambda i: -shape[i]):
            if shape[i] % fsdp == 0:
                spec[i] = "fsdp"
                break
    return P(*spec)


def path_str(path) -> str:
    """A ``jax.tree_util`` key path (or a tuple of names) as ``"a/b/c"``."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", k))))
    return "/".join(parts)


def param_shardings(params, mesh: Mesh):
    """A tree of ``NamedSharding`` matching ``params`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, param_spec(path_str(p), tuple(x.shape), mesh)), params
    )


def shard_params(params, mesh: Mesh):
    """Place ``params`` on ``mesh`` by the rule table."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def mesh_context(tree):
    """``jax.set_mesh`` of the mesh the leaves of ``tree`` (arrays or
    ``ShapeDtypeStruct``s) are laid out on, for compiling a step over them; a null
    context when none carries a ``NamedSharding``. Code that must know which rows a
    device holds (the forward attention's row loop) reads it from there."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return jax.set_mesh(sharding.mesh)
    return contextlib.nullcontext()


def batch_divisor(mesh) -> int:
    """The global batch size must be a multiple of this (the batch shards: the product
    of the ``BATCH_AXES`` sizes of a ``Mesh`` or ``AbstractMesh``)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def auto_batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes XLA shards (all of :data:`BATCH_AXES` but those a ``shard_map``
    has made manual: inside it, a device's rows of those are all the rows it sees)."""
    manual = set(getattr(mesh, "manual_axes", ()))
    return tuple(a for a in BATCH_AXES if a not in manual)


def row_shards(mesh, batch: int) -> int | None:
    """The batch shards of ``mesh`` (a ``Mesh`` or ``AbstractMesh``: the product of its
    :func:`auto_batch_axes` sizes) where they split ``batch`` rows evenly; None where
    ``mesh`` is empty, lacks the batch axes or does not divide ``batch``."""
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    shards = math.prod(mesh.shape[a] for a in auto_batch_axes(mesh))
    return shards if batch % shards == 0 else None


def local_rows(batch: int) -> int:
    """Rows of a ``batch``-row array each device holds under the context mesh
    (``jax.set_mesh``, see :func:`mesh_context`): ``batch`` over the batch shards where
    they divide it, else (no mesh in context, a batch that does not split) ``batch``.
    Code that works on a device's rows a few positions at a time sizes its pieces by it."""
    return batch // batch_shards(batch)


def batch_shards(batch: int) -> int:
    """The context mesh's batch shards (:func:`row_shards`) where they split ``batch``
    rows evenly, else 1. A sum over rows built up in a loop (a weight's gradient, piece
    by piece) can be kept per shard, ``[shards, ...]``, and reduced once after the loop
    rather than in every step."""
    return row_shards(jax.sharding.get_abstract_mesh(), batch) or 1


def row_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis ``axis`` (the rows) over ``("data", "fsdp")``, every other axis whole."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def _row_block(index: tuple, axis: int, n_rows: int) -> tuple[int, int]:
    """``(start, stop)`` of the rows a device's global ``index`` covers."""
    start, stop, _ = index[axis].indices(n_rows)
    return start, stop


def global_rows(mesh: Mesh, n_rows: int, build: Callable[[slice], dict[str, np.ndarray]],
                axis: int = 0) -> dict[str, jax.Array]:
    """Global arrays of ``n_rows`` rows on ``axis``, sharded over the batch axes.

    Every process runs the same deterministic plan, and each materialises only the rows
    its own devices hold, at the global indices the sharding gives them:
    ``build(rows: slice) -> {name: host array}`` returns those rows (``axis`` of each
    array has ``rows.stop - rows.start`` entries, the other axes are whole). It is called
    once per distinct block this process addresses (with one process: the blocks of all
    devices). Where a row lands never depends on the order of the mesh's devices or on
    which process owns them; read results back with :func:`to_host`.

    Returns ``{name: jax.Array[..., n_rows (on axis), ...]}`` with :func:`row_sharding`.
    """
    sharding = row_sharding(mesh, axis)
    probe = (1,) * axis + (n_rows,)
    blocks: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for index in sharding.addressable_devices_indices_map(probe).values():
        key = _row_block(index, axis, n_rows)
        if key not in blocks:
            blocks[key] = {k: np.asarray(v) for k, v in build(slice(*key)).items()}
    first = next(iter(blocks.values()))
    out = {}
    for name, block in first.items():
        shape = block.shape[:axis] + (n_rows,) + block.shape[axis + 1:]

        def fetch(index, name=name):
            return blocks[_row_block(index, axis, n_rows)][name]

        out[name] = jax.make_array_from_callback(shape, sharding, fetch)
    return out


def put_rows(mesh: Mesh, arrays: dict[str, np.ndarray], axis: int = 0) -> dict[str, jax.Array]:
    """Host arrays holding *all* rows of a global batch (the same on every process) ->
    global arrays; each process transfers only the rows its devices hold."""
    n_rows = next(iter(arrays.values())).shape[axis]
    take = lambda rows: {k: np.asarray(v)[(slice(None),) * axis + (rows,)] for k, v in arrays.items()}
    return global_rows(mesh, n_rows, take, axis)


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Host arrays ``[rows, ...]`` of the whole global batch -> global arrays sharded over
    the batch axes (see :func:`put_rows`)."""
    return put_rows(mesh, batch, axis=0)


def to_host(tree):
    """Global arrays -> numpy in global index order (row ``i`` is global row ``i``,
    whatever process or device held it). Collective when the arrays span processes:
    every process must call it in the same order."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def is_main_process() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0
