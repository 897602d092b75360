"""Weight-only int8 and the int8 KV cache (model/quant.py, kernels/int8_gpu.py, the decode
kernel's int8 cache): the kernels in interpret mode against exact dequantize-then-matmul
references, the quantized model's logits within a stated bound of the float model's, the
decode path through the kernels equal to the XLA path, quantize / save / load / export round
trips, the decode-loop variants computing the same tokens, a trained model's perplexity, and
the one-line refusals."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, hf_logits, hf_model, pallas_kernels, random_pure, tiny
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM, load_pretrained
from mpt_jax.convert.convert import ConversionError, model_from_pure_dict
from mpt_jax.convert.convert import main as convert_main
from mpt_jax.infer import generate as gen_lib
from mpt_jax.infer.generate import DecodeOptions, Generator, SamplingParams
from mpt_jax.kernels import decode_gpu, int8_gpu
from mpt_jax.model import attention, quant, quantize_model
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.model.config import AttnConfig, FFNConfig


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _np_quantize(w):
    """float64 reference: symmetric absmax per row, halves away from zero."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w).max(-1)
    scale = amax / 127
    y = w / np.where(scale > 0, scale, 1)[..., None]
    return np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -127, 127), scale


# A model the GPU kernels take whole (power-of-two head dim, every matrix a multiple of 16).
KERNEL_CFG = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=112, max_seq_len=64)


def test_quantize_rows_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 33)).astype(np.float32) * rng.uniform(0.1, 3, (7, 1))
    w[3] = 0.0  # an all-zero row: scale 0, q 0
    want_q, want_s = _np_quantize(w)
    for xp in (np, jnp):
        q, s = quant.quantize_rows(xp.asarray(w), xp=xp)
        assert np.asarray(q).dtype == np.int8 and np.asarray(s).dtype == np.float32
        # (float32 rounding may move a value sitting exactly on a half by one)
        assert np.abs(np.asarray(q, np.float64) - want_q).max() <= 1
        assert (np.asarray(q, np.float64) != want_q).mean() < 0.01
        np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)
        err = np.abs(np.asarray(quant.dequantize_rows(jnp.asarray(q), jnp.asarray(s))) - w)
        assert (err <= want_s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()  # at most half a step


@pytest.mark.parametrize("m,gelu,tiles", [
    (1, False, None), (1, False, (4, 32, 4, 1)), (1, True, (4, 16, 4, 1, 3)),
    (1, False, (16, 32, 4, 3, 1, 16)), (5, True, None), (5, True, (16, 16, 4, 3, 2))])
def test_int8_kernel_matches_dequantized_matmul(m, gelu, tiles, monkeypatch):
    """The Pallas kernel (interpret mode) against float64 x @ (q * scale)^T + b, and its CUDA
    lowering: M = 1 the elementwise GEMV (16- and 4-row blocks; K split over 3 programs, the
    GELU then applied after the partial sums), M = 1 on the 16-row dot path, M = 5 the dot path
    with the GELU epilogue, also with K split in 2."""
    from scipy.special import erf

    n, k = 48, 96  # several programs and K blocks
    if tiles is not None:
        monkeypatch.setitem(int8_gpu.TILES, (m, n, k), tiles)
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    assert int8_gpu.supported(m, n, k)
    ref = (np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s)[:, None]).T
           + np.asarray(b, np.float64))
    y = int8_gpu.int8_matmul_gpu(x, q, s, b, out_dtype=jnp.float32, interpret=True)
    assert _rel(y, ref) < 1e-6  # float32 accumulation of exact products
    if gelu:
        yg = int8_gpu.int8_matmul_gpu(x, q, s, b, gelu=True, interpret=True)
        r = np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64)  # rounded, then the GELU
        want = 0.5 * r * (1 + erf(r / np.sqrt(2)))
        np.testing.assert_allclose(np.asarray(yg, np.float64), want, rtol=8e-3, atol=1e-2)
    txt = jax.jit(lambda *a: int8_gpu.int8_matmul_gpu(*a, gelu=gelu)).trace(
        x, q, s, b).lower(lowering_platforms=("cuda",)).as_text()
    assert txt.count("int8_matmul") >= 1


