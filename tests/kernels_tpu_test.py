"""Mosaic TPU flash attention in TPU interpret mode (CPU) against the jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax.model import attention
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.kernels import flash_tpu

TOL = 2e-5  # float32, interpret mode


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("b,t,h,kvh,causal,use_seg", [
    pytest.param(1, 67, 4, 2, True, False, id="causal_gqa_odd_len"),
    pytest.param(1, 40, 2, 1, False, True, id="noncausal_mqa_segments"),
])
def test_pallas_tpu_matches_reference(b, t, h, kvh, causal, use_seg):
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, 64))
    k = jax.random.normal(ks[1], (b, t, kvh, 64))
    v = jax.random.normal(ks[2], (b, t, kvh, 64))
    do = jax.random.normal(ks[3], (b, t, h, 64))
    seg = None
    if use_seg:
        seg = jnp.asarray(np.sort(np.random.default_rng().integers(0, 3, (b, t)), 1), jnp.int32)
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(h)), causal=causal, segment_ids=seg)

    def ours(q, k, v):
        return attention.flash_attention(q, k, v, impl="pallas_tpu", interpret=True,
                                         block_sizes=flash_tpu.BlockSizes(32, 32), **kw)

    out, vjp = jax.vjp(ours, q, k, v)
    got = (out, *vjp(do))
    out, vjp = jax.vjp(lambda q, k, v: attention.reference_attention(q, k, v, **kw), q, k, v)
    want = (out, *vjp(do))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a)).all(), name
        assert _rel(a, w) < TOL, (name, _rel(a, w))
