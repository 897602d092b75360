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


# ---------------------------------------------------------------------------------------------
# Pallas kernels under a mesh
# ---------------------------------------------------------------------------------------------
def kernel_mesh():
    """The ambient mesh when it has more than one device, else None. A Pallas call is opaque
    to XLA's SPMD partitioner: under a mesh it would gather every operand to every device and
    compute the whole global batch there. Kernels run under `per_shard` instead."""
    mesh = _active_mesh()
    return None if mesh is None or mesh.size == 1 else mesh


def divided_axes(mesh, logical: str, *sizes: int, rules=DEFAULT_RULES):
    """The mesh axes the `logical` rule maps to, if they divide every size; else None (also
    when those axes have one device in all: nothing is split)."""
    entry = logical_to_spec((logical,), rules)[0]
    for n in sizes:
        entry = fit_spec(P(entry), (n,), mesh)[0]
    return None if _axes_size(mesh, entry) == 1 else entry


def per_shard(fn, mesh, in_specs, out_specs):
    """`fn` under `shard_map` over `mesh` (in/out specs as shard_map takes them; None for an
    argument that is None)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


# ---------------------------------------------------------------------------------------------
# Mesh from config
# ---------------------------------------------------------------------------------------------
def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) from `mesh_cfg` (a mapping with those keys); one -1 fills
    the rest. Raises ValueError naming the numbers when they do not multiply to `n_devices`."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {named}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {named}")
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh: {named} cannot fill {n_devices} devices "
                             f"({n_devices} is not divisible by {known})")
        sizes[sizes.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ValueError(f"mesh: {named} uses {known} devices, but there are {n_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The global device mesh with axes ('data', 'fsdp', 'tensor')."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = getattr(jax.sharding, "AxisType", None)
    kwargs = {}
    if axis_types is not None:  # explicit Auto: propagation as in classic pjit
        kwargs["axis_types"] = (axis_types.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices, **kwargs)


def use_mesh(mesh):
    """Context manager that makes `mesh` the ambient mesh (so `constrain` applies)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)


def rules_from_config(rules_cfg) -> tuple:
    """The rules table from the config (a sequence of (logical, mesh axes) pairs)."""
    out = []
    for pair in rules_cfg:
        if len(pair) != 2:
            raise ValueError(f"sharding rule {pair!r} must be a (logical_name, mesh_axes) pair")
        name, target = pair
        if isinstance(target, list):
            target = tuple(target)
        for axis in (target,) if isinstance(target, str) else (target or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {target!r}: unknown mesh axis "
                                 f"{axis!r}; mesh axes are {MESH_AXES}")
        out.append((name, target))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Parameter shardings (from the `logical_axes` metadata and the rules table)
# ---------------------------------------------------------------------------------------------
def _axes_size(mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def fit_spec(spec: P, shape, mesh, *, what: str = "array") -> P:
    """`spec` with the sharding of every dimension the mesh does not divide dropped
    (replicated), so tiny or odd-sized arrays still place; large parameters of real configs
    divide and keep their sharding (tests/sharding_test.py checks that)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        entry = _drop_missing(entry, mesh.axis_names)
        fitted.append(entry if entry is None or dim % _axes_size(mesh, entry) == 0 else None)
    return P(*fitted)


def param_specs(param_state, mesh, rules=DEFAULT_RULES):
    """Pure-dict tree of PartitionSpecs for the parameters of an (abstract) model state."""
    from flax import nnx

    def spec(var):
        axes = var.get_metadata().get("logical_axes")
        return fit_spec(logical_to_spec(axes, rules), var.shape, mesh)

    tree = jax.tree.map(spec, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def named(mesh, spec_tree):
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), spec_tree,
                        is_leaf=lambda x: isinstance(x, P))


# ---------------------------------------------------------------------------------------------
# Batches: global arrays from each process's local rows
# ---------------------------------------------------------------------------------------------
def batch_spec(rules=DEFAULT_RULES) -> P:
    return logical_to_spec(("batch", "seq"), rules)


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
    """Number of ways the batch dimension is split across the mesh."""
    return _axes_size(mesh, _drop_missing(batch_spec(rules)[0], mesh.axis_names))


def check_batch(global_batch: int, mesh, rules=DEFAULT_RULES, *, what="global batch") -> None:
    n = batch_shards(mesh, rules)
    if global_batch % n:
        raise ValueError(
            f"{what} of {global_batch} rows does not divide over the {n} batch shards of the mesh "
            f"{dict(mesh.shape)}; use a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"{what} of {global_batch} rows does not divide over "
                         f"{jax.process_count()} processes")


def make_global_batch(local_batch: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """Each process's rows ([global_batch / process_count, T] numpy) -> global jax.Arrays
    sharded over the batch axes (jax.make_array_from_process_local_data)."""
    sharding = jax.sharding.NamedSharding(mesh, batch_spec(rules))
    out = {}
    for key, rows in local_batch.items():
        global_shape = (rows.shape[0] * jax.process_count(),) + tuple(rows.shape[1:])
        check_batch(global_shape[0], mesh, rules, what=f"batch[{key!r}]")
        out[key] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
    return out
