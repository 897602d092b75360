"""MPT in Flax NNX: LPLayerNorm, fused-Wqkv ALiBi attention, GELU/GLU MLP, stacked blocks.

Weights are stored `[in, out]` (JAX convention; the converter transposes torch's `[out, in]`).
Every parameter carries its logical axis names as `logical_axes` metadata (see sharding.py); the
blocks' parameters are stacked along a leading `layers` axis and applied with `jax.lax.scan`
(or a Python loop over the same stacked state when `scan_layers=False`).

Dtype policy: parameters in `param_dtype` (float32 by default), matmuls in `dtype` (the compute
dtype; bfloat16 for training), softmax and norms' statistics in float32, logits float32.
RNG keys are passed explicitly: `dropout_rng=None` means deterministic (eval).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mpt_jax import sharding
from mpt_jax.kernels import ATTN_LSE_NAME, ATTN_OUT_NAME, norm_gpu, unpack_qkv
from mpt_jax.model import attention as attn_lib
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.model.config import MPTConfig
from mpt_jax.model.layers import ACTIVATIONS, Norm, dense, dropout, init_weight, residual_div

_cp = jax.checkpoint_policies
_ATTN_NAMES = (ATTN_OUT_NAME, ATTN_LSE_NAME)
MLP_ACT_NAME = "mlp_act"

# Every policy but "full"/"nothing" keeps the attention kernel's output and logsumexp (named in
# the kernels), so the backward pass never reruns the forward kernel; "dots_act" also keeps the
# MLP activation (the GELU output), trading memory for the elementwise recompute.
REMAT_POLICIES = {
    "none": None,
    "full": "full",
    "dots": _cp.save_from_both_policies(_cp.dots_saveable, _cp.save_only_these_names(*_ATTN_NAMES)),
    "dots_no_batch": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names(*_ATTN_NAMES)),
    "dots_act": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable,
        _cp.save_only_these_names(*_ATTN_NAMES, MLP_ACT_NAME)),
    "nothing": _cp.nothing_saveable,
}


class AttnContext(NamedTuple):
    """Per-call inputs shared by every layer's attention."""

    segment_ids: jax.Array | None  # [B, T] (training / full forward)
    kv_mask: jax.Array | None  # [B, S] (cache mode: valid cache slots)
    cache_index: jax.Array | None  # scalar int32 (cache mode: tokens already in the cache)


