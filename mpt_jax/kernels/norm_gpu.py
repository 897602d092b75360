"""Residual add + LayerNorm/RMSNorm in one Pallas (Triton) kernel, for decoding.

At decode time each row is one token, and XLA runs `x + delta` and a norm as four small kernels
(the add, the mean, the variance, the normalisation), each a few microseconds of launch and
ramp against almost no data. This kernel does all of it in one launch, one program per row:
it writes the new residual `x + delta` (in x's dtype, rounded as the jnp add rounds) and the
normed row, with the model's Norm semantics (model.Norm): the low-precision variants round the
input and the weight (and bias) to the compute dtype before float32 statistics and return the
compute dtype; the full-precision variants return float32. Forward only (no VJP): the model
uses it in cache mode alone.

Needs a power-of-two row length (a whole row is one block). Imports from mpt_jax nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


NUM_WARPS = 8  # 8 beat 4 by 0.06 ms a decode step at batch 1 (H100, bench/RESULTS.md)


def supported(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0


def _kernel(*refs, has_delta, has_bias, rms, low, eps, compute_dtype):
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


@functools.partial(jax.jit, static_argnames=("eps", "rms", "low", "compute_dtype",
                                             "num_warps", "interpret"))
def add_norm_gpu(x, delta, weight, bias=None, *, eps: float, rms: bool, low: bool,
                 compute_dtype, num_warps: int | None = None, interpret: bool = False):
    """x [..., D], delta like x or None, weight/bias [D] -> (x + delta in x's dtype, normed row:
    compute dtype when `low`, else float32)."""
    shape = x.shape
    d = shape[-1]
    if not supported(d):
        raise ValueError(f"add_norm kernel needs a power-of-two row length, got {d}")
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
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
    kernel = functools.partial(_kernel, has_delta=delta is not None, has_bias=bias is not None,
                               rms=rms, low=low, eps=float(eps),
                               compute_dtype=jnp.dtype(compute_dtype))
    r, y = pl.pallas_call(
        kernel,
        grid=(n,),
        in_specs=specs,
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n, d), out_dtype)],
        compiler_params=plgpu.CompilerParams(
            num_warps=NUM_WARPS if num_warps is None else num_warps, num_stages=1),
        interpret=interpret,
        name="add_norm",
    )(*args)
    return r.reshape(shape), y.reshape(shape)
