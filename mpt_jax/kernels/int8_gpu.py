"""Weight-only int8 matmul for GPUs at decode batch sizes, as one Pallas (Triton) kernel.

    y [M, N] = (x [M, K] @ q [N, K]^T) * scale [N]   (+ bias, then optionally the exact GELU)

x is bfloat16 (or float32), q int8 in torch's `[out, in]` layout with one float32 scale per
output row (symmetric absmax, model/quant.py). Each program owns `block_n` output rows: it
streams their int8 weight in `[block_n, block_k]` tiles, converts each tile in registers and
accumulates in float32; the scale is applied once at the end, so the weight is read once, as
int8, and never exists in a wider dtype anywhere in memory. M = 1 (decode at batch 1) uses no
dot: a single row is below Triton's 16-row dot minimum, so the tile is multiplied by x
elementwise into a `[block_n, block_k]` float32 accumulator that is reduced once at the end (the
form bench/gemv.py measured level with XLA's bf16 GEMV). 2 <= M <= MAX_ROWS pads x to 16 rows
and uses the tensor cores (`x_tile @ q_tile^T` in x's dtype, float32 accumulation).

Why our own kernel: qwix (google/qwix) computes a weight-only int8 matmul as `lax.dot_general(x,
q)` followed by the scale (its `_fast_dot_general`), and AQT's serving mode likewise hands the
int8 operand to XLA; neither ships a GPU kernel for small batches (qwix's
contrib/kernels/quantized_matmul.py is a TPU Mosaic kernel with both operands quantized and
256-row blocks), so whether the int8 read is fused into the GEMV is XLA's choice. model/quant.py
keeps that XLA form for CPU, prefill and large batches; this kernel is the decode path where the
bytes read are the whole cost.

The `[out, in]` layout gives each program long contiguous runs of K (block_k bytes per row), so
small block_n still reads whole cache lines and the grid has N / block_n programs (256 for a
4096-wide output at block_n 16) with no split-K pass.

Epilogue: `gelu=True` applies the exact GELU (erf form) to the bias-added output rounded to the
output dtype, as the unfused path rounds the up-projection before its GELU. Pallas Triton has
no erf lowering, so erf is Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, 4e-7 in float32:
far below a bfloat16 rounding).

Needs N % block_n == 0 and K % block_k == 0 with power-of-two blocks; `supported()` says whether
a call qualifies. Imports from mpt_jax nothing.

Two tile options beyond the blocks: `splits` > 1 divides K over that many programs per row block
(split-K), each writing a float32 partial sum; XLA adds the partials and applies the scale, bias
and GELU (one small fused kernel more). A narrow output (N = 4096 is 128 programs of 32 rows: an
H200 has 132 SMs) then still has enough programs streaming. `rows` 16 at M = 1 runs the
tensor-core path on x padded to 16 rows, which measured faster than the elementwise GEMV on the
wide matrices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MAX_ROWS = 16  # the largest M this kernel takes (Triton's dot tile is 16 rows)
_DOT_ROWS = 16

# Tiles (block_n, block_k, num_warps, num_stages[, splits[, rows]]) by row regime (see `tile`);
# a benchmark may replace them, or add per-shape entries to TILES: {(rows_regime, N, K): tile}
# with rows_regime 1 or 16.
# The entries are bench/generate.py's `tune` picks for MPT-7B's matrices on an H200
# (2026-12-01): the 16-row dot path at batch 1 too, K split over programs; batch 1's from the
# call at b6df59e (decode 2.72 ms/step; 3.75 with the 16-row GEMV blocks of before), batch 16's
# from the call at b343be0 (3.14 ms there; b6df59e's picks ran 3.23). Each decode row uses only
# its own regime's tiles. These defaults in one call (0926413): 2.73 and 3.28 ms. Other shapes
# get the regime defaults.
GEMV_TILE = (4, 1024, 4, 1)
GEMM_TILE = (32, 256, 4, 3)
TILES: dict[tuple[int, int, int], tuple[int, ...]] = {
    (1, 12288, 4096): (64, 256, 4, 3, 2, 16), (16, 12288, 4096): (32, 256, 4, 3, 1, 16),
    (1, 4096, 4096): (64, 128, 4, 3, 8, 16), (16, 4096, 4096): (64, 256, 4, 3, 4, 16),
    (1, 16384, 4096): (64, 256, 4, 3, 1, 16), (16, 16384, 4096): (64, 256, 4, 3, 1, 16),
    (1, 4096, 16384): (32, 256, 4, 3, 4, 16), (16, 4096, 16384): (64, 256, 4, 3, 4, 16),
    (1, 50432, 4096): (64, 128, 4, 3, 1, 16), (16, 50432, 4096): (64, 128, 4, 3, 1, 16),
}

# erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z), z >= 0
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT_HALF = 0.7071067811865476


def erf_approx(x):
    """erf of a float32 array (Abramowitz & Stegun 7.1.26): only ops Triton lowers."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + _AS_P * z)
    poly = _AS_A[4]
    for a in _AS_A[3::-1]:
        poly = a + t * poly
    y = 1.0 - t * poly * jnp.exp(-z * z)
    return jnp.where(x < 0, -y, y)


def gelu_approx_erf(x):
    """0.5 x (1 + erf(x / sqrt 2)) of a float32 array, erf as `erf_approx`."""
    return 0.5 * x * (1.0 + erf_approx(x * _SQRT_HALF))


def _regime(m: int) -> int:
    return 1 if m == 1 else _DOT_ROWS


