"""Warming the GPU's L2 cache with the next matmul's weights from inside a decode kernel.

At batch 1 each layer's matrix-vector products read their weights at near HBM bandwidth, and
between them run kernels that are bound by latency, not bytes: the attention over the KV cache
and the add+norm kernels take a few microseconds each while HBM sits mostly idle. A kernel that
supports prefetching gets extra programs in its grid. Each loads its share of the first bytes of
the weight the next matmul reads (with the evict_last policy, so the lines stay in L2) and
stores their sum into a scratch output nobody reads, so that the loads cannot be compiled away.
The matmul that follows then finds part of its weight in L2 instead of HBM.

The kernel's results do not depend on it: the weight is only read. A kernel given
`Prefetch(w, n_bytes)` calls `plan()` for its grid, `body()` in its extra programs, and
`sink_shape()` for its scratch output.

Imports from mpt_jax nothing.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ROW = 1024  # elements per row of the flat view the extra programs read
ROWS_PER_STEP = 8  # rows one loop step loads (16 KiB of bf16)
PROGRAMS = 256  # extra programs to spread the bytes over
SINK = 16  # lanes of each program's scratch output row


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of the extra programs: `programs` of them, each loading `steps` loop steps
    of ROWS_PER_STEP rows of the `[rows, ROW]` view."""

    programs: int
    steps: int


def flat_view(w):
    """`w` as `[rows, ROW]` (a bitcast of a contiguous array), or None when its size does not
    divide so."""
    if w.size % ROW:
        return None
    return w.reshape(-1, ROW)


def plan(w, n_bytes: int, programs: int = PROGRAMS) -> Plan | None:
    """How the extra programs split the first `n_bytes` of `w` (at most all of it); None when
    there is nothing to load (no weight, no bytes, a size the flat view does not fit, or fewer
    bytes than one loop step per program)."""
    if w is None or n_bytes <= 0 or flat_view(w) is None:
        return None
    rows = min(n_bytes // (ROW * w.dtype.itemsize), w.size // ROW)
    steps = rows // (ROWS_PER_STEP * programs)
    if steps == 0:
        return None
    return Plan(programs=programs, steps=steps)


def sink_shape(p: Plan) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((p.programs, SINK), jnp.float32)


def body(w_ref, sink_ref, index, p: Plan):
    """Extra program `index` (0 .. p.programs - 1): loads its rows of the flat weight and
    stores their sum into its row of the sink. `w_ref` is the whole `[rows, ROW]` view and
    `sink_ref` the whole `[programs, SINK]` sink."""
    base = index * (p.steps * ROWS_PER_STEP)

    def step(i, acc):
        start = pl.multiple_of(base + i * ROWS_PER_STEP, ROWS_PER_STEP)
        tile = plgpu.load(w_ref.at[pl.ds(start, ROWS_PER_STEP), :], eviction_policy="evict_last")
        return acc + tile.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, p.steps, step,
                            jnp.zeros((ROWS_PER_STEP, ROW), jnp.float32))
    total = jnp.sum(acc)
    sink_ref[pl.ds(index, 1), :] = jnp.full((1, SINK), total, jnp.float32)


def specs(w, p: Plan):
    """(input, block spec) of the flat weight and the sink's block spec: both whole arrays
    whatever the program (index maps for a grid of any rank)."""
    zeros = lambda *_: (0, 0)  # noqa: E731
    view = flat_view(w)
    return (view, pl.BlockSpec(view.shape, zeros),
            pl.BlockSpec((p.programs, SINK), zeros))
