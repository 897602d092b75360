"""The continuous-batching engine without HTTP: batching changes no greedy token (each choice
equals Generator.generate on its prompt alone), prompts longer than a chunk, n > 1 from one
prefill, seeded sampling independent of the batch, penalties and log-probabilities against a
full-forward reference, stop ids and budgets, one failing request among others, the queue
bound, cancellation freeing slots, shutdown; and the pieces: chunk plans, per-row sampling
against the static one, stop strings across token boundaries, incremental detokenization."""
import random
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from conftest import SERVE_ENGINE, left_padded, slow_engine, wait_for, write_serve_checkpoint

from mpt_jax.data.tokenizer import train_byte_level_bpe
from mpt_jax.eval import loading
from mpt_jax.infer import slots
from mpt_jax.infer.engine import Engine, chunk_plan
from mpt_jax.infer.generate import Generator
from mpt_jax.infer.request import EngineUnavailable, QueueFull, RequestError, RequestParams
from mpt_jax.infer.sampling import _filter, sample_rows
from mpt_jax.infer.text import Detokenizer, StopMatcher

REF_T, REF_N = 32, 24  # the reference prompts' padded length and tokens: one compilation


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_serve_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
    loaded = loading.load(path, dtype="float32")  # as serve.py loads it
    model, tok = loaded.model, loaded.tokenizer
    gen = Generator(model)
    engine = Engine(gen, tok, eos_id=None, **SERVE_ENGINE)
    engine.warm_up()
    engine.start()
    forward = jax.jit(lambda ids: model(ids))  # the full-forward reference
    yield {"engine": engine, "gen": gen, "tok": tok, "forward": forward}
    engine.shutdown(5)


def _reference(gen, prompt, n):
    ids, mask = left_padded(prompt, REF_T)
    return [int(t) for t in gen.generate(ids, attention_mask=mask, max_new_tokens=REF_N).tokens[0]
            ][:n]


def _prompts(seed, lengths):
    rs = np.random.RandomState(seed)
    return [[int(t) for t in rs.randint(1, 300, n)] for n in lengths]


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------
def test_chunk_spans_double_up_to_the_slot():
    """A chunk attends over the shortest span holding the prompt so far: chunk x 1, 2, 4, ...
    then the whole slot; past the slot is an error."""
    from mpt_jax.infer.slots import Pool

    pool = Pool(None, batch=2, slots=2560, chunk=256, top_n=0, n_stop=1)
    assert pool.spans == (256, 512, 1024, 2048, 2560)
    assert [pool.span_for(e) for e in (1, 256, 257, 1024, 2049, 2560)] == [
        256, 256, 512, 1024, 2560, 2560]
    assert Pool(None, 1, 64, 64, 0, 1).spans == (64,)
    with pytest.raises(ValueError, match="past the slot"):
        pool.span_for(2561)
    # chunks of part key blocks: the spans still fill whole blocks (the chunk kernel takes
    # each, on the cache in place), and a slot below the chunk is one span
    import jax.numpy as jnp

    from mpt_jax.kernels import flash_gpu

    odd = Pool(None, 2, 2048, 100, 0, 1)
    assert odd.spans == (128, 256, 448, 832, 1600, 2048)
    assert all(flash_gpu.chunk_supported((1, 100, 32, 128), 32, n, jnp.bfloat16)
               for n in odd.spans)
    assert [odd.span_for(e) for e in (100, 129, 2048)] == [128, 256, 2048]
    assert Pool(None, 2, 256, 200, 0, 1).spans == (256,)


def _mixed_model(name):
    from conftest import random_pure, tiny

    from mpt_jax.convert.convert import model_from_pure_dict
    from mpt_jax.model.config import AttnConfig

    if name == "wpe_qk_ln_gqa":  # learned positions, q/k norms (no in-place qkv), GQA
        cfg = tiny(d_model=30, n_heads=6, vocab_size=384, max_seq_len=64, learned_pos_emb=True,
                   attn_config=AttnConfig(alibi=False, qk_ln=True, kv_n_heads=3,
                                          attn_type="grouped_query_attention"))
        return model_from_pure_dict(cfg, random_pure(cfg, seed=3))
    cfg = tiny(d_model=64, n_heads=4, vocab_size=384, max_seq_len=64, attn_config=AttnConfig(
        attn_type="grouped_query_attention", kv_n_heads=2))  # the Pallas kernels, interpreted
    return model_from_pure_dict(cfg, random_pure(cfg, seed=4), attn_impl="pallas_triton",
                                attn_interpret=True)


