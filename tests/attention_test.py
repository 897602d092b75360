"""flash_attention (Pallas GPU kernel in interpret mode) against the jnp reference.

Fresh random inputs every run (seeded from the OS); tolerances are relative L2 errors per dtype.
GPU-only checks skip on CPU.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax.model import attention
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.kernels import flash_gpu, flash_mgpu

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch):
    """This file tests the Triton kernels: on an H100/H200 flash_gpu would hand the calls the
    Mosaic GPU kernels take to them (tests/flash_mgpu_test.py covers those)."""
    monkeypatch.setattr(flash_mgpu, "is_hopper", lambda: False)


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # interpret mode: exact f32 dots; bf16 p @ v
GPU_TOL = {jnp.float32: 3e-3, jnp.bfloat16: 2e-2}  # tf32 dots for float32 on the GPU
SMALL = flash_gpu.BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64,
                             block_q_dq=64, block_k_dq=32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(b, t, s, h, kvh, d, dtype, seed=None):
    seed = np.random.SeedSequence(seed).generate_state(1)[0]
    ks = jax.random.split(jax.random.key(int(seed)), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    return q, k, v, do


def _segments(b, t, n, rng):
    """Sorted random document ids per row: packed documents of random lengths."""
    return jnp.asarray(np.sort(rng.integers(0, n, (b, t)), axis=1), jnp.int32)


def _fwd_bwd(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


CASES = [  # b, t, s, h, kv, d, causal, alibi, segments, dtype, blocks
    pytest.param(2, 67, 67, 4, 4, 64, True, True, False, jnp.float32, SMALL, id="odd_len_alibi"),
    pytest.param(2, 128, 128, 4, 2, 64, True, True, True, jnp.float32, SMALL, id="gqa_segments"),
    pytest.param(2, 67, 67, 6, 3, 64, False, True, False, jnp.float32, SMALL,
                 id="noncausal_h6_gqa_odd"),
    pytest.param(1, 16, 100, 4, 1, 64, True, True, False, jnp.float32, SMALL, id="mqa_s_gt_t"),
    pytest.param(2, 67, 67, 4, 4, 64, True, False, True, jnp.bfloat16, SMALL,
                 id="bf16_noalibi_seg"),
    pytest.param(1, 96, 96, 2, 2, 128, True, True, False, jnp.bfloat16, SMALL, id="bf16_d128"),
]


@pytest.mark.parametrize("b,t,s,h,kvh,d,causal,use_alibi,use_seg,dtype,blocks", CASES)
@pytest.mark.slow
def test_pallas_gpu_matches_reference(b, t, s, h, kvh, d, causal, use_alibi, use_seg, dtype,
                                      blocks):
    rng = np.random.default_rng()
    q, k, v, do = _inputs(b, t, s, h, kvh, d, dtype)
    slopes = jnp.asarray(alibi_slopes(h)) if use_alibi else None
    seg = _segments(b, t, 3, rng) if use_seg else None
    kw = dict(alibi_slopes=slopes, causal=causal, segment_ids=seg)
    ours = jax.jit(lambda q, k, v, do: _fwd_bwd(
        lambda q, k, v: attention.flash_attention(
            q, k, v, impl="pallas_gpu", interpret=True, block_sizes=blocks, **kw), q, k, v, do))
    ref = jax.jit(lambda q, k, v, do: _fwd_bwd(
        lambda q, k, v: attention.reference_attention(q, k, v, **kw), q, k, v, do))
    got, want = ours(q, k, v, do), ref(q, k, v, do)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == w.shape and a.dtype == w.dtype, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _rel(a, w) < TOL[dtype], (name, _rel(a, w))


@pytest.mark.slow
def test_every_output_element_written():
    """Outputs start as NaN (aliased poisoned buffers); every element must be overwritten."""
    q, k, v, do = _inputs(2, 67, 67, 4, 2, 64, jnp.float32)
    slopes = jnp.asarray(alibi_slopes(4))
    seg = _segments(2, 67, 2, np.random.default_rng())
    fn = lambda q, k, v: flash_gpu.flash_attention_gpu(  # noqa: E731
        q, k, v, slopes, q_segment_ids=seg, kv_segment_ids=seg, block_sizes=SMALL,
        interpret=True, _poison=True)
    got = jax.jit(lambda *a: _fwd_bwd(fn, *a))(q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: attention.reference_attention(
        q, k, v, alibi_slopes=slopes, segment_ids=seg), q, k, v, do)
    for a, w in zip(got, want):
        assert np.isfinite(np.asarray(a)).all()
        assert _rel(a, w) < TOL[jnp.float32]


@pytest.mark.slow
def test_rows_without_visible_keys_are_zero():
    """Queries whose document has no key (non-causal, disjoint ids): output 0, gradient 0."""
    q, k, v, do = _inputs(1, 40, 40, 2, 2, 64, jnp.float32)
    qseg = jnp.asarray(np.r_[np.zeros(20), np.full(20, 7)][None], jnp.int32)
    kvseg = jnp.zeros((1, 40), jnp.int32)
    kw = dict(causal=False, kv_segment_ids=kvseg)
    slopes = jnp.asarray(alibi_slopes(2))
    got = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: flash_gpu.flash_attention_gpu(
        q, k, v, slopes, q_segment_ids=qseg, block_sizes=SMALL, interpret=True, **kw), *a))(
        q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: attention.reference_attention(
        q, k, v, alibi_slopes=slopes, segment_ids=qseg, **kw), q, k, v, do)
    assert np.all(np.asarray(got[0])[:, 20:] == 0)
    assert np.all(np.asarray(got[1])[:, 20:] == 0)
    for a, w in zip(got, want):
        assert _rel(a, w) < TOL[jnp.float32]


def test_slopes_non_power_of_two_heads():
    """llm-foundry's gen_slopes for H=6: n=8, slopes 2^-(1..8), interleaved odd-first, cut."""
    full = [2.0 ** -(i + 1) for i in range(8)]
    want = (full[1::2] + full[::2])[:6]
    np.testing.assert_allclose(alibi_slopes(6), want, rtol=0)
    assert alibi_slopes(6).dtype == np.float32


