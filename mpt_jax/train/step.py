"""The pure step functions and the sharded train state.

    state = {"step": int32 [], "params": pure dict of arrays, "opt_state": optax state}

`train_step(state, batch, settings=...)` and `eval_step(params, batch, settings=...)` are pure
top-level functions; `compile_train_step` jits the first once with explicit in/out shardings and
the state donated. Gradient accumulation runs inside the step: the global batch `[G, T]` is
viewed as `n_micro` micro-batches (each spread over every batch shard) and `lax.scan`ned, summing
float32 NLL and gradients; the mean is taken once over every target token of the global batch,
so the loss and update do not depend on the micro-batch count.

With finetuning batches (`loss_mask`), the target tokens are the loss tokens (response tokens):
loss = sum of their NLLs / their number in the whole global batch, every response token
weighted alike. llm-foundry's loss is a mean over the non-ignored targets of each micro-batch
on each device; Composer then weights those means by the micro-batch's share of the batch. With
`accumulate_train_batch_on_tokens: true` (llm-foundry's default) the share counts loss tokens
(all-reduced over devices), which is exactly this normalisation. With it false (Composer's own
default, and the older llm-foundry that finetuned MPT-7B-Instruct) the share counts sequences:
loss = sum_m (B_m / B) * S_m / N_m over micro-batches m (S_m the NLL sum, N_m the loss tokens,
B_m the sequences), equal to ours only when every micro-batch has the same loss tokens per
sequence. E.g. two one-sequence micro-batches with 10 and 100 response tokens: there each token
of the first weighs 1/20 and each of the second 1/200; here every token weighs 1/110. A padding
row (no loss token) adds nothing to either sum. eval_step returns (NLL sum, loss-token count),
so the held-out loss of finetuning data is the response-token loss.

LoRA (train.lora): state["params"] still holds the whole model, but only its adapters are
trained: the step differentiates the loss with respect to the adapters alone (the frozen base
is a constant of the differentiated function, so no weight gradient of the base is formed), the
optimizer state covers the adapters alone, and the base passes through the step unchanged
(donated in, the same buffers out).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpt_jax.train import loss as loss_lib
from mpt_jax import sharding
from mpt_jax.model.config import MPTConfig
from mpt_jax.model import MPTForCausalLM, abstract_model
from mpt_jax.model import lora as lora_lib

NONFINITE_ACTIONS = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the step closes over (built once by `make_settings`)."""

    graphdef: Any
    tx: optax.GradientTransformation
    lr_fn: Callable[[jax.Array], jax.Array]
    n_micro: int
    loss_chunk_size: int
    seed: int
    use_dropout: bool
    param_specs: Any  # pure-dict tree of PartitionSpec (gradient accumulators follow it)
    rules: tuple = sharding.DEFAULT_RULES
    # > 0: clip by global norm here (tx built with make_optimizer(..., clip=False)): the
    # 1/token-count mean and the clip factor become one scale on the gradients, one pass.
    clip_norm: float = 0.0
    # LoRA: train the adapters only (param_specs then covers them alone)
    frozen_base: bool = False


def _float_dtype(name: str, key: str):
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{key}={name!r}: expected a float dtype (bfloat16, float16, float32)")
    return dtype


def model_kwargs(train_cfg) -> dict:
    """The model's constructor arguments from the train section. With train.lora the adapters
    (float32) join the model and train.param_dtype is the frozen base's dtype. (A train
    section without a lora key, as older callers build, means no LoRA.)"""
    lora = lora_lib.from_train_config(train_cfg.lora) if "lora" in train_cfg else None
    return dict(dtype=_float_dtype(train_cfg.compute_dtype, "train.compute_dtype"),
                param_dtype=_float_dtype(train_cfg.param_dtype, "train.param_dtype"),
                attn_impl=train_cfg.attn_impl,
                remat_policy=train_cfg.remat_policy, scan_layers=train_cfg.scan_layers,
                lora=lora)


def trainable(params, frozen_base: bool):
    """(the trained parameters, the frozen ones or None): the adapters and the base with LoRA,
    else everything and None."""
    if not frozen_base:
        return params, None
    return lora_lib.split(params)


def with_frozen(trained, frozen):
    return trained if frozen is None else lora_lib.join(trained, frozen)


def uses_dropout(cfg: MPTConfig, lora=None) -> bool:
    return (cfg.resid_pdrop > 0 or cfg.emb_pdrop > 0 or cfg.attn_config.attn_pdrop > 0
            or (lora is not None and lora.dropout > 0))


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def _nll_sum(params, graphdef, batch, dropout_rng, chunk_size):
    model = nnx.merge(graphdef, params)
    segment_ids = batch.get("segment_ids")
    h_btd, _ = model.hidden_states(batch["input_ids"], segment_ids=segment_ids,
                                   dropout_rng=dropout_rng)
    targets_bt, weights_bt = loss_lib.targets_and_weights(batch["input_ids"], segment_ids,
                                                          batch.get("loss_mask"))
    return loss_lib.chunked_cross_entropy(h_btd, model.output_embedding(), targets_bt,
                                          weights_bt, chunk_size=chunk_size,
                                          logit_scale=model.config.logit_scale_value)