def test_xla_int8_dense_and_gelu_approximation():
    """The XLA path equals the dequantized product; the kernel's erf is within 5e-7 of XLA's
    (1.5e-7 in exact arithmetic, plus float32 rounding)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    q = jnp.asarray(rng.integers(-127, 128, (24, 40)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 2e-2, 24), jnp.float32)
    y = quant.int8_dense(x, q, s, None, jnp.float32)
    ref = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s)[:, None]).T
    assert _rel(y, ref) < 1e-6
    z = jnp.linspace(-6, 6, 2001, dtype=jnp.float32)
    assert float(jnp.abs(int8_gpu.erf_approx(z) - jax.lax.erf(z)).max()) < 5e-7


@pytest.mark.slow
def test_quantized_logits_within_bound_of_float():
    """Every matrix int8 (blocks and embeddings; GQA, GLU, biases and an untied head for the
    paths the default model does not take): logits within 3% (relative L2) of the float
    model's. Bound: a per-channel absmax step is max|w| / 127, an error of at most half a step
    per weight (~0.4% of a row's scale on average); summed over ~5 matmuls it stays ~1-2%."""
    cfg = tiny(d_model=40, n_heads=4, no_bias=False, tie_word_embeddings=False,
               ffn_config=FFNConfig(ffn_type="mptglu", ffn_act_fn="silu"),
               attn_config=AttnConfig(attn_type="grouped_query_attention", kv_n_heads=2))
    pure = random_pure(cfg, std=0.15)
    model = model_from_pure_dict(cfg, pure)
    qmodel = quantize_model(model)
    shapes = nnx.to_pure_dict(nnx.state(qmodel))
    assert shapes["blocks"]["attn"]["Wqkv"].dtype == jnp.int8
    assert shapes["wte"].dtype == jnp.int8 and shapes["wte_scale"].shape == (cfg.vocab_size,)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 13)))
    want = np.asarray(jax.jit(lambda i: model(i))(ids))
    got = np.asarray(jax.jit(lambda i: qmodel(i))(ids))
    assert _rel(got, want) < 0.03, _rel(got, want)
    with pytest.raises(ValueError, match="inference only"):
        qmodel.output_embedding()


@pytest.mark.slow
def test_int8_decode_step_through_the_kernels_equals_the_xla_path():
    """One decode step of an int8 model against an int8 KV cache through every Pallas kernel
    (interpret mode, batch 1: the int8 GEMVs, the up-projection's GELU epilogue, the
    unembedding, the add+norm chain, decode attention appending to the int8 cache) equals the
    XLA / jnp path: logits, and the cache rows it writes."""
    pure = nnx.to_pure_dict(nnx.state(quantize_model(MPTForCausalLM(KERNEL_CFG,
                                                                     rngs=nnx.Rngs(3)))))
    qcfg = KERNEL_CFG.replace(quantization="int8")
    ref = model_from_pure_dict(qcfg, pure)
    kern = model_from_pure_dict(qcfg, pure, attn_impl="pallas_gpu", attn_interpret=True)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, qcfg.vocab_size, (1, 8)))
    _, cache = ref(ids[:, :7], cache=ref.init_cache(1, 64, dtype=jnp.int8), mode="prefill")
    outs = []
    for m in (ref, kern):
        graphdef, state = nnx.split(m)
        step = jax.jit(lambda st, i, c, g=graphdef: nnx.merge(g, st)(i, cache=c, cache_index=7))
        outs.append(step(state, ids[:, 7:], cache))
    (want, want_cache), (got, got_cache) = outs
    assert kern._norm_kernels(1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1.0 if a.dtype == jnp.int8 else 1e-6)


