"""The Mosaic TPU kernels in TPU interpret mode (CPU) against the jnp paths: flash attention
(forward and the gradients of q, k and v) against reference_attention, the decode kernel
against write_cache + decode_attention. (That the model's train step, prefill and decode step
run these kernels, and that they lower for TPU, is tests/tpu_lowering_test.py.)

Interpret mode here is pltpu.InterpretParams: VMEM, SMEM, the block pipeline and the
input/output aliasing are simulated, and a read of memory nothing wrote gives NaN. Each case
is one jit (forward and backward together), so it compiles once.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax.kernels import decode_tpu, flash_tpu
from mpt_jax.model import attention
from mpt_jax.model.alibi import alibi_slopes

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}  # relative L2 error against float32 jnp
# The interpreted kernels are large XLA:CPU programs; without LLVM's optimisations they compile
# in about half the time (and run as exactly: no fast-math here either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _segments(t):
    """Documents of lengths 1, 5, 1, 9, 1, ... (a length-1 document at position 0 and at the
    16-row block boundary), cut to t."""
    lengths = [1, 5, 1, 9] + [1, 3, 1, 7] * t
    return np.repeat(np.arange(len(lengths)), lengths)[:t].astype(np.int32)


@pytest.mark.parametrize("b,t,s,h,kvh,d,dtype,causal,alibi,seg", [
    # groups of 2 query heads, float32, head dim 64, padded lengths, length-1 documents
    pytest.param(1, 37, 37, 2, 1, 64, jnp.float32, True, True, True, id="gqa2_f32_d64_segments"),
    # MQA (one group of 4), bf16, head dim 128, two rows, not causal, no ALiBi
    pytest.param(2, 24, 24, 4, 1, 128, jnp.bfloat16, False, False, True,
                 id="mqa4_bf16_d128_noncausal"),
    # one query head per KV head; keys longer than queries (bottom-right causal and ALiBi)
    pytest.param(1, 21, 45, 2, 2, 64, jnp.bfloat16, True, True, False, id="mha_bf16_kv_longer"),
])
@pytest.mark.slow
def test_flash_matches_reference(b, t, s, h, kvh, d, dtype, causal, alibi, seg):
    ks = jax.random.split(jax.random.key(int(np.random.SeedSequence().generate_state(1)[0])), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(h)) if alibi else None, causal=causal,
              segment_ids=jnp.asarray(np.tile(_segments(t), (b, 1))) if seg else None)

    def fwd_bwd(f, *args):
        out, vjp = jax.vjp(f, *args)
        return (out, *vjp(do.astype(out.dtype)))

    got = jax.jit(lambda q, k, v: fwd_bwd(lambda q, k, v: attention.flash_attention(
        q, k, v, impl="pallas_tpu", interpret=True, block_sizes=flash_tpu.BlockSizes(16, 16),
        **kw), q, k, v), compiler_options=FAST_COMPILE)(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(lambda q, k, v: fwd_bwd(
        lambda q, k, v: attention.reference_attention(q, k, v, **kw), q, k, v))(*f32)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _rel(a, w) < TOL[dtype], (name, _rel(a, w))


def _decode_inputs(b, h, kvh, d, s, dtype, seed):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return (normal(b, 1, h, d), normal(b, 1, kvh, d), normal(b, 1, kvh, d),
            normal(b, kvh, s, d), normal(b, kvh, s, d), rng)


@pytest.mark.parametrize("h,kvh,d,dtype", [
    pytest.param(4, 2, 64, jnp.float32, id="gqa2_f32_d64"),
    pytest.param(4, 1, 128, jnp.bfloat16, id="mqa4_bf16_d128"),
])
@pytest.mark.slow
def test_decode_kernel_appends_and_matches_the_jnp_path(monkeypatch, h, kvh, d, dtype):
    """Through append_and_attend (the plan picks the kernel): rows of different lengths (the
    new token alone, a block boundary crossed, the cache full) over several slot blocks, left
    padding and holes in kv_mask, ALiBi; the caches come back with exactly the new rows
    written, everything else untouched."""
    b, s = 3, 64
    q, k_new, v_new, k_cache, v_cache, rng = _decode_inputs(b, h, kvh, d, s, dtype, seed=h + d)
    index = np.array([0, 16, 63])  # slot of each row's new token
    kv_mask = rng.random((b, s)) > 0.3
    kv_mask[:, :3] = False  # left padding
    kv_mask[np.arange(b), index] = True
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(h)), kv_mask=jnp.asarray(kv_mask))
    assert attention.plan("pallas_tpu", q.shape, kvh, s, dtype, cache=True).kernel == "decode_tpu"
    monkeypatch.setattr(decode_tpu, "BLOCK_S", 16)  # four blocks of 16 slots
    got = jax.jit(lambda *a: attention.append_and_attend(
        *a, index, impl="pallas_tpu", interpret=True, **kw), compiler_options=FAST_COMPILE)(
        q, k_new, v_new, k_cache, v_cache)
    want = jax.jit(lambda *a: attention.append_and_attend(*a, index, impl="reference", **kw))(
        q, k_new, v_new, k_cache, v_cache)
    assert got[0].dtype == dtype and got[0].shape == (b, 1, h, d)
    assert _rel(got[0], want[0]) < TOL[dtype], _rel(got[0], want[0])
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(want[2], np.float32))


@pytest.mark.slow
def test_decode_kernel_without_append():
    """The kernel alone, reading the caches as they are (k_new None): one query head per KV
    head, no ALiBi, an empty row (zeros, as the jnp path), a cache of one block that is not a
    whole sublane tile (40 slots)."""
    b, h, d, s = 2, 2, 64, 40
    q, _, _, k_cache, v_cache, _ = _decode_inputs(b, h, h, d, s, jnp.float32, seed=1)
    lens = jnp.asarray([0, 29], jnp.int32)
    got = jax.jit(lambda q, k, v: decode_tpu.decode_attention_tpu(
        q, k, v, lens, scale=d ** -0.5, interpret=True),
        compiler_options=FAST_COMPILE)(q[:, 0], k_cache, v_cache)
    want = attention.decode_attention(q, k_cache, v_cache, lens)[:, 0]
    np.testing.assert_array_equal(got[0], 0.0)
    assert _rel(got[1], want[1]) < TOL[jnp.float32]


def test_decode_plan_and_supported_shapes(monkeypatch):
    bf16 = jnp.bfloat16
    plan = lambda t, s, dtype=bf16: attention.plan(  # noqa: E731
        "pallas_tpu", (2, t, 4, 64), 2, s, dtype, cache=True).kernel
    assert plan(1, 2112) == "decode_tpu"  # a 64-slot multiple (the generator's allocation)
    assert decode_tpu.block_slots(2112, bf16) == 352  # 2112 = 6 x 352
    assert decode_tpu.block_slots(2048, bf16) == 512
    assert decode_tpu.block_slots(300, bf16) == 300  # one block: the whole cache
    assert decode_tpu.block_slots(1000, jnp.float32) == 200  # 8-row tiles
    assert decode_tpu.block_slots(1000, bf16) is None  # 1000 = 8 x 125: no 16-row block
    assert plan(1, 1000) == "reference"
    assert plan(1, 1000, jnp.float32) == "decode_tpu"
    assert plan(2, 128) == "reference"  # two new tokens a row: the jnp path
    assert plan(1, 128, jnp.int8) == "reference"  # not a float cache
    assert attention.plan("pallas_tpu", (2, 1, 4, 64), 2, 128, bf16).kernel == "flash_tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # auto on a TPU host
    assert attention.plan("auto", (2, 1, 4, 64), 2, 128, bf16, cache=True).kernel == "decode_tpu"
    assert attention.plan("auto", (2, 7, 4, 64), 2, 7, bf16).kernel == "flash_tpu"
    with pytest.raises(ValueError, match="decode kernel"):
        decode_tpu.decode_attention_tpu(jnp.ones((1, 3, 64)), jnp.ones((1, 2, 8, 64)),
                                        jnp.ones((1, 2, 8, 64)), jnp.ones((1,), jnp.int32),
                                        scale=1.0)