@pytest.mark.slow
def test_dispatch():
    q, k, v, _ = _inputs(1, 24, 24, 2, 2, 64, jnp.float32)
    if jax.default_backend() == "cpu":
        assert attention._default_impl() == "reference"
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention.flash_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="segment_ids need S == T"):
        attention.flash_attention(q[:, :8], k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
    auto = attention.flash_attention(q, k, v, alibi_slopes=jnp.asarray(alibi_slopes(2)))
    ref = attention.reference_attention(q, k, v, alibi_slopes=jnp.asarray(alibi_slopes(2)))
    assert _rel(auto, ref) < 1e-6


def test_plan_picks_the_kernel_and_layout():
    """attention.plan without a mesh (the Hopper choice: flash_mgpu_test): each impl's kernel,
    the packed layout only where the kernel needs no padding, the decode kernel only for one
    new token a row against a cache of whole blocks, the chunk kernel for several against a
    float cache of whole blocks; nothing split."""
    bf16 = jnp.bfloat16

    def plan(impl, q_shape=(2, 128, 4, 64), kvh=4, s=128, **kw):
        return attention.plan(impl, q_shape, kvh, s, bf16, **kw)

    assert attention.plan("auto", (2, 8, 4, 16), 4, 8, bf16) == attention.Plan(
        "reference" if jax.default_backend() == "cpu" else "flash_gpu")
    assert plan("reference", packed=True) == attention.Plan("reference")
    assert plan("pallas_tpu", packed=True) == attention.Plan("flash_tpu")
    assert plan("pallas_triton", packed=True) == attention.Plan("flash_gpu", packed=True)
    assert plan("pallas_gpu", packed=True) == attention.Plan("flash_gpu", packed=True)
    assert plan("pallas_triton") == attention.Plan("flash_gpu")  # no fused projection given
    assert not plan("pallas_gpu", (2, 100, 4, 64), s=100, packed=True).packed  # T padded
    assert not plan("pallas_gpu", (2, 128, 4, 40), packed=True).packed  # D padded
    decode = attention.Plan("decode_gpu", packed=True)
    assert plan("pallas_triton", (2, 1, 4, 64), s=128, cache=True, packed=True) == decode
    assert plan("pallas_gpu", (2, 1, 4, 64), 2, 128, cache=True) == attention.Plan("decode_gpu")
    chunk = attention.Plan("chunk_gpu")  # several new tokens: the chunk flash kernel
    assert plan("pallas_gpu", (2, 2, 4, 64), s=128, cache=True) == chunk
    assert plan("pallas_triton", (1, 256, 4, 64), 2, 2048, cache=True, packed=True) == chunk
    assert plan("pallas_gpu", (2, 2, 4, 64), s=100, cache=True) == attention.Plan("reference")
    assert attention.plan("pallas_gpu", (2, 2, 4, 64), 4, 128, jnp.int8,
                          cache=True) == attention.Plan("reference")  # an int8 cache
    assert plan("pallas_gpu", (2, 1, 4, 64), s=100, cache=True) == attention.Plan("reference")
    assert plan("pallas_tpu", (2, 1, 4, 64), s=128, cache=True) == attention.Plan("decode_tpu")
    assert plan("pallas_tpu", (2, 2, 4, 64), s=128, cache=True) == attention.Plan("reference")
    assert plan("reference", (2, 1, 4, 64), s=128, cache=True) == attention.Plan("reference")
    with pytest.raises(ValueError, match="unknown attention impl 'cuda'"):
        plan("cuda")


@pytest.mark.slow
def test_decode_attention_matches_reference():
    """Few new rows against a partly filled cache, per-sequence lengths."""
    b, t, smax, h, kvh, d = 2, 2, 50, 4, 2, 64
    q, k, v, _ = _inputs(b, t, smax, h, kvh, d, jnp.float32)
    slopes = jnp.asarray(alibi_slopes(h))
    lens = np.array([17, 50])
    got = attention.decode_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(lens),
                                     alibi_slopes=slopes)
    for i, n in enumerate(lens):
        want = attention.reference_attention(
            q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], alibi_slopes=slopes)
        assert _rel(got[i:i + 1], want) < 1e-6


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: compiles the Triton kernels for real")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_compiled(dtype):
    rng = np.random.default_rng()
    q, k, v, do = _inputs(2, 1000, 1000, 8, 2, 128, dtype)
    slopes = jnp.asarray(alibi_slopes(8))
    seg = _segments(2, 1000, 3, rng)
    kw = dict(alibi_slopes=slopes, segment_ids=seg)
    got = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: attention.flash_attention(
        q, k, v, impl="pallas_gpu", **kw), *a))(q, k, v, do)
    want = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: attention.reference_attention(
        q, k, v, **kw), *a))(q, k, v, do)
    for a, w in zip(got, want):
        assert _rel(a, w) < GPU_TOL[dtype]


