"""The scoring core against transformers' MptForCausalLM: summed log-probabilities and greedy
flags of flat rows and of shared contexts (several continuations of one context), one
compilation per bucket shape and none per example, buckets."""
import random

import numpy as np
import pytest

import eval_common
from mpt_jax.eval.scoring import Request, Scorer, bucket_length, parse_mesh


def test_bucket_length():
    assert [bucket_length(n) for n in range(1, 13)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
    assert bucket_length(1000) == 1024 and bucket_length(1025) == 1536
    assert bucket_length(65536) == 65536 and bucket_length(3, 16) == 16


@pytest.fixture(scope="module")
def scorer():
    # the mesh the CLI and the lm-eval backend use, so their compilations are shared
    return Scorer(eval_common.model(), mesh=parse_mesh(None), batch_tokens=512, min_bucket=64,
                  progress=False)


def _requests(seed: int):
    """Flat rows (own contexts, 1-20 continuation tokens) and shared contexts (2-4
    continuations each, one of them the model's greedy continuation)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(5):
        ctx = tuple(int(x) for x in rng.integers(1, eval_common.VOCAB, rng.integers(1, 40)))
        reqs.append(Request(ctx, tuple(int(x) for x in rng.integers(1, eval_common.VOCAB,
                                                                     rng.integers(1, 20)))))
    for _ in range(4):
        ctx = tuple(int(x) for x in rng.integers(1, eval_common.VOCAB, rng.integers(3, 50)))
        reqs.append(Request(ctx, tuple(eval_common.hf_greedy(ctx, int(rng.integers(1, 6))))))
        for _ in range(int(rng.integers(1, 3))):
            reqs.append(Request(ctx, tuple(int(x) for x in rng.integers(
                1, eval_common.VOCAB, rng.integers(1, 8)))))
    order = list(range(len(reqs)))
    random.Random(seed).shuffle(order)
    return [reqs[i] for i in order]


@pytest.mark.slow
def test_scores_equal_transformers_without_recompiling(scorer):
    reqs = _requests(0)
    before = scorer.traces  # other tests' scorers share these compiled functions
    scores = scorer.score(reqs)
    assert sum(s.greedy for s in scores) >= 4  # the greedy continuations are recognised
    for req, sc in zip(reqs, scores):
        want, greedy = eval_common.hf_score(*req)
        assert abs(sc.logprob - want) <= 1e-4 * max(1.0, abs(want)), (req, sc.logprob, want)
        assert sc.greedy == greedy
        assert sc.token_logprobs.shape == (len(req.continuation),)
    traces = scorer.traces
    assert traces - before <= 4  # at most the flat and shared shapes, not one per example
    # other requests of the same buckets: nothing is compiled again
    more = [Request(r.context[::-1], r.continuation) for r in reqs]
    again = scorer.score(more)
    assert scorer.traces == traces
    for req, sc in zip(more[:4], again[:4]):
        assert abs(sc.logprob - eval_common.hf_score(*req)[0]) <= 1e-4 * max(1, abs(sc.logprob))


@pytest.mark.slow
def test_buckets_shrink_to_their_longest_request():
    """A ladder bucket runs at its longest member's length rounded up to 16 (65-70 tokens: 80,
    not the ladder's 96), on both paths; one shape still, and the scores are transformers'."""
    from mpt_jax.eval import scoring

    rng = np.random.default_rng(7)
    tok = lambda n: tuple(int(x) for x in rng.integers(1, eval_common.VOCAB, n))  # noqa: E731
    shared_ctx = tok(67)
    reqs = [Request(tok(int(rng.integers(62, 67))), tok(4)) for _ in range(3)]  # rows 65..69
    reqs += [Request(shared_ctx, tok(2)), Request(shared_ctx, tok(3))]
    sc = Scorer(eval_common.model(), batch_tokens=512, min_bucket=16, progress=False)
    batches = sc._plan(reqs)
    assert sorted((b.kind, b.arrays[0].shape[1]) for b in batches) == [("flat", 80),
                                                                        ("shared", 80)]
    assert scoring.bucket_length(67, 16) == 96  # what the ladder alone would have run
    for req, got in zip(reqs, sc.score(reqs)):
        want, greedy = eval_common.hf_score(*req)
        assert abs(got.logprob - want) <= 1e-4 * max(1.0, abs(want)) and got.greedy == greedy


@pytest.mark.slow
def test_shared_contexts_run_the_chunk_kernel_on_gpu():
    """On the GPU path a shared context runs as a prefill (the flash forward, its left padding
    as segment ids) and its continuations against the cache on the chunk flash kernel: the
    cache is allocated in whole key blocks of that kernel, whatever the (tight) prefix and
    suffix lengths sum to (80 + 8 here; a part block sends the call to the jnp path). Traced,
    as for a GPU (not Hopper: the Triton forward)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from conftest import pallas_kernels
    from mpt_jax import MPTConfig, MPTForCausalLM
    from mpt_jax.eval import scoring

    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=101, max_seq_len=256)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           attn_impl="pallas_gpu")
    sc = Scorer(model, batch_tokens=1024, min_bucket=16, progress=False)
    ctx = tuple(range(1, 68))
    (batch,) = sc._plan([Request(ctx, (5,)), Request(ctx, (6, 7)), Request(ctx, (8, 9, 10))])
    assert batch.kind == "shared" and batch.arrays[0].shape[1] + batch.arrays[2].shape[1] == 88
    traced = jax.jit(functools.partial(scoring._shared_impl, sc._spec)).trace(
        sc.state, *(jnp.asarray(a) for a in batch.arrays))
    assert pallas_kernels(traced.jaxpr.jaxpr) == ["alibi_flash_fwd", "alibi_chunk_fwd"]


