"""Optimizers as llm-foundry/Composer define them, built from optax pieces.

- `decoupled_lion`: llm-foundry's DecoupledLionW. With f = schedule(step), lr_t = lr * f:
      p *= 1 - f * wd;  u = sign(b1*m + (1-b1)*g);  p -= lr_t * u;  m = b2*m + (1-b2)*g
  (optax.lion couples the decay to lr_t; it equals this only with weight_decay = wd / lr.)
- `decoupled_adamw`: Composer's DecoupledAdamW. p *= 1 - f * wd; m, v as Adam;
      p -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
- Schedules are multipliers of the base lr (Composer's schedulers): `warmup_schedule` with
  cosine / linear / constant decay and `alpha_f`; warmup rises linearly from 0 at step 0.
- `make_optimizer(optim_cfg, max_steps, clip=True)`: clipping by global norm (before the optimizer),
  optional weight-decay mask, momentum dtype.

`step` everywhere is the number of updates already applied (0 for the first update), as
Composer evaluates its scheduler.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("decoupled_lion", "decoupled_adamw")


# ---------------------------------------------------------------------------------------------
# Schedules (multipliers)
# ---------------------------------------------------------------------------------------------
def warmup_schedule(kind: str, *, warmup_steps: int, max_steps: int, alpha_f: float = 0.0
                    ) -> Schedule:
    """Composer's cosine_with_warmup / linear_decay_with_warmup / constant_with_warmup.

    f(t) = t / warmup for t < warmup; then with tau = (t - warmup) / (max_steps - warmup):
    cosine: alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2; linear: 1 + (alpha_f - 1) * tau;
    constant: 1. tau is clipped to [0, 1].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if warmup_steps < 0 or max_steps <= 0:
        raise ValueError(f"schedule needs warmup_steps >= 0 and max_steps > 0, got "
                         f"warmup_steps={warmup_steps}, max_steps={max_steps}")
    if kind != "constant" and warmup_steps >= max_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be < max_steps ({max_steps})")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = t / max(warmup_steps, 1)
        if kind == "constant":
            decay = jnp.float32(1.0)
        else:
            tau = jnp.clip((t - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0, 1.0)
            if kind == "cosine":
                decay = alpha_f + (1 - alpha_f) * 0.5 * (1 + jnp.cos(math.pi * tau))
            else:
                decay = 1 + (alpha_f - 1) * tau
        return jnp.where(t < warmup_steps, warm, decay).astype(jnp.float32)

    return schedule


def _multiplier(schedule: Schedule | None, count):
    return jnp.float32(1.0) if schedule is None else schedule(count)


# ---------------------------------------------------------------------------------------------
# Decoupled LION
# ---------------------------------------------------------------------------------------------
class LionState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied so far
    mu: optax.Updates


def decoupled_lion(learning_rate: float, b1: float = 0.9, b2: float = 0.99,
                   weight_decay: float = 0.0, schedule: Schedule | None = None,
                   mu_dtype=None, mask=None) -> optax.GradientTransformation:
    """llm-foundry's DecoupledLionW (see the module docstring). `mask`: pytree of bools (or a
    function of params) — where False, no weight decay."""
    if not isinstance(learning_rate, (int, float)):
        raise ValueError(f"decoupled_lion: learning_rate must be a float (the base lr; put the "
                         f"schedule in `schedule`), got {learning_rate!r}")
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return LionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("decoupled_lion needs params (decoupled weight decay)")
        f = _multiplier(schedule, state.count)
        lr_t = learning_rate * f
        decay_mask = _resolve_mask(mask, params)

        def one(g, m, p, decays):
            g32, m32 = g.astype(jnp.float32), m.astype(jnp.float32)
            u = jnp.sign(b1 * m32 + (1 - b1) * g32)
            wd = f * weight_decay if decays else 0.0
            new_p = p.astype(jnp.float32) * (1 - wd) - lr_t * u
            return (new_p - p.astype(jnp.float32)).astype(p.dtype)

        updates = jax.tree.map(one, grads, state.mu, params, decay_mask)
        mu = jax.tree.map(
            lambda g, m: (b2 * m.astype(jnp.float32) + (1 - b2) * g.astype(jnp.float32)
                          ).astype(m.dtype), grads, state.mu)
        return updates, LionState(count=state.count + 1, mu=mu)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# Decoupled AdamW
# ---------------------------------------------------------------------------------------------
class AdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def decoupled_adamw(learning_rate: float, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                    weight_decay: float = 0.0, schedule: Schedule | None = None, mu_dtype=None,
                    mask=None) -> optax.GradientTransformation:
    """Composer's DecoupledAdamW (see the module docstring); `nu` stays float32."""
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        nu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("decoupled_adamw needs params (decoupled weight decay)")
        f = _multiplier(schedule, state.count)
        lr_t = learning_rate * f
        t = (state.count + 1).astype(jnp.float32)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(
            jnp.float32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          grads, state.nu)
        decay_mask = _resolve_mask(mask, params)

        def one(m, v, p, decays):
            wd = f * weight_decay if decays else 0.0
            p32 = p.astype(jnp.float32)
            new_p = p32 * (1 - wd) - (lr_t / bc1) * m / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
            return (new_p - p32).astype(p.dtype)

        updates = jax.tree.map(one, mu, nu, params, decay_mask)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        return updates, AdamWState(count=state.count + 1, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _resolve_mask(mask, params):
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask


def matrices_only(params):
    """Weight-decay mask: decay arrays of 2+ dims per layer (not norms or biases). Stacked
    layers add a leading dim, so a layer's vector is 2-D here: we look at the trailing dims."""
    def decays(path, p):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        return not ("norm" in jax.tree_util.keystr(path) or name.endswith("bias")
                    or p.ndim < 2)
    return jax.tree_util.tree_map_with_path(decays, params)


# ---------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------
def make_schedule(optim_cfg, max_steps: int) -> Schedule:
    return warmup_schedule(optim_cfg.schedule, warmup_steps=optim_cfg.warmup_steps,
                           max_steps=max_steps, alpha_f=optim_cfg.alpha_f)


def make_optimizer(optim_cfg, max_steps: int, *, clip: bool = True
                   ) -> optax.GradientTransformation:
    """Global-norm clipping (when optim.clip_norm > 0 and `clip`) then the decoupled optimizer.

    clip=False leaves clipping to the caller: train_step does it itself when given
    `clip_norm` (make_settings), folding the clip factor into the gradient's one scaling pass.

    Keys: name, lr, b1, b2, eps (AdamW), weight_decay, weight_decay_mask ('all' | 'matrices'),
    mu_dtype ('' = the parameter dtype, or e.g. 'bfloat16'), clip_norm, schedule,
    warmup_steps, alpha_f.
    """
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name {optim_cfg.name!r}; expected one of {OPTIMIZERS}")
    masks = {"all": None, "matrices": matrices_only}
    if optim_cfg.weight_decay_mask not in masks:
        raise ValueError(f"unknown optim.weight_decay_mask {optim_cfg.weight_decay_mask!r}; "
                         f"expected one of {tuple(masks)}")
    schedule = make_schedule(optim_cfg, max_steps)
    common = dict(weight_decay=optim_cfg.weight_decay, schedule=schedule,
                  mu_dtype=optim_cfg.mu_dtype or None,
                  mask=masks[optim_cfg.weight_decay_mask])
    if optim_cfg.name == "decoupled_lion":
        opt = decoupled_lion(float(optim_cfg.lr), b1=optim_cfg.b1, b2=optim_cfg.b2, **common)
    else:
        opt = decoupled_adamw(float(optim_cfg.lr), b1=optim_cfg.b1, b2=optim_cfg.b2,
                              eps=optim_cfg.eps, **common)
    if clip and optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), opt)
    return opt

