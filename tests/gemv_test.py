"""The batch-1 decode GEMV kernel (kernels/gemv_gpu.py) in interpret mode against jnp: the plain
product, the norm prologue (LayerNorm/RMSNorm, low precision or not, with a bias), the
activation and residual epilogues; its erf; its CUDA lowering; its errors; and the generator's
batch-1 path built on it, against the path without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.special import erf

from mpt_jax.config import FFNConfig, MPTConfig
from mpt_jax.generate import Generator
from mpt_jax.kernels import gemv_gpu
from mpt_jax.model import MPTForCausalLM

F32 = jnp.float32


def _reference(x, wt, *, norm=None, nw=None, nb=None, act=None, residual=None, dtype):
    """The unfused model's arithmetic: model.Norm, `_dense`, the activation, the residual add."""
    h = x
    if norm is not None:
        cast = (lambda a: a.astype(dtype).astype(F32)) if norm.low else (lambda a: a.astype(F32))
        x32 = cast(x)
        if norm.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + norm.eps)
        else:
            mean = jnp.mean(x32, -1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(
                jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + norm.eps)
        y = y * cast(nw)
        if nb is not None:
            y = y + cast(nb)
        h = y
    y = jnp.einsum("...k,nk->...n", h.astype(dtype), wt.astype(dtype), precision="highest")
    if act is not None:
        y = {"gelu": lambda a: jax.nn.gelu(a, approximate=False), "relu": jax.nn.relu,
             "silu": jax.nn.silu}[act](y)
    if residual is not None:
        y = residual + y.astype(residual.dtype)
    return y


def test_erf_matches_jax():
    x = jnp.linspace(-7.0, 7.0, 100_003, dtype=F32)
    np.testing.assert_allclose(gemv_gpu.erf_f32(x), erf(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", [
    dict(),
    dict(norm=gemv_gpu.NormSpec(1e-5, rms=False, low=True), act="gelu"),
    dict(norm=gemv_gpu.NormSpec(1e-6, rms=True, low=False), act="silu", bias=True),
    dict(act="relu", residual=True),
    dict(norm=gemv_gpu.NormSpec(1e-5, rms=False, low=False), residual=True, bias=True),
])
def test_gemv_matches_reference(case, dtype):
    k, n = 96, 80  # blocks 32 x 16: three K steps, five programs
    ks = jax.random.split(jax.random.key(len(case) + (dtype == F32)), 5)
    x = (jax.random.normal(ks[0], (1, 1, k)) * 2 + 0.5).astype(dtype)
    wt = (jax.random.normal(ks[1], (n, k)) * 0.3).astype(dtype)
    norm = case.get("norm")
    nw = (1 + 0.2 * jax.random.normal(ks[2], (k,))).astype(dtype) if norm else None
    nb = (0.1 * jax.random.normal(ks[3], (k,))).astype(dtype) if case.get("bias") else None
    res = jax.random.normal(ks[4], (1, 1, n)).astype(dtype) if case.get("residual") else None
    kw = dict(norm=norm, act=case.get("act"), residual=res)
    got = gemv_gpu.gemv(x, wt, norm_weight=nw, norm_bias=nb, compute_dtype=dtype, block_n=16,
                        block_k=32, interpret=True, **kw)
    want = _reference(x, wt, nw=nw, nb=nb, dtype=dtype, **kw)
    assert got.shape == (1, 1, n) and got.dtype == want.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_folded_norm_is_closer_to_exact_than_rounding_the_normed_row():
    """The norm folded into the product (mean and rstd applied after it) against exact float32
    math, with a mean far from zero: within 1e-5, where the unfused bf16 path is ~1e-3 off."""
    k, n = 1024, 64
    ks = jax.random.split(jax.random.key(7), 3)
    x = (jax.random.normal(ks[0], (1, k)) * 2 + 3).astype(jnp.bfloat16)
    wt = (jax.random.normal(ks[1], (n, k)) * 0.02).astype(jnp.bfloat16)
    g = (1 + 0.1 * jax.random.normal(ks[2], (k,))).astype(jnp.bfloat16)
    norm = gemv_gpu.NormSpec(1e-5, rms=False, low=True)
    got = gemv_gpu.gemv(x, wt, norm=norm, norm_weight=g, compute_dtype=F32, block_n=16,
                        block_k=128, interpret=True)
    x32 = x.astype(F32)
    h = (x32 - x32.mean()) * jax.lax.rsqrt(jnp.var(x32) + 1e-5) * g.astype(F32)
    exact = jnp.einsum("mk,nk->mn", h, wt.astype(F32), precision="highest")
    rounded = _reference(x, wt, norm=norm, nw=g, dtype=jnp.bfloat16).astype(F32)
    scale = float(jnp.abs(exact).max())
    assert float(jnp.abs(got - exact).max()) < 1e-5 * scale
    assert float(jnp.abs(rounded - exact).max()) > 1e-4 * scale


def test_every_output_written_and_blocks_default_to_small_dims():
    """N smaller than BLOCK_N and K smaller than BLOCK_K: one whole block; no stale output."""
    x = jnp.ones((1, 64), F32)
    wt = jnp.full((8, 64), 0.5, F32)
    assert gemv_gpu.supported(8, 64) and not gemv_gpu.supported(24, 64, block_n=16)
    np.testing.assert_array_equal(gemv_gpu.gemv(x, wt, compute_dtype=F32, interpret=True),
                                  np.full((1, 8), 32.0))


def test_lowers_for_cuda_with_fused_gelu():
    x = jnp.ones((1, 1, 256), jnp.bfloat16)
    wt = jnp.ones((128, 256), jnp.bfloat16)
    nw = jnp.ones((256,), jnp.bfloat16)
    f = lambda x, wt, nw: gemv_gpu.gemv(
        x, wt, norm=gemv_gpu.NormSpec(1e-5, False, True), norm_weight=nw, act="gelu")
    txt = jax.jit(f).trace(x, wt, nw).lower(lowering_platforms=("cuda",)).as_text()
    assert "gemv_norm_gelu" in txt


def test_bad_inputs_are_refused():
    wt = jnp.ones((32, 64), F32)
    with pytest.raises(ValueError, match="one row"):
        gemv_gpu.gemv(jnp.ones((2, 64), F32), wt, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), jnp.ones((24, 64), F32), block_n=16,
                      interpret=True)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), wt, norm=gemv_gpu.NormSpec(1e-5, False, True),
                      interpret=True)
    with pytest.raises(ValueError, match="activation"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), wt, act="tanh", interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generator_batch_one_gemv_path_equals_the_unfused_path(dtype):
    """Batch 1 decodes through the GEMV kernels (the projections held `[out, in]`); tokens and
    every step's logits equal the generator without them, and batch 2 on the same generator
    (XLA reading the transposed weights) equals it too. float32 checks the wiring tightly; in
    bf16 the unfused path rounds each normed row to bf16 before its matmul (the kernel folds
    the norm into the product, ~1e-6 from exact against ~2e-3), so only tokens and a loose
    logits bound are compared there."""
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=3, vocab_size=64, max_seq_len=64)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(3), attn_impl="pallas_gpu", attn_interpret=True,
                           dtype=dtype, param_dtype=dtype)
    blocks = nnx.state(model.blocks)  # larger block matrices: the blocks shape the logits
    nnx.update(model.blocks, jax.tree.map(lambda a: a * 4 if a.ndim >= 3 else a, blocks))
    fused, plain = Generator(model), Generator(model, gemv_kernels=False)
    assert fused.weights.layers_t is not None and plain.weights.layers_t is None
    assert "Wqkv" not in str(fused.weights.layers[0])  # held once, transposed
    for prompts in ([[1, 2, 3, 4, 5, 9, 11]], [[1, 2, 3], [7, 8, 9, 10, 11]]):
        a = fused.generate(prompts, max_new_tokens=8, keep_logits=True)
        b = plain.generate(prompts, max_new_tokens=8, keep_logits=True)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        tol = 1e-4 if dtype == jnp.float32 else 0.1 * float(np.abs(b.logits).max())
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=tol)


def test_glu_model_keeps_the_unfused_path():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=32,
                    ffn_config=FFNConfig(ffn_type="mptglu", ffn_act_fn="silu"))
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), attn_impl="pallas_gpu", attn_interpret=True)
    assert not model.blocks.gemv_kernels()
    assert Generator(model).weights.layers_t is None