def test_block_sizes_are_hashable_config():
    bs = dataclasses.replace(flash_gpu.BlockSizes(), block_q=32)
    assert hash(bs) != hash(flash_gpu.BlockSizes())


def _live_forward_kernels(policy) -> int:
    """Forward-kernel launches whose results are used, in the CUDA lowering (no GPU needed) of
    the gradient of a rematerialised layer; XLA deletes unused custom calls."""
    import re

    def layer(q):
        o = flash_gpu.flash_attention_gpu(q * 2, q, q, jnp.ones((2,), jnp.float32))
        return jnp.tanh(o.astype(jnp.float32))

    loss = lambda q: jnp.sum(jax.checkpoint(layer, policy=policy)(q) ** 2)  # noqa: E731
    q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
    txt = jax.jit(jax.grad(loss)).trace(q).lower(lowering_platforms=("cuda",)).as_text()
    lines = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln and "alibi_flash_fwd" in ln]
    ids = [re.match(r"\s*(%\w+)", ln).group(1) for ln in lines]
    return sum(1 for i in ids if re.search(re.escape(i) + r"#", txt))


def test_remat_policies_keep_the_attention_forward():
    """The model's remat policies save the kernel's named residuals, so the backward pass does
    not rerun the forward kernel; the bare dots policy does (the check can fail)."""
    from mpt_jax.model import REMAT_POLICIES

    assert _live_forward_kernels(REMAT_POLICIES["dots_no_batch"]) == 1
    assert _live_forward_kernels(REMAT_POLICIES["dots_act"]) == 1
    assert _live_forward_kernels(jax.checkpoint_policies.dots_with_no_batch_dims_saveable) == 2