def tile(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages, splits, rows) for an M x N x K call: a TILES
    entry (4 to 6 values; splits default 1, rows 0 = the regime's: 1 at M = 1, else 16), else
    the regime default with blocks shrunk (by halving) to divide N and K."""
    found = TILES.get((_regime(m), n, k))
    if found is None:
        bn, bk, warps, stages = GEMV_TILE if m == 1 else GEMM_TILE
        while bn > 1 and n % bn:
            bn //= 2
        while bk > 1 and k % bk:
            bk //= 2
        found = (bn, bk, warps, stages)
    found = tuple(found)
    bn, bk, warps, stages, splits, rows = found + (1, 0)[len(found) - 4:]
    return bn, bk, warps, stages, splits, rows or _regime(m)


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def supported(m: int, n: int, k: int) -> bool:
    """Whether the kernel takes x [m, k] against q [n, k]: at most MAX_ROWS rows, and tiles
    that divide N and K exist: power-of-two blocks, at least 16 wide where they are a dot's
    operands (M > 1; M = 1 takes row blocks of any power of two)."""
    if not 1 <= m <= MAX_ROWS:
        return False
    bn, bk, _, _, splits, rows = tile(m, n, k)
    least_n = 1 if rows == 1 else 16
    return (rows in (1, _DOT_ROWS) and rows >= m and _pow2(bn) and _pow2(bk)
            and bn >= least_n and bk >= 16 and splits >= 1 and n % bn == 0
            and k % (bk * splits) == 0)


def _epilogue(y, scale, bias, gelu, out_dtype):
    """After the sum, on a float32 [M, N] total: the scale, the bias, the GELU, the output
    dtype (inside the kernel, or in XLA after the split-K partials are added)."""
    y = y * scale.astype(F32)[None, :]
    if bias is not None:
        y = y + bias.astype(F32)[None, :]
    if gelu:
        y = gelu_approx_erf(y.astype(out_dtype).astype(F32))
    return y.astype(out_dtype)


def _kernel(x_ref, q_ref, s_ref, *refs, rows, block_k, n_k, has_bias, gelu, split):
    b_ref = refs[0] if has_bias else None
    o_ref = refs[-1]
    block_n = q_ref.shape[0]
    if rows == 1:
        def body(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xk = x_ref[0, pl.ds(k0, block_k)].astype(F32)
            wk = q_ref[:, pl.ds(k0, block_k)].astype(F32)  # [block_n, block_k]
            return acc + wk * xk[None, :]

        acc = lax.fori_loop(0, n_k, body, jnp.zeros((block_n, block_k), F32))
        y = jnp.sum(acc, axis=1)[None, :]  # [1, block_n]
    else:
        dt = x_ref.dtype
        prec = lax.Precision.HIGHEST if dt == F32 else None

        def body(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xk = x_ref[:, pl.ds(k0, block_k)]  # [16, block_k]
            wk = q_ref[:, pl.ds(k0, block_k)].astype(dt)  # exact: |q| <= 127
            return acc + lax.dot_general(xk, wk, (((1,), (1,)), ((), ())), precision=prec,
                                         preferred_element_type=F32)

        y = lax.fori_loop(0, n_k, body, jnp.zeros((x_ref.shape[0], block_n), F32))
    if split:  # a partial sum: the epilogue runs on the total (_matmul)
        o_ref[0] = y
        return
    o_ref[...] = _epilogue(y, s_ref[...], b_ref[...] if has_bias else None, gelu, o_ref.dtype)


def int8_matmul_gpu(x, q, scale, bias=None, *, gelu: bool = False, out_dtype=None,
                    interpret: bool = False):
    """x [M, K], q int8 [N, K], scale float32 [N], bias [N] or None -> [M, N] in `out_dtype`
    (default x's dtype). M <= MAX_ROWS; see `supported`. The tile is read from `tile()` when
    the call is traced."""
    m, k = x.shape
    n = q.shape[0]
    if q.shape != (n, k) or q.dtype != jnp.int8 or scale.shape != (n,):
        raise ValueError(f"int8 matmul takes x [M, K], q int8 [N, K] and scale [N]; got x "
                         f"{x.shape}, q {q.dtype} {q.shape}, scale {scale.shape}")
    if not supported(m, n, k):
        raise ValueError(f"int8 matmul kernel does not take M={m} N={n} K={k} (M <= "
                         f"{MAX_ROWS}, power-of-two tiles dividing N and K)")
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    return _matmul(x, q, scale, bias, gelu=gelu, out_dtype=out_dtype, tiles=tile(m, n, k),
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("gelu", "out_dtype", "tiles", "interpret"))
def _matmul(x, q, scale, bias, *, gelu, out_dtype, tiles, interpret):
    m, k = x.shape
    n = q.shape[0]
    block_n, block_k, warps, stages, splits, rows = tiles
    split = splits > 1
    kc = k // splits  # each program's share of K
    x_p = x if rows == m else jnp.zeros((rows, k), x.dtype).at[:m].set(x)
    in_specs = [pl.BlockSpec((rows, kc), lambda j, s: (0, s)),
                pl.BlockSpec((block_n, kc), lambda j, s: (j, s)),
                pl.BlockSpec((block_n,), lambda j, s: (j,))]
    args = [x_p, q, scale.astype(F32)]
    if bias is not None and not split:
        in_specs.append(pl.BlockSpec((block_n,), lambda j, s: (j,)))
        args.append(bias)
    kernel = functools.partial(_kernel, rows=rows, block_k=block_k, n_k=kc // block_k,
                               has_bias=bias is not None and not split, gelu=gelu, split=split)
    if split:
        out_specs = pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), F32)
    else:
        out_specs = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
    y = pl.pallas_call(
        kernel,
        grid=(n // block_n, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="int8_matmul",
    )(*args)
    if split:
        y = _epilogue(jnp.sum(y[:, :m], axis=0), scale, bias, gelu, out_dtype)
    return y if rows == m else y[:m]