def _micro_batches(batch, n_micro):
    """[G, T] -> [n_micro, G / n_micro, T]; micro-batch i is rows i::n_micro, so every micro-batch
    keeps the global batch's spread over the batch shards."""
    def split(x):
        g = x.shape[0]
        x = x.reshape((g // n_micro, n_micro) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch", "seq"))
    return jax.tree.map(split, batch)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def train_step(state, batch, *, settings: StepSettings):
    """One optimizer update over the global batch. -> (new_state, metrics of float32 scalars).

    A non-finite loss or gradient norm leaves params and opt_state unchanged (`finite` = 0 in
    the metrics); the trainer then stops or skips, by config. Activations and kernels split by
    `settings.rules` (entered here, so the traced step carries them).
    """
    with sharding.use_rules(settings.rules):
        return _train_step(state, batch, settings)


def _nll_sum_split(trained, frozen, graphdef, batch, dropout_rng, chunk_size):
    return _nll_sum(with_frozen(trained, frozen), graphdef, batch, dropout_rng, chunk_size)


def _train_step(state, batch, s: StepSettings):
    params, frozen = trainable(state["params"], s.frozen_base)
    step_key = jax.random.fold_in(jax.random.PRNGKey(s.seed), state["step"])
    grad_fn = jax.value_and_grad(_nll_sum_split, has_aux=True)  # d/d(trained) only

    def micro(i, mb):
        rng = jax.random.fold_in(step_key, i) if s.use_dropout else None
        (nll, count), grads = grad_fn(params, frozen, s.graphdef, mb, rng, s.loss_chunk_size)
        return nll, count, grads

    def constrain_like_params(tree):
        mesh = sharding.active_mesh()
        if mesh is None:
            return tree
        return jax.tree.map(lambda x, spec: jax.lax.with_sharding_constraint(x, spec),
                            tree, s.param_specs)

    if s.n_micro == 1:
        nll, count, grads = micro(0, batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
        mbs = _micro_batches(batch, s.n_micro)
        zeros = constrain_like_params(
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

        def body(carry, xs):
            i, mb = xs
            acc_nll, acc_count, acc_g = carry
            nll_i, count_i, g_i = micro(i, mb)
            acc_g = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_g, g_i)
            return (acc_nll + nll_i, acc_count + count_i, constrain_like_params(acc_g)), None

        init = (jnp.float32(0), jnp.float32(0), zeros)
        (nll, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(s.n_micro), mbs))

    denom = jnp.maximum(count, 1.0)
    loss = nll / denom
    raw_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
    grad_norm = raw_norm / denom  # the norm of the mean gradient
    scale = 1.0 / denom
    if s.clip_norm > 0:  # optax.clip_by_global_norm's rule
        scale = scale * jnp.where(grad_norm < s.clip_norm, 1.0,
                                  s.clip_norm / jnp.maximum(grad_norm, 1e-30))
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt_state = s.tx.update(grads, state["opt_state"], params)
        return optax.apply_updates(params, updates), new_opt_state

    # A conditional, not a select: the skip costs no extra pass over params and moments.
    new_params, new_opt_state = jax.lax.cond(
        finite, update, lambda _: (params, state["opt_state"]), None)
    new_state = {"step": state["step"] + 1, "params": with_frozen(new_params, frozen),
                 "opt_state": new_opt_state}
    # The lr this step applies: the optimizer's schedule runs on its count of updates applied,
    # which a skipped (non-finite) step does not advance.
    applied = optax.tree_utils.tree_get(state["opt_state"], "count")
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": s.lr_fn(state["step"] if applied is None else applied),
               "finite": finite.astype(jnp.float32), "tokens": count}
    return new_state, metrics


def eval_step(params, batch, *, settings: StepSettings):
    """-> (sum of target-token NLLs, number of target tokens), float32."""
    with sharding.use_rules(settings.rules):
        return _nll_sum(params, settings.graphdef, batch, None, settings.loss_chunk_size)


# ---------------------------------------------------------------------------------------------
# Sharded state and compiled steps
# ---------------------------------------------------------------------------------------------
def micro_steps(global_batch: int, micro_batch_size: int, mesh, rules) -> int:
    """Micro-steps per optimizer step: global_batch / (micro_batch_size * batch shards), 1 when
    micro_batch_size is 0. ValueError naming the numbers when they do not divide."""
    shards = sharding.batch_shards(mesh, rules)
    sharding.check_batch(global_batch, mesh, rules, what="train.global_batch_size")
    per_shard = global_batch // shards
    mb = micro_batch_size or per_shard
    if mb < 0 or per_shard % mb:
        raise ValueError(
            f"train.global_batch_size {global_batch} over {shards} batch shards is {per_shard} "
            f"rows per shard, not a multiple of train.micro_batch_size {mb}")
    return per_shard // mb


def make_settings(model_cfg: MPTConfig, train_cfg, tx, lr_fn, *, mesh, rules, seed: int,
                  global_batch: int, clip_norm: float = 0.0) -> StepSettings:
    """Derives the micro-batch count from the mesh: n_micro = global_batch /
    (train.micro_batch_size * batch shards); micro_batch_size 0 = no accumulation.
    clip_norm > 0: the step clips (pair it with make_optimizer(..., clip=False))."""
    n_micro = micro_steps(global_batch, train_cfg.micro_batch_size, mesh, rules)
    kwargs = model_kwargs(train_cfg)
    abstract = abstract_model(model_cfg, **kwargs)
    frozen_base = kwargs["lora"] is not None
    specs, _ = trainable(sharding.param_specs(nnx.state(abstract, nnx.Param), mesh, rules),
                         frozen_base)
    return StepSettings(graphdef=nnx.graphdef(abstract), tx=tx, lr_fn=lr_fn,
                        n_micro=n_micro, loss_chunk_size=train_cfg.loss_chunk_size,
                        seed=seed, use_dropout=uses_dropout(model_cfg, kwargs["lora"]),
                        param_specs=specs, rules=rules, clip_norm=float(clip_norm or 0.0),
                        frozen_base=frozen_base)


def _init_state(model_cfg, kwargs, tx, seed):
    model = MPTForCausalLM(model_cfg, rngs=nnx.Rngs(seed), **kwargs)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    trained, _ = trainable(params, kwargs["lora"] is not None)
    return {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(trained)}


def state_shardings(model_cfg, train_cfg, tx, mesh, rules):
    """(abstract state, NamedSharding tree): params by the rules table, optimizer moments like
    their params (with LoRA: the adapters'), scalars replicated."""
    kwargs = model_kwargs(train_cfg)
    abstract = jax.eval_shape(functools.partial(_init_state, model_cfg, kwargs, tx, 0))
    specs = sharding.param_specs(nnx.state(abstract_model(model_cfg, **kwargs), nnx.Param),
                                 mesh, rules)
    replicated = P()
    opt_specs = optax.tree_map_params(
        tx, lambda _, spec: spec, abstract["opt_state"],
        trainable(specs, kwargs["lora"] is not None)[0],
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, P))
    spec_tree = {"step": replicated, "params": specs, "opt_state": opt_specs}
    return abstract, sharding.named(mesh, spec_tree)