@pytest.mark.slow
def test_int8_decode_step_launches():
    """The int8 decode step on the Pallas GPU path (traced as for a GPU): one int8 kernel per
    matrix (qkv, out, up with its GELU, down) a layer plus the unembedding, the decode kernel
    on the int8 cache, the add+norm chain, and no GELU left for XLA."""
    layers, t, n = 2, 64, 4
    qcfg = KERNEL_CFG.replace(n_layers=layers, quantization="int8")
    model = MPTForCausalLM(qcfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           attn_impl="pallas_gpu")
    gen = Generator(model, cache_dtype=jnp.int8)
    alloc = decode_gpu.alloc_slots(t + n)
    args = (gen.weights, jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32),
            jax.random.key(0), jnp.int32(0), alloc, n, SamplingParams(), False)
    state = jax.eval_shape(lambda: gen_lib._prefill_jit(gen._spec, *args))
    decode = gen_lib._decode_jit.trace(gen._spec, gen.weights, state, t, n, SamplingParams(),
                                       jnp.int32(-1), jnp.int32(0))
    names = pallas_kernels(decode.jaxpr.jaxpr)
    counts = {k: names.count(k) for k in set(names)}
    want = {"alibi_decode": layers, "add_norm": 2 * layers + 1, "int8_matmul": 4 * layers + 1}
    if decode_gpu.n_splits(1, qcfg.kv_n_heads, alloc) > 1:
        want["alibi_decode_combine"] = layers
    assert counts == want
    from conftest import all_eqns

    assert not any(e.primitive.name == "erf" for e in all_eqns(decode.jaxpr.jaxpr))


def _cache_case(seed, b=2, kvh=2, g=2, d=32, s=128):
    rng = np.random.default_rng(seed)
    h = kvh * g
    k = rng.standard_normal((b, kvh, s, d)).astype(np.float32)
    v = rng.standard_normal((b, kvh, s, d)).astype(np.float32)
    q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
    kn = rng.standard_normal((b, 1, kvh, d)).astype(np.float32)
    vn = rng.standard_normal((b, 1, kvh, d)).astype(np.float32)
    idx = np.array([37, 90], np.int32)[:b]
    mask = np.ones((b, s), bool)
    mask[0, :4] = False  # left padding
    return (jnp.asarray(a) for a in (q, kn, vn, k, v, idx, mask)), h


@pytest.mark.slow
def test_int8_kv_cache_kernel_equals_jnp_path_and_is_close_to_float():
    """Appending to and attending over an int8 cache: the decode kernel (interpret) writes the
    same int8 rows and scales as the jnp path and returns its output; both are within 2% of the
    float32 cache's output (int8 rows: ~0.4% per element, averaged by the softmax sums)."""
    (q, kn, vn, k, v, idx, mask), h = _cache_case(0)
    slopes = jnp.asarray(alibi_slopes(h, 8.0))

    def attend(**kw):
        return jax.jit(lambda *a: attention.append_and_attend(*a, alibi_slopes=slopes,
                                                              kv_mask=mask, **kw))

    ref, _, _ = attend()(q, kn, vn, k, v, idx)
    kq, vq = quant.QuantizedKV(*quant.quantize_rows(k)), quant.QuantizedKV(*quant.quantize_rows(v))
    jnp_out, kj, vj = attend()(q, kn, vn, kq, vq, idx)
    ker_out, kk, vk = attend(impl="pallas_gpu", interpret=True)(q, kn, vn, kq, vq, idx)
    for a, b in ((kj, kk), (vj, vk)):
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
        np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ker_out), np.asarray(jnp_out), rtol=1e-5, atol=1e-5)
    assert _rel(jnp_out, ref) < 0.02, _rel(jnp_out, ref)
    # the new rows went in at idx, quantized
    want_q, _ = _np_quantize(np.asarray(kn)[:, 0])
    got = np.asarray(kk.values)[np.arange(2), :, np.asarray(idx)]
    assert np.abs(got - want_q).max() <= 1