@pytest.mark.parametrize("name", ["served", "wpe_qk_ln_gqa", "kernels"])
def test_a_mixed_step_is_the_decode_step_then_the_chunk(served, name):
    """slots.mixed_jit (a decode step and a prefill chunk in one call, one forward pass over
    both) computes what decode_jit then prefill_jit compute: the step's tokens and
    log-probabilities, the chunk's logits, and the whole pool state, with two slots decoding
    at different depths and the chunk going into a third slot deep in it. ALiBi (the served
    model), learned positions with q/k norms and GQA, and the Pallas kernels."""
    gen = served["gen"] if name == "served" else Generator(_mixed_model(name))
    pool = slots.Pool(gen._spec, batch=3, slots=64, chunk=8, top_n=5, n_stop=8)
    w = gen.weights
    state = slots.init_jit(pool)
    for slot, prompt in ((0, _prompts(20, [8])[0]), (1, _prompts(21, [16])[0])):
        for start in range(0, len(prompt), 8):
            state, logits = slots.prefill_jit(pool, w, state,
                                              np.asarray([prompt[start:start + 8]], np.int32),
                                              slot, start, 8, pool.span_for(start + 8))
        rows = slots.empty_rows(pool)
        rows.mask[slot], rows.pos[slot], rows.max_tokens[slot] = True, len(prompt), 10
        state, _, _ = slots.admit_jit(pool, state, logits, rows)
    state, _ = slots.prefill_jit(pool, w, state, np.ones((1, 8), np.int32), 2, 0, 8, 8)
    owned = jnp.asarray([True, True, True])
    ids = np.asarray([_prompts(22, [8])[0]], np.int32)
    span = pool.span_for(16)
    for full in (False, True):
        copy = jax.tree.map(jnp.copy, state)
        ref, ref_out, ref_top = slots.decode_jit(pool, w, copy, owned, 1, full)
        ref, ref_logits = slots.prefill_jit(pool, w, ref, ids, 2, 8, 5, span)
        copy = jax.tree.map(jnp.copy, state)
        got, out, top, logits = slots.mixed_jit(pool, w, copy, owned, ids, 2, 8, 5, span, full)
        assert np.asarray(out[0, :2, 1]).all() and not np.asarray(out[0, 2, 1])
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-6,
                                   atol=1e-6)
        assert (top is None) == (ref_top is None) == (not full)
        if full:
            np.testing.assert_array_equal(np.asarray(top[0]), np.asarray(ref_top[0]))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_chunk_plan_covers_the_prompt_without_padding_past_it():
    assert chunk_plan(5, 8) == [(0, 5)]
    assert chunk_plan(8, 8) == [(0, 8)]
    assert chunk_plan(16, 8) == [(0, 8), (8, 8)]
    assert chunk_plan(20, 8) == [(0, 8), (8, 8), (12, 8)]  # the last chunk ends at token 20


def test_stop_strings_across_token_boundaries_never_leak():
    m = StopMatcher(["END", "\n\n"])
    outs = [m.feed(d) for d in ["Hello", " E", "N", "D more"]]
    assert outs == [("Hello", False), (" ", False), ("", False), ("", True)]
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False) and m.flush() == "ab"  # not a stop after all
    m = StopMatcher(["cd", "bcx"])
    assert m.feed("abc") == ("a", False) and m.feed("d") == ("b", True)
    rng = random.Random(0)
    for _ in range(300):  # against a find over the text so far, piece by piece
        text = "".join(rng.choice("abc\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc\n") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 5)))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        m, out, stopped = StopMatcher(stops), "", False
        for p in pieces:
            emitted, stopped = m.feed(p)
            out += emitted
            assert not any(s in out for s in stops)
            if stopped:
                break
        if not stopped:
            out += m.flush()
        # Generation ends at the first piece that completes a stop string (as vLLM's), cut at
        # the earliest stop string in the text so far.
        want, hit, seen = text, False, ""
        for p in pieces:
            seen += p
            found = [i for i in (seen.find(s) for s in stops) if i >= 0]
            if found:
                want, hit = seen[:min(found)], True
                break
        assert out == want and stopped == hit, (text, stops, pieces)


