"""MPTForCausalLM against transformers' MptForCausalLM (torch CPU, fp32) and against an
independent numpy forward written from DESIGN.md / llm-foundry's formulas (for what native MPT
lacks: GQA/MQA, GLU, biases, qk_ln/qk_gn, logit_scale, learned positions, embedding_fraction,
untied head, alibi_bias_max != 8). Tiny prime-ish shapes; random weights with a std that gives
logits of order 1-10."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from mpt_jax import MPTConfig
from mpt_jax.model.config import AttnConfig, FFNConfig
from conftest import (V, HF_CONFIGS, NP_CONFIGS, _ids_mask, all_eqns, hf_logits, hf_model,  # noqa: F401
                      hf_state, np_forward, pallas_kernels, random_pure, tiny)
from mpt_jax.convert.convert import model_from_pure_dict
from mpt_jax.convert.table import pure_dict_from_torch
from mpt_jax.model import KVCache, abstract_model, attention


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.slow
def test_logits_match_transformers(name):
    cfg = HF_CONFIGS[name]
    hf = hf_model(cfg)
    model = model_from_pure_dict(cfg, pure_dict_from_torch(cfg, hf_state(hf)))
    ids, mask = _ids_mask()
    ref = hf_logits(hf, ids)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    out = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4)
    ref_m = hf_logits(hf, ids, mask)
    out_m = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    np.testing.assert_array_less(np.abs(out_m - ref_m)[keep].max(), 1e-4)


def test_numpy_reference_matches_transformers():
    """The numpy reference itself agrees with transformers (so it can judge the rest)."""
    cfg = HF_CONFIGS["h5_clip"]
    hf = hf_model(cfg, seed=1)
    ids, mask = _ids_mask(seed=1)
    pure = pure_dict_from_torch(cfg, hf_state(hf))
    ref = hf_logits(hf, ids, mask)
    np.testing.assert_array_less(np.abs(np_forward(cfg, pure, ids, mask) - ref)[mask > 0].max(),
                                 1e-4)


@pytest.mark.parametrize("name", list(NP_CONFIGS))
@pytest.mark.slow
def test_logits_match_numpy_reference(name):
    cfg = NP_CONFIGS[name]
    pure = random_pure(cfg, seed=3)
    model = model_from_pure_dict(cfg, pure)
    ids, mask = _ids_mask(seed=3)
    ref = np_forward(cfg, pure, ids)
    out = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ref).max() > 0.3
    np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4)
    ref_m = np_forward(cfg, pure, ids, mask)
    out_m = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_less(np.abs(out_m - ref_m)[mask > 0].max(), 1e-4)


def test_mpt_7b_param_count_abstract():
    cfg = MPTConfig.mpt_7b()
    model = abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(math.prod(x.shape) for x in leaves) == 6_649_286_656 == cfg.num_params()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(d_model=22, n_heads=3), "22"),
    (dict(n_heads=4, d_model=28, attn_config=AttnConfig(attn_type="grouped_query_attention",
                                                         kv_n_heads=3)), "3"),
    (dict(attn_config=AttnConfig(attn_type="sparse_attention")), "sparse_attention"),
    (dict(ffn_config=FFNConfig(ffn_type="moe")), "moe"),
    (dict(norm_type="batchnorm"), "batchnorm"),
    (dict(logit_scale="huge"), "huge"),
    (dict(n_layers=0), "n_layers"),
])
def test_config_validation_names_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**kwargs)


@pytest.mark.parametrize("name", ["h6_scale", "gqa", "qk_ln_bias_gqa", "logit_scale_inv_sqrt",
                                  "wpe_no_alibi_fraction", "glu_silu_bias"])
def test_config_json_round_trip(name, tmp_path):
    cfg = {**HF_CONFIGS, **NP_CONFIGS}[name]
    cfg.to_json_file(tmp_path / "c.json", form="foundry")
    assert MPTConfig.from_json_file(tmp_path / "c.json") == cfg
    if not cfg.hf_native_problems():
        from transformers import MptConfig

        d = MptConfig(**cfg.to_dict("hf")).to_dict()
        assert MPTConfig.from_dict(d) == dataclasses.replace(
            cfg, attn_config=dataclasses.replace(cfg.attn_config, attn_impl="torch"))


@pytest.mark.parametrize("name", ["h5_clip", "gqa"])
@pytest.mark.slow
def test_kv_cache_matches_full_forward(name):
    """Prefill, then a chunk of 3 tokens at position 4 against the partly filled cache, then
    one token at a time: the logits of the full forward."""
    cfg = {**HF_CONFIGS, **NP_CONFIGS}[name]
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=5))
    ids, _ = _ids_mask(T=9, seed=5)
    full = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    cache = model.init_cache(ids.shape[0], 12)
    logits, cache = model(jnp.asarray(ids[:, :4], jnp.int32), cache=cache, cache_index=0,
                          mode="prefill")
    outs = [np.asarray(logits)]
    logits, cache = model(jnp.asarray(ids[:, 4:7], jnp.int32), cache=cache, cache_index=4)
    outs.append(np.asarray(logits))
    for t in range(7, ids.shape[1]):
        logits, cache = model(jnp.asarray(ids[:, t:t + 1], jnp.int32), cache=cache,
                              cache_index=t, mode="decode")
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4, rtol=0)
    # a step past the cache's 12 slots is refused, not clamped onto earlier slots
    with pytest.raises(ValueError, match="cache_index 12 with 1 new token"):
        model(jnp.asarray(ids[:, :1], jnp.int32), cache=cache, cache_index=12)
    with pytest.raises(ValueError, match="cache_index 10 with 3 new token"):
        model(jnp.asarray(ids[:, :3], jnp.int32), cache=cache, cache_index=10)
    with pytest.raises(ValueError, match=r"cache_index \[3, 12\] with 1 new token"):
        model(jnp.asarray(ids[:, :1], jnp.int32), cache=cache, cache_index=np.array([3, 12]))


def test_mode_and_cache_arguments_are_checked():
    cfg = HF_CONFIGS["h3"]
    model = model_from_pure_dict(cfg, random_pure(cfg))
    ids = jnp.ones((2, 3), jnp.int32)
    cache = model.init_cache(2, 8)
    cases = [
        (dict(mode="prefill"), "needs a cache"),
        (dict(mode="full", cache=cache, cache_index=0), "takes no cache"),
        (dict(mode="chunk", cache=cache, cache_index=0), "unknown mode 'chunk'"),
        (dict(cache=cache), "cache given without cache_index"),
        (dict(mode="prefill", cache=cache, cache_index=2), "fills an empty cache from slot 0"),
        (dict(cache=cache, cache_index=0, segment_ids=ids), "segment_ids"),
        (dict(cache=cache, cache_index=0, attention_mask=jnp.ones((2, 3))),
         r"attention_mask must be \[2, 8\] \(batch, cache slots\)"),
        (dict(attention_mask=jnp.ones((2, 8))), r"attention_mask must be \[2, 3\]"),
        (dict(cache=cache, cache_index=jnp.zeros((3,), jnp.int32)),
         r"cache_index must be a scalar or \[batch=2\]"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            model(ids, **kwargs)


@pytest.mark.parametrize("qk_ln", [False, True])  # the packed kernel, and q/k/v slices
@pytest.mark.slow
def test_prefill_runs_the_flash_kernel_and_fills_the_cache(monkeypatch, qk_ln):
    """mode="prefill" into an empty cache attends through the flash kernel (Triton, interpret
    mode) and nothing else; its logits are the full forward's and its cache holds the keys and
    values the jnp cache path writes, with a left-padded row."""
    cfg = tiny(d_model=64, n_heads=4, attn_config=AttnConfig(qk_ln=qk_ln))
    pure = random_pure(cfg, seed=11)
    ref = model_from_pure_dict(cfg, pure)
    ids, mask = _ids_mask(T=16, seed=11)  # row 1: 4 pads
    s = 24
    cache_mask = jnp.asarray(np.concatenate([mask, np.ones((2, s - 16), mask.dtype)], 1))
    ids = jnp.asarray(ids, jnp.int32)
    full, (_, ref_cache) = jax.jit(lambda ids: (  # the cache: the dense jnp path
        ref(ids, attention_mask=jnp.asarray(mask)),
        ref(ids, attention_mask=cache_mask, cache=ref.init_cache(2, s), cache_index=0,
            mode="decode")))(ids)
    full = np.asarray(full)

    def never(*args, **kwargs):
        raise AssertionError("a jnp attention path was traced")

    monkeypatch.setattr(attention, "reference_attention", never)
    monkeypatch.setattr(attention, "decode_attention", never)
    kern = model_from_pure_dict(cfg, pure, attn_impl="pallas_triton", attn_interpret=True)
    graphdef, state = nnx.split(kern)

    def prefill(state):
        return nnx.merge(graphdef, state)(ids, attention_mask=cache_mask,
                                          cache=kern.init_cache(2, s), cache_index=0,
                                          mode="prefill")

    assert pallas_kernels(jax.make_jaxpr(prefill)(state).jaxpr) == ["alibi_flash_fwd"]
    logits, cache = jax.jit(prefill)(state)  # (the layers' scan body: one launch a layer)
    keep = mask.astype(bool)
    np.testing.assert_array_less(np.abs(np.asarray(logits) - full)[keep].max(), 1e-4)
    for got, want in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
        # [L, B, KV, S, hd] -> [L, B, S, KV, hd]: the prompt's slots (pad slots differ: never
        # attended), and nothing past them
        got, want = (np.asarray(a).swapaxes(2, 3) for a in (got, want))
        np.testing.assert_allclose(got[:, :, :16][:, keep], want[:, :, :16][:, keep],
                                   atol=1e-5, rtol=0)
        assert not got[:, :, 16:].any()


@pytest.mark.parametrize("name", ["h5_clip", "wpe_no_alibi_fraction", "gqa_kernels"])
@pytest.mark.slow
def test_decode_rows_at_their_own_positions(name):
    """One decode call with cache_index [B] (rows at different lengths, as continuous batching
    has them) gives each row the logits and cache it gets decoded alone, and the full
    forward's logits: per-row cache writes, ALiBi / causal positions and learned positions;
    "gqa_kernels": the Pallas decode and add+norm kernels (interpret mode)."""
    kernels = name == "gqa_kernels"
    cfg = (tiny(d_model=64, n_heads=4, attn_config=AttnConfig(
        attn_type="grouped_query_attention", kv_n_heads=2)) if kernels
        else {**HF_CONFIGS, **NP_CONFIGS}[name])
    kw = dict(attn_impl="pallas_triton", attn_interpret=True) if kernels else {}
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=13), **kw)
    if kernels:
        assert model._norm_kernels(1)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids, **a: nnx.merge(graphdef, state)(ids, **a))
    s = 64  # (the decode kernel streams the cache in blocks of 64 slots)
    lens = np.array([5, 9, 7])
    ids = np.random.default_rng(13).integers(0, V, (3, 10)).astype(np.int32)
    full = np.asarray(run(state, ids))
    alone = []
    for i, n in enumerate(lens):  # each row alone, one token at a time (one compilation)
        c = model.init_cache(1, s)
        for j in range(n + 1):
            one, c = run(state, ids[i:i + 1, j:j + 1], cache=c, cache_index=jnp.int32(j))
        alone.append((c, one))
    # the rows' caches before their last token, side by side, and one call for all the rows
    cache = KVCache(*(jnp.concatenate([getattr(c, f) for c, _ in alone], axis=1).at[
        :, np.arange(3), :, lens].set(0) for f in "kv"))
    new = ids[np.arange(3), lens][:, None]
    logits, batched = run(state, new, cache=cache, cache_index=jnp.asarray(lens, jnp.int32),
                          attention_mask=jnp.ones((3, s), jnp.int32))
    for i, (c, one) in enumerate(alone):
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(one[0]), atol=1e-5,
                                   rtol=0)
        np.testing.assert_allclose(np.asarray(logits[i, 0]), full[i, lens[i]], atol=1e-4,
                                   rtol=0)
        for got, want in ((batched.k, c.k), (batched.v, c.v)):
            np.testing.assert_allclose(np.asarray(got[:, i]), np.asarray(want[:, 0]),
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("d_model,t", [
    (30, 13),  # head dim 5, odd length: the kernel on sliced, padded q/k/v
    (96, 32),  # head dim 16, whole blocks: the packed kernels read the fused projection
])
@pytest.mark.slow
def test_forward_and_grads_through_pallas_kernel_match_reference(d_model, t):
    """The model's attention through the Pallas GPU kernel (interpret mode on CPU) gives the
    reference forward and gradients: GQA, packed documents (sequence ids) and left padding."""
    cfg = tiny(d_model=d_model, n_heads=6, attn_config=AttnConfig(
        attn_type="grouped_query_attention", kv_n_heads=2, attn_uses_sequence_id=True))
    pure = random_pure(cfg, seed=7)
    ref_model = model_from_pure_dict(cfg, pure, attn_impl="reference")
    pallas_model = model_from_pure_dict(cfg, pure, attn_impl="pallas_gpu", attn_interpret=True)
    ids, mask = _ids_mask(T=t, seed=7)
    seg = np.ones_like(ids)
    seg[:, 7:] = 2  # two packed documents per row
    kwargs = dict(attention_mask=jnp.asarray(mask), segment_ids=jnp.asarray(seg, jnp.int32))
    ids = jnp.asarray(ids, jnp.int32)

    def loss(model):
        logits = model(ids, **kwargs)
        return jnp.sum(jnp.where(jnp.asarray(mask, bool)[..., None], logits, 0.0) ** 2) * 1e-3

    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss))(ref_model)
    out_loss, out_grads = nnx.jit(nnx.value_and_grad(loss))(pallas_model)
    assert float(ref_loss) > 1.0
    np.testing.assert_allclose(float(out_loss), float(ref_loss), rtol=1e-4)
    for (path, g_ref), (_, g_out) in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                                          jax.tree_util.tree_leaves_with_path(out_grads)):
        scale = float(jnp.abs(g_ref).max()) + 1e-6
        assert float(jnp.abs(g_out - g_ref).max()) <= 2e-3 * scale, path
    # Without the sequence ids the packed documents would see each other: the kernel honours them.
    leak = np.asarray(nnx.jit(lambda m: m(ids, attention_mask=jnp.asarray(mask)))(pallas_model))
    kept = np.asarray(nnx.jit(lambda m: m(ids, **kwargs))(pallas_model))
    assert np.abs(leak - kept)[:, 8:].max() > 1e-3


@pytest.mark.parametrize("norm_type", ["low_precision_layernorm", "layernorm",
                                       "low_precision_rmsnorm", "rmsnorm"])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.slow
def test_add_norm_kernel_matches_norm(norm_type, use_bias):
    """The decode path's residual-add + norm kernel (interpret mode) equals `x + delta` and
    model.Norm on fresh random rows, bf16 compute; without delta it is the norm alone."""
    from mpt_jax.model.layers import Norm

    rng = np.random.default_rng()
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=101, norm_type=norm_type)
    norm = Norm(64, cfg, param_dtype=jnp.float32, use_bias=use_bias)
    norm.weight[...] = jnp.asarray(rng.normal(1.0, 0.2, 64), jnp.float32)
    if norm.bias is not None:
        norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.2, 64), jnp.float32)
    x = jnp.asarray(rng.normal(0.5, 2.0, (3, 1, 64)), jnp.bfloat16)
    delta = jnp.asarray(rng.normal(size=(3, 1, 64)), jnp.bfloat16)
    for dlt in (delta, None):
        want_r = x if dlt is None else x + dlt
        r, y = norm.fused(x, dlt, jnp.bfloat16, interpret=True)
        want_y = norm(want_r, jnp.bfloat16)
        assert r.dtype == x.dtype and y.dtype == want_y.dtype
        np.testing.assert_array_equal(np.asarray(r, np.float32), np.asarray(want_r, np.float32))
        tol = 1e-2 if want_y.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32),
                                   rtol=tol, atol=tol)


def test_add_norm_kernel_lowers_for_cuda():
    from mpt_jax.kernels import norm_gpu

    x = jax.ShapeDtypeStruct((16, 1, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096,), jnp.float32)
    fn = lambda x, d, w: norm_gpu.add_norm_gpu(  # noqa: E731
        x, d, w, eps=1e-5, rms=False, low=True, compute_dtype=jnp.bfloat16)
    txt = jax.jit(fn).trace(x, x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in txt and "add_norm" in txt


@pytest.mark.parametrize("dtype,tol,floor", [(jnp.float32, 2e-6, 1.0), (jnp.bfloat16, 5e-3, 1e-2)])
def test_exact_gelu_value_and_derivative(dtype, tol, floor):
    """model.exact_gelu (erf form in float32, custom JVP) against float64 0.5 x (1 + erf(x/√2))
    on fresh random inputs and a sweep through the tails, and its derivative (jax.grad) against
    the analytic one. Errors are relative to max(|value|, floor): float32 keeps 1 + erf's
    cancellation in the negative tail, as torch does; bf16 is within about one rounding (the
    erfc form of jax.nn.gelu is off by up to 1.6e-2 there)."""
    from mpt_jax.model.layers import exact_gelu

    rng = np.random.default_rng()
    x = np.concatenate([rng.normal(0, 3, 4000), np.linspace(-12, 12, 2001)])
    xj = jnp.asarray(x, dtype)
    x64 = np.asarray(xj, np.float64)  # the input as rounded to dtype
    want = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    got = exact_gelu(xj)
    assert got.dtype == dtype
    err = np.abs(np.asarray(got, np.float64) - want) / np.maximum(np.abs(want), floor)
    assert err.max() < tol, err.max()
    dwant = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 * x64 / 2) / np.sqrt(2 * np.pi)
    dgot = jax.vmap(jax.grad(lambda v: exact_gelu(v).astype(jnp.float32)))(xj)
    assert dgot.dtype == dtype
    derr = np.abs(np.asarray(dgot, np.float64) - dwant) / np.maximum(np.abs(dwant), floor)
    assert derr.max() < tol * 2, derr.max()


@pytest.mark.parametrize("norm_type", ["low_precision_layernorm", "layernorm",
                                       "low_precision_rmsnorm", "rmsnorm"])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_norm_custom_vjp_matches_autodiff(norm_type, x_dtype):
    """model.norm's written-out backward against jax autodiff of the same forward (written
    here in plain jnp) on fresh random inputs: equal outputs, and gradients for x, the weight
    and the bias within float32 rounding (one bf16 ulp where they are bf16 or went through a
    bf16 cast), in the dtypes autodiff gives."""
    from mpt_jax.model.layers import norm

    rng = np.random.default_rng()
    rms, low, cd = norm_type.endswith("rmsnorm"), norm_type.startswith("low_precision"), \
        jnp.dtype(jnp.bfloat16)

    def plain(x, w, b):
        cast = (lambda a: a.astype(cd).astype(jnp.float32)) if low else (
            lambda a: a.astype(jnp.float32))
        x32 = cast(x)
        if rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)
        else:
            mu = jnp.mean(x32, -1, keepdims=True)
            y = (x32 - mu) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
                                           + 1e-5)
        y = y * cast(w) + (0.0 if b is None else cast(b))
        return y.astype(cd) if low else y

    x = jnp.asarray(rng.normal(0.3, 2.0, (3, 7, 64)), x_dtype)
    w = jnp.asarray(rng.normal(1.0, 0.2, 64), jnp.float32)
    b = None if rms else jnp.asarray(rng.normal(0.0, 0.2, 64), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(3, 7, 64)), jnp.float32)
    ours = functools.partial(norm, eps=1e-5, rms=rms, low=low, compute_dtype=cd)
    np.testing.assert_array_equal(np.asarray(ours(x, w, b), np.float32),
                                  np.asarray(plain(x, w, b), np.float32))
    argnums = (0, 1) if b is None else (0, 1, 2)
    got = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * ct), argnums)(x, w, b)
    want = jax.grad(lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * ct), argnums)(x, w, b)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        g32, r32 = np.asarray(g, np.float32), np.asarray(r, np.float32)
        # One ulp of bf16 where the gradient is bf16, or passed through a bf16 cast (the
        # low-precision norms cast x and the weight to bf16: autodiff rounds their gradients to
        # bf16 even when it hands them back as float32); float32 rounding elsewhere.
        tol = 8e-3 if (low or g.dtype == jnp.bfloat16) else 1e-5
        assert np.abs(g32 - r32).max() <= tol * np.abs(r32).max()


def test_unrolled_weight_gradients_are_one_concatenation():
    """Unrolled over stacked float32 weights at bf16 compute (the full finetune's and
    pretraining's setting), each layer's weights come from one split a stacked leaf, so their
    gradients are joined by one concatenation. Static slices would make each layer's gradient a
    pad to the whole stack, summed: XLA fused those n pads into one kernel that read all of
    them for every element (365 ms of MPT-7B's 1.09 s finetune step). The gradients equal the
    scanned model's to bf16 rounding."""
    from mpt_jax.model import MPTForCausalLM

    cfg = tiny(n_layers=3)
    ids = jnp.asarray(_ids_mask(T=11, seed=3)[0], jnp.int32)

    def grad_fn(scan):
        model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                               dtype=jnp.bfloat16, remat_policy="full", scan_layers=scan)
        graphdef, state = nnx.split(model, nnx.Param)
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids).astype(
            jnp.float32) ** 2) * 1e-3), state

    grad, state = grad_fn(scan=False)
    stacked = {a.shape for a in jax.tree.leaves(state) if a.ndim and a.shape[0] == 3}
    eqns = list(all_eqns(jax.make_jaxpr(grad)(state).jaxpr))
    pads = [e for e in eqns if e.primitive.name == "pad"
            and tuple(e.outvars[0].aval.shape) in stacked]
    assert not pads, f"{len(pads)} pads to a stacked weight's shape in the backward"
    assert any(e.primitive.name == "concatenate" for e in eqns)
    got = jax.jit(grad)(state)
    scanned_grad, scanned_state = grad_fn(scan=True)
    want = jax.jit(scanned_grad)(scanned_state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        # bf16 compute: the two programs round in different places
        rel = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-12))
        assert rel <= 3e-2, (path, rel)
