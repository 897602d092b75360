"""Generation: greedy tokens equal transformers' MptForCausalLM.generate (single and batched with
left padding), KV-cache logits equal full-recompute logits at every step, ALiBi extrapolation
past max_seq_len, seeded sampling, top-k/top-p sets, streaming, the CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpt_jax import load_pretrained
from mpt_jax.infer.generate import Generator, SamplingParams, filter_logits, left_pad, sample

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 101  # prime vocabulary; tiny prime-ish dims elsewhere


def _hf_model(max_seq_len=64, seed=0):
    cfg = transformers.MptConfig(d_model=33, n_heads=3, n_layers=2, vocab_size=V,
                                 max_seq_len=max_seq_len, no_bias=True,
                                 attn_config={"alibi": True, "softmax_scale": None})
    torch.manual_seed(seed)
    hf = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.2)
            else:
                torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return hf


def _converted(hf, tmp_path_factory) -> str:
    """Saves the HF model as safetensors; our converter loads that directory."""
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _hf_model()
    path = _converted(hf, tmp_path_factory)
    model = load_pretrained(path, dtype=jnp.float32)
    return hf, Generator(model), model, path


def _hf_greedy(hf, ids, mask, n):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.slow
def test_greedy_matches_hf_single(pair):
    hf, gen, _, _ = pair
    ids, mask = left_pad([list(np.random.RandomState(1).randint(1, V, 9))])
    ours = gen.generate(ids, attention_mask=mask, max_new_tokens=12)
    np.testing.assert_array_equal(ours.tokens, _hf_greedy(hf, ids, mask, 12))


@pytest.mark.slow
def test_batched_left_padding_matches_hf_and_full_recompute(pair):
    """Greedy tokens equal HF's with left padding; the KV-cache logits of every step equal a
    full recompute of the whole sequence, through our generator and the model's cache path."""
    hf, gen, model, _ = pair
    rs = np.random.RandomState(2)
    prompts = [list(rs.randint(1, V, n)) for n in (11, 4, 7)]
    ids, mask = left_pad(prompts)
    out = gen.generate(prompts, max_new_tokens=12, keep_logits=True)
    np.testing.assert_array_equal(out.tokens, _hf_greedy(hf, ids, mask, 12))
    seq = np.concatenate([ids, out.tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, cache=None, index=None):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache,
                                          cache_index=index)

    full = np.asarray(run(state, seq, full_mask))
    t = ids.shape[1]
    np.testing.assert_allclose(out.logits, full[:, t - 1:-1], rtol=1e-4, atol=1e-4)
    cache = model.init_cache(3, seq.shape[1])
    lg, cache = run(state, seq[:, :t], full_mask, cache, 0)
    got = [np.asarray(lg[:, -1])]
    for i in range(out.tokens.shape[1] - 1):
        lg, cache = run(state, seq[:, t + i:t + i + 1], full_mask, cache, t + i)
        got.append(np.asarray(lg[:, 0]))
    np.testing.assert_allclose(np.stack(got, 1), full[:, t - 1:-1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pallas_kernels_greedy_matches_hf(tmp_path_factory):
    """Prefill through the flash kernel and every decode step through the decode and the
    add+norm kernels (interpret mode; d_model 64 and head dim 16 qualify) give HF's greedy
    tokens, batched with padding."""
    cfg = transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=V,
                                 max_seq_len=64, no_bias=True,
                                 attn_config={"alibi": True, "softmax_scale": None})
    torch.manual_seed(3)
    hf = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.2)
    path = _converted(hf, tmp_path_factory)
    model = load_pretrained(path, dtype=jnp.float32, attn_impl="pallas_gpu", attn_interpret=True)
    rs = np.random.RandomState(4)
    prompts = [list(rs.randint(1, V, n)) for n in (9, 5)]
    ids, mask = left_pad(prompts)
    out = Generator(model).generate(prompts, max_new_tokens=6)
    np.testing.assert_array_equal(out.tokens, _hf_greedy(hf, ids, mask, 6))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.slow
