"""The batch-1 decode GEMV kernel (kernels/gemv_gpu.py) in interpret mode against jnp: the plain
product, the activation prologue and the residual epilogue; its erf; its CUDA lowering; its
errors; and the generator's batch-1 path built on it, against the path without it."""
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
ACTS = {"gelu": lambda a: jax.nn.gelu(a, approximate=False), "relu": jax.nn.relu,
        "silu": jax.nn.silu}


def _reference(x, wt, *, act_in=None, residual=None, dtype):
    """The unfused model's arithmetic: the activation, `_dense`, the residual add."""
    h = x if act_in is None else ACTS[act_in](x)
    y = jnp.einsum("...k,nk->...n", h.astype(dtype), wt.astype(dtype), precision="highest")
    return y if residual is None else residual + y.astype(residual.dtype)


def test_erf_matches_jax():
    x = jnp.linspace(-7.0, 7.0, 100_003, dtype=F32)
    np.testing.assert_allclose(gemv_gpu.erf_f32(x), erf(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("act_in", [None, "gelu", "relu", "silu"])
@pytest.mark.parametrize("residual", [False, True])
def test_gemv_matches_reference(act_in, residual, dtype):
    k, n = 96, 80  # blocks 32 x 16: three K steps, five programs
    ks = jax.random.split(jax.random.key(7 * (act_in is None) + residual + (dtype == F32)), 3)
    x = (jax.random.normal(ks[0], (1, 1, k)) * 2 + 0.5).astype(dtype)
    wt = (jax.random.normal(ks[1], (n, k)) * 0.3).astype(dtype)
    res = jax.random.normal(ks[2], (1, 1, n)).astype(dtype) if residual else None
    got = gemv_gpu.gemv(x, wt, act_in=act_in, residual=res, compute_dtype=dtype, block_n=16,
                        block_k=32, interpret=True)
    want = _reference(x, wt, act_in=act_in, residual=res, dtype=dtype)
    assert got.shape == (1, 1, n) and got.dtype == want.dtype
    want = np.asarray(want, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2 * float(np.abs(want).max())  # bf16: rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)


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
    res = jnp.ones((1, 1, 128), jnp.bfloat16)
    f = lambda x, wt, res: gemv_gpu.gemv(x, wt, act_in="gelu", residual=res)
    txt = jax.jit(f).trace(x, wt, res).lower(lowering_platforms=("cuda",)).as_text()
    assert "gemv_gelu_residual" in txt


def test_bad_inputs_are_refused():
    wt = jnp.ones((32, 64), F32)
    with pytest.raises(ValueError, match="one row"):
        gemv_gpu.gemv(jnp.ones((2, 64), F32), wt, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), jnp.ones((24, 64), F32), block_n=16,
                      interpret=True)
    with pytest.raises(ValueError, match="residual"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), wt, residual=jnp.ones((1, 16), F32),
                      interpret=True)
    with pytest.raises(ValueError, match="activation"):
        gemv_gpu.gemv(jnp.ones((1, 64), F32), wt, act_in="tanh", interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generator_batch_one_gemv_path_equals_the_unfused_path(dtype):
    """Batch 1 decodes through the GEMV kernels (out and down held `[out, in]`); tokens and
    every step's logits equal the generator without them, and batch 2 on the same generator
    (XLA reading the transposed weights) equals it too."""
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=3, vocab_size=64, max_seq_len=64)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(3), attn_impl="pallas_gpu", attn_interpret=True,
                           dtype=dtype, param_dtype=dtype)
    blocks = nnx.state(model.blocks)  # larger block matrices: the blocks shape the logits
    nnx.update(model.blocks, jax.tree.map(lambda a: a * 4 if a.ndim >= 3 else a, blocks))
    fused, plain = Generator(model), Generator(model, gemv_kernels=False)
    assert fused.weights.layers_t is not None and plain.weights.layers_t is None
    assert "out_proj" not in str(fused.weights.layers[0])  # held once, transposed
    for prompts in ([[1, 2, 3, 4, 5, 9, 11]], [[1, 2, 3], [7, 8, 9, 10, 11]]):
        a = fused.generate(prompts, max_new_tokens=8, keep_logits=True)
        b = plain.generate(prompts, max_new_tokens=8, keep_logits=True)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        tol = 1e-4 if dtype == jnp.float32 else 0.025 * float(np.abs(b.logits).max())
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=tol)


def test_glu_model_keeps_the_unfused_path():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=32,
                    ffn_config=FFNConfig(ffn_type="mptglu", ffn_act_fn="silu"))
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), attn_impl="pallas_gpu", attn_interpret=True)
    assert not model.blocks.gemv_kernels()
    assert Generator(model).weights.layers_t is None
