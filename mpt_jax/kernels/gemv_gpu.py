"""Matrix-vector products for decoding at batch 1, with the work around them fused in: one
Pallas (Triton) kernel per projection.

At batch 1 a decode step is a chain of GEMVs, and XLA runs the work between them as separate
launches of a few microseconds each: the residual add and the norm before a projection, the
GELU after the up projection, the split-K reduction after a GEMV. This kernel takes that work
into the GEMV itself:

- prologue `norm`: the input row is normed first (model.Norm's semantics: the low-precision
  variants round the input and the weight/bias to the compute dtype, statistics in float32).
  The norm is folded into the product, `rstd * (W (g * x) - mean * W g)`, so the statistics
  accumulate in the same pass as the products; the unfused model instead rounds the normed row
  to the compute dtype before its matmul, so bf16 results differ from it at that rounding;
- epilogue `act` (gelu, exact; relu; silu), applied to the product rounded to the compute dtype;
- epilogue `residual`: the output is `residual + y`, rounded as the model's residual add rounds.

The weight is transposed, `wt [N, K]` (the model stores `[K, N]`): one program owns `block_n`
output features and streams their whole rows of K, `block_k` at a time, so every program reads
contiguous memory and no split-K reduction is needed. A single row is below Triton's 16-row dot
minimum, so the product is an elementwise multiply into a float32 `[block_n, block_k]`
accumulator, reduced once at the end; the kernel is bound by reading the weight.

Pallas' Triton lowering has no `erf`, so the exact GELU uses `erf_f32` below, the rational
approximation XLA's own GPU backend emits (clamped to [-4, 4]; error about 1e-7).

Imports from mpt_jax nothing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32

# Tuning knobs (module level so bench/gemv.py and bench/generate.py can sweep them).
BLOCK_N = 16
BLOCK_K = 512
NUM_WARPS = 4
NUM_STAGES = 3

ACTIVATIONS = ("gelu", "relu", "silu")

_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)


def erf_f32(x):
    """erf of a float32 array from adds, multiplies and one divide (lowers anywhere)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x, _ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = p * x2 + c
    q = jnp.full_like(x, _ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = q * x2 + c
    return x * p / q


def _activate(y, act):
    if act == "gelu":
        return 0.5 * y * (1.0 + erf_f32(y * 0.7071067811865476))
    if act == "relu":
        return jnp.maximum(y, 0.0)
    if act == "silu":
        return y / (1.0 + jnp.exp(-y))
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


class NormSpec(NamedTuple):
    """The prologue norm's static settings (model.Norm's)."""

    eps: float
    rms: bool
    low: bool  # low_precision_*: round input and weight to the compute dtype first


def _blocks(n: int, k: int, block_n: int | None, block_k: int | None) -> tuple[int, int]:
    """The block sizes used for wt `[n, k]`: the knobs, or the whole dimension when smaller."""
    return (min(BLOCK_N if block_n is None else block_n, n),
            min(BLOCK_K if block_k is None else block_k, k))


def supported(n: int, k: int, block_n: int | None = None, block_k: int | None = None) -> bool:
    """Whether wt `[n, k]` splits into whole power-of-two blocks (Triton's block shapes)."""
    bn, bk = _blocks(n, k, block_n, block_k)
    return all(b & (b - 1) == 0 for b in (bn, bk)) and n % bn == 0 and k % bk == 0


def _kernel(*refs, nk, bk, norm, has_norm_bias, act, has_residual, compute_dtype):
    x_ref, w_ref = refs[:2]
    rest = list(refs[2:-1])
    o_ref = refs[-1]
    nw_ref = rest.pop(0) if norm is not None else None
    nb_ref = rest.pop(0) if has_norm_bias else None
    r_ref = rest.pop(0) if has_residual else None
    bn = w_ref.shape[0]

    def chunk(i):
        return pl.ds(pl.multiple_of(i * bk, bk), bk)

    def cast(a):
        low = norm is None or norm.low
        return a.astype(compute_dtype).astype(F32) if low else a.astype(F32)

    # With a norm, y_n = rstd * (sum_k w_nk g_k x_k - mean * sum_k w_nk g_k) [+ sum_k w_nk b_k]:
    # the row statistics accumulate in the same pass as the products, so no program waits for
    # them before streaming its weights (a separate statistics pass cost ~8 us a GEMV).
    def body(i, carry):
        w = w_ref[:, chunk(i)].astype(F32)
        xs = cast(x_ref[chunk(i)])
        if norm is None:
            return (carry[0] + w * xs[None, :],)
        acc, sx, sxx, *more = carry
        g = cast(nw_ref[chunk(i)])
        out = [acc + w * (xs * g)[None, :], sx + xs, sxx + xs * xs]
        if not norm.rms:
            out.append(more.pop(0) + w * g[None, :])
        if has_norm_bias:
            out.append(more.pop(0) + w * cast(nb_ref[chunk(i)])[None, :])
        return tuple(out)

    tile, vec = jnp.zeros((bn, bk), F32), jnp.zeros((bk,), F32)
    init = [tile]
    if norm is not None:
        init += [vec, vec] + [tile] * ((not norm.rms) + has_norm_bias)
    carry = list(jax.lax.fori_loop(0, nk, body, tuple(init)))
    y = jnp.sum(carry.pop(0), axis=1)
    if norm is not None:
        k = nk * bk
        sx, sxx = jnp.sum(carry.pop(0)), jnp.sum(carry.pop(0))
        if norm.rms:
            y = y * jax.lax.rsqrt(sxx / k + norm.eps)
        else:
            mean = sx / k
            var = jnp.maximum(sxx / k - mean * mean, 0.0)
            y = (y - mean * jnp.sum(carry.pop(0), axis=1)) * jax.lax.rsqrt(var + norm.eps)
        if has_norm_bias:
            y = y + jnp.sum(carry.pop(0), axis=1)
    y = y.astype(compute_dtype)  # the product, as the unfused dot returns it
    if act is not None:
        y = _activate(y.astype(F32), act).astype(compute_dtype)
    if has_residual:
        y = (r_ref[...].astype(F32) + y.astype(F32)).astype(r_ref.dtype)
    o_ref[...] = y.astype(o_ref.dtype)


def gemv(x, wt, *, norm: NormSpec | None = None, norm_weight=None, norm_bias=None,
         act: str | None = None, residual=None, compute_dtype=jnp.bfloat16,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None, interpret: bool = False):
    """x `[..., K]` holding one row, wt `[N, K]` -> `[..., N]`:
    `residual + act(norm(x) @ wt.T)`, each part optional (see the module docstring).

    The output is in the compute dtype, or the residual's dtype when one is given. `norm`
    needs `norm_weight [K]` (and takes `norm_bias [K]`). Blocks default to the module's knobs
    (or the whole dimension when smaller) and must divide N and K (`supported`)."""
    bn, bk = _blocks(wt.shape[0], wt.shape[1], block_n, block_k)
    return _gemv(x, wt, norm_weight, norm_bias, residual, norm=norm, act=act,
                 compute_dtype=jnp.dtype(compute_dtype), bn=bn, bk=bk,
                 num_warps=NUM_WARPS if num_warps is None else num_warps,
                 num_stages=NUM_STAGES if num_stages is None else num_stages,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("norm", "act", "compute_dtype", "bn", "bk",
                                             "num_warps", "num_stages", "interpret"))
def _gemv(x, wt, norm_weight, norm_bias, residual, *, norm, act, compute_dtype, bn, bk,
          num_warps, num_stages, interpret):
    n, k = wt.shape
    lead = x.shape[:-1]
    if x.shape[-1] != k or x.size != k:
        raise ValueError(f"gemv takes one row of length {k} (wt {wt.shape}); got x {x.shape}")
    if not supported(n, k, bn, bk):
        raise ValueError(f"gemv blocks ({bn}, {bk}) must be powers of two dividing wt {wt.shape}")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if (norm is None) != (norm_weight is None):
        raise ValueError("a prologue norm needs both `norm` and `norm_weight`")
    vec_k = pl.BlockSpec((k,), lambda j: (0,))
    vec_n = pl.BlockSpec((bn,), lambda j: (j,))
    args, specs = [x.reshape(k), wt], [vec_k, pl.BlockSpec((bn, k), lambda j: (j, 0))]
    if norm is not None:
        args.append(norm_weight)
        specs.append(vec_k)
        if norm_bias is not None:
            args.append(norm_bias)
            specs.append(vec_k)
    if residual is not None:
        if residual.size != n:
            raise ValueError(f"residual {residual.shape} does not match the output size {n}")
        args.append(residual.reshape(n))
        specs.append(vec_n)
    out_dtype = compute_dtype if residual is None else residual.dtype
    kernel = functools.partial(
        _kernel, nk=k // bk, bk=bk, norm=norm, has_norm_bias=norm is not None and norm_bias
        is not None, act=act, has_residual=residual is not None, compute_dtype=compute_dtype)
    y = pl.pallas_call(
        kernel,
        grid=(n // bn,),
        in_specs=specs,
        out_specs=vec_n,
        out_shape=jax.ShapeDtypeStruct((n,), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemv" + ("_norm" if norm is not None else "") + (f"_{act}" if act else "")
        + ("_residual" if residual is not None else ""),
    )(*args)
    return y.reshape(*lead, n)