@pytest.mark.parametrize("h,kvh,t,d,segments", [
    (4, 4, 64, 32, False),  # MHA: K and V heads sit H and 2H heads into the packed array
    (4, 2, 64, 32, True),   # GQA, packed documents
    (6, 1, 64, 16, False),  # MQA, 6 heads (non power-of-two slopes and packed width)
    (4, 4, 40, 32, False),  # T not a multiple of the blocks: the plan slices q, k, v
])
@pytest.mark.slow
def test_packed_qkv_matches_reference(h, kvh, t, d, segments):
    """The packed kernels read q/k/v from the fused projection in place (interpret mode) and
    return the gradient as one array: forward and gradient equal the reference on fresh random
    inputs; outputs start as NaN buffers, so any element left unwritten shows. Where they need
    padding they refuse, and the public entry slices instead."""
    rng = np.random.default_rng()
    b = 2
    qkv = jnp.asarray(rng.normal(size=(b, t, (h + 2 * kvh) * d)), jnp.float32)
    slopes = jnp.asarray(alibi_slopes(h))
    seg = (jnp.asarray(np.repeat(np.arange(2), t // 2)[None].repeat(b, 0), jnp.int32)
           if segments else None)

    def ref(x):
        q, k, v = jnp.split(x, [h * d, (h + kvh) * d], axis=-1)
        return attention.reference_attention(
            q.reshape(b, t, h, d), k.reshape(b, t, kvh, d), v.reshape(b, t, kvh, d),
            alibi_slopes=slopes, segment_ids=seg)

    def ker(x):
        return flash_gpu.flash_attention_gpu_packed(x, h, kvh, slopes, segment_ids=seg,
                                                    interpret=True, _poison=True)

    def public(x, impl="pallas_triton", interpret=True):
        return attention.flash_attention_packed(x, h, kvh, alibi_slopes=slopes, segment_ids=seg,
                                                impl=impl, interpret=interpret)

    ct = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    want = jax.grad(lambda x: jnp.sum(ref(x) * ct))(qkv)
    takes = flash_gpu.takes_packed(t, d, qkv.dtype)
    assert takes == (t % 64 == 0)
    fn = ker if takes else public
    out = jax.jit(fn)(qkv)
    assert _rel(out, ref(qkv)) < 1e-5
    got = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * ct)))(qkv)
    assert got.shape == qkv.shape and _rel(got, want) < 1e-5
    if takes:  # the public entry runs that same kernel
        np.testing.assert_array_equal(jax.jit(public)(qkv), out)
    else:
        with pytest.raises(ValueError, match=f"T={t}, D={d}"):
            ker(qkv)
    # the public entry with the auto impl (on this CPU: the sliced reference) agrees
    assert _rel(public(qkv, impl="auto", interpret=False), ref(qkv)) < 1e-6
    # the CUDA lowering of the gradient: three kernels, and no slice or concatenate of q/k/v
    # (the sliced layout slices and concatenates)
    txt = jax.jit(jax.grad(lambda x: jnp.sum(public(x, interpret=False) * ct))).trace(
        qkv).lower(lowering_platforms=("cuda",)).as_text()
    assert txt.count("xla.gpu.triton") == 3
    copies = txt.count("stablehlo.concatenate") + txt.count("stablehlo.slice")
    assert (copies == 0) == (t % 64 == 0), copies


def test_packed_qkv_keeps_the_remat_names():
    import re

    from mpt_jax.model import REMAT_POLICIES

    def layer(x):
        return jnp.tanh(flash_gpu.flash_attention_gpu_packed(x * 2, 2, 2, jnp.ones((2,)))
                        .astype(jnp.float32))

    x = jnp.ones((1, 128, 6 * 64), jnp.bfloat16)
    for policy, want in ((REMAT_POLICIES["dots_no_batch"], 1),
                         (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, 2)):
        loss = lambda x: jnp.sum(jax.checkpoint(layer, policy=policy)(x) ** 2)  # noqa: E731
        txt = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        ids = [re.match(r"\s*(%\w+)", ln).group(1) for ln in txt.splitlines()
               if "xla.gpu.triton" in ln and "alibi_flash_fwd" in ln]
        assert sum(1 for i in ids if re.search(re.escape(i) + r"#", txt)) == want, policy