@pytest.mark.slow
def test_shared_contexts_prefill_on_the_hopper_kernels(monkeypatch):
    """On Hopper (head dim 64) the shared contexts' prefill is the Mosaic GPU forward (which
    skips the left padding's blocks); the continuations stay on the chunk kernel. Lowered for
    CUDA on the host."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpt_jax import MPTConfig, MPTForCausalLM
    from mpt_jax.eval import scoring
    from mpt_jax.kernels import flash_mgpu

    monkeypatch.setattr(flash_mgpu, "is_hopper", lambda: True)
    cfg = MPTConfig(d_model=256, n_heads=4, n_layers=1, vocab_size=101, max_seq_len=256)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           attn_impl="pallas_gpu")
    sc = Scorer(model, batch_tokens=1024, min_bucket=16, progress=False)
    ctx = tuple(range(1, 68))
    (batch,) = sc._plan([Request(ctx, (5,)), Request(ctx, (6, 7))])
    txt = jax.jit(functools.partial(scoring._shared_impl, sc._spec)).trace(
        sc.state, *(jnp.asarray(a) for a in batch.arrays)).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [ln for ln in txt.splitlines() if "custom_call" in ln]
    assert sum("alibi_flash_fwd_mgpu" in ln for ln in calls) == 1
    assert sum("alibi_chunk_fwd" in ln for ln in calls) == 1


def test_bad_requests_are_named(scorer):
    with pytest.raises(ValueError, match="request 1: context .* need at least one token"):
        scorer.score([Request((1,), (2,)), Request((), (2,))])
    with pytest.raises(ValueError, match="request 0: token id 384 is outside"):
        scorer.score([Request((1, 384), (2,))])


@pytest.mark.slow
def test_learned_positions_model_padding_and_shared_contexts():
    """No ALiBi (llm-foundry's learned positions): rows padded up to the position table and
    shared contexts score as the model's own unpadded forward (no NaN from padding slots)."""
    import jax
    import jax.numpy as jnp

    from conftest import random_pure
    from mpt_jax import MPTConfig
    from mpt_jax.convert.convert import model_from_pure_dict
    from mpt_jax.model.config import AttnConfig

    cfg = MPTConfig(d_model=20, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=40,
                    attn_config=AttnConfig(alibi=False), learned_pos_emb=True)
    model = model_from_pure_dict(cfg, random_pure(cfg, seed=1))
    rng = np.random.default_rng(5)
    short = tuple(int(x) for x in rng.integers(0, 101, 20))  # shared: 24 + 8 slots fit 40
    ctx = tuple(int(x) for x in rng.integers(0, 101, 33))  # 48 + 8 would not: flat rows
    reqs = [Request(short, (3, 4, 5)), Request(short, (7,)), Request(ctx, (3, 4, 5)),
            Request(ctx, (7,))]
    scores = Scorer(model, batch_tokens=256, min_bucket=16, progress=False).score(reqs)
    forward = jax.jit(lambda ids: jax.nn.log_softmax(model(ids)[0], -1))
    # one unpadded forward per context: each of its continuations is a prefix of the longest
    for ctx_, longest in ((short, (3, 4, 5)), (ctx, (3, 4, 5))):
        lp = np.asarray(forward(jnp.asarray([ctx_ + longest], jnp.int32)))
        for req, sc in zip(reqs, scores):
            if req.context == ctx_:
                want = sum(float(lp[len(ctx_) - 1 + j, t])
                           for j, t in enumerate(req.continuation))
                assert np.isfinite(sc.logprob) and abs(sc.logprob - want) <= 1e-4
    with pytest.raises(ValueError, match="more than max_seq_len 40"):
        Scorer(model, progress=False).score([Request(ctx, tuple(range(10)))])
