"""Sampling: temperature, then top-k, then top-p (HF's order); greedy is exactly argmax.

One implementation for both callers:
  - the Generator samples a whole batch with one `SamplingParams` (static: a step that is off
    is not traced at all): `sample(logits_bv, key, params)`;
  - the serving engine samples every slot with its own parameters, given as arrays, inside one
    compiled step: `sample_rows(logits_bv, keys_b, temperature_b, top_k_b, top_p_b)`.
Both filter through `_filter`, so a row with the same parameters keeps the same tokens.

A token survives top-k iff its logit is at least the k-th largest (ties at the k-th all stay,
as HF's TopKLogitsWarper keeps them); it survives top-p iff, in descending order over the
top-k survivors, the probability mass strictly before it is < top_p (the smallest set reaching
top_p; the most likely token always stays).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def _filter(x_bv, top_k, top_p):
    """Top-k then top-p on temperature-scaled float32 logits `[B, V]`; excluded tokens get
    -inf. top_k: a Python int (0 = off) or int32 `[B]` (a row's 0 = off); top_p: a Python float
    (1.0 = off) or float32 `[B]` (a row's 1.0 = off)."""
    b, v = x_bv.shape
    static_k, static_p = isinstance(top_k, int), isinstance(top_p, (int, float))
    use_k = not static_k or 0 < top_k < v
    use_p = not static_p or top_p < 1.0
    if not (use_k or use_p):
        return x_bv
    if static_k and not use_p:  # the k-th largest value without a full sort
        kth_b1 = jax.lax.top_k(x_bv, top_k)[0][:, -1:]
        return jnp.where(x_bv < kth_b1, -jnp.inf, x_bv)
    sorted_bv = jnp.sort(x_bv, axis=-1)[:, ::-1]
    if use_k:
        k_b1 = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32).reshape(-1, 1), (b, 1))
        kth_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(k_b1 - 1, 0, v - 1), axis=-1)
        kth_b1 = jnp.where((k_b1 > 0) & (k_b1 < v), kth_b1, -jnp.inf)
        x_bv = jnp.where(x_bv < kth_b1, -jnp.inf, x_bv)
        sorted_bv = jnp.where(sorted_bv < kth_b1, -jnp.inf, sorted_bv)
    if use_p:
        p_b1 = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32).reshape(-1, 1), (b, 1))
        # a row's 1.0 is off even where float32 cumulative sums reach 1 before the last token
        p_b1 = jnp.where(p_b1 >= 1.0, jnp.inf, p_b1)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        n_keep_b1 = jnp.maximum(jnp.sum(before_bv < p_b1, axis=-1, keepdims=True), 1)
        thresh_b1 = jnp.take_along_axis(sorted_bv, n_keep_b1 - 1, axis=-1)
        x_bv = jnp.where(x_bv < thresh_b1, -jnp.inf, x_bv)
    return x_bv


def filter_logits(logits_bv, params: SamplingParams):
    """Temperature, then top-k, then top-p: excluded tokens get -inf."""
    return _filter(logits_bv.astype(jnp.float32) / jnp.float32(params.temperature),
                   params.top_k, params.top_p)


def sample(logits_bv, key, params: SamplingParams):
    """Next tokens `[B]` int32 from float logits `[B, V]`, one key for the batch."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_bv, params), axis=-1).astype(jnp.int32)


def sample_rows(logits_bv, keys_b, temperature_b, top_k_b, top_p_b, *, filtered: bool = True):
    """Next tokens `[B]` int32, each row with its own key (typed PRNG keys `[B]`) and
    parameters (`[B]` arrays: temperature float32, 0 = greedy: exactly argmax of logits_bv;
    top_k int32, 0 = off; top_p float32, 1.0 = off). filtered=False skips top-k / top-p (the
    caller knows no row uses them: no sort is traced)."""
    greedy_b = temperature_b <= 0
    x_bv = logits_bv.astype(jnp.float32) / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
    if filtered:
        x_bv = _filter(x_bv, top_k_b, top_p_b)
    drawn_b = jax.vmap(jax.random.categorical)(keys_b, x_bv)
    return jnp.where(greedy_b, jnp.argmax(logits_bv, axis=-1), drawn_b).astype(jnp.int32)


__all__ = ["SamplingParams", "filter_logits", "sample", "sample_rows"]
