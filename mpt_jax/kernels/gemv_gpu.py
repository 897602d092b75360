"""Matrix-vector products for decoding at batch 1, with the work around them fused in: one
Pallas (Triton) kernel per projection.

At batch 1 a decode step is a chain of GEMVs, and XLA runs the work between them as separate
launches of a few microseconds each. For the out and down projections (N = d_model, small
against K) XLA's Triton GEMV also splits K and adds one more launch to reduce the parts. This
kernel does the GEMV without splitting K and takes in the work on either side:

- prologue `act_in` (gelu, exact; relu; silu): applied to the input row, in float32 and
  rounded to the compute dtype, as the unfused MLP feeds its down projection;
- epilogue `residual`: the output is `residual + y`, with y rounded to the compute dtype first,
  as the model's residual add rounds.

The weight is transposed, `wt [N, K]` (the model stores `[K, N]`): one program owns `block_n`
output features and streams their whole rows of K, `block_k` at a time, so every program reads
contiguous memory and no split-K reduction is needed. A single row is below Triton's 16-row dot
minimum, so the product is an elementwise multiply into a float32 `[block_n, block_k]`
accumulator, reduced once at the end; the kernel is bound by reading the weight.

Measured on an H100 (bench/gemv.py, bench/RESULTS.md): this GEMV is level with XLA's. A norm
prologue (for qkv and up) was built and measured too and cost 3-7 us a GEMV more than the
separate add+norm launch it saved, so those two projections stay XLA's.

Pallas' Triton lowering has no `erf`, so the exact GELU uses `erf_f32` below, the rational
approximation XLA's own GPU backend emits (clamped to [-4, 4]; error about 1e-7).

Imports from mpt_jax nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32

# Tuning knobs (module level so bench/gemv.py and bench/generate.py can sweep them).
BLOCK_N = 16
BLOCK_K = 1024
NUM_WARPS = 8
NUM_STAGES = 2  # the best for out and down in bench/gemv.py (H100)

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


def _blocks(n: int, k: int, block_n: int | None, block_k: int | None) -> tuple[int, int]:
    """The block sizes used for wt `[n, k]`: the knobs, or the whole dimension when smaller."""
    return (min(BLOCK_N if block_n is None else block_n, n),
            min(BLOCK_K if block_k is None else block_k, k))


def supported(n: int, k: int, block_n: int | None = None, block_k: int | None = None) -> bool:
    """Whether wt `[n, k]` splits into whole power-of-two blocks (Triton's block shapes)."""
    bn, bk = _blocks(n, k, block_n, block_k)
    return all(b & (b - 1) == 0 for b in (bn, bk)) and n % bn == 0 and k % bk == 0


def _kernel(*refs, nk, bk, act_in, has_residual, compute_dtype):
    x_ref, w_ref = refs[:2]
    r_ref = refs[2] if has_residual else None
    o_ref = refs[-1]

    def body(i, acc):
        cols = pl.ds(pl.multiple_of(i * bk, bk), bk)
        xs = x_ref[cols].astype(F32)
        if act_in is not None:
            xs = _activate(xs, act_in)
        xs = xs.astype(compute_dtype).astype(F32)  # the row the unfused dot reads
        return acc + w_ref[:, cols].astype(F32) * xs[None, :]

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((w_ref.shape[0], bk), F32))
    y = jnp.sum(acc, axis=1).astype(compute_dtype)  # the product, as the unfused dot returns it
    if has_residual:
        y = (r_ref[...].astype(F32) + y.astype(F32)).astype(r_ref.dtype)
    o_ref[...] = y.astype(o_ref.dtype)


def gemv(x, wt, *, act_in: str | None = None, residual=None, compute_dtype=jnp.bfloat16,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None, interpret: bool = False):
    """x `[..., K]` holding one row, wt `[N, K]` -> `[..., N]`: `residual + act_in(x) @ wt.T`,
    each part optional (see the module docstring).

    The output is in the compute dtype, or the residual's dtype when one is given. Blocks
    default to the module's knobs (or the whole dimension when smaller) and must divide N and
    K (`supported`)."""
    bn, bk = _blocks(wt.shape[0], wt.shape[1], block_n, block_k)
    return _gemv(x, wt, residual, act_in=act_in, compute_dtype=jnp.dtype(compute_dtype), bn=bn,
                 bk=bk, num_warps=NUM_WARPS if num_warps is None else num_warps,
                 num_stages=NUM_STAGES if num_stages is None else num_stages,
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("act_in", "compute_dtype", "bn", "bk",
                                             "num_warps", "num_stages", "interpret"))
def _gemv(x, wt, residual, *, act_in, compute_dtype, bn, bk, num_warps, num_stages,
          interpret):
    n, k = wt.shape
    lead = x.shape[:-1]
    if x.shape[-1] != k or x.size != k:
        raise ValueError(f"gemv takes one row of length {k} (wt {wt.shape}); got x {x.shape}")
    if not supported(n, k, bn, bk):
        raise ValueError(f"gemv blocks ({bn}, {bk}) must be powers of two dividing wt {wt.shape}")
    if act_in is not None and act_in not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act_in!r}; expected one of {ACTIVATIONS}")
    vec_n = pl.BlockSpec((bn,), lambda j: (j,))
    args = [x.reshape(k), wt]
    specs = [pl.BlockSpec((k,), lambda j: (0,)), pl.BlockSpec((bn, k), lambda j: (j, 0))]
    if residual is not None:
        if residual.size != n:
            raise ValueError(f"residual {residual.shape} does not match the output size {n}")
        args.append(residual.reshape(n))
        specs.append(vec_n)
    kernel = functools.partial(_kernel, nk=k // bk, bk=bk, act_in=act_in,
                               has_residual=residual is not None, compute_dtype=compute_dtype)
    y = pl.pallas_call(
        kernel,
        grid=(n // bn,),
        in_specs=specs,
        out_specs=vec_n,
        out_shape=jax.ShapeDtypeStruct((n,), compute_dtype if residual is None
                                       else residual.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemv" + (f"_{act_in}" if act_in else "") + ("_residual" if residual is not None
                                                          else ""),
    )(*args)
    return y.reshape(*lead, n)