@pytest.mark.parametrize("b,h,kvh,s,d,dtype", [
    (3, 4, 4, 128, 32, jnp.float32),   # MHA, several blocks
    (2, 8, 2, 192, 64, jnp.float32),   # GQA (4 query heads a KV head)
    (2, 6, 1, 64, 128, jnp.bfloat16),  # MQA, 6 heads (slopes of a non power of two)
])
@pytest.mark.slow
def test_decode_kernel_matches_jnp_path(b, h, kvh, s, d, dtype):
    """The Pallas decode kernel (interpret mode) against the jnp cache path on fresh random
    inputs: per-row lengths, a left-padding mask, ALiBi; a row whose visible slots are all
    masked returns zeros."""
    rng = np.random.default_rng()
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kvh, s, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kvh, s, d)), dtype)
    lens = rng.integers(1, s + 1, (b,)).astype(np.int32)
    lens[0] = s
    mask = rng.random((b, s)) > 0.2
    mask[-1, : lens[-1]] = False  # nothing visible in the last row
    slopes = jnp.asarray(alibi_slopes(h))
    kw = dict(alibi_slopes=slopes, kv_mask=jnp.asarray(mask))
    from mpt_jax.kernels import decode_gpu

    want = attention.decode_attention(q, k, v, jnp.asarray(lens), **kw)
    got = decode_gpu.decode_attention_gpu(q[:, 0], k, v, jnp.asarray(lens), jnp.asarray(mask),
                                          slopes, scale=d ** -0.5, interpret=True)[:, None]
    assert got.shape == want.shape and got.dtype == dtype
    assert _rel(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2)
    assert float(jnp.max(jnp.abs(got[-1].astype(jnp.float32)))) == 0.0
    for splits in (1, 2, 5):  # one program per (row, head), and split slots (flash-decoding)
        split = decode_gpu.decode_attention_gpu(
            q[:, 0], k, v, jnp.asarray(lens), jnp.asarray(mask), slopes, scale=d ** -0.5,
            splits=splits, interpret=True)
        assert _rel(split, want[:, 0]) < (1e-5 if dtype == jnp.float32 else 1e-2)
    no_alibi = decode_gpu.decode_attention_gpu(q[:, 0], k, v, jnp.asarray(lens),
                                               scale=d ** -0.5, interpret=True)[:, None]
    assert _rel(no_alibi, attention.decode_attention(q, k, v, jnp.asarray(lens))) < 1e-2


