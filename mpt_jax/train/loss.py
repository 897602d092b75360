"""Next-token cross entropy in float32, fused with the unembedding, over sequence chunks.

The [B, T, V] float32 logits of a real batch are large (MPT-7B, 8 x 2048 x 50432: 3.3 GB), so
the loss never holds them all: the sequence is cut into chunks of `chunk_size` positions and each
chunk is unembedded (compute-dtype operands, float32 accumulation) and reduced in turn.

The gradient is formed in the forward pass. The loss is linear in its cotangent, so each chunk's
d(loss)/d(logits) = (softmax - onehot(target)) * weight * logit_scale is computed from the float32
logits while they exist and kept in the compute dtype (bf16 in training: [B, T, V] x 2 bytes,
1.6 GB for 8 x 2048 tokens of MPT-1B). The backward pass is then two compute-dtype matrix
products over the whole batch (dh = D @ W, dW = D^T @ h, float32 accumulation), with no logits
recomputed and no float32 (tf32) matmul. Without differentiation (eval) nothing is kept.

Targets: position t predicts input_ids[t + 1]; the last position has no target. With packed
rows (`segment_ids`), a target whose segment id is 0 (padding) is masked; a document's last
token predicting the next document's first token is kept, as llm-foundry's concatenated
pretraining data does.

Finetuning batches carry `loss_mask` (1 on response tokens): the weight at t is then
loss_mask[t + 1], the mask of the token t predicts (llm-foundry's labels are -100 where the
mask is 0, and its loss shifts them the same way), and never across a segment boundary (a
packed example's last token does not learn the next example's first). The step normalises by
the number of loss tokens of the whole global batch (see train/step.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _next(x_bt):
    """x shifted left by one position (the value at t + 1), 0 after the end."""
    return jnp.concatenate([x_bt[:, 1:], jnp.zeros((x_bt.shape[0], 1), x_bt.dtype)], axis=1)


def targets_and_weights(input_ids_bt, segment_ids_bt=None, loss_mask_bt=None):
    """-> (targets [B, T] int32, weights [B, T] float32)."""
    b, t = input_ids_bt.shape
    targets_bt = _next(input_ids_bt)
    weights_bt = jnp.broadcast_to((jnp.arange(t) < t - 1)[None, :], (b, t))
    if segment_ids_bt is not None:
        next_seg_bt = _next(segment_ids_bt)
        weights_bt = weights_bt & (next_seg_bt != 0) & (segment_ids_bt != 0)
        if loss_mask_bt is not None:
            weights_bt = weights_bt & (next_seg_bt == segment_ids_bt)
    if loss_mask_bt is not None:
        weights_bt = weights_bt & (_next(loss_mask_bt) != 0)
    return targets_bt.astype(jnp.int32), weights_bt.astype(jnp.float32)


def chunked_cross_entropy(h_btd, w_vd, targets_bt, weights_bt, *, chunk_size: int,
                          logit_scale: float | None = None):
    """Sum of weighted token NLLs (float32) and the sum of weights.

    h_btd: final hidden states in the compute dtype; w_vd: the output embedding `[V, D]` (any
    dtype: it is cast to h's dtype for the matmuls, and its gradient comes back in its own
    dtype); logits = (h @ w.T) * logit_scale. chunk_size must divide T (0 = T).
    """
    b, t, d = h_btd.shape
    c = t if chunk_size <= 0 else min(chunk_size, t)
    if t % c:
        raise ValueError(f"train.loss_chunk_size {chunk_size} must divide seq_len {t}")
    n = t // c
    split = lambda x: x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    nll = _xent(split(h_btd), w_vd, split(targets_bt), split(weights_bt), logit_scale)
    return nll, jnp.sum(weights_bt)


def _chunk(h_bcd, w_vd, tg_bc, wt_bc, scale, with_grad: bool):
    logits_bcv = jnp.einsum("bcd,vd->bcv", h_bcd, w_vd.astype(h_bcd.dtype),
                            preferred_element_type=jnp.float32)
    if scale is not None:
        logits_bcv = logits_bcv * jnp.float32(scale)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    picked_bc = jnp.take_along_axis(logits_bcv, tg_bc[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse_bc - picked_bc) * wt_bc)
    if not with_grad:
        return nll
    onehot_bcv = jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32) == tg_bc[..., None]
    dlogits_bcv = (jnp.exp(logits_bcv - lse_bc[..., None]) - onehot_bcv) * wt_bc[..., None]
    if scale is not None:
        dlogits_bcv = dlogits_bcv * jnp.float32(scale)
    return nll, dlogits_bcv.astype(h_bcd.dtype)


def _chunks(h_nbcd, w_vd, tg_nbc, wt_nbc, scale, with_grad: bool):
    return jax.lax.map(lambda xs: _chunk(xs[0], w_vd, xs[1], xs[2], scale, with_grad),
                       (h_nbcd, tg_nbc, wt_nbc))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xent(h_nbcd, w_vd, tg_nbc, wt_nbc, scale):
    return jnp.sum(_chunks(h_nbcd, w_vd, tg_nbc, wt_nbc, scale, False))


def _xent_fwd(h_nbcd, w_vd, tg_nbc, wt_nbc, scale):
    nll_n, d_nbcv = _chunks(h_nbcd, w_vd, tg_nbc, wt_nbc, scale, True)
    return jnp.sum(nll_n), (h_nbcd, w_vd, d_nbcv)


def _xent_bwd(scale, res, g):
    h_nbcd, w_vd, d_nbcv = res
    g = g.astype(jnp.float32)
    dh = jnp.einsum("nbcv,vd->nbcd", d_nbcv, w_vd.astype(d_nbcv.dtype),
                    preferred_element_type=jnp.float32)
    dw = jnp.einsum("nbcv,nbcd->vd", d_nbcv, h_nbcd, preferred_element_type=jnp.float32)
    return (dh * g).astype(h_nbcd.dtype), (dw * g).astype(w_vd.dtype), None, None


_xent.defvjp(_xent_fwd, _xent_bwd)