def test_detokenizer_deltas_are_the_full_decode():
    text = "naïve café — 東京 🙂🚀 ok\n\tdone"
    tok = train_byte_level_bpe([text, "plain ascii words " * 20], 280)
    prompt = tok.encode("say: ").ids
    ids = tok.encode(text).ids
    d = Detokenizer(tok, prompt)
    deltas = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)  # a split character waits for its bytes
    # A SentencePiece-style decoder (the leading-space strip of a first token): the context
    # token keeps the continuation's spaces as the full decode has them.
    sp = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    sp.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    sp.train_from_iterator(["the cat sat on the mat with a hat"] * 5, trainer)
    prompt, cont = sp.encode("the cat").ids, sp.encode("sat on the mat").ids
    d = Detokenizer(sp, prompt)
    streamed = "".join([d.push(t) for t in cont] + [d.flush()])
    assert streamed == sp.decode(prompt + cont)[len(sp.decode(prompt)):] == " sat on the mat"


def test_completion_logprobs_name_partial_characters_by_their_bytes():
    """Tokens that are part of a character (byte-level BPE) are keyed `bytes:\\xNN` as
    OpenAI's completions API writes them: two of them in one top_logprobs never collide."""
    from mpt_jax.infer import protocol
    from mpt_jax.infer.request import TokenLogprob

    tok = train_byte_level_bpe(["plain ascii words " * 20], 270)  # no merges across é's bytes
    text = protocol.TokenText(tok)
    a, b = [tok.token_to_id(c) for c in tok.encode("é").tokens]
    assert text.key(a) != text.key(b) and text.key(a).startswith("bytes:\\x")
    word = tok.encode("plain").ids[0]
    assert text.key(word) == tok.decode([word])
    out = protocol.completion_logprobs(
        [TokenLogprob(a, -0.5, ((a, -0.5), (b, -1.0), (word, -2.0)))], text)
    assert out["tokens"] == [text.key(a)]
    assert out["top_logprobs"] == [{text.key(a): -0.5, text.key(b): -1.0, text.key(word): -2.0}]


def _np_filter(x, k, p):
    """The filtering rule written out in numpy, one row (see sampling.py)."""
    x = x.astype(np.float64).copy()
    if 0 < k < x.size:
        x[x < np.sort(x)[::-1][k - 1]] = -np.inf
    if p < 1:
        srt = np.sort(x)[::-1]
        probs = np.exp(srt - srt.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        x[x < srt[max(int((before < p).sum()), 1) - 1]] = -np.inf
    return x


@pytest.mark.slow
def test_per_row_sampling_filters_as_written():
    rs = np.random.RandomState(0)
    logits = rs.randn(6, 50).astype(np.float32) * 3
    rows = [(0.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.6), (1.0, 50, 1.0),
            (2.0, 0, 1.0)]
    t, k, p = (np.asarray(c) for c in zip(*rows))
    t, k, p = t.astype(np.float32), k.astype(np.int32), p.astype(np.float32)

    @jax.jit
    def run(logits, seed):
        kept = _filter(logits / jnp.where(t == 0, 1.0, t)[:, None], k, p)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(i), seed))(jnp.arange(6))
        return kept, sample_rows(logits, keys, t, k, p)

    kept = np.asarray(run(logits, 0)[0])
    for i, (ti, ki, pi) in enumerate(rows[1:], start=1):
        np.testing.assert_array_equal(np.isfinite(kept[i]),
                                      np.isfinite(_np_filter(logits[i] / ti, ki, pi)))
    drawn = set()
    for seed in range(20):
        toks = np.asarray(run(logits, seed)[1])
        assert toks[0] == np.argmax(logits[0])  # greedy: exactly argmax
        assert all(np.isfinite(kept[i, toks[i]]) for i in range(1, 6))
        drawn.add(tuple(toks))
    assert len(drawn) > 1


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batching_changes_no_greedy_token(served):
    """Prompts shorter than, equal to and longer than a chunk (8), with n=2 on one, arriving
    staggered into 4 slots (so some wait): every choice is the Generator's greedy output on its
    prompt alone; nothing compiles."""
    engine, gen = served["engine"], served["gen"]
    prompts = _prompts(1, [3, 8, 17, 30, 5, 12])
    max_tokens = [6, 12, 9, 4, 11, 7]
    refs = [_reference(gen, p, n) for p, n in zip(prompts, max_tokens)]
    c0 = slots.backend_compiles()
    handles = []
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        handles.append(engine.submit(p, RequestParams(max_tokens=n, temperature=0.0,
                                                      n=2 if i == 2 else 1)))
        time.sleep(0.003 * i)
    for h, ref in zip(handles, refs):
        h.result(timeout=120)
        assert h.error is None
        for c in h.choices:
            assert c.token_ids == ref and c.finish_reason == "length"
    assert slots.backend_compiles() == c0
    assert engine.slots_used == 0