def test_decode_kernel_long_cache_knobs(monkeypatch):
    """Caches of LONG_SLOTS positions or more take the long-cache block and target programs
    (decode_gpu.knobs), others the short ones; alloc_slots rounds to the block that length
    takes; the kernel under the long knobs (LONG_SLOTS lowered, interpret) equals the jnp
    path."""
    from mpt_jax.kernels import decode_gpu

    long_ = decode_gpu.LONG_SLOTS
    short_knobs = (decode_gpu.BLOCK_S, decode_gpu.TARGET_PROGRAMS)
    long_knobs = (decode_gpu.LONG_BLOCK_S, decode_gpu.LONG_TARGET_PROGRAMS)
    assert short_knobs != long_knobs
    assert decode_gpu.knobs(384) == short_knobs
    assert decode_gpu.knobs(decode_gpu.alloc_slots(65536 + 32)) == long_knobs
    assert decode_gpu.alloc_slots(65536 + 32) % decode_gpu.LONG_BLOCK_S == 0
    assert decode_gpu.alloc_slots(300) == -(-300 // decode_gpu.BLOCK_S) * decode_gpu.BLOCK_S
    odd = long_ + decode_gpu.BLOCK_S  # long, but not whole long blocks: the short knobs
    assert odd % decode_gpu.LONG_BLOCK_S and decode_gpu.knobs(odd) == short_knobs
    monkeypatch.setattr(decode_gpu, "LONG_SLOTS", 256)
    rng = np.random.default_rng()
    b, h, kvh, s, d = 1, 4, 2, 256, 16
    assert decode_gpu.knobs(s) == long_knobs
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    lens = jnp.asarray([200], jnp.int32)
    slopes = jnp.asarray(alibi_slopes(h))
    want = attention.decode_attention(q, k, v, lens, alibi_slopes=slopes)
    got = decode_gpu.decode_attention_gpu(q[:, 0], k, v, lens, None, slopes, scale=d ** -0.5,
                                          interpret=True)[:, None]
    assert _rel(got, want) < 1e-5


@pytest.mark.slow
def test_decode_kernel_lowers_for_cuda():
    """The kernel's Pallas-to-Triton lowering runs on CPU (compiling it needs a GPU)."""
    from mpt_jax.kernels import decode_gpu

    q = jax.ShapeDtypeStruct((16, 32, 128), jnp.bfloat16)
    c = jax.ShapeDtypeStruct((16, 32, 384, 128), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((16,), jnp.int32)
    mask = jax.ShapeDtypeStruct((16, 384), jnp.bool_)
    sl = jax.ShapeDtypeStruct((32,), jnp.float32)
    row = jax.ShapeDtypeStruct((16, 32, 128), jnp.bfloat16)
    for splits in (1, 6):
        fn = lambda *a, n=splits: decode_gpu.decode_attention_gpu(  # noqa: E731
            *a, scale=0.088, splits=n)
        txt = jax.jit(fn).trace(q, c, c, lens, mask, sl).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in txt and "alibi_decode" in txt
        fn = lambda q, c1, c2, lens, mask, sl, kn, vn, n=splits: (  # noqa: E731
            decode_gpu.decode_attention_gpu(q, c1, c2, lens, mask, sl, k_new=kn, v_new=vn,
                                            scale=0.088, splits=n))
        txt = jax.jit(fn).trace(q, c, c, lens, mask, sl, row, row).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in txt and "alibi_decode" in txt
        packed = jax.ShapeDtypeStruct((16, 96 * 128), jnp.bfloat16)
        fn = lambda qkv, c1, c2, lens, mask, sl, n=splits: (  # noqa: E731
            decode_gpu.decode_attention_gpu(None, c1, c2, lens, mask, sl, qkv=qkv,
                                            scale=0.088, splits=n))
        txt = jax.jit(fn).trace(packed, c, c, lens, mask, sl).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in txt and "alibi_decode" in txt


def _assert_same_append(got, want):
    """append_and_attend's (out, k_cache, v_cache) against the jnp path's: the output within
    1e-5, the caches written identically."""
    assert _rel(got[0], want[0]) < 1e-5
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("s,splits_hint", [(128, "one"), (192, "split")])
@pytest.mark.slow
def test_append_and_attend_kernel_writes_the_cache(s, splits_hint):
    """The decode kernel's append mode (interpret): the new row lands in both caches at
    cache_index, nothing else changes, and the output equals the jnp update-then-attend path."""
    rng = np.random.default_rng()
    b, h, kvh, d = (1, 8, 8, 32) if splits_hint == "split" else (16, 4, 2, 32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(b, 1, kvh, d)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(b, 1, kvh, d)), jnp.float32)
    kc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    idx = jnp.int32(int(rng.integers(0, s)))
    mask = jnp.asarray(rng.random((b, s)) > 0.1).at[:, idx].set(True)
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(h)), kv_mask=mask)
    want = attention.append_and_attend(q, k_new, v_new, kc, vc, idx, impl="reference", **kw)
    got = attention.append_and_attend(q, k_new, v_new, kc, vc, idx, impl="pallas_gpu",
                                      interpret=True, **kw)
    _assert_same_append(got, want)
    # the same from the fused projection, read in place by the kernel
    qkv = jnp.concatenate([q.reshape(b, 1, h * d), k_new.reshape(b, 1, kvh * d),
                           v_new.reshape(b, 1, kvh * d)], axis=-1)
    packed = attention.append_and_attend(q, k_new, v_new, kc, vc, idx, impl="pallas_gpu",
                                         interpret=True, qkv=qkv, **kw)
    _assert_same_append(packed, want)
    assert not np.array_equal(np.asarray(got[1]), np.asarray(kc))  # the row was written
    from mpt_jax.kernels import decode_gpu

    one = decode_gpu.decode_attention_gpu(  # a single program per (row, head)
        q[:, 0], kc, vc, jnp.full((b,), idx + 1, jnp.int32), mask, kw["alibi_slopes"],
        k_new=k_new[:, 0], v_new=v_new[:, 0], scale=d ** -0.5, splits=1, interpret=True)
    assert _rel(one[0], want[0][:, 0]) < 1e-5
    np.testing.assert_array_equal(one[1], want[1])
    np.testing.assert_array_equal(one[2], want[2])


