"""Decode-sized matmuls (at most 16 rows of x) streamed with TMA: Pallas kernels lowered through
Mosaic GPU, for Hopper.

    out [splits, N, 16] float32 = partial sums of (w^T-as-[N, K]) @ x^T, K split `splits` ways

At decode, a matmul reads its whole weight to multiply it by one to sixteen rows, so its time is
the weight's bytes over the rate it is streamed at. XLA's GEMVs and our Triton kernels
(kernels/int8_gpu.py) reach 2.4-3.5 TB/s on an H200 whose copy rate is 3.4-4.3 TB/s. These
kernels put the weight on the wgmma's M side (64 output rows a compute warpgroup) and x on its N
side (16 columns: batch rows padded), so the tensor cores do 16 columns of work rather than 64,
and a memory warpgroup keeps `stages` weight tiles in flight with TMA while two compute
warpgroups multiply.

Weights:
  int8  [N, K] (torch's [out, in], model/quant.py): each compute warpgroup loads its 64 x tile_k
        int8 tile into registers, widens it to bf16 (exact) and issues wgmma with it as the
        register operand. The per-row scale is applied by the caller on the total.
  bf16  [K, N] (the model's [in, out]): the tile is the wgmma's shared-memory operand, read
        transposed.

x [16, K] bf16 is every CTA's other operand, read transposed from shared memory. Each CTA owns
`2 * 64` output rows and one K split; it writes float32 partials that XLA sums (with the scale,
bias and activation: `matmul` below) in one small fusion.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
ROWS = 16  # the most x rows a call takes
_WGS = 2


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    tile_k: int = 128
    stages: int = 4
    splits: int = 1
    wg_rows: int = 64  # output rows a compute warpgroup (the wgmma's M: 64 or 128)
    x_rows: int = 16  # x rows as the kernel sees them (the wgmma's N: 8 or 16)


def _swizzle_transforms(minor_elems: int, dtype):
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits, "gemv")
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def supported(m: int, n: int, k: int, dtype, tiles: GemvTiles) -> bool:
    cta_rows = _WGS * tiles.wg_rows
    return (1 <= m <= tiles.x_rows and tiles.x_rows in (8, 16) and tiles.wg_rows in (64, 128)
            and n % cta_rows == 0 and k % (tiles.tile_k * tiles.splits) == 0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16)))


def partials(x, w, tiles: GemvTiles = GemvTiles()):
    """x [x_rows, K] bf16; w int8 [N, K] or bf16 [K, N] -> float32 [splits, N, x_rows]: partial sums of
    w's rows (as [N, K]) times x's rows over each K split."""
    r, k = x.shape
    int8 = w.dtype == jnp.int8
    n = w.shape[0] if int8 else w.shape[1]
    if r != tiles.x_rows or (w.shape[1] if int8 else w.shape[0]) != k:
        raise ValueError(f"gemv_mgpu takes x [{tiles.x_rows}, K] and w [N, K] int8 or [K, N] bf16; got x "
                         f"{x.shape}, w {w.dtype} {w.shape}")
    tk, stages, splits = tiles.tile_k, tiles.stages, tiles.splits
    wg_n, xr = tiles.wg_rows, tiles.x_rows
    cta_rows = _WGS * wg_n
    if not supported(r, n, k, w.dtype, tiles):
        raise ValueError(f"gemv_mgpu does not take N={n} K={k} under {tiles}")
    kc = k // splits
    x_tr = _swizzle_transforms(tk, x.dtype)
    if int8:
        w_block, w_tr = (cta_rows, tk), _swizzle_transforms(tk, w.dtype)
    else:
        w_block, w_tr = (tk, cta_rows), _swizzle_transforms(cta_rows, w.dtype)
    out_tr = _swizzle_transforms(xr, F32)

    def kernel(x_gmem, w_gmem, out_gmem, out_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")
        ks = pl.ds(si * kc, kc)
        rows = pl.ds(ni * cta_rows, cta_rows)

        def pipeline(body, context):
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(kc // tk,), memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((xr, tk), lambda i: (0, i), transforms=x_tr,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec(w_block, (lambda i: (0, i)) if int8 else (lambda i: (i, 0)),
                                    transforms=w_tr, memory_space=plgpu.SMEM),
                ],
                wg_axis="wg", num_compute_wgs=_WGS, max_concurrent_steps=stages,
                compute_context=context)

        ignore = lambda *_, **__: None  # noqa: E731
        w_view = w_gmem.at[rows, ks] if int8 else w_gmem.at[ks, rows]

        @functools.partial(pl.run_scoped,
                           allocs=pipeline(ignore, ignore).get_allocations(x_gmem.at[:, ks],
                                                                           w_view),
                           collective_axes="wg")
        def _scope(allocs):
            wg = lax.axis_index("wg")
            wg_rows = pl.ds(wg * wg_n, wg_n)

            def context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((wg_n, xr), F32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    out_smem[wg] = acc_ref[...]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg],
                        out_gmem.at[si, pl.ds(ni * cta_rows + wg * wg_n, wg_n)])

            def body(_, x_smem, w_smem, acc_ref):
                b = plgpu.transpose_ref(x_smem, (1, 0))  # [tk, x_rows]
                if int8:
                    a = w_smem[wg_rows].astype(x.dtype)  # [wg_rows, tk] bf16 in registers
                else:
                    a = plgpu.transpose_ref(w_smem.at[:, wg_rows], (1, 0))  # [wg_rows, tk]
                plgpu.wgmma(acc_ref, a, b)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(body, context)(x_gmem.at[:, ks], w_view, allocations=allocs)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, n, xr), F32),
        grid=(n // cta_rows, splits),
        grid_names=("n", "s"),
        num_threads=_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=dict(out_smem=plgpu.SMEM((_WGS, wg_n, xr), F32,
                                               transforms=out_tr)),
    )(x, w)


def matmul(x, w, scale=None, bias=None, *, tiles: GemvTiles = GemvTiles(), out_dtype=None):
    """x [M, K] (M <= 16) @ w -> [M, N]: w int8 [N, K] (with `scale` [N]) or bf16 [K, N]. The
    split partials, scale and bias are summed in XLA."""
    m, k = x.shape
    xp = jnp.zeros((tiles.x_rows, k), jnp.bfloat16).at[:m].set(x.astype(jnp.bfloat16))
    y = jnp.sum(partials(xp, w, tiles), axis=0)[:, :m].T  # [M, N] float32
    if scale is not None:
        y = y * scale.astype(F32)[None, :]
    if bias is not None:
        y = y + bias.astype(F32)[None, :]
    return y.astype(out_dtype or x.dtype)