def test_seeded_sampling_is_independent_of_the_batch(served):
    engine = served["engine"]
    prompt = _prompts(2, [10])[0]
    params = RequestParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20, seed=7, n=2)
    alone = engine.submit(prompt, params).result(timeout=120)
    others = [engine.submit(p, RequestParams(max_tokens=8, temperature=t, seed=1))
              for p, t in zip(_prompts(3, [4, 20, 9]), (0.0, 1.0, 1.5))]
    again = engine.submit(prompt, params).result(timeout=120)
    for h in others:
        h.result(timeout=120)
    other_seed = engine.submit(prompt, RequestParams(
        max_tokens=12, temperature=0.9, top_p=0.8, top_k=20, seed=8)).result(timeout=120)
    a = [c.token_ids for c in alone.choices]
    assert a == [c.token_ids for c in again.choices]
    assert a[0] != a[1]  # the choices draw apart
    assert other_seed.choices[0].token_ids != a[0]


def test_penalties_and_logprobs_match_a_full_forward(served):
    """Greedy under OpenAI's penalties (logit - 1.5 * count - 0.5 * [count > 0] over the
    tokens produced) and the chosen / top-3 log-probabilities of the raw logits, against
    `model(ids)` run on the whole sequence at every step."""
    engine, forward = served["engine"], served["forward"]
    prompt = _prompts(4, [7])[0]
    h = engine.submit(prompt, RequestParams(max_tokens=10, temperature=0.0,
                                            frequency_penalty=1.5, presence_penalty=0.5,
                                            logprobs=3)).result(timeout=120)
    seq, counts = list(prompt), np.zeros(384)
    for lp in h.choices[0].logprobs:
        ids = np.zeros((1, 64), np.int32)
        ids[0, :len(seq)] = seq  # right padding: causal, so the last real position is exact
        logits = np.asarray(forward(jnp.asarray(ids)))[0, len(seq) - 1].astype(np.float64)
        tok = int(np.argmax(logits - 1.5 * counts - 0.5 * (counts > 0)))
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert lp.token_id == tok
        np.testing.assert_allclose(lp.logprob, logp[tok], atol=1e-4)
        assert [i for i, _ in lp.top] == list(np.argsort(-logp)[:3])
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(logp)[::-1][:3], atol=1e-4)
        seq.append(tok)
        counts[tok] += 1
    assert h.choices[0].token_ids == seq[len(prompt):]


def test_stop_token_ids_and_budgets(served):
    engine, gen, tok = served["engine"], served["gen"], served["tok"]
    prompt = _prompts(5, [6])[0]
    ref = _reference(gen, prompt, 12)
    stop = ref[3]
    first = ref.index(stop)
    h = engine.submit(prompt, RequestParams(max_tokens=12, temperature=0.0,
                                            stop_token_ids=(stop,))).result(timeout=120)
    c = h.choices[0]
    assert c.finish_reason == "stop" and c.token_ids == ref[:first + 1]
    assert tok.decode(prompt + ref[:first]).endswith(c.text)  # the stop token's text is not output
    h = engine.submit(prompt, RequestParams(max_tokens=1, temperature=0.0)).result(timeout=60)
    assert h.choices[0].token_ids == ref[:1] and h.choices[0].finish_reason == "length"
    for bad, param in (({"max_tokens": 60}, "max_tokens"), ({"n": 5}, "n"),
                       ({"logprobs": 6}, "logprobs")):
        with pytest.raises(RequestError) as e:
            engine.submit(prompt, RequestParams(**bad))
        assert e.value.param == param
    with pytest.raises(RequestError, match="context"):
        engine.submit(list(range(1, 65)), RequestParams())