@pytest.mark.slow
def test_int8_cache_widening_by_magic_numbers_is_exact(monkeypatch):
    """decode_gpu.INT8_WIDEN "magic" (integer adds and a reinterpret in place of converts)
    widens every int8 value exactly, gives the kernel (interpret) the same output bit for bit
    as "cast", and lowers for CUDA."""
    from mpt_jax.kernels import decode_gpu

    every = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    monkeypatch.setattr(decode_gpu, "INT8_WIDEN", "magic")
    np.testing.assert_array_equal(np.asarray(decode_gpu._to_f32(every)),
                                  np.arange(-128, 128, dtype=np.float32).reshape(16, 16))
    (q, kn, vn, k, v, idx, mask), h = _cache_case(1)
    kq, vq = quant.quantize_rows(k), quant.quantize_rows(v)
    slopes = jnp.asarray(alibi_slopes(h, 8.0))
    lens = jnp.asarray(idx) + 1
    d = q.shape[-1]

    def run(**kw):
        return decode_gpu.decode_attention_gpu(
            q[:, 0], kq[0], vq[0], lens, mask, slopes, k_scales=kq[1], v_scales=vq[1],
            scale=d ** -0.5, **kw)

    magic = run(interpret=True)
    monkeypatch.setattr(decode_gpu, "INT8_WIDEN", "cast")
    jax.clear_caches()  # the knob is read when the kernel is traced
    cast = run(interpret=True)
    np.testing.assert_array_equal(np.asarray(magic), np.asarray(cast))
    monkeypatch.setattr(decode_gpu, "INT8_WIDEN", "magic")
    jax.clear_caches()
    txt = jax.jit(lambda: run()).trace().lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in txt and "alibi_decode" in txt


@pytest.mark.slow
def test_int8_kv_cache_decoding_within_bound_of_float_cache():
    """A float32 model reading a 6-token prompt and then 6 given tokens one at a time against
    an int8 cache (quantized on write, the stacked cache under scan): every step's logits
    within 2% (relative L2) of the float32 cache's."""
    cfg = tiny(d_model=40, n_heads=4)
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=4, std=0.15))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, cache, index):
        return nnx.merge(graphdef, state)(ids, cache=cache, cache_index=index)

    ids = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12)))
    steps = {}
    for dtype in (None, jnp.int8):
        lg, cache = run(state, ids[:, :6], model.init_cache(2, 32, dtype=dtype), 0)
        got = [lg]
        for i in range(6, 12):
            lg, cache = run(state, ids[:, i:i + 1], cache, i)
            got.append(lg)
        steps[dtype] = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert isinstance(cache.k, quant.QuantizedKV) and cache.k.values.dtype == jnp.int8
    assert _rel(steps[jnp.int8], steps[None]) < 0.02, _rel(steps[jnp.int8], steps[None])


@pytest.mark.slow
def test_decode_variants_compute_the_same_tokens():
    """steps_per_sync (a fixed-trip inner loop, masked past the end), command-buffer compiler
    options: the tokens of the default loop, with EOS stops and streamed chunks."""
    cfg = tiny(d_model=40, n_heads=4)
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=5, std=0.3))
    prompts = [[5, 9, 3], [2, 8]]
    base = Generator(model).generate(prompts, max_new_tokens=9)
    eos = int(base.tokens[1, 4])
    base_eos = Generator(model).generate(prompts, max_new_tokens=9, eos_id=eos)
    opts = DecodeOptions(steps_per_sync=4, compiler_options=(
        ("xla_gpu_enable_command_buffer", "FUSION,CUBLAS,CUSTOM_CALL,WHILE,CONDITIONAL"),))
    gen = Generator(model, decode=opts)
    np.testing.assert_array_equal(gen.generate(prompts, max_new_tokens=9).tokens, base.tokens)
    seen = []
    out = gen.generate(prompts, max_new_tokens=9, eos_id=eos, stream_chunk=2,
                       on_tokens=lambda t, n: seen.append(n))
    np.testing.assert_array_equal(out.tokens, base_eos.tokens)
    np.testing.assert_array_equal(out.lengths, base_eos.lengths)
    assert seen[0] == 1 and seen == sorted(seen)
    with pytest.raises(ValueError, match="steps_per_sync"):
        DecodeOptions(steps_per_sync=0)