class Attention(nnx.Module):
    """Fused-Wqkv multi-head / multi-query / grouped-query attention with ALiBi."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype, attn_impl: str,
                 attn_interpret: bool = False):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim = h, kv, hd
        self.clip_qkv = cfg.attn_config.clip_qkv
        self.softmax_scale = cfg.attn_config.softmax_scale
        self.attn_impl = attn_impl
        self.attn_interpret = attn_interpret
        self.attn_pdrop = cfg.attn_config.attn_pdrop
        self.qk_gn = cfg.attn_config.qk_gn
        self.slopes = (tuple(float(s) for s in alibi_slopes(h, cfg.attn_config.alibi_bias_max))
                       if cfg.attn_config.alibi else None)
        n_qkv = (h + 2 * kv) * hd
        self.Wqkv = nnx.Param(
            init_weight(rngs.params(), (d, n_qkv), cfg, param_dtype), logical_axes=("embed", "qkv")
        )
        self.out_proj = nnx.Param(
            init_weight(rngs.params(), (h * hd, d), cfg, param_dtype, div=residual_div(cfg)),
            logical_axes=("heads", "embed"),
        )
        use_bias = not cfg.no_bias
        self.Wqkv_bias = (nnx.Param(jnp.zeros((n_qkv,), param_dtype), logical_axes=("qkv",))
                          if use_bias else None)
        self.out_proj_bias = (nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("norm",))
                              if use_bias else None)
        if cfg.attn_config.qk_ln:
            self.q_ln = Norm(d, cfg, param_dtype=param_dtype, use_bias=use_bias)
            self.k_ln = Norm(kv * hd, cfg, param_dtype=param_dtype, use_bias=use_bias)
        elif cfg.attn_config.qk_gn:
            self.q_ln = Norm(hd, cfg, param_dtype=param_dtype, use_bias=use_bias)
            self.k_ln = Norm(hd, cfg, param_dtype=param_dtype, use_bias=use_bias)
        else:
            self.q_ln = self.k_ln = None

    def _heads(self, qkv, dtype):
        """The fused projection `[B, T, (H + 2 KV) * hd]` -> q `[B, T, H, hd]`, k and v
        `[B, T, KV, hd]`, with the q/k norms (qk_ln / qk_gn) applied."""
        q, k, v = unpack_qkv(qkv, self.n_heads, self.kv_heads)
        if self.q_ln is not None:
            if self.qk_gn:  # per head
                q = self.q_ln(q, dtype).astype(dtype)
                k = self.k_ln(k, dtype).astype(dtype)
            else:  # over all heads' features
                q = self.q_ln(q.reshape(*q.shape[:2], -1), dtype).astype(dtype).reshape(q.shape)
                k = self.k_ln(k.reshape(*k.shape[:2], -1), dtype).astype(dtype).reshape(k.shape)
        return q, k, v

    def __call__(self, x_btd, ctx: AttnContext, cache_kv, *, dtype, training: bool):
        b, t, _ = x_btd.shape
        h, kv, hd = self.n_heads, self.kv_heads, self.head_dim
        qkv = dense(x_btd, self.Wqkv, self.Wqkv_bias, dtype)
        if self.clip_qkv is not None:
            qkv = jnp.clip(qkv, -self.clip_qkv, self.clip_qkv)
        slopes = None if self.slopes is None else jnp.asarray(self.slopes, jnp.float32)

        if training and self.attn_pdrop > 0:
            raise ValueError(
                f"attn_config.attn_pdrop={self.attn_pdrop}: attention-probability dropout is not "
                "implemented in the flash kernels; train with attn_pdrop=0 (as MPT-7B did)"
            )
        new_cache = None
        if cache_kv is None and self.q_ln is None:
            # q, k and v are read in place from the fused projection (and the gradient comes
            # back as one array) on the Pallas GPU path
            o_bthd = attn_lib.flash_attention_packed(
                qkv, h, kv, alibi_slopes=slopes, causal=True, segment_ids=ctx.segment_ids,
                softmax_scale=self.softmax_scale, impl=self.attn_impl,
                interpret=self.attn_interpret,
            )
        elif cache_kv is None:
            q_bthd, k_btkd, v_btkd = self._heads(qkv, dtype)
            o_bthd = attn_lib.flash_attention(
                q_bthd, k_btkd, v_btkd, alibi_slopes=slopes, causal=True,
                segment_ids=ctx.segment_ids, softmax_scale=self.softmax_scale,
                impl=self.attn_impl, interpret=self.attn_interpret,
            )
        else:
            q_bthd, k_btkd, v_btkd = self._heads(qkv, dtype)
            k_cache, v_cache = cache_kv  # [B, KV, S, hd]
            idx = ctx.cache_index
            if isinstance(idx, int) and idx == 0:
                k_cache = jax.lax.dynamic_update_slice(
                    k_cache, k_btkd.swapaxes(1, 2).astype(k_cache.dtype), (0, 0, 0, 0))
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, v_btkd.swapaxes(1, 2).astype(v_cache.dtype), (0, 0, 0, 0))
                # Prefill into an empty cache (a static 0): the new tokens see only each other,
                # so attention runs over them alone through the flash path.
                seg = None if ctx.kv_mask is None else ctx.kv_mask[:, :t].astype(jnp.int32)
                o_bthd = attn_lib.flash_attention(
                    q_bthd, k_btkd, v_btkd, alibi_slopes=slopes, causal=True, segment_ids=seg,
                    softmax_scale=self.softmax_scale, impl=self.attn_impl,
                    interpret=self.attn_interpret,
                )
            else:
                o_bthd, k_cache, v_cache = attn_lib.append_and_attend(
                    q_bthd, k_btkd, v_btkd, k_cache, v_cache, idx, alibi_slopes=slopes,
                    softmax_scale=self.softmax_scale, kv_mask=ctx.kv_mask, impl=self.attn_impl,
                    interpret=self.attn_interpret,
                    qkv=None if self.q_ln is not None else qkv)  # q/k normed: use the slices
            new_cache = (k_cache, v_cache)
        o_btd = o_bthd.reshape(b, t, h * hd)
        return dense(o_btd, self.out_proj, self.out_proj_bias, dtype), new_cache


class MLP(nnx.Module):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype):
        d, f = cfg.d_model, cfg.ffn_hidden_size
        use_bias = not cfg.no_bias
        self.act = cfg.ffn_config.ffn_act_fn
        self.up_proj = nnx.Param(init_weight(rngs.params(), (d, f), cfg, param_dtype),
                                 logical_axes=("embed", "mlp"))
        self.down_proj = nnx.Param(
            init_weight(rngs.params(), (f, d), cfg, param_dtype, div=residual_div(cfg)),
            logical_axes=("mlp", "embed"),
        )
        self.gate_proj = (nnx.Param(init_weight(rngs.params(), (d, f), cfg, param_dtype),
                                    logical_axes=("embed", "mlp"))
                          if cfg.ffn_config.ffn_type == "mptglu" else None)
        self.up_proj_bias = (nnx.Param(jnp.zeros((f,), param_dtype), logical_axes=("mlp",))
                             if use_bias else None)
        self.down_proj_bias = (nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("norm",))
                               if use_bias else None)
        self.gate_proj_bias = (nnx.Param(jnp.zeros((f,), param_dtype), logical_axes=("mlp",))
                               if use_bias and self.gate_proj is not None else None)

    def __call__(self, x_btd, *, dtype):
        act = ACTIVATIONS[self.act]
        up_btf = dense(x_btd, self.up_proj, self.up_proj_bias, dtype)
        if self.gate_proj is not None:
            h_btf = act(dense(x_btd, self.gate_proj, self.gate_proj_bias, dtype)) * up_btf
        else:
            h_btf = act(up_btf)
        h_btf = checkpoint_name(h_btf, MLP_ACT_NAME)
        h_btf = sharding.constrain(h_btf, ("batch", "seq", "mlp"))
        return dense(h_btf, self.down_proj, self.down_proj_bias, dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)); x + ffn(norm_2(x))."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype, attn_impl: str,
                 attn_interpret: bool = False):
        use_bias = not cfg.no_bias
        self.resid_pdrop = cfg.resid_pdrop
        self.norm_1 = Norm(cfg.d_model, cfg, param_dtype=param_dtype, use_bias=use_bias)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype, attn_impl=attn_impl,
                              attn_interpret=attn_interpret)
        self.norm_2 = Norm(cfg.d_model, cfg, param_dtype=param_dtype, use_bias=use_bias)
        self.ffn = MLP(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x_btd, ctx: AttnContext, cache_kv, dropout_key, *, dtype):
        training = dropout_key is not None
        if cache_kv is not None and x_btd.shape[1] == 1 and self.decode_kernels():
            x_btd, m_btd, new_cache = self.decode_step(x_btd, None, ctx, cache_kv, dtype=dtype)
            x_btd = x_btd + m_btd.astype(x_btd.dtype)
            return sharding.constrain(x_btd, ("batch", "seq", "act_embed")), new_cache
        k1 = k2 = None
        if training:
            k1, k2 = jax.random.split(dropout_key)
        a_btd, new_cache = self.attn(self.norm_1(x_btd, dtype), ctx, cache_kv, dtype=dtype,
                                     training=training)
        x_btd = x_btd + dropout(a_btd, self.resid_pdrop, k1).astype(x_btd.dtype)
        m_btd = self.ffn(self.norm_2(x_btd, dtype), dtype=dtype)
        x_btd = x_btd + dropout(m_btd, self.resid_pdrop, k2).astype(x_btd.dtype)
        return sharding.constrain(x_btd, ("batch", "seq", "act_embed")), new_cache

    def decode_kernels(self) -> bool:
        """One token per row against the cache on the Pallas GPU path: the residual adds and
        norms run as single-launch kernels (kernels/norm_gpu.py)."""
        return (attn_lib.resolve_impl(self.attn.attn_impl) in attn_lib.GPU_IMPLS
                and norm_gpu.supported(self.norm_1.weight.shape[-1]))

    def decode_step(self, x_btd, pending, ctx: AttnContext, cache_kv, *, dtype):
        """The block on one new token per row with the add+norm kernels. `pending` (or None) is
        the previous block's MLP output, not yet added to x: it is added inside this block's
        first norm kernel. Returns (x after the attention residual, this block's MLP output,
        new cache): the caller adds the MLP output, or hands it on to the next block."""
        interpret = self.attn.attn_interpret
        x_btd, h_btd = self.norm_1.fused(x_btd, pending, dtype, interpret=interpret)
        a_btd, new_cache = self.attn(h_btd, ctx, cache_kv, dtype=dtype, training=False)
        x_btd, h_btd = self.norm_2.fused(x_btd, a_btd, dtype, interpret=interpret)
        return x_btd, self.ffn(h_btd, dtype=dtype), new_cache


class KVCache(NamedTuple):
    """Preallocated per-layer keys and values, `[L, B, KV, S, hd]` each (see
    attention.decode_attention for the layout)."""

    k: jax.Array
    v: jax.Array


def _stacked_blocks(cfg: MPTConfig, key, *, param_dtype, attn_impl, attn_interpret) -> Block:
    """One Block whose parameters carry a leading `layers` axis (n_layers deep)."""

    def make_state(k):
        return nnx.state(Block(cfg, rngs=nnx.Rngs(params=k), param_dtype=param_dtype,
                               attn_impl=attn_impl, attn_interpret=attn_interpret))

    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: Block(cfg, rngs=nnx.Rngs(params=0), param_dtype=param_dtype, attn_impl=attn_impl,
                      attn_interpret=attn_interpret)))
    state = jax.vmap(make_state)(jax.random.split(key, cfg.n_layers))
    blocks = nnx.merge(graphdef, state)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable):
            var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return blocks


class MPTForCausalLM(nnx.Module):
    """MPT decoder with a (tied by default) language-model head.

    `model(input_ids)` -> float32 logits `[B, T, vocab]`. Optional `attention_mask` `[B, T]`
    (1 = token, 0 = padding; left padding is the supported layout), `segment_ids` `[B, T]` for
    packed documents (used when `attn_config.attn_uses_sequence_id`, as llm-foundry does),
    `dropout_rng` for training. With `cache=` (from `init_cache`) and `cache_index` the call runs
    against the KV cache and returns `(logits, new_cache)`; `attention_mask` is then `[B, S]` over
    the whole cache. `attn_interpret=True` runs a Pallas `attn_impl` in interpret mode (CPU tests).
    """

    def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attn_impl: str = "auto", remat_policy: str = "none",
                 scan_layers: bool = True, attn_interpret: bool = False):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; expected {tuple(REMAT_POLICIES)}")
        if attn_impl not in attn_lib.IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected {attn_lib.IMPLS}")
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.scan_layers = scan_layers
        d = cfg.d_model
        self.wte = nnx.Param(
            init_weight(rngs.params(), (cfg.vocab_size, d), cfg, param_dtype, embedding=True),
            logical_axes=("vocab", "embed"),
        )
        self.wpe = (nnx.Param(
            init_weight(rngs.params(), (cfg.max_seq_len, d), cfg, param_dtype, embedding=True),
            logical_axes=("positions", "embed")) if cfg.use_wpe else None)
        self.blocks = _stacked_blocks(cfg, rngs.params(), param_dtype=param_dtype,
                                      attn_impl=attn_impl, attn_interpret=attn_interpret)
        self.norm_f = Norm(d, cfg, param_dtype=param_dtype, use_bias=not cfg.no_bias)
        self.lm_head = (None if cfg.tie_word_embeddings else nnx.Param(
            init_weight(rngs.params(), (cfg.vocab_size, d), cfg, param_dtype, embedding=True),
            logical_axes=("vocab", "embed")))

    # -- public API ------------------------------------------------------------------------
    def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, dropout_rng=None,
                 cache: KVCache | None = None, cache_index=None):
        h_btd, new_cache = self.hidden_states(
            input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
            dropout_rng=dropout_rng, cache=cache, cache_index=cache_index)
        logits = self.unembed(h_btd)
        return logits if cache is None else (logits, new_cache)

    def output_embedding(self):
        """The `[V, D]` unembedding matrix: wte when tied, else lm_head."""
        return (self.wte if self.lm_head is None else self.lm_head)[...]

    def unembed(self, h_btd):
        """Final hidden states `[..., D]` -> float32 logits `[..., V]` (h @ wte.T, logit_scale)."""
        w_vd = self.output_embedding()
        logits = jnp.einsum("...d,vd->...v", h_btd.astype(self.dtype), w_vd.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        scale = self.config.logit_scale_value
        return logits if scale is None else logits * scale

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.config
        shape = (cfg.n_layers, batch_size, cfg.kv_n_heads, max_len, cfg.head_dim)
        dt = self.dtype if dtype is None else dtype
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def hidden_states(self, input_ids, *, attention_mask=None, segment_ids=None,
                      dropout_rng=None, cache: KVCache | None = None, cache_index=None):
        """Token ids -> final normed hidden states `[B, T, D]` (and the updated cache)."""
        cfg, dtype = self.config, self.dtype
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if cache is not None and cache_index is None:
            raise ValueError("cache given without cache_index")
        if cache is not None:  # (before cache_index becomes an array below)
            attn_lib.check_cache_index(cache_index, input_ids.shape[1], cache.k.shape[3])

        x_btd = self.embed(input_ids, attention_mask=attention_mask, cache_index=cache_index)
        keys = None
        if dropout_rng is not None:
            emb_key, layers_key = jax.random.split(dropout_rng)
            x_btd = dropout(x_btd, cfg.emb_pdrop, emb_key)
            keys = jax.random.split(layers_key, cfg.n_layers)
        x_btd = sharding.constrain(x_btd.astype(dtype), ("batch", "seq", "act_embed"))

        if cache is None:
            seg = segment_ids if (cfg.attn_config.attn_uses_sequence_id
                                  and segment_ids is not None) else None
            if attention_mask is not None:
                mask = jnp.asarray(attention_mask).astype(bool)
                seg = jnp.where(mask, 1 if seg is None else seg + 1, 0).astype(jnp.int32)
            ctx = AttnContext(segment_ids=seg, kv_mask=None, cache_index=None)
        else:
            kv_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
            ctx = AttnContext(segment_ids=None, kv_mask=kv_mask,
                              cache_index=jnp.asarray(cache_index, jnp.int32))

        x_btd, new_cache = self._run_blocks(x_btd, ctx, cache, keys)
        return self.norm_f(x_btd, dtype), new_cache

    def embed(self, input_ids, *, attention_mask=None, cache_index=None):
        """Token (and learned position) embeddings `[B, T, D]` float32, before dropout;
        `embedding_fraction` scales the gradient reaching them, as in llm-foundry."""
        x_btd = jnp.take(self.wte[...], input_ids, axis=0).astype(jnp.float32)
        if self.wpe is not None:
            x_btd = x_btd + self._position_embeddings(input_ids.shape[1], attention_mask,
                                                      cache_index)
        f = self.config.embedding_fraction
        if f < 1.0:
            x_btd = x_btd * f + jax.lax.stop_gradient(x_btd) * (1 - f)
        return x_btd

    # -- internals -------------------------------------------------------------------------
    def _position_embeddings(self, t, attention_mask, cache_index):
        """llm-foundry's learned positions: left padding does not advance the position."""
        start = 0 if cache_index is None else cache_index
        pos_bt = (start + jnp.arange(t))[None, :]
        if attention_mask is not None:
            pads = jnp.cumsum(1 - jnp.asarray(attention_mask).astype(jnp.int32), axis=1)
            pads = jax.lax.dynamic_slice_in_dim(pads, start, t, axis=1)
            pos_bt = jnp.maximum(pos_bt - pads, 0)
        return jnp.take(self.wpe[...], pos_bt, axis=0).astype(jnp.float32)

    def _run_blocks(self, x_btd, ctx, cache, keys):
        graphdef, state = nnx.split(self.blocks)
        dtype = self.dtype

        def layer(x, layer_state, cache_kv, key):
            block = nnx.merge(graphdef, layer_state)
            return block(x, ctx, cache_kv, key, dtype=dtype)

        policy = REMAT_POLICIES[self.remat_policy]
        if policy == "full":
            layer = jax.checkpoint(layer)
        elif policy is not None:
            layer = jax.checkpoint(layer, policy=policy)

        cache_xs = None if cache is None else (cache.k, cache.v)
        if self.scan_layers:
            def body(x, xs):
                layer_state, cache_kv, key = xs
                x, new_kv = layer(x, layer_state, cache_kv, key)
                return x, new_kv

            x_btd, new_kv = jax.lax.scan(body, x_btd, (state, cache_xs, keys))
        else:
            outs = []
            for i in range(self.config.n_layers):
                sl = jax.tree.map(lambda a, i=i: a[i], (state, cache_xs, keys))
                x_btd, kv_i = layer(x_btd, *sl)
                outs.append(kv_i)
            new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x_btd, (None if cache is None else KVCache(*new_kv))


def count_params(model: MPTForCausalLM) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(config: MPTConfig, **kwargs) -> MPTForCausalLM:
    """The model's shapes and dtypes only (nothing allocated): `nnx.eval_shape`."""
    return nnx.eval_shape(lambda: MPTForCausalLM(config, rngs=nnx.Rngs(0), **kwargs))
