"""The model's building blocks: exact GELU, LayerNorm/RMSNorm with a written-out backward,
llm-foundry's weight initialisation, and the dense / dropout helpers.

Dtype policy: parameters in `param_dtype`, matmuls in the compute dtype, norm statistics in
float32 (see `Norm`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax import sharding
from mpt_jax.kernels import norm_gpu
from mpt_jax.model import quant
from mpt_jax.model.config import MPTConfig

_SQRT_HALF = float(1.0 / np.sqrt(2.0))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_jvp
def exact_gelu(x):
    """torch.nn.GELU(approximate='none'): 0.5 x (1 + erf(x / sqrt 2)), evaluated in float32
    (as torch does for bf16 inputs) and returned in x's dtype.

    jax.nn.gelu(approximate=False) goes through erfc, whose float32 expansion has several
    branches and an exp; on an H100 it made the MLP's GELU forward and backward compute-bound
    at 2-3x their memory time (62 ms of a 686 ms MPT-1B step, bench/PERF_NOTES.md). erf is one
    rational polynomial, and the derivative below needs one exp."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


@exact_gelu.defjvp
def _exact_gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    y = (x32 * cdf).astype(x.dtype)
    return y, (t.astype(jnp.float32) * (cdf + x32 * pdf)).astype(t.dtype)