@pytest.mark.slow
def test_quantized_checkpoint_round_trip(tmp_path, capsys):
    """import --quantize int8 and `quantize` of a float checkpoint write the same int8
    checkpoint (config.json records it); it loads as stored, equal to quantizing at load
    time; export writes its dequantized weights, which transformers loads to our int8 logits.
    """
    cfg = tiny(d_model=32, n_heads=4)
    hf = hf_model(cfg, std=0.1)
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "q8"),
                         "--quantize", "int8"]) == 0
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "f")]) == 0
    assert convert_main(["quantize", str(tmp_path / "f"), str(tmp_path / "q8b")]) == 0
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"] == "int8"
    ids = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 9)))
    loaded = [load_pretrained(tmp_path / "q8"), load_pretrained(tmp_path / "q8b"),
              load_pretrained(tmp_path / "hf", quantize="int8"),
              load_pretrained(tmp_path / "f", quantize="int8")]
    pures = [nnx.to_pure_dict(nnx.state(m)) for m in loaded]
    for p in pures[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     pures[0], p)
    assert pures[0]["blocks"]["ffn"]["up_proj"].dtype == jnp.int8
    logits = np.asarray(loaded[0](ids))
    assert _rel(logits, hf_logits(hf, np.asarray(ids))) < 0.03
    assert convert_main(["export", str(tmp_path / "q8"), str(tmp_path / "exp")]) == 0
    assert "dequantized" in capsys.readouterr().out
    import transformers

    back = transformers.MptForCausalLM.from_pretrained(tmp_path / "exp")
    np.testing.assert_allclose(hf_logits(back, np.asarray(ids)), logits, rtol=1e-4, atol=1e-4)


