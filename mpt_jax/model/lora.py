"""LoRA: low-rank adapters on MPT's projections, as HF PEFT's LoraLayer computes them.

    y = x @ W (+ b) + (dropout(x) @ A) @ B * (alpha / rank)

`project` is the one place the model applies an adapter: beside `layers.dense`, as its own term,
so adapters compose with whatever `dense` does with W. Targets are the projections of
MPT's blocks, named as in HF / llm-foundry (and PEFT's target_modules): Wqkv, out_proj, up_proj,
down_proj, gate_proj (mptglu only).

Parameters (float32 whatever the base dtype, as PEFT keeps them): A `[in, rank]` and B
`[rank, out]`, our `[in, out]` layout of PEFT's lora_A.weight `[rank, in]` and lora_B.weight
`[out, rank]`; in the model they are the `a` and `b` of a `<target>_lora` submodule beside the
weight (pure-dict path `blocks.attn.Wqkv_lora.a`), stacked over layers like every block
parameter. Logical axes: A's input dimension is the weight's (embed, heads or mlp) and its rank
is `lora_rank`; B's rank is `lora_rank` and its output the weight's (qkv, embed or mlp); so
adapters shard with FSDP / tensor rules like the weights they adapt. Initialisation is PEFT's
default (init_lora_weights=True): A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
1/sqrt(in)); B zero, so a fresh adapter leaves the model exactly as it was.

Pure-dict helpers: `split` / `join` separate the adapters from the base (the trainer trains
the first and holds the second frozen), `merge` folds them into the base weights
(W + A @ B * scale), `fingerprint` names a base by its values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax.model.layers import ACTIVATIONS, dense, dropout

TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj", "gate_proj")
# target -> (module in a block, logical axes of the weight's input and output)
TARGET_PLACES = {"Wqkv": ("attn", "embed", "qkv"), "out_proj": ("attn", "heads", "embed"),
                 "up_proj": ("ffn", "embed", "mlp"), "down_proj": ("ffn", "mlp", "embed"),
                 "gate_proj": ("ffn", "embed", "mlp")}
SUFFIX = "_lora"
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank > 0, alpha (scale = alpha / rank, PEFT without rslora), dropout on the adapter's
    input, targets (a sorted tuple of TARGETS)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("Wqkv",)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("lora targets is empty: name at least one of " + ", ".join(TARGETS))
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"unknown lora target module {t!r}: expected some of "
                                 f"{', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoraConfig":
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)),
                   tuple(d["targets"]))

    def check_model(self, cfg) -> None:
        """The targets exist in `cfg` (an MPTConfig): gate_proj only in mptglu models."""
        if "gate_proj" in self.targets and cfg.ffn_config.ffn_type != "mptglu":
            raise ValueError(f"lora target module 'gate_proj': the model's ffn_type is "
                             f"{cfg.ffn_config.ffn_type!r}, which has no gate_proj (only mptglu)")


def from_train_config(section) -> LoraConfig | None:
    """train.lora (rank, alpha, dropout, targets) -> LoraConfig, None when rank is 0; a
    ValueError naming the key otherwise."""
    rank = section.rank
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"train.lora.rank={rank!r}: must be an integer >= 0 (0 = no LoRA)")
    if rank == 0:
        return None
    targets = section.targets
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    try:
        return LoraConfig(rank, section.alpha, section.dropout, tuple(targets))
    except ValueError as e:
        raise ValueError(f"train.lora: {e}") from None


def init_a(key, shape, dtype=jnp.float32):
    """PEFT's lora_A init, kaiming_uniform_(a=sqrt(5)) on torch's [rank, in]: U(+-1/sqrt(in));
    `shape` is ours, [in, rank]."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class Adapter(nnx.Module):
    """One projection's A `[in, rank]` and B `[rank, out]` (float32)."""

    def __init__(self, d_in: int, d_out: int, in_axis: str, out_axis: str, cfg: LoraConfig, *,
                 rngs: nnx.Rngs):
        # (their own rng stream: the base's initial values do not depend on the adapters)
        self.a = nnx.Param(init_a(rngs.lora(), (d_in, cfg.rank)),
                           logical_axes=(in_axis, RANK_AXIS))
        self.b = nnx.Param(jnp.zeros((cfg.rank, d_out), jnp.float32),
                           logical_axes=(RANK_AXIS, out_axis))
        self.scale = cfg.scale
        self.rate = cfg.dropout

    def __call__(self, x, key, dtype):
        h = dense(dropout(x, self.rate, key), self.a, None, dtype)
        return dense(h, self.b, None, dtype) * jnp.asarray(self.scale, dtype)