def test_decode_step_launches_the_same_kernels(batch):
    """The generator's prefill and decode loop on the Pallas GPU path (traced, as for a GPU),
    counted launch by launch: prefill one flash forward a layer; each decode step one decode
    attention kernel a layer (which appends the new K/V row in place; plus its combine launch
    where the slots are split), two add+norm kernels a layer and one for norm_f (each block's
    MLP residual rides in the next norm kernel), and nothing else. The counts are the ones the
    generator had with its own copy of the decode chain."""
    from conftest import pallas_kernels

    from mpt_jax import MPTConfig, MPTForCausalLM
    from mpt_jax.infer import generate as gen_lib
    from mpt_jax.kernels import decode_gpu

    layers, t, n = 3, 128, 8
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=layers, vocab_size=V, max_seq_len=256)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           attn_impl="pallas_gpu")
    gen = Generator(model)
    alloc = decode_gpu.alloc_slots(t + n)
    args = (gen.weights, jnp.zeros((batch, t), jnp.int32), jnp.ones((batch, t), jnp.int32),
            jax.random.key(0), jnp.int32(0), alloc, n, SamplingParams(), False)
    prefill = gen_lib._prefill_jit.trace(gen._spec, *args)
    state = jax.eval_shape(lambda: gen_lib._prefill_jit(gen._spec, *args))
    decode = gen_lib._decode_jit.trace(gen._spec, gen.weights, state, t, n, SamplingParams(),
                                       jnp.int32(-1), jnp.int32(0))

    def counts(traced):
        names = pallas_kernels(traced.jaxpr.jaxpr)
        return {k: names.count(k) for k in set(names)}

    assert counts(prefill) == {"alibi_flash_fwd": layers}
    split = decode_gpu.n_splits(batch, cfg.kv_n_heads, alloc) > 1
    want = {"alibi_decode": layers, "add_norm": 2 * layers + 1}
    if split:
        want["alibi_decode_combine"] = layers
    assert counts(decode) == want


