"""Next-token cross entropy in float32 over vocabulary chunks of the sequence.

The [B, T, V] float32 logits of a real batch are large (MPT-7B, 8 x 2048 x 50432: 3.3 GB), so
the loss never holds them: the sequence is cut into chunks of `chunk_size` positions, each chunk
is unembedded and reduced under `jax.checkpoint` inside `lax.map`, and the backward pass
recomputes each chunk's logits.

Targets: position t predicts input_ids[t + 1]; the last position has no target. With packed
rows (`segment_ids`), a target whose segment id is 0 (padding) is masked; a document's last
token predicting the next document's first token is kept, as llm-foundry's concatenated
pretraining data does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def targets_and_weights(input_ids_bt, segment_ids_bt=None):
    """-> (targets [B, T] int32, weights [B, T] float32)."""
    b, t = input_ids_bt.shape
    targets_bt = jnp.concatenate(
        [input_ids_bt[:, 1:], jnp.zeros((b, 1), input_ids_bt.dtype)], axis=1)
    weights_bt = jnp.broadcast_to((jnp.arange(t) < t - 1)[None, :], (b, t))
    if segment_ids_bt is not None:
        next_seg_bt = jnp.concatenate(
            [segment_ids_bt[:, 1:], jnp.zeros((b, 1), segment_ids_bt.dtype)], axis=1)
        weights_bt = weights_bt & (next_seg_bt != 0) & (segment_ids_bt != 0)
    return targets_bt.astype(jnp.int32), weights_bt.astype(jnp.float32)


def chunked_cross_entropy(unembed, h_btd, targets_bt, weights_bt, *, chunk_size: int):
    """Sum of weighted token NLLs (float32) and the sum of weights.

    `unembed(h [..., D]) -> float32 logits [..., V]`; chunk_size must divide T (0 = T).
    """
    b, t, d = h_btd.shape
    c = t if chunk_size <= 0 else min(chunk_size, t)
    if t % c:
        raise ValueError(f"train.loss_chunk_size {chunk_size} must divide seq_len {t}")
    n = t // c
    h_nbcd = h_btd.reshape(b, n, c, d).swapaxes(0, 1)
    tg_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)
    w_nbc = weights_bt.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(xs):
        h_bcd, tg_bc, w_bc = xs
        logits_bcv = unembed(h_bcd).astype(jnp.float32)
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logits_bcv, tg_bc[..., None], axis=-1)[..., 0]
        return jnp.sum((lse_bc - picked_bc) * w_bc)

    nll_n = jax.lax.map(chunk, (h_nbcd, tg_nbc, w_nbc))
    return jnp.sum(nll_n), jnp.sum(weights_bt)
