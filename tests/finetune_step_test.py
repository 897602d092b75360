"""The masked (response-only) loss of train_step / eval_step: equal to transformers'
MptForCausalLM loss with labels -100 off the mask, unchanged by packing, and exact under
gradient accumulation with different loss-token counts per micro-batch."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import hf_model, hf_state, tiny
from mpt_jax import sharding
from mpt_jax.convert.table import pure_dict_from_torch
from mpt_jax.model.config import AttnConfig
from mpt_jax.train import optim
from mpt_jax.train import step as step_lib

T = 16
V = 101


def setup(cfg, params, *, micro_batch_size=0, global_batch=4):
    train = ml_collections.ConfigDict(dict(
        seq_len=T, global_batch_size=global_batch, micro_batch_size=micro_batch_size,
        compute_dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=True,
        attn_impl="reference", loss_chunk_size=8, nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_adamw", lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=0.0, schedule="constant",
        warmup_steps=0, alpha_f=0.0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    tx = optim.make_optimizer(ocfg, 10)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-2, mesh=mesh,
                                      rules=sharding.DEFAULT_RULES, seed=0,
                                      global_batch=global_batch)
    params = jax.tree.map(jnp.asarray, params)
    state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
    return settings, state, mesh


def padded(examples):
    """[(ids, mask)] -> a batch of one example per row (segment 1, padding 0 / mask 0)."""
    ids = np.zeros((len(examples), T), np.int32)
    mask, seg = np.zeros_like(ids), np.zeros_like(ids)
    for row, (e_ids, e_mask) in enumerate(examples):
        n = len(e_ids)
        ids[row, :n], mask[row, :n], seg[row, :n] = e_ids, e_mask, 1
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg}


def example(rng, n, n_prompt):
    return (rng.integers(1, V, n).astype(np.int32),
            np.array([0] * n_prompt + [1] * (n - n_prompt), np.int32))


@pytest.mark.slow
def test_masked_loss_equals_transformers_labels_minus_100():
    import torch

    cfg = tiny()
    hf = hf_model(cfg, seed=2)
    rng = np.random.default_rng(0)
    batch = padded([example(rng, 13, 5), example(rng, 9, 6), example(rng, 16, 3),
                    example(rng, 7, 2)])
    labels = np.where(batch["loss_mask"] == 1, batch["input_ids"], -100)
    with torch.no_grad():
        want = float(hf(torch.tensor(batch["input_ids"], dtype=torch.long),
                        attention_mask=torch.tensor(batch["segment_ids"]),
                        labels=torch.tensor(labels, dtype=torch.long)).loss)
    settings, state, mesh = setup(cfg, pure_dict_from_torch(cfg, hf_state(hf)))
    with sharding.use_mesh(mesh):  # (eval_step's (sum, count) gives this loss: test below)
        _, metrics = jax.jit(lambda s, b: step_lib.train_step(s, b, settings=settings))(
            state, batch)
    # HF counts the labels after the shift: every mask-1 token but a row's first
    assert float(metrics["tokens"]) == float((labels[:, 1:] != -100).sum())
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    with torch.no_grad():  # (the mask matters: the unmasked loss is another number)
        unmasked = float(hf(torch.tensor(batch["input_ids"], dtype=torch.long),
                            labels=torch.tensor(batch["input_ids"], dtype=torch.long)).loss)
    assert abs(want - unmasked) > 1e-2


@pytest.mark.slow
def test_packing_leaves_an_examples_loss_and_gradients_unchanged():
    cfg = tiny(attn_config=AttnConfig(attn_uses_sequence_id=True))
    from conftest import random_pure

    params = random_pure(cfg, seed=4)
    rng = np.random.default_rng(1)
    e, other1, other2 = example(rng, 6, 2), example(rng, 5, 1), example(rng, 4, 2)
    alone = padded([e])
    ids = np.concatenate([other1[0], e[0], other2[0], np.zeros(1, np.int32)])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [3] * 4 + [0]], np.int32)
    only_e = np.concatenate([0 * other1[1], e[1], 0 * other2[1], [0]])[None].astype(np.int32)
    everyone = np.concatenate([other1[1], e[1], other2[1], [0]])[None].astype(np.int32)
    packed = {"input_ids": ids, "segment_ids": seg, "loss_mask": only_e}
    settings, _, _ = setup(cfg, params, global_batch=1)

    evaluate = jax.jit(lambda p, b: step_lib.eval_step(p, b, settings=settings))
    loss_and_grads = jax.jit(jax.value_and_grad(evaluate, has_aux=True))

    (nll_a, count_a), grads_a = loss_and_grads(params, alone)
    (nll_b, count_b), grads_b = loss_and_grads(params, packed)
    assert float(count_a) == float(count_b) == 4.0
    np.testing.assert_allclose(float(nll_b), float(nll_a), rtol=1e-5)
    for g_a, g_b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(g_b, g_a, rtol=1e-4, atol=1e-6)
    # the row's three examples add up; the last token of one never learns the next one's first
    total, total_count = evaluate(params, {**packed, "loss_mask": everyone})
    parts = [evaluate(params, {**packed, "loss_mask": m[None]})
             for m in (np.where(seg[0] == s, everyone[0], 0) for s in (1, 2, 3))]
    np.testing.assert_allclose(float(total), sum(float(p[0]) for p in parts), rtol=1e-5)
    assert float(total_count) == 4 + 4 + 2


@pytest.mark.slow
def test_accumulation_equals_one_batch_with_loss_token_normalisation():
    cfg = tiny()
    from conftest import random_pure

    params = jax.tree.map(jnp.asarray, random_pure(cfg, seed=6, std=0.1))
    rng = np.random.default_rng(2)
    # 2, 13, 4 and 0 loss tokens: micro-batches of very different loss-token counts
    batch = padded([example(rng, 8, 6), example(rng, 16, 3), example(rng, 10, 6),
                    example(rng, 5, 5)])
    results = []
    for micro_batch_size in (0, 1):
        settings, state, mesh = setup(cfg, params, micro_batch_size=micro_batch_size)
        assert settings.n_micro == (1 if micro_batch_size == 0 else 4)
        with sharding.use_mesh(mesh):
            results.append(jax.jit(lambda s, b, st=settings: step_lib.train_step(
                s, b, settings=st))(state, batch))
    (s1, m1), (sn, mn) = results
    evaluate = jax.jit(lambda p, b: step_lib.eval_step(p, b, settings=settings))
    nll, count = evaluate(params, batch)
    assert float(m1["tokens"]) == float(mn["tokens"]) == float(count) == 19.0
    np.testing.assert_allclose(float(m1["loss"]), float(nll) / 19.0, rtol=1e-6)
    np.testing.assert_allclose(float(mn["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(mn["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(sn["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a per-sequence mean of per-micro-batch means (Composer without token accumulation) is
    # another number here: the test can tell the two apart
    rows = [evaluate(params, {**batch, "loss_mask": np.where(np.arange(4)[:, None] == i,
                                                              batch["loss_mask"], 0)})
            for i in range(4)]
    per_row = [float(s) / max(float(c), 1.0) for s, c in rows]
    assert abs(np.mean(per_row) - float(m1["loss"])) > 1e-2