@pytest.mark.slow
def test_unpadded_prefill_drops_the_mask(pair):
    """A batch with no left padding prefills without a mask, so attention runs without segment
    ids (the faster kernels); its logits and cache equal the masked prefill's, and generate
    takes that path exactly when no row is padded."""
    from conftest import all_eqns

    from mpt_jax import MPTConfig, MPTForCausalLM
    from mpt_jax.infer import generate as gen_lib
    from mpt_jax.kernels import decode_gpu

    _, gen, _, _ = pair
    ids = jnp.asarray(np.random.RandomState(3).randint(1, V, (2, 11)), jnp.int32)
    args = (gen.weights, ids, jnp.ones_like(ids), jax.random.key(0), jnp.int32(0),
            decode_gpu.alloc_slots(11 + 4), 4, SamplingParams(), True)
    masked, bare = gen._prefill(*args, True), gen._prefill(*args, False)
    np.testing.assert_allclose(bare.logits, masked.logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(bare.cache), jax.tree.leaves(masked.cache)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    seen, real = [], gen._prefill
    gen._prefill = lambda *a: seen.append(a[-1]) or real(*a)
    try:
        gen.generate([[5, 6, 7], [8, 9, 10]], max_new_tokens=2)
        gen.generate([[5, 6, 7], [8, 9]], max_new_tokens=2)
    finally:
        gen._prefill = real
    assert seen == [False, True]

    # on the GPU path the flash forward then takes no segment-id operands
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=V, max_seq_len=256)
    g = Generator(MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16, attn_impl="pallas_gpu"))
    z = jnp.zeros((1, 128), jnp.int32)
    targs = (g.weights, z, jnp.ones_like(z), jax.random.key(0), jnp.int32(0),
             decode_gpu.alloc_slots(136), 8, SamplingParams(), False)

    def flash_operands(padded):
        jaxpr = gen_lib._prefill_jit.trace(g._spec, *targs, padded).jaxpr.jaxpr
        return [len(e.invars) for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call"]

    with_mask, without = flash_operands(True), flash_operands(False)
    assert len(with_mask) == len(without) == 1 and without[0] < with_mask[0]


@pytest.mark.slow
def test_prompt_past_max_seq_len_with_override(pair):
    _, gen, model, _ = pair  # trained length 64
    prompt = list(np.random.RandomState(5).randint(1, V, 70))
    with pytest.raises(ValueError, match="max_len"):
        gen.generate([prompt], max_new_tokens=4)
    out = gen.generate([prompt], max_new_tokens=6, max_len=80, keep_logits=True)
    seq = np.asarray([prompt + list(out.tokens[0])])
    full = np.asarray(jax.jit(lambda ids: model(ids))(seq))  # our full recompute, past 64
    np.testing.assert_allclose(out.logits[0], full[0, 69:-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.tokens[0], full[0, 69:-1].argmax(-1))


@pytest.mark.slow
def test_sampling_seeded_reproducible_and_eos(pair):
    _, gen, _, _ = pair
    prompts = [[5, 6, 7], [8, 9]]
    kw = {"max_new_tokens": 10, "temperature": 1.3, "top_k": 20, "top_p": 0.9}
    a = gen.generate(prompts, seed=7, **kw)
    b = gen.generate(prompts, seed=7, **kw)
    c = gen.generate(prompts, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # Stop at EOS per row: pick the token row 0 emits at step 3 as EOS.
    eos = int(a.tokens[0, 3])
    e = gen.generate(prompts, seed=7, eos_id=eos, pad_id=0, **kw)
    assert e.lengths[0] == list(a.tokens[0]).index(eos) + 1
    n0 = e.lengths[0]
    np.testing.assert_array_equal(e.tokens[0, :n0], a.tokens[0, :n0])
    assert (e.tokens[0, n0:] == 0).all()


@pytest.mark.slow
def test_streaming_equals_one_shot(pair):
    _, gen, _, _ = pair
    seen = []
    kw = {"max_new_tokens": 10, "temperature": 1.3, "top_k": 20, "top_p": 0.9, "seed": 3}
    prompts = [[5, 6, 7], [8, 9]]
    s = gen.generate(prompts, on_tokens=lambda t, n: seen.append(n), stream_chunk=4, **kw)
    o = gen.generate(prompts, **kw)
    np.testing.assert_array_equal(s.tokens, o.tokens)
    assert seen[0] == 1 and seen[-1] == 10 and seen == sorted(seen)


@pytest.mark.slow
def test_top_k_top_p_stay_in_allowed_set():
    v = 50
    logits = np.full((4, v), -5.0, np.float32)
    logits[:, [3, 17, 29, 41]] = [4.0, 3.0, 2.0, 1.0]  # probabilities well apart
    logits = jnp.asarray(np.repeat(logits[:1], 400, axis=0))  # 400 independent draws
    key = jax.random.key(0)

    def draw(p):
        return np.asarray(sample(logits, key, p))

    k3 = draw(SamplingParams(1.0, top_k=3))
    assert set(np.unique(k3)) <= {3, 17, 29} and len(np.unique(k3)) == 3
    # softmax of (4, 3, 2, 1, -5 x 46): p ~ .64, .24, .09, .03; top_p 0.8 keeps {3, 17}.
    p8 = draw(SamplingParams(1.0, top_p=0.8))
    assert set(np.unique(p8)) == {3, 17}
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(1.0, top_p=0.8))))
    assert (kept.sum(-1) == 2).all()
    both = draw(SamplingParams(2.0, top_k=2, top_p=0.999))
    assert set(np.unique(both)) <= {3, 17}
    tiny = draw(SamplingParams(1.0, top_p=0.01))  # always keeps the best
    assert set(np.unique(tiny)) == {3}