def test_a_failing_request_leaves_the_others(served, monkeypatch):
    engine, gen = served["engine"], served["gen"]
    prompts = _prompts(6, [5, 9, 13])
    refs = [_reference(gen, p, 8) for p in prompts]
    handles = []
    real = engine._on_token

    def on_token(seq, *args):
        if seq.handle is handles[1] and seq.n == 3:
            raise RuntimeError("boom")
        return real(seq, *args)

    monkeypatch.setattr(engine, "_on_token", on_token)
    with engine._lock:  # all three listed before the engine sees any (its lock is reentrant)
        handles += [engine.submit(p, RequestParams(max_tokens=8, temperature=0.0))
                    for p in prompts]
    for h in handles:
        h.result(timeout=120)
    assert handles[1].error == "RuntimeError: boom" and len(handles[1].choices[0].token_ids) == 3
    for i in (0, 2):
        assert handles[i].error is None and handles[i].choices[0].token_ids == refs[i]
    assert engine.slots_used == 0 and engine.alive


def test_queue_bound_then_all_served(served, monkeypatch):
    engine = served["engine"]
    gate = threading.Event()
    real = engine._iteration

    def gated():
        gate.wait(30)
        real()

    monkeypatch.setattr(engine, "_iteration", gated)
    monkeypatch.setattr(engine, "max_queue", 3)
    # the free slots take their requests at once: only what is left over waits in the queue
    room = 3 + engine.max_batch - engine.slots_used
    prompts = _prompts(7, [4, 5, 6, 7] * 3)[:room + 1]
    handles = [engine.submit(p, RequestParams(max_tokens=3, temperature=0.0))
               for p in prompts[:room]]
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        engine.submit(prompts[room], RequestParams(max_tokens=3))
    with pytest.raises(RequestError, match="takes at most"):  # a list that can never fit: 400
        engine.submit_many([(prompts[0], RequestParams(max_tokens=3))] * (room + 1))
    assert engine.queue_depth == room
    gate.set()
    for h in handles:
        assert h.result(timeout=120).choices[0].finish_reason == "length"


def test_cancel_frees_the_slot_for_the_next_request(served, monkeypatch):
    """All 4 slots busy with long requests; one is cancelled; a new request is admitted and
    finishes while the other three still run (the batch is full again at once)."""
    engine = served["engine"]
    slow_engine(engine, monkeypatch, 0.02)
    long = [engine.submit(p, RequestParams(max_tokens=40, temperature=0.0))
            for p in _prompts(8, [5, 6, 7, 8])]
    wait_for(lambda: all(h.choices[0].token_ids for h in long))
    long[0].cancel()
    wait_for(lambda: long[0].finished)
    assert long[0].cancelled and engine.slots_used == 3
    late = engine.submit(_prompts(9, [4])[0], RequestParams(max_tokens=2, temperature=0.0))
    wait_for(lambda: engine.slots_used == 4 or late.finished)
    late.result(timeout=60)
    assert late.error is None and len(late.choices[0].token_ids) == 2
    assert not any(h.finished for h in long[1:])
    for h in long[1:]:
        h.cancel()
    wait_for(lambda: engine.slots_used == 0)


def test_shutdown_finishes_or_cancels_within_the_bound(served, monkeypatch):
    """A second engine on the same pool shape (the compiled steps are shared): shutdown lets
    short requests finish, cancels long ones at the bound, then refuses."""
    engine = Engine(served["gen"], served["tok"], eos_id=None, **SERVE_ENGINE)
    engine.start()
    short = engine.submit([1, 2, 3], RequestParams(max_tokens=4, temperature=0.0))
    engine.shutdown(timeout=60)
    assert short.finished and short.error is None and not engine.alive
    with pytest.raises(EngineUnavailable, match="shutting down"):
        engine.submit([1, 2, 3], RequestParams())

    engine = Engine(served["gen"], served["tok"], eos_id=None, **SERVE_ENGINE)
    slow_engine(engine, monkeypatch, 0.05)
    engine.start()
    long = engine.submit([1, 2, 3], RequestParams(max_tokens=50, temperature=0.0))
    wait_for(lambda: long.choices[0].token_ids)
    t0 = time.monotonic()
    engine.shutdown(timeout=0.2)
    assert time.monotonic() - t0 < 5
    assert long.finished and "shut down" in long.error and len(long.choices[0].token_ids) < 50