def _generate_cli():
    spec = importlib.util.spec_from_file_location("generate_cli",
                                                  os.path.join(ROOT, "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_bad_input_is_one_line(tmp_path, capsys):
    """--quantize int4 (generate.py, convert_torch.py), --kv_cache int4, a quantized checkpoint
    whose config.json records no quantization and a float one whose config.json claims int8
    (load_pretrained and generate.py), finetuning from a quantized checkpoint."""
    from mpt_jax.convert.pretrained import merge_finetune_config
    from mpt_jax.data import tokenizer as tokenizer_lib

    cfg = tiny(vocab_size=307)
    hf_model(cfg).save_pretrained(tmp_path / "hf")
    tokenizer_lib.train_byte_level_bpe(["def main(argv):\n    return 0\n"] * 10, 300).save(
        str(tmp_path / "hf" / "tokenizer.json"))
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "q8"),
                         "--quantize", "int8"]) == 0
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "f")]) == 0
    for name, drop in (("q8", True), ("f", False)):
        conf = json.loads((tmp_path / name / "config.json").read_text())
        if drop:
            del conf["quantization"]
        else:
            conf["quantization"] = "int8"
        (tmp_path / name / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConversionError, match="records no quantization"):
        load_pretrained(tmp_path / "q8")
    with pytest.raises(ConversionError, match="records quantization 'int8'"):
        load_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="finetune from the floating-point checkpoint"):
        merge_finetune_config(cfg.replace(quantization="int8"), {})
    capsys.readouterr()
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "x"),
                         "--quantize", "int4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: quantize='int4' is unsupported; supported: int8 (weight-only, per "
                   "output channel)"] and not (tmp_path / "x").exists()
    cli = _generate_cli()
    hf_dir = str(tmp_path / "hf")
    cases = [
        (["--quantize", "int4"], "--quantize int4: unsupported; supported: none, int8 "
                                 "(weight-only, per output channel)"),
        (["--kv_cache", "int4"], "--kv_cache int4: unsupported; choose one of auto, bfloat16, "
                                 "float16, float32, int8"),
    ]
    for argv, line in cases:
        assert cli.main(["--checkpoint", hf_dir, "--prompt", "x", *argv]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines()
               if not ln.startswith("[generate]")]
        assert err == [f"generate.py: {line}"], err
    assert cli.main(["--checkpoint", str(tmp_path / "q8"), "--prompt", "x",
                     "--tokenizer", str(tmp_path / "hf" / "tokenizer.json")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[generate]")]
    assert len(err) == 1 and "records no quantization" in err[0], err


def _markov_chain(vocab, seed):
    """A first-order chain with peaked transitions (each token has ~3 likely successors): a
    language a tiny model learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((vocab, vocab)) * 0.5
    for a in range(vocab):
        logits[a, rng.choice(vocab, 3, replace=False)] += 5.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _sample(p, n, t, rng):
    out = np.empty((n, t), np.int32)
    out[:, 0] = rng.integers(0, len(p), n)
    cum = p.cumsum(1)
    for i in range(1, t):
        out[:, i] = (cum[out[:, i - 1]] < rng.random((n, 1))).sum(1)
    return np.minimum(out, len(p) - 1)


@pytest.mark.slow
def test_int8_quality_on_a_trained_tiny_model():
    """A tiny model trained on a Markov chain (80 Adam steps on fresh samples; held-out
    perplexity under 20, against the chain's own ~9 and the uniform model's 101) keeps its
    held-out perplexity within 3% under int8 weights and under an int8 KV cache (looser than
    the 1% goal: bench/quant_quality.py measured +0.02% on the CPU demo), and its greedy
    continuations mostly agree with the float model's: at least 75% identical tokens."""
    import optax

    cfg = tiny(d_model=40, n_heads=4, vocab_size=101)
    p = _markov_chain(cfg.vocab_size, 0)
    rng = np.random.default_rng(1)
    held = jnp.asarray(_sample(p, 16, 32, rng))
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=0, std=0.05))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def nll(params, ids, cache_dtype=None, g=graphdef, r=rest):
        m = nnx.merge(g, params, r)
        if cache_dtype is None:
            logits = m(ids)
        else:
            logits, _ = m(ids, cache=m.init_cache(ids.shape[0], 32, dtype=cache_dtype),
                          cache_index=0)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(nll)(params, ids)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    for i in range(80):
        params, opt_state, _ = step(params, opt_state, jnp.asarray(_sample(p, 16, 32, rng)))
    trained = nnx.merge(graphdef, params, rest)
    qmodel = quantize_model(trained)
    qgraph, qparams, qrest = nnx.split(qmodel, nnx.Param, ...)
    ppl = float(np.exp(jax.jit(nll)(params, held)))
    ppl_int8 = float(np.exp(jax.jit(lambda pr, ids: nll(pr, ids, g=qgraph, r=qrest))(qparams,
                                                                                         held)))
    ppl_kv8 = float(np.exp(jax.jit(lambda pr, ids: nll(pr, ids, jnp.int8))(params, held)))
    assert ppl < 20, ppl  # trained
    assert abs(ppl_int8 / ppl - 1) < 0.03, (ppl, ppl_int8)
    assert abs(ppl_kv8 / ppl - 1) < 0.03, (ppl, ppl_kv8)
    prompts = np.asarray(held[:8, :4])
    want = Generator(trained).generate(prompts, max_new_tokens=24).tokens
    got = Generator(qmodel).generate(prompts, max_new_tokens=24).tokens
    assert (got == want).mean() >= 0.75, (got == want).mean()