def _tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.BPEDecoder()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>",
                                                                          "<unk>"])
    text = ["the quick brown fox jumps over the lazy dog", "a story about a cat and a dog",
            "once upon a time there was a model that wrote stories"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    assert tok.get_vocab_size() <= V
    return tok


@pytest.mark.slow
def test_cli_prints_only_the_completion(pair, tmp_path_factory, capsys):
    import importlib.util

    from mpt_jax.convert.convert import import_checkpoint

    _, gen, _, src = pair
    tok = _tiny_tokenizer()
    tok.save(os.path.join(src, "tokenizer.json"))
    dst = str(tmp_path_factory.mktemp("ours") / "ckpt")
    import_checkpoint(src, dst)  # our checkpoint dir; the tokenizer travels with it
    prompt = "once upon a time the quick fox"
    ids = tok.encode(prompt).ids
    eos = tok.token_to_id("<|endoftext|>")
    out = gen.generate([ids], max_new_tokens=7, eos_id=eos)
    expected = tok.decode([int(x) for x in out.tokens[0, :out.lengths[0]] if x != eos])
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    capsys.readouterr()
    rc = cli.main(["--checkpoint", dst, "--prompt", prompt, "--max_new_tokens", "7",
                   "--dtype", "float32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out == expected + "\n"
    assert "[generate]" in captured.err
    # config.json's eos_token_id (HF's generate stops there) comes before the tokenizer's
    first = int(out.tokens[0, 0])
    assert first != eos
    conf = json.loads(open(os.path.join(dst, "config.json")).read())
    conf["eos_token_id"] = first
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(conf, fh)
    rc = cli.main(["--checkpoint", dst, "--prompt", prompt, "--max_new_tokens", "7",
                   "--dtype", "float32"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "\n" and f"eos_id={first}" in captured.err, captured
    assert cli.main(["--checkpoint", dst, "--prompt", "the dog " * 40, "--dtype", "float32",
                     "--max_new_tokens", "40"]) == 1  # past max_seq_len without the override
    assert "max_seq_len" in capsys.readouterr().err
    # bad sampling flags: one line before any loading (a missing checkpoint is not reached)
    for flags, needle in ((["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
                          (["--temperature", "-1"], "--temperature must be >= 0"),
                          (["--top_p", "0"], "--top_p must be in (0, 1]"),
                          (["--top_k", "-1"], "--top_k must be an int >= 0")):
        assert cli.main(["--checkpoint", "/nonexistent", "--prompt", "x", *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    # any seed the server takes (it reduces it mod 2**64)
    rc = cli.main(["--checkpoint", dst, "--prompt", prompt, "--max_new_tokens", "3",
                   "--dtype", "float32", "--temperature", "1", "--seed", str(2**64 - 1)])
    assert rc == 0, capsys.readouterr().err


_MESH_SCRIPT = r"""
import os
import subprocess
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 "
                           "--xla_backend_optimization_level=0")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mpt_jax import MPTConfig, MPTForCausalLM, sharding
from mpt_jax.infer import slots
from mpt_jax.infer.generate import Generator, left_pad
cfg = MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=32)
model = MPTForCausalLM(cfg, rngs=nnx.Rngs(1))
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
sharded = Generator(model, mesh=mesh)
wqkv = sharded.weights.layers[0]["attn"]["Wqkv"][...]
assert len(wqkv.sharding.device_set) == 4 and wqkv.addressable_shards[0].data.shape == (16, 48), (
    wqkv.sharding)
prompts = [[1, 2, 3, 4, 5], [6, 7]]
ids, mask = left_pad(prompts)
a = sharded.generate(prompts, max_new_tokens=6)
seq = np.concatenate([ids, a.tokens], 1)  # greedy: each token is the full recompute's argmax
full = model(jnp.asarray(seq), attention_mask=jnp.asarray(np.concatenate(
    [mask, np.ones_like(a.tokens)], 1)))
np.testing.assert_array_equal(a.tokens, np.asarray(full)[:, 4:-1].argmax(-1))
# The decode kernels (interpret mode) over the mesh, per batch shard: the same tokens.
cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=32)
ref = MPTForCausalLM(cfg, rngs=nnx.Rngs(2))
kern = MPTForCausalLM(cfg, rngs=nnx.Rngs(2), attn_impl="pallas_gpu", attn_interpret=True)
assert kern._norm_kernels(1)  # the decode chain of add+norm kernels runs
want = Generator(ref).generate(prompts, max_new_tokens=6).tokens
got = Generator(kern, mesh=mesh).generate(prompts, max_new_tokens=6).tokens
np.testing.assert_array_equal(got, want)
# The serving engine's mixed step over the mesh (its decode rows and the chunk in one row):
# what the decode step then the chunk compute.
pool = slots.Pool(sharded._spec, batch=2, slots=32, chunk=8, top_n=3, n_stop=2)
w = sharded.weights
state = slots.init_jit(pool)
state, logits = slots.prefill_jit(pool, w, state, np.arange(1, 9, dtype=np.int32)[None], 0, 0,
                                  8, 8)
rows = slots.empty_rows(pool)
rows.mask[0], rows.pos[0], rows.max_tokens[0] = True, 8, 10
state, _, _ = slots.admit_jit(pool, state, logits, rows)
owned, ids = jnp.asarray([True, True]), np.arange(9, 17, dtype=np.int32)[None]
ref, ref_out, _ = slots.decode_jit(pool, w, jax.tree.map(jnp.copy, state), owned, 1, False)
ref, ref_logits = slots.prefill_jit(pool, w, ref, ids, 1, 0, 6, 8)
got, out, _, got_logits = slots.mixed_jit(pool, w, state, owned, ids, 1, 0, 6, 8, False)
np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
print("MESH OK")
"""


@pytest.mark.slow
def test_sharded_over_a_mesh_of_fake_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True,
                       check=False,
                       env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and "MESH OK" in p.stdout, p.stderr[-2000:]
