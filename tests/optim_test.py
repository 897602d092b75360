"""decoupled_lion / decoupled_adamw against numpy transcriptions of llm-foundry's DecoupledLionW
and Composer's DecoupledAdamW, over several steps with a changing schedule; schedules; masks."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mpt_jax.train import optim


def _np_lion(params, grads_seq, lr, b1, b2, wd, fs):
    """DecoupledLionW.step as llm-foundry writes it (lr_t = lr * f, decay_factor = f)."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    for g, f in zip(grads_seq, fs):
        for k in p:
            p[k] *= 1 - f * wd
            u = np.sign(b1 * m[k] + (1 - b1) * g[k])
            p[k] += -(lr * f) * u
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return p


def _np_adamw(params, grads_seq, lr, b1, b2, eps, wd, fs):
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for t, (g, f) in enumerate(zip(grads_seq, fs), start=1):
        for k in p:
            lr_t = lr * f
            p[k] *= 1 - f * wd
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v2[k]) / math.sqrt(1 - b2**t) + eps
            p[k] -= lr_t / (1 - b1**t) * m[k] / denom
    return p


def _problem(seed=0, steps=7):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(5, 3)).astype(np.float32),
              "b": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


def _run(tx, params, grads):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return p


def test_decoupled_lion_matches_numpy_with_changing_schedule():
    params, grads = _problem()
    lr, wd = 3e-2, 0.1
    sched = optim.warmup_schedule("cosine", warmup_steps=2, max_steps=6, alpha_f=0.1)
    fs = [float(sched(i)) for i in range(len(grads))]
    assert len(set(fs)) > 4  # the multiplier really changes (warmup, decay, floor)
    got = _run(optim.decoupled_lion(lr, b1=0.9, b2=0.99, weight_decay=wd, schedule=sched),
               params, grads)
    want = _np_lion(params, grads, lr, 0.9, 0.99, wd, fs)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-6)


def test_decoupled_lion_equals_optax_lion_with_rescaled_decay():
    params, grads = _problem(1)
    lr, wd = 1e-2, 0.05
    got = _run(optim.decoupled_lion(lr, weight_decay=wd), params, grads)
    ref = _run(optax.lion(lr, b1=0.9, b2=0.99, weight_decay=wd / lr), params, grads)
    for k in got:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5,
                                   atol=1e-6)


def test_decoupled_adamw_matches_numpy():
    params, grads = _problem(2)
    sched = optim.warmup_schedule("linear", warmup_steps=1, max_steps=5, alpha_f=0.2)
    fs = [float(sched(i)) for i in range(len(grads))]
    got = _run(optim.decoupled_adamw(1e-2, weight_decay=1e-3, schedule=sched), params, grads)
    want = _np_adamw(params, grads, 1e-2, 0.9, 0.95, 1e-8, 1e-3, fs)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-6)


def test_schedules_follow_composer():
    cos = optim.warmup_schedule("cosine", warmup_steps=10, max_steps=110, alpha_f=0.1)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.55)
    assert float(cos(110)) == pytest.approx(0.1) and float(cos(500)) == pytest.approx(0.1)
    lin = optim.warmup_schedule("linear", warmup_steps=0, max_steps=100, alpha_f=0.0)
    assert float(lin(50)) == pytest.approx(0.5)
    const = optim.warmup_schedule("constant", warmup_steps=4, max_steps=10)
    assert float(const(2)) == pytest.approx(0.5) and float(const(9)) == 1.0
    with pytest.raises(ValueError, match="warmup_steps \\(10\\) must be < max_steps \\(5\\)"):
        optim.warmup_schedule("cosine", warmup_steps=10, max_steps=5)


@pytest.mark.slow
def test_weight_decay_mask_momentum_dtype_and_clipping():
    params = {"blocks": {"norm_1": {"weight": jnp.ones((2, 4))}, "w": jnp.ones((2, 4, 4))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.decoupled_lion(0.0, weight_decay=0.5, mask=optim.matrices_only,
                              mu_dtype=jnp.bfloat16)
    state = tx.init(params)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state.mu))
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["blocks"]["norm_1"]["weight"], 1.0)  # masked: no decay
    np.testing.assert_allclose(new["blocks"]["w"], 0.5)

    cfg = ml_collections.ConfigDict(dict(
        name="decoupled_lion", lr=1.0, b1=0.0, b2=0.99, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=1.0, schedule="constant",
        warmup_steps=0, alpha_f=0.0))
    tx = optim.make_optimizer(cfg, max_steps=10)
    p = {"w": jnp.zeros(3)}
    g = {"w": jnp.array([30.0, -40.0, 0.0])}
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [-1.0, 1.0, 0.0])  # sign of the clipped grad
    cfg.name = "sgd"
    with pytest.raises(ValueError, match="unknown optim.name 'sgd'"):
        optim.make_optimizer(cfg, max_steps=10)
