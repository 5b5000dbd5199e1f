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

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scas_jax.errors import ScasError

AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")

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
    (r"^layers/(input_layernorm|post_attention_layernorm)/scale$", ("layers", None)),
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


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def is_main_process() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0