def make_adapter(target: str, d_in: int, d_out: int, cfg: LoraConfig | None, rngs):
    """The adapter of `target` when `cfg` adapts it, else None."""
    if cfg is None or target not in cfg.targets:
        return None
    _, in_axis, out_axis = TARGET_PLACES[target]
    return Adapter(d_in, d_out, in_axis, out_axis, cfg, rngs=rngs)


def project(x, w, b, adapter: Adapter | None, key, dtype, *, act: str | None = None,
            **dense_kw):
    """act(dense(x, w, b) + the adapter's low-rank term): the one place adapters enter the
    model. key: the adapter's dropout key (None: no dropout). dense_kw go to `layers.dense`
    (an int8 weight's scale, its kernel choice); without an adapter act runs inside dense (the
    int8 kernel's epilogue), with one after the sum."""
    if adapter is None:
        return dense(x, w, b, dtype, act=act, **dense_kw)
    y = dense(x, w, b, dtype, **dense_kw) + adapter(x, key, dtype)
    return y if act is None else ACTIVATIONS[act](y)


# ---------------------------------------------------------------------------------------------
# Pure-dict trees: adapters vs base
# ---------------------------------------------------------------------------------------------
def is_adapter_key(key: str) -> bool:
    return key.endswith(SUFFIX)


def split(params: Mapping) -> tuple[dict, dict]:
    """A params pure dict -> (adapters, base): the same nesting, each with only its leaves."""
    adapters, base = {}, {}
    for key, value in params.items():
        if is_adapter_key(key):
            adapters[key] = value
        elif isinstance(value, Mapping):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b:
                base[key] = b
        else:
            base[key] = value
    return adapters, base


def join(adapters: Mapping, base: Mapping) -> dict:
    """split's inverse."""
    out = dict(base)
    for key, value in adapters.items():
        if key in out and isinstance(value, Mapping) and not is_adapter_key(key):
            out[key] = join(value, out[key])
        else:
            out[key] = value
    return out


def adapter_paths(cfg: LoraConfig):
    """(target, path of its adapter in the params pure dict) for every target."""
    for target in cfg.targets:
        module = TARGET_PLACES[target][0]
        yield target, ("blocks", module, target + SUFFIX)


def merge(params: Mapping, cfg: LoraConfig) -> dict:
    """A params pure dict with adapters -> the plain model's: each target weight
    W + A @ B * scale (float32 arithmetic, stored back in W's dtype), adapters removed. Works
    on numpy or jax arrays."""
    adapters, base = split(params)
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)) else jnp
    blocks = {m: dict(v) for m, v in base["blocks"].items()} if "blocks" in base else {}
    for target, (_, module, name) in adapter_paths(cfg):
        pair = adapters["blocks"][module][name]
        w = blocks[module][target]
        delta = xp.einsum("lir,lro->lio", xp.asarray(pair["a"], np.float32),
                          xp.asarray(pair["b"], np.float32)) * np.float32(cfg.scale)
        blocks[module][target] = (xp.asarray(w, np.float32) + delta).astype(w.dtype)
    return {**base, "blocks": {**base["blocks"], **blocks}}


# ---------------------------------------------------------------------------------------------
# The base's fingerprint
# ---------------------------------------------------------------------------------------------
@jax.jit
def _tensor_hash(x):
    """An order-free integer hash of an array's values rounded to bfloat16: sum over elements
    of (bits + 1) * odd(index) mod 2^32, index the row-major position. Integer sums do not
    depend on the reduction order, so a sharded array hashes as the same array on one device;
    bfloat16 rounding makes a float32 base and its bfloat16 copy one base."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + (jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim)
                         * jnp.uint32(stride % 2**32))
        stride *= x.shape[dim]
    odd = index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9) | jnp.uint32(1)
    return jnp.sum((bits + jnp.uint32(1)) * odd, dtype=jnp.uint32)


def fingerprint(base: Mapping) -> str:
    """A 16-hex-digit name of a base model's parameters (pure dict, jax or numpy arrays, any
    sharding): every tensor's path, shape and value hash."""
    flat = jax.tree_util.tree_flatten_with_path(base)[0]
    h = hashlib.sha256()
    for path, leaf in flat:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        value = int(jax.device_get(_tensor_hash(leaf)))
        h.update(f"{name}:{tuple(leaf.shape)}:{value};".encode())
    return h.hexdigest()[:16]