@pytest.mark.parametrize("b,t,h,kvh,d,s,dtype", [
    (3, 20, 4, 2, 32, 128, jnp.float32),  # T padded to the block inside, GQA
    (2, 64, 4, 1, 16, 192, jnp.float32),  # MQA, several key blocks
    (2, 32, 2, 2, 64, 128, jnp.bfloat16),
])
def test_chunk_kernel_matches_jnp_path(b, t, h, kvh, d, s, dtype):
    """flash_gpu.chunk_attention_gpu (interpret, outputs poisoned) against the jnp path
    (decode_attention): each row's chunk at its own start, anywhere in the cache (at 0, at the
    end), ALiBi on and off, with and without a kv_mask (left padding; bool or integer)."""
    from mpt_jax.kernels import flash_gpu

    rng = np.random.default_rng()
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    kc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), dtype)
    vc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), dtype)
    start = np.concatenate([[0, s - t], rng.integers(0, s - t + 1, b)])[:b].astype(np.int32)
    mask = jnp.asarray(rng.random((b, s)) > 0.3)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for kv_mask in (None, mask, mask.astype(jnp.int32) * 2):  # (any nonzero entry: visible)
        for slopes in (None, jnp.asarray(alibi_slopes(h))):
            want = attention.decode_attention(q, kc, vc, jnp.asarray(start) + t,
                                              alibi_slopes=slopes, kv_mask=kv_mask)
            got = flash_gpu.chunk_attention_gpu(q, kc, vc, jnp.asarray(start), slopes, kv_mask,
                                                interpret=True, _poison=True)
            assert got.dtype == dtype and not bool(jnp.isnan(got).any())
            assert _rel(got, want) < tol, (kv_mask is None, slopes is None)
    with pytest.raises(ValueError, match="not supported"):
        flash_gpu.chunk_attention_gpu(q, kc[:, :, :s - 8], vc[:, :, :s - 8], 0, interpret=True)


@pytest.mark.slow
def test_append_and_attend_chunk_kernel():
    """A chunk through append_and_attend on a GPU impl (interpret): the chunk kernel writes
    the same caches and attends as the jnp update-then-attend path, for a scalar and a
    per-row cache_index."""
    rng = np.random.default_rng()
    b, t, h, kvh, d, s = 2, 16, 4, 2, 32, 128
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    kc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    assert attention.plan("pallas_gpu", q.shape, kvh, s, jnp.float32, cache=True,
                          interpret=True).kernel == "chunk_gpu"
    for idx in (jnp.int32(37), jnp.asarray([0, s - t], jnp.int32)):
        kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(h)))
        want = attention.append_and_attend(q, k_new, v_new, kc, vc, idx, impl="reference", **kw)
        got = attention.append_and_attend(q, k_new, v_new, kc, vc, idx, impl="pallas_gpu",
                                          interpret=True, **kw)
        _assert_same_append(got, want)


@pytest.mark.slow
def test_chunk_kernel_lowers_for_cuda():
    """The chunk kernel's Pallas-to-Triton lowering on CPU, at the serving engine's shapes
    (one slot's 256-token chunk against a 2048-position span of MPT-7B's cache)."""
    from mpt_jax.kernels import flash_gpu

    q = jax.ShapeDtypeStruct((1, 256, 32, 128), jnp.bfloat16)
    c = jax.ShapeDtypeStruct((1, 32, 2048, 128), jnp.bfloat16)
    sl = jax.ShapeDtypeStruct((32,), jnp.float32)
    fn = lambda q, k, v, start, sl: flash_gpu.chunk_attention_gpu(  # noqa: E731
        q, k, v, start, sl)
    txt = jax.jit(fn).trace(q, c, c, jnp.int32(300), sl).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in txt and "alibi_chunk_fwd" in txt