def init_adapters(model_cfg, train_cfg, mesh, rules, seed: int):
    """A LoRA run's fresh adapters (PEFT's init), directly sharded: the whole model is built
    under jit and only its adapters returned, so XLA never computes the base's random init."""
    kwargs = model_kwargs(train_cfg)
    _, shardings = state_shardings(model_cfg, train_cfg, optax.identity(), mesh, rules)

    def make():
        model = MPTForCausalLM(model_cfg, rngs=nnx.Rngs(seed), **kwargs)
        return lora_lib.split(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]

    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        return jax.jit(make, out_shardings=trainable(shardings["params"], True)[0])()


def init_state(model_cfg, train_cfg, tx, mesh, rules, seed: int):
    """Parameters and optimizer state created directly sharded (jit with out_shardings)."""
    _, shardings = state_shardings(model_cfg, train_cfg, tx, mesh, rules)
    init = jax.jit(functools.partial(_init_state, model_cfg, model_kwargs(train_cfg), tx, seed),
                   out_shardings=shardings)
    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        return init()


def parse_xla_options(text: str) -> dict:
    """"name=value,name=value" (XLA debug options, e.g. "xla_gpu_enable_triton_gemm=false") ->
    a dict for `jax.jit(..., compiler_options=...)`: true/false become bools, integers ints.
    Raises ValueError naming the bad entry."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"XLA option {item!r}: expected name=value with an xla_* name")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[name.strip()] = low == "true"
        else:
            try:
                out[name.strip()] = int(value)
            except ValueError:
                out[name.strip()] = value.strip()
    return out


def compile_train_step(settings: StepSettings, state_shardings_tree, mesh, batch_keys, *,
                       xla_options: str = ""):
    """The jitted train step. xla_options: XLA options for this computation alone (see
    parse_xla_options), e.g. "xla_gpu_enable_triton_gemm=false"; other jits keep theirs."""
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(settings.rules))
    batch_shardings = {k: batch_sharding for k in batch_keys}
    replicated = NamedSharding(mesh, P())
    return jax.jit(functools.partial(train_step, settings=settings),
                   in_shardings=(state_shardings_tree, batch_shardings),
                   out_shardings=(state_shardings_tree, replicated), donate_argnums=(0,),
                   compiler_options=parse_xla_options(xla_options) or None)


def compile_eval_step(settings: StepSettings, params_shardings, mesh, batch_keys):
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(settings.rules))
    replicated = NamedSharding(mesh, P())
    return jax.jit(functools.partial(eval_step, settings=settings),
                   in_shardings=(params_shardings, {k: batch_sharding for k in batch_keys}),
                   out_shardings=(replicated, replicated))