def _trace_calls(engine, monkeypatch) -> list:
    """The engine's prefill-chunk ("P") and decode ("D") dispatches, in order, as they happen."""
    calls = []
    real_prefill, real_decode = engine._prefill_chunk, engine._decode

    def prefill(job, with_decode=False):
        calls.append("M" if with_decode else "P")  # M: the chunk in the decode step's call
        return real_prefill(job, with_decode)

    def decode():
        calls.append("D")
        return real_decode()

    monkeypatch.setattr(engine, "_prefill_chunk", prefill)
    monkeypatch.setattr(engine, "_decode", decode)
    return calls


@pytest.mark.parametrize("mode", ["separate", "mixed"])
@pytest.mark.parametrize("per_step", [1, 2])
def test_a_long_prompt_interleaves_with_running_decodes(served, monkeypatch, per_step, mode):
    """While one request decodes, a prompt of 4 chunks is prefilled `prefill_chunks` chunks
    per iteration, each group followed by a decode step (the running request waits that many
    chunks at most), the group's last chunk in the decode step's call unless prefill_mode is
    "separate"; with nothing decoding, the chunks run back to back."""
    engine = served["engine"]
    monkeypatch.setattr(engine, "prefill_chunks", per_step)
    monkeypatch.setattr(engine, "prefill_mode", mode)
    calls = _trace_calls(engine, monkeypatch)
    slow_engine(engine, monkeypatch, 0.01)
    alone = engine.submit(_prompts(10, [30])[0], RequestParams(max_tokens=2, temperature=0.0))
    alone.result(timeout=60)
    assert "".join(calls).startswith("PPPP")  # 30 tokens = 4 chunks of 8, nothing to wait for
    running = engine.submit([1, 2, 3], RequestParams(max_tokens=30, temperature=0.0))
    wait_for(lambda: running.choices[0].token_ids)
    calls.clear()
    long = engine.submit(_prompts(11, [30])[0], RequestParams(max_tokens=2, temperature=0.0))
    long.result(timeout=60)
    trace = "".join(calls)
    first = next(i for i, c in enumerate(trace) if c in "PM")  # the first chunk
    expect = ("P" * per_step + "D") * (4 // per_step)  # a group of chunks, a decode step, ...
    if mode != "separate":
        expect = expect.replace("PD", "M")
    assert trace[first:first + len(expect)] == expect, trace
    running.result(timeout=60)
    assert running.error is None and len(running.choices[0].token_ids) == 30


@pytest.mark.parametrize("mode", ["separate", "mixed"])
@pytest.mark.parametrize("catch_up", [True, False])
def test_a_second_waiting_prompt_with_a_free_slot_adds_a_chunk(served, monkeypatch, catch_up,
                                                                mode):
    """prefill_catch_up: while another prompt waits with a slot free for it, an iteration
    prefills one chunk more (those slots decode nothing until their prompts are in); the last
    prompt alone goes back to prefill_chunks a step."""
    engine = served["engine"]
    monkeypatch.setattr(engine, "prefill_chunks", 1)
    monkeypatch.setattr(engine, "prefill_catch_up", catch_up)
    monkeypatch.setattr(engine, "prefill_mode", mode)
    calls = _trace_calls(engine, monkeypatch)
    slow_engine(engine, monkeypatch, 0.01)
    running = engine.submit([1, 2, 3], RequestParams(max_tokens=40, temperature=0.0))
    wait_for(lambda: running.choices[0].token_ids)
    calls.clear()
    with engine._lock:  # both queued before the engine looks (its lock is reentrant for us)
        a = engine.submit(_prompts(12, [30])[0], RequestParams(max_tokens=2, temperature=0.0))
        b = engine.submit(_prompts(13, [30])[0], RequestParams(max_tokens=2, temperature=0.0))
    a.result(timeout=60)
    b.result(timeout=60)
    trace = "".join(calls)
    first = next(i for i, c in enumerate(trace) if c in "PM")  # the first chunk
    # 30 tokens = 4 chunks of 8 each: a's two at a time while b waits, then b's one at a time
    expect = "PPDPPD" + "PD" * 4 if catch_up else "PD" * 8
    if mode != "separate":
        expect = expect.replace("PD", "M")
    assert trace[first:first + len(expect)] == expect, trace
    for h in (a, b, running):
        assert h.error is None
    running.result(timeout=60)