ACTIVATIONS = {
    "gelu": exact_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# ---------------------------------------------------------------------------------------------
# Initialisation (llm-foundry's param_init_fns, for the schemes MPT uses)
# ---------------------------------------------------------------------------------------------
def _gain(nonlinearity: str, a: float) -> float:
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a * a))
    if nonlinearity in ("linear", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    raise ValueError(f"unknown init_config.init_nonlinearity {nonlinearity!r}")


def init_weight(key, shape_in_out, cfg: MPTConfig, dtype, *, div: float = 1.0,
                 embedding: bool = False):
    """Initialises a weight stored `[in, out]` (or `[V, d]` for embeddings) as llm-foundry does
    for the torch tensor (`[out, in]`, or `[V, d]`), so fan_in/fan_out follow torch's rules."""
    ic = cfg.init_config
    if embedding:
        v, d = shape_in_out
        torch_fan_in, torch_fan_out = d, v
        if ic.emb_init_std is not None:
            return (jax.random.normal(key, shape_in_out) * ic.emb_init_std).astype(dtype)
        if ic.emb_init_uniform_lim is not None:
            lim = ic.emb_init_uniform_lim
            lo, hi = (-lim, lim) if isinstance(lim, (int, float)) else lim
            return jax.random.uniform(key, shape_in_out, minval=lo, maxval=hi).astype(dtype)
    else:
        torch_fan_in, torch_fan_out = shape_in_out
    fan = torch_fan_in if ic.fan_mode == "fan_in" else torch_fan_out
    name = ic.name
    if name == "kaiming_normal_":
        std = _gain(ic.init_nonlinearity, ic.init_gain) / math.sqrt(fan)
        w = jax.random.normal(key, shape_in_out) * std
    elif name == "kaiming_uniform_":
        bound = math.sqrt(3.0) * _gain(ic.init_nonlinearity, ic.init_gain) / math.sqrt(fan)
        w = jax.random.uniform(key, shape_in_out, minval=-bound, maxval=bound)
    elif name == "baseline_":
        if ic.init_std is None:
            raise ValueError("init_config.name 'baseline_' needs init_config.init_std")
        w = jax.random.normal(key, shape_in_out) * ic.init_std
    elif name == "small_init_":
        w = jax.random.normal(key, shape_in_out) * math.sqrt(2.0 / (5 * cfg.d_model))
    else:
        raise ValueError(
            f"init_config.name {name!r} is not supported; use kaiming_normal_, "
            "kaiming_uniform_, baseline_ or small_init_"
        )
    return (w / div).astype(dtype)


def residual_div(cfg: MPTConfig) -> float:
    d = cfg.init_config.init_div_is_residual
    if d is True:
        return math.sqrt(2 * cfg.n_layers)
    if d is False:
        return 1.0
    return float(d)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def _norm_cast(a, low: bool, compute_dtype):
    """The norm's view of an input or a parameter: rounded to the compute dtype first when low."""
    return a.astype(compute_dtype).astype(jnp.float32) if low else a.astype(jnp.float32)


def _norm_stats(x32, eps: float, rms: bool):
    """Per-row (mean, 1/std) of a float32 `[..., D]`, keepdims; mean 0 for RMSNorm."""
    if rms:
        return (jnp.zeros(x32.shape[:-1] + (1,), jnp.float32),
                jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def norm(x, weight, bias, eps: float, rms: bool, low: bool, compute_dtype):
    """LayerNorm / RMSNorm of `x [..., D]` with Norm's precision semantics (see Norm), bias
    optional (None). Float32 out unless `low` (then the compute dtype).

    The backward is written out: the weight and bias gradients are column sums of
    `dy * xhat` and `dy` with xhat rebuilt from the saved per-row mean and 1/std, so XLA reduces
    them straight from x and dy. Autodiff of the forward made XLA write `dy * xhat` out in
    float32 (its row statistics cannot share a fusion with a column sum) and read it back: 18 ms
    of an MPT-1B step at micro-batch 20 on an H100. Rounding follows autodiff of the forward:
    gradients pass through the same casts (bf16 for the low-precision variants)."""
    return _norm_fwd(x, weight, bias, eps, rms, low, compute_dtype)[0]


def _norm_fwd(x, weight, bias, eps, rms, low, compute_dtype):
    x32 = _norm_cast(x, low, compute_dtype)
    mean, rstd = _norm_stats(x32, eps, rms)
    y = (x32 - mean) * rstd * _norm_cast(weight, low, compute_dtype)
    if bias is not None:
        y = y + _norm_cast(bias, low, compute_dtype)
    return (y.astype(compute_dtype) if low else y), (x, weight, bias, mean, rstd)


def _norm_bwd(eps, rms, low, compute_dtype, res, dy):
    del eps
    x, weight, bias, mean, rstd = res
    back = (lambda g, like: g.astype(compute_dtype).astype(like.dtype)) if low else (
        lambda g, like: g.astype(like.dtype))
    dy32 = dy.astype(jnp.float32)
    xhat = (_norm_cast(x, low, compute_dtype) - mean) * rstd
    g = dy32 * _norm_cast(weight, low, compute_dtype)
    dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if not rms:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    rows = tuple(range(x.ndim - 1))
    dw = back(jnp.sum(dy32 * xhat, axis=rows), weight)
    db = None if bias is None else back(jnp.sum(dy32, axis=rows), bias)
    return back(dx * rstd, x), dw, db


norm.defvjp(_norm_fwd, _norm_bwd)


class Norm(nnx.Module):
    """LayerNorm / RMSNorm, optionally low precision (llm-foundry's LPLayerNorm: the input and
    weight are rounded to the compute dtype, statistics are taken in float32, the output is in
    the compute dtype). Full-precision variants return float32."""

    def __init__(self, dim: int, cfg: MPTConfig, *, param_dtype, use_bias: bool):
        self.norm_type = cfg.norm_type
        self.eps = cfg.norm_eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        rms = cfg.norm_type.endswith("rmsnorm")
        self.bias = (nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))
                     if use_bias and not rms else None)

    def __call__(self, x, compute_dtype):
        bias = None if self.bias is None else self.bias[...]
        return norm(x, self.weight[...], bias, self.eps, self.norm_type.endswith("rmsnorm"),
                    self.norm_type.startswith("low_precision"), jnp.dtype(compute_dtype))

    def fused(self, x, delta, compute_dtype, *, interpret: bool = False):
        """(x + delta, norm(x + delta)) in one GPU kernel (forward only; delta may be None).
        x `[B, ..., D]`; under a multi-device mesh it runs once per batch shard."""

        def run(x, delta, weight, bias):
            return norm_gpu.add_norm_gpu(
                x, delta, weight, bias, eps=self.eps, rms=self.norm_type.endswith("rmsnorm"),
                low=self.norm_type.startswith("low_precision"), compute_dtype=compute_dtype,
                interpret=interpret)

        rows = ("batch",) + (None,) * (x.ndim - 1)
        bias = None if self.bias is None else self.bias[...]
        return sharding.per_shard_logical(
            run, in_axes=(rows, rows, (None,), (None,)), out_axes=(rows, rows))(
            x, delta, self.weight[...], bias)


def dense(x, w, b, dtype, *, act: str | None = None, scale=None, kernels: bool = False,
          interpret: bool = False, out_axis: str | None = None):
    """`act(x @ w + b)` in the compute dtype; act a name of ACTIVATIONS or None, b optional.

    w is a float weight `[in, out]`, or with `scale` (its per-output-channel scales) an int8
    weight `[out, in]` (model/quant.py): quant.int8_dense then runs it, through the int8 GPU
    kernel for decode-sized calls when `kernels` (the model's impl is a Pallas GPU one;
    `interpret` for CPU tests), the output features split as `out_axis` under a mesh."""
    fn = None if act is None else ACTIVATIONS[act]
    if scale is not None:
        return quant.int8_dense(x, w[...], scale[...], None if b is None else b[...], dtype,
                                act=fn, act_name=act, kernels=kernels, interpret=interpret,
                                out_axis=out_axis)
    y = jnp.einsum("...i,io->...o", x.astype(dtype), w[...].astype(dtype))
    if b is not None:
        y = y + b[...].astype(dtype)
    return y if fn is None else fn(y)


def dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