@pytest.mark.slow
def test_row_arguments_of_the_wrong_shape_and_cache_overflow_are_errors():
    """segment_ids / kv_mask must be exactly [B, T] / [B, S] (the kernels would pad a short one
    into a fake document); a concrete cache_index past the cache is refused (the slice would
    clamp it and overwrite earlier slots)."""
    q = jnp.ones((2, 16, 4, 16), jnp.float32)
    seg = jnp.zeros((2, 15), jnp.int32)
    for impl in ("reference", "pallas_gpu", "pallas_tpu"):
        with pytest.raises(ValueError, match=r"segment_ids must be \[2, 16\]"):
            attention.flash_attention(q, q, q, segment_ids=seg, impl=impl, interpret=True)
    with pytest.raises(ValueError, match=r"segment_ids must be \[2, 16\]"):
        attention.flash_attention_packed(jnp.ones((2, 16, 3 * 64)), 4, 4, segment_ids=seg,
                                         impl="pallas_gpu", interpret=True)
    kc = jnp.zeros((2, 4, 64, 16), jnp.float32)
    q1, new = q[:, :1], jnp.ones((2, 1, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"kv_mask must be \[2, 64\]"):
        attention.decode_attention(q1, kc, kc, 3, kv_mask=jnp.ones((2, 40), bool))
    for impl in ("reference", "pallas_gpu", "pallas_tpu"):
        with pytest.raises(ValueError, match=r"kv_mask must be \[2, 64\]"):
            attention.append_and_attend(q1, new, new, kc, kc, 3, kv_mask=jnp.ones((2, 40), bool),
                                        impl=impl, interpret=True)
        with pytest.raises(ValueError, match="cache_index 64 with 1 new token"):
            attention.append_and_attend(q1, new, new, kc, kc, 64, impl=impl, interpret=True)
    out, k2, _ = attention.append_and_attend(q1, new, new, kc, kc, 63, impl="reference")
    assert float(k2[0, 0, 63, 0]) == 1.0 and out.shape == q1.shape  # the last slot fits


@pytest.mark.slow
def test_bf16_cache_decode_runs_on_cpu():
    """The jnp KV-cache path with a bf16 cache and several rows (generate.py's default dtype):
    XLA:CPU runs it, and it equals the float32 computation on the same bf16 values."""
    rng = np.random.default_rng()
    q = jnp.asarray(rng.normal(size=(3, 2, 4, 16)), jnp.bfloat16)
    kc = jnp.asarray(rng.normal(size=(3, 2, 32, 16)), jnp.bfloat16)
    vc = jnp.asarray(rng.normal(size=(3, 2, 32, 16)), jnp.bfloat16)
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(4)))
    got = attention.decode_attention(q, kc, vc, jnp.asarray([32, 20, 9]), **kw)
    want = attention.decode_attention(*(x.astype(jnp.float32) for x in (q, kc, vc)),
                                      jnp.asarray([32, 20, 9]), **kw)
    assert got.dtype == jnp.bfloat16 and _rel(got, want) < 1e-2


@pytest.mark.slow
def test_gpu_kernels_trace_with_x64_enabled():
    """jax_enable_x64 on (Python ints become int64): the Triton kernels (interpret mode) still
    trace, forward, backward and decode, and agree with the reference."""
    with jax.enable_x64(True):
        q, k, v, do = _inputs(1, 40, 40, 2, 2, 16, jnp.float32)
        slopes = jnp.asarray(alibi_slopes(2), jnp.float32)
        ours = _fwd_bwd(lambda q, k, v: attention.flash_attention(
            q, k, v, alibi_slopes=slopes, impl="pallas_gpu", interpret=True, block_sizes=SMALL),
            q, k, v, do)
        ref = _fwd_bwd(lambda q, k, v: attention.reference_attention(
            q, k, v, alibi_slopes=slopes), q, k, v, do)
        for a, w in zip(ours, ref):
            assert _rel(a, w) < TOL[jnp.float32]
        from mpt_jax.kernels import decode_gpu

        kc = jnp.pad(k.swapaxes(1, 2), ((0, 0), (0, 0), (0, 24), (0, 0)))  # 64 slots, 40 full
        got = decode_gpu.decode_attention_gpu(q[:, -1], kc, kc, jnp.asarray([40], jnp.int32),
                                              None, slopes, scale=0.25, interpret=True)
        want = attention.decode_attention(q[:, -1:], kc, kc, 40, alibi_slopes=slopes,
                                          softmax_scale=0.25)
        assert _rel(got, want[:, 0]) < 1e-5
