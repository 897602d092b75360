"""Sharding as configuration: logical axis names on parameters and activations, one rules table
mapping them onto the mesh axes `data`, `fsdp`, `tensor`.

Parameters carry their logical names as NNX variable metadata (`logical_axes`); stacked layers add
a leading `layers` axis. Activations are constrained at block boundaries through `constrain`,
which applies only inside a mesh context (`use_mesh`) — on a single device without a mesh there
is nothing to constrain. Pallas kernels run once per shard through `per_shard_logical`.

The rules in force are the ones of the innermost `use_rules(rules)` context (DEFAULT_RULES when
none is entered): every function here that takes `rules=None` reads them, so the activation
constraints and the kernels' shard_map specs follow the same table as the parameters. They are
read when a function is traced, and jit's caches key on them (a jax user context).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
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
    ("lora_rank", None),
)


# jax keys its tracing and compilation caches on a user context's value, so a function traced
# under one table is traced again under another.
_RULES = jax.make_user_context(None)


def use_rules(rules):
    """Context manager: `rules` (a sequence of (logical name, mesh axes) pairs, as
    rules_from_config returns) are the rules in force inside the block."""
    return _RULES(tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules))


def current_rules() -> tuple:
    """The rules in force: the innermost `use_rules`, else DEFAULT_RULES."""
    rules = _RULES.value
    return DEFAULT_RULES if rules is None else rules


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules=None) -> P:
    """PartitionSpec for a tuple of logical axis names (by `rules`, default: the rules in
    force); unknown names raise ValueError."""
    if logical_axes is None:
        return P()
    table = dict(current_rules() if rules is None else rules)
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


def active_mesh():
    """The ambient mesh (`use_mesh`), or None."""
    get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get_abstract() if get_abstract is not None else None
    if mesh is None or not mesh.axis_names:
        return None
    return mesh


def constrain(x, logical_axes: Sequence[str | None], rules=None):
    """`with_sharding_constraint` by logical names (the rules in force unless `rules`), inside a
    mesh context; identity outside one. A dimension the mesh axes do not divide stays whole."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = fit_spec(logical_to_spec(logical_axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def _as_axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


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
    compute the whole global batch there. Kernels run under `per_shard_logical` instead."""
    mesh = active_mesh()
    return None if mesh is None or mesh.size == 1 else mesh


def shard_axes(sizes: Mapping[str, Sequence[int]], rules=None) -> dict:
    """{logical name: the mesh axes its rule maps to, or None} for a kernel's dimensions under
    the kernel mesh (`kernel_mesh`; no mesh: all None). `sizes` gives every length a name
    labels. A name keeps its axes only if their device count divides each of its lengths (as
    `fit_spec` does), and only the axes no earlier name took (a mesh axis splits one dimension
    at most); one device in all is None: nothing is split."""
    mesh = kernel_mesh()
    out, used = {}, set()
    for name, lengths in sizes.items():
        entry = None
        if mesh is not None:
            entry = _drop_missing(logical_to_spec((name,), rules)[0], mesh.axis_names)
            axes = tuple(a for a in _as_axes(entry) if a not in used)
            entry = axes[0] if len(axes) == 1 else (axes or None)
            n = axes_size(mesh, entry)
            if n == 1 or any(length % n for length in lengths):
                entry = None
        out[name] = entry
        used.update(_as_axes(entry))
    return out


def per_shard_logical(fn, in_axes, out_axes):
    """`fn` (a Pallas call) once per device shard: under the kernel mesh, `jax.shard_map` with
    specs from logical axis names; without one, `fn` itself.

    in_axes: one tuple of logical names (or None) per argument, a name per dimension; an
    argument passed as None needs no spec. out_axes: one such tuple, or a tuple of them for
    several outputs. Each name resolves once over every dimension it labels (`shard_axes`, the
    rules in force), so arrays that share a name split alike (the query and key heads of GQA
    stay in whole groups); names resolve in the order they first appear."""
    def is_axes(x):
        return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)

    def run(*args):
        if kernel_mesh() is None:
            return fn(*args)
        if len(args) != len(in_axes):
            raise ValueError(f"{len(args)} arguments for {len(in_axes)} in_axes")
        sizes: dict[str, list[int]] = {}
        for arg, axes in zip(args, in_axes):
            if arg is None:
                continue
            if len(axes) != jnp.ndim(arg):
                raise ValueError(f"in_axes {axes} do not name the {jnp.ndim(arg)} "
                                 f"dimensions of an argument of shape {jnp.shape(arg)}")
            for name, n in zip(axes, jnp.shape(arg)):
                if name is not None:
                    sizes.setdefault(name, []).append(n)
        resolved = shard_axes(sizes)

        def spec(axes):
            missing = [a for a in axes if a is not None and a not in resolved]
            if missing:
                raise ValueError(f"out_axes name {missing} that no input dimension carries")
            return P(*(None if a is None else resolved[a] for a in axes))

        in_specs = tuple(None if a is None else spec(axes) for a, axes in zip(args, in_axes))
        out_specs = spec(out_axes) if is_axes(out_axes) else tuple(spec(a) for a in out_axes)
        return jax.shard_map(fn, mesh=kernel_mesh(), in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return run


# ---------------------------------------------------------------------------------------------
# Mesh from config
# ---------------------------------------------------------------------------------------------
def parse_mesh_sizes(text: str) -> dict[str, int]:
    """A --mesh flag, "data,fsdp,tensor" sizes (one may be -1), -> {axis: size}; ValueError
    naming the flag otherwise."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ValueError(f"--mesh {text!r}: expected three integers data,fsdp,tensor (one may "
                         "be -1), e.g. 1,1,-1")
    return dict(zip(MESH_AXES, sizes))


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
    """Context manager that makes `mesh` the ambient mesh (so `constrain` applies and the
    kernels run per shard); the rules stay those of `use_rules`."""
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
def axes_size(mesh, entry) -> int:
    """Devices along a spec entry (a mesh axis, a tuple of them, or None: 1)."""
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def fit_spec(spec: P, shape, mesh) -> P:
    """`spec` with the sharding of every dimension the mesh does not divide dropped
    (replicated), so tiny or odd-sized arrays still place; large parameters of real configs
    divide and keep their sharding (tests/sharding_test.py checks that)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        entry = _drop_missing(entry, mesh.axis_names)
        fitted.append(entry if entry is None or dim % axes_size(mesh, entry) == 0 else None)
    return P(*fitted)


def param_specs(param_state, mesh, rules=None):
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
def batch_spec(rules=None) -> P:
    return logical_to_spec(("batch", "seq"), rules)


def batch_shards(mesh, rules=None) -> int:
    """Number of ways the batch dimension is split across the mesh."""
    return axes_size(mesh, _drop_missing(batch_spec(rules)[0], mesh.axis_names))


def check_batch(global_batch: int, mesh, rules=None, *, what="global batch") -> None:
    n = batch_shards(mesh, rules)
    if global_batch % n:
        raise ValueError(
            f"{what} of {global_batch} rows does not divide over the {n} batch shards of the mesh "
            f"{dict(mesh.shape)}; use a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"{what} of {global_batch} rows does not divide over "
                         f"{jax.process_count()} processes")


def make_global_batch(local_batch: dict, mesh, rules=None) -> dict:
    """Each process's rows ([global_batch / process_count, T] numpy) -> global jax.Arrays
    sharded over the batch axes (jax.make_array_from_process_local_data)."""
    sharding = jax.sharding.NamedSharding(mesh, batch_spec(rules))
    out = {}
    for key, rows in local_batch.items():
        global_shape = (rows.shape[0] * jax.process_count(),) + tuple(rows.shape[1:])
        check_batch(global_shape[0], mesh, rules, what=f"batch[{key!r}]")
        out[key] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
    return out
