"""Residual add + LayerNorm/RMSNorm in one Pallas (Triton) kernel, for decoding.

At decode time each row is one token, and XLA runs `x + delta` and a norm as four small kernels
(the add, the mean, the variance, the normalisation), each a few microseconds of launch and
ramp against almost no data. This kernel does all of it in one launch, one program per row:
it writes the new residual `x + delta` (in x's dtype, rounded as the jnp add rounds) and the
normed row, with the model's Norm semantics (model.Norm): the low-precision variants round the
input and the weight (and bias) to the compute dtype before float32 statistics and return the
compute dtype; the full-precision variants return float32. Forward only (no VJP): the model
uses it in cache mode alone.

Given the weight of the matmul that follows (prefetch_w), extra programs warm L2 with its first
bytes while the norm runs (kernels/prefetch.py); the results do not depend on it.

Needs a power-of-two row length (a whole row is one block). Imports from mpt_jax only
kernels/prefetch.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.kernels import prefetch

NUM_WARPS = 8  # 8 beat 4 by 0.06 ms a decode step at batch 1 (H100, bench/RESULTS.md)
PREFETCH_BYTES = 4 << 20  # of the next matmul's weight, when given one


def supported(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0


def _kernel(*refs, rows, pre, **kw):
    """Programs i < rows norm row i; with a prefetch plan `pre`, the others warm L2."""
    if pre is None:
        return _norm(*refs, **kw)
    *refs, w_ref, r_ref, y_ref, sink_ref = refs
    i = pl.program_id(0)

    @pl.when(i < rows)
    def _():
        _norm(*refs, r_ref, y_ref, **kw)

    @pl.when(i >= rows)
    def _():
        prefetch.body(w_ref, sink_ref, i - rows, pre)


def _norm(*refs, has_delta, has_bias, rms, low, eps, compute_dtype):
    x_ref = refs[0]
    d_ref = refs[1] if has_delta else None
    w_ref = refs[1 + has_delta]
    b_ref = refs[2 + has_delta] if has_bias else None
    r_ref, y_ref = refs[-2:]
    x = x_ref[...]
    if has_delta:
        x = (x.astype(jnp.float32) + d_ref[...].astype(jnp.float32)).astype(x_ref.dtype)
    r_ref[...] = x

    def cast(a):
        return a.astype(compute_dtype).astype(jnp.float32) if low else a.astype(jnp.float32)

    x32 = cast(x)
    n = x32.shape[0]
    if rms:
        y = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32) / n + eps)
    else:
        mean = jnp.sum(x32) / n
        xc = x32 - mean
        y = xc * jax.lax.rsqrt(jnp.sum(xc * xc) / n + eps)
    y = y * cast(w_ref[...])
    if has_bias:
        y = y + cast(b_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)


def add_norm_gpu(x, delta, weight, bias=None, *, eps: float, rms: bool, low: bool,
                 compute_dtype, num_warps: int | None = None, prefetch_w=None,
                 prefetch_bytes: int | None = None, interpret: bool = False):
    """x [..., D], delta like x or None, weight/bias [D] -> (x + delta in x's dtype, normed row:
    compute dtype when `low`, else float32). prefetch_w: the next matmul's weight, whose first
    `prefetch_bytes` (default PREFETCH_BYTES) extra programs load into L2."""
    if prefetch_w is not None and prefetch.flat_view(prefetch_w) is None:
        prefetch_w = None
    return _add_norm(x, delta, weight, bias, prefetch_w, eps=eps, rms=rms, low=low,
                     compute_dtype=compute_dtype,
                     num_warps=NUM_WARPS if num_warps is None else num_warps,
                     prefetch_bytes=(PREFETCH_BYTES if prefetch_bytes is None
                                     else int(prefetch_bytes)) if prefetch_w is not None else 0,
                     interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "rms", "low", "compute_dtype",
                                             "num_warps", "prefetch_bytes", "interpret"))
def _add_norm(x, delta, weight, bias, prefetch_w, *, eps, rms, low, compute_dtype, num_warps,
              prefetch_bytes, interpret):
    shape = x.shape
    d = shape[-1]
    if not supported(d):
        raise ValueError(f"add_norm kernel needs a power-of-two row length, got {d}")
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    pre = prefetch.plan(prefetch_w, prefetch_bytes) if prefetch_w is not None else None
    # extra (prefetching) programs map to the last row's block and write nothing there
    row = pl.BlockSpec((None, d), lambda i: (jnp.minimum(i, n - 1), 0))
    vec = pl.BlockSpec((d,), lambda i: (0,))
    args, specs = [x2], [row]
    if delta is not None:
        args.append(delta.reshape(-1, d))
        specs.append(row)
    args.append(weight)
    specs.append(vec)
    if bias is not None:
        args.append(bias)
        specs.append(vec)
    out_dtype = jnp.dtype(compute_dtype) if low else jnp.float32
    kernel = functools.partial(_kernel, rows=n, pre=pre, has_delta=delta is not None,
                               has_bias=bias is not None, rms=rms, low=low, eps=float(eps),
                               compute_dtype=jnp.dtype(compute_dtype))
    out_specs = [row, row]
    out_shape = [jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n, d), out_dtype)]
    if pre is not None:
        view, view_spec, sink_spec = prefetch.specs(prefetch_w, pre)
        args.append(view)
        specs.append(view_spec)
        out_specs.append(sink_spec)
        out_shape.append(prefetch.sink_shape(pre))
    r, y, *_ = pl.pallas_call(
        kernel,
        grid=(n + (pre.programs if pre is not None else 0),),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_norm",
    )(*args)
    return r.reshape(shape), y.reshape(shape)
