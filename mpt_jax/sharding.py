"""Sharding as configuration: logical axis names on parameters and activations, one rules table
mapping them onto the mesh axes `data`, `fsdp`, `tensor`.

Parameters carry their logical names as NNX variable metadata (`logical_axes`); stacked layers add
a leading `layers` axis. Activations are constrained at block boundaries through `constrain`,
which applies only inside a mesh context (`jax.sharding.use_mesh` / `jax.set_mesh`) — on a single
device without a mesh there is nothing to constrain.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
    ("act_embed", None),
    ("positions", None),
)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names; unknown names raise ValueError."""
    if logical_axes is None:
        return P()
    table = dict(rules)
    spec = []
    used: set[str] = set()
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else (target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim at most
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def _active_mesh():
    get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get_abstract() if get_abstract is not None else None
    if mesh is None or not mesh.axis_names:
        return None
    return mesh


def constrain(x, logical_axes: Sequence[str | None], rules=DEFAULT_RULES):
    """`with_sharding_constraint` by logical names, inside a mesh context; identity outside one."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, rules)
    spec = P(*(_drop_missing(s, mesh.axis_names) for s in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _drop_missing(entry, axis_names):
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry if entry in axis_names else None
    kept = tuple(a for a in entry if a in axis_names)
    return kept if kept else None
