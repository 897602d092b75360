"""MPT in Flax NNX: LPLayerNorm, fused-Wqkv ALiBi attention, GELU/GLU MLP, stacked blocks.

Weights are stored `[in, out]` (JAX convention; the converter transposes torch's `[out, in]`).
Every parameter carries its logical axis names as `logical_axes` metadata (see sharding.py); the
blocks' parameters are stacked along a leading `layers` axis and applied with `jax.lax.scan`
(or a Python loop over the same stacked state when `scan_layers=False`).

One forward path: `MPTForCausalLM.hidden_states` serves training and scoring (mode "full"),
prefill into an empty KV cache ("prefill") and decoding or chunks against a filled one
("decode"); the generator drives the same code over its per-layer weight copies (`layers=`).

Dtype policy: parameters in `param_dtype` (float32 by default), matmuls in `dtype` (the compute
dtype; bfloat16 for training), softmax and norms' statistics in float32, logits float32.
RNG keys are passed explicitly: `dropout_rng=None` means deterministic (eval).

Quantized weights (`config.quantization`, model/quant.py): the matrices are int8 `[out, in]`
with float32 scale siblings (`Wqkv_scale`, `wte_scale`, ...); every matmul and the embedding
gather read them as int8 (quant.int8_dense, quant.embed_rows). `quantize_model` turns a float
model into one; such a model is for inference (its int8 parameters take no gradient).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mpt_jax import sharding
from mpt_jax.kernels import norm_gpu
from mpt_jax.kernels.common import ATTN_LSE_NAME, ATTN_OUT_NAME, unpack_qkv
from mpt_jax.model import attention as attn_lib
from mpt_jax.model import lora as lora_lib
from mpt_jax.model import quant
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.model.config import MPTConfig
from mpt_jax.model.layers import Norm, dropout, init_weight, residual_div

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


# "full": the whole sequence (training, scoring; no cache). "prefill": the new tokens into an
# empty KV cache, attending to each other only (the flash kernels), written from slot 0.
# "decode": new tokens against a filled cache at cache_index (one token a row, or a chunk).
# "mixed" (per-layer weights only; the serving engine): one row holding a decode step's B
# tokens, one per row of a [B, ...] cache at cache_index[0] ([B]), then a prompt chunk into a
# second, one-row cache at cache_index[1] (a scalar); the matmuls run over all of them at once,
# each part attends against its own cache.
MODES = ("full", "prefill", "decode", "mixed")


def _unstack(tree, n: int) -> list:
    """The n layers of a tree of stacked [n, ...] arrays, as n trees. One split a leaf, not n
    slices: the gradient of a slice is a pad to the whole stack, and XLA summed the n pads of a
    leaf in one fusion that read every pad for each element (MPT-7B's full finetune: 365 ms of
    a 1.09 s step on an H200, bench/PERF_NOTES.md Session 14); a split's gradient is one
    concatenation."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[p.reshape(p.shape[1:]) for p in jnp.split(a, n, axis=0)] for a in leaves]
    return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


class LayerContext(NamedTuple):
    """Per-call inputs every layer shares (MPTForCausalLM.hidden_states builds it once)."""

    mode: str  # one of MODES
    segment_ids: jax.Array | None  # [B, T] int32 (full / prefill): 0 = padding, else documents
    kv_mask: jax.Array | None  # [B, S] bool (decode: the cache slots to attend to)
    cache_index: jax.Array | None  # int32 scalar or [B] (decode: tokens already in each row)
    # Decode, one token a row, on the Pallas GPU path: every residual add + norm is one
    # add+norm kernel, and each block's MLP residual is added in the next block's first norm
    # kernel (or norm_f's) instead of by itself.
    norm_kernels: bool
    n_decode: int = 0  # mixed: the decode tokens ahead of the chunk in the row


class Attention(nnx.Module):
    """Fused-Wqkv multi-head / multi-query / grouped-query attention with ALiBi."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype, attn_impl: str,
                 attn_interpret: bool = False, lora: lora_lib.LoraConfig | None = None):
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
        q8 = cfg.quantization
        self.Wqkv, self.Wqkv_scale = quant.linear_params(
            init_weight(rngs.params(), (d, n_qkv), cfg, param_dtype), ("embed", "qkv"), q8)
        self.out_proj, self.out_proj_scale = quant.linear_params(
            init_weight(rngs.params(), (h * hd, d), cfg, param_dtype, div=residual_div(cfg)),
            ("heads", "embed"), q8)
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
        self.Wqkv_lora = lora_lib.make_adapter("Wqkv", d, n_qkv, lora, rngs)
        self.out_proj_lora = lora_lib.make_adapter("out_proj", h * hd, d, lora, rngs)

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

    def _dense(self, x, w, scale, b, adapter, key, dtype, out_axis):
        return lora_lib.project(x, w, b, adapter, key, dtype, scale=scale, out_axis=out_axis,
                                kernels=attn_lib.resolve_impl(self.attn_impl) in
                                attn_lib.GPU_IMPLS, interpret=self.attn_interpret)

    def __call__(self, x_btd, ctx: LayerContext, cache_kv, *, dtype, training: bool,
                 lora_key=None):
        b, t, _ = x_btd.shape
        h, kv, hd = self.n_heads, self.kv_heads, self.head_dim
        qkv = self._dense(x_btd, self.Wqkv, self.Wqkv_scale, self.Wqkv_bias, self.Wqkv_lora,
                          _subkey(lora_key, 0), dtype, "qkv")
        if self.clip_qkv is not None:
            qkv = jnp.clip(qkv, -self.clip_qkv, self.clip_qkv)
        slopes = None if self.slopes is None else jnp.asarray(self.slopes, jnp.float32)

        if training and self.attn_pdrop > 0:
            raise ValueError(
                f"attn_config.attn_pdrop={self.attn_pdrop}: attention-probability dropout is not "
                "implemented in the flash kernels; train with attn_pdrop=0 (as MPT-7B did)"
            )
        kw = dict(alibi_slopes=slopes, softmax_scale=self.softmax_scale, impl=self.attn_impl,
                  interpret=self.attn_interpret)
        # Without q/k norms the kernels may read q, k and v in place from the projection (the
        # attention plan decides); with them there is no such array.
        packed = self.q_ln is None
        heads = None if packed and ctx.mode == "full" else self._heads(qkv, dtype)
        new_cache = None
        if ctx.mode == "mixed":  # the decode tokens [B, 1], then the chunk [1, C]
            nd = ctx.n_decode
            parts = []
            for qkv_p, kv_p, index in ((qkv[0, :nd, None], cache_kv[0], ctx.cache_index[0]),
                                       (qkv[:, nd:], cache_kv[1], ctx.cache_index[1])):
                o_p, k_p, v_p = attn_lib.append_and_attend(
                    *self._heads(qkv_p, dtype), *kv_p, index, qkv=qkv_p if packed else None,
                    **kw)
                parts.append((o_p.reshape(1, -1, h * hd), (k_p, v_p)))
            o_btd = jnp.concatenate([parts[0][0], parts[1][0]], axis=1)
            return self._dense(o_btd, self.out_proj, self.out_proj_scale, self.out_proj_bias,
                               self.out_proj_lora, _subkey(lora_key, 1), dtype,
                               "embed"), (parts[0][1], parts[1][1])
        if ctx.mode == "decode":
            o_bthd, k_cache, v_cache = attn_lib.append_and_attend(
                *heads, *cache_kv, ctx.cache_index, kv_mask=ctx.kv_mask,
                qkv=qkv if packed else None, **kw)
            new_cache = (k_cache, v_cache)
        else:  # the tokens see only each other: left padding and documents are segment ids
            if packed:
                o_bthd = attn_lib.flash_attention_packed(
                    qkv, h, kv, causal=True, segment_ids=ctx.segment_ids, **kw)
            else:
                o_bthd = attn_lib.flash_attention(*heads, causal=True,
                                                  segment_ids=ctx.segment_ids, **kw)
            if ctx.mode == "prefill":
                new_cache = attn_lib.write_cache(*cache_kv, heads[1], heads[2], 0)
        o_btd = o_bthd.reshape(b, t, h * hd)
        return self._dense(o_btd, self.out_proj, self.out_proj_scale, self.out_proj_bias,
                           self.out_proj_lora, _subkey(lora_key, 1), dtype, "embed"), new_cache


class MLP(nnx.Module):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype, attn_impl: str = "auto",
                 attn_interpret: bool = False, lora: lora_lib.LoraConfig | None = None):
        d, f = cfg.d_model, cfg.ffn_hidden_size
        use_bias = not cfg.no_bias
        self.act = cfg.ffn_config.ffn_act_fn
        self.attn_impl = attn_impl  # the model's kernel choice (int8 matmuls on GPU)
        self.attn_interpret = attn_interpret
        q8 = cfg.quantization
        self.up_proj, self.up_proj_scale = quant.linear_params(
            init_weight(rngs.params(), (d, f), cfg, param_dtype), ("embed", "mlp"), q8)
        self.down_proj, self.down_proj_scale = quant.linear_params(
            init_weight(rngs.params(), (f, d), cfg, param_dtype, div=residual_div(cfg)),
            ("mlp", "embed"), q8)
        self.gate_proj, self.gate_proj_scale = (quant.linear_params(
            init_weight(rngs.params(), (d, f), cfg, param_dtype), ("embed", "mlp"), q8)
            if cfg.ffn_config.ffn_type == "mptglu" else (None, None))
        self.up_proj_bias = (nnx.Param(jnp.zeros((f,), param_dtype), logical_axes=("mlp",))
                             if use_bias else None)
        self.down_proj_bias = (nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("norm",))
                               if use_bias else None)
        self.gate_proj_bias = (nnx.Param(jnp.zeros((f,), param_dtype), logical_axes=("mlp",))
                               if use_bias and self.gate_proj is not None else None)
        self.up_proj_lora = lora_lib.make_adapter("up_proj", d, f, lora, rngs)
        self.down_proj_lora = lora_lib.make_adapter("down_proj", f, d, lora, rngs)
        self.gate_proj_lora = (lora_lib.make_adapter("gate_proj", d, f, lora, rngs)
                               if self.gate_proj is not None else None)

    def __call__(self, x_btd, *, dtype, lora_key=None):
        kw = dict(kernels=attn_lib.resolve_impl(self.attn_impl) in attn_lib.GPU_IMPLS,
                  interpret=self.attn_interpret)
        if self.gate_proj is not None:
            up_btf = lora_lib.project(x_btd, self.up_proj, self.up_proj_bias, self.up_proj_lora,
                                      _subkey(lora_key, 2), dtype, scale=self.up_proj_scale,
                                      out_axis="mlp", **kw)
            h_btf = lora_lib.project(x_btd, self.gate_proj, self.gate_proj_bias,
                                     self.gate_proj_lora, _subkey(lora_key, 4), dtype,
                                     act=self.act, scale=self.gate_proj_scale, out_axis="mlp",
                                     **kw) * up_btf
        else:
            h_btf = lora_lib.project(x_btd, self.up_proj, self.up_proj_bias, self.up_proj_lora,
                                     _subkey(lora_key, 2), dtype, act=self.act,
                                     scale=self.up_proj_scale, out_axis="mlp", **kw)
        h_btf = checkpoint_name(h_btf, MLP_ACT_NAME)
        h_btf = sharding.constrain(h_btf, ("batch", "seq", "mlp"))
        return lora_lib.project(h_btf, self.down_proj, self.down_proj_bias, self.down_proj_lora,
                                _subkey(lora_key, 3), dtype, scale=self.down_proj_scale,
                                out_axis="embed", **kw)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)); x + ffn(norm_2(x))."""

    def __init__(self, cfg: MPTConfig, *, rngs: nnx.Rngs, param_dtype, attn_impl: str,
                 attn_interpret: bool = False, lora: lora_lib.LoraConfig | None = None):
        use_bias = not cfg.no_bias
        self.resid_pdrop = cfg.resid_pdrop
        self.norm_1 = Norm(cfg.d_model, cfg, param_dtype=param_dtype, use_bias=use_bias)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype, attn_impl=attn_impl,
                              attn_interpret=attn_interpret, lora=lora)
        self.norm_2 = Norm(cfg.d_model, cfg, param_dtype=param_dtype, use_bias=use_bias)
        self.ffn = MLP(cfg, rngs=rngs, param_dtype=param_dtype, attn_impl=attn_impl,
                       attn_interpret=attn_interpret, lora=lora)

    def __call__(self, x_btd, pending, ctx: LayerContext, cache_kv, dropout_key, *, dtype):
        """-> (x, pending, new cache). With ctx.norm_kernels, `pending` is the previous block's
        MLP output, not yet added to x (None before the first block): this block's first
        add+norm kernel adds it, and its own MLP output is returned as the next pending.
        Otherwise pending is None in and out."""
        if ctx.norm_kernels:
            interpret = self.attn.attn_interpret
            x_btd, h_btd = self.norm_1.fused(x_btd, pending, dtype, interpret=interpret)
            a_btd, new_cache = self.attn(h_btd, ctx, cache_kv, dtype=dtype, training=False)
            x_btd, h_btd = self.norm_2.fused(x_btd, a_btd, dtype, interpret=interpret)
            return x_btd, self.ffn(h_btd, dtype=dtype), new_cache
        training = dropout_key is not None
        k1 = k2 = lora_key = None
        if training:
            k1, k2 = jax.random.split(dropout_key)
            lora_key = jax.random.fold_in(dropout_key, 2)  # (adapters' dropout, if any)
        a_btd, new_cache = self.attn(self.norm_1(x_btd, dtype), ctx, cache_kv, dtype=dtype,
                                     training=training, lora_key=lora_key)
        x_btd = x_btd + dropout(a_btd, self.resid_pdrop, k1).astype(x_btd.dtype)
        m_btd = self.ffn(self.norm_2(x_btd, dtype), dtype=dtype, lora_key=lora_key)
        x_btd = x_btd + dropout(m_btd, self.resid_pdrop, k2).astype(x_btd.dtype)
        return sharding.constrain(x_btd, ("batch", "seq", "act_embed")), None, new_cache


class KVCache(NamedTuple):
    """Preallocated per-layer keys and values, `[L, B, KV, S, hd]` each (see
    attention.decode_attention for the layout), or int8 quant.QuantizedKV pairs."""

    k: jax.Array
    v: jax.Array


def _stacked_blocks(cfg: MPTConfig, key, *, param_dtype, attn_impl, attn_interpret,
                    lora=None) -> Block:
    """One Block whose parameters carry a leading `layers` axis (n_layers deep)."""

    def make_state(k):
        return nnx.state(Block(cfg, rngs=nnx.Rngs(params=k, lora=jax.random.fold_in(k, 1)),
                               param_dtype=param_dtype, attn_impl=attn_impl,
                               attn_interpret=attn_interpret, lora=lora))

    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: Block(cfg, rngs=nnx.Rngs(params=0, lora=1), param_dtype=param_dtype,
                      attn_impl=attn_impl, attn_interpret=attn_interpret, lora=lora)))
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
    `dropout_rng` for training. With `cache=` (from `init_cache`) the call runs against the KV
    cache and returns `(logits, new_cache)`; `attention_mask` is then `[B, S]` over the whole
    cache, and `mode` says how (see MODES):
      mode="prefill"  the prompt into an empty cache (cache_index 0): the flash kernels, the
                      tokens attending to each other only;
      mode="decode"   (the default with a cache) T new tokens at `cache_index` (int32 scalar,
                      or `[B]`: each row at its own position) against what the cache holds.
    `attn_interpret=True` runs a Pallas `attn_impl` in interpret mode (CPU tests).
    `lora=LoraConfig(...)` adds low-rank adapters to the targeted projections of every block
    (model/lora.py: `<target>_lora` submodules, applied beside the weights by lora.project).
    """

    def __init__(self, config: MPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attn_impl: str = "auto", remat_policy: str = "none",
                 scan_layers: bool = True, attn_interpret: bool = False,
                 lora: lora_lib.LoraConfig | None = None):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; expected {tuple(REMAT_POLICIES)}")
        if attn_impl not in attn_lib.IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected {attn_lib.IMPLS}")
        cfg = config
        if lora is not None:
            lora.check_model(cfg)
        self.config = cfg
        self.lora = lora
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.scan_layers = scan_layers
        d = cfg.d_model
        self.wte, self.wte_scale = quant.embedding_params(
            init_weight(rngs.params(), (cfg.vocab_size, d), cfg, param_dtype, embedding=True),
            ("vocab", "embed"), cfg.quantization)
        self.wpe = (nnx.Param(
            init_weight(rngs.params(), (cfg.max_seq_len, d), cfg, param_dtype, embedding=True),
            logical_axes=("positions", "embed")) if cfg.use_wpe else None)
        self.blocks = _stacked_blocks(cfg, rngs.params(), param_dtype=param_dtype,
                                      attn_impl=attn_impl, attn_interpret=attn_interpret,
                                      lora=lora)
        self.norm_f = Norm(d, cfg, param_dtype=param_dtype, use_bias=not cfg.no_bias)
        self.lm_head, self.lm_head_scale = (None, None) if cfg.tie_word_embeddings else (
            quant.embedding_params(
                init_weight(rngs.params(), (cfg.vocab_size, d), cfg, param_dtype, embedding=True),
                ("vocab", "embed"), cfg.quantization))

    # -- public API ------------------------------------------------------------------------
    def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, dropout_rng=None,
                 cache: KVCache | None = None, cache_index=None, mode: str | None = None):
        h_btd, new_cache = self.hidden_states(
            input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
            dropout_rng=dropout_rng, cache=cache, cache_index=cache_index, mode=mode)
        logits = self.unembed(h_btd)
        return logits if cache is None else (logits, new_cache)

    def output_embedding(self):
        """The `[V, D]` unembedding matrix: wte when tied, else lm_head (float models: the
        training loss fuses it with the cross entropy; a quantized model has no float one)."""
        if self.config.quantization is not None:
            raise ValueError(f"this model's weights are {self.config.quantization} (inference "
                             "only): train or finetune from the floating-point checkpoint")
        return (self.wte if self.lm_head is None else self.lm_head)[...]

    def unembed(self, h_btd):
        """Final hidden states `[..., D]` -> float32 logits `[..., V]` (h @ wte.T, logit_scale)."""
        if self.config.quantization is not None:
            w, s = (self.wte, self.wte_scale) if self.lm_head is None else (
                self.lm_head, self.lm_head_scale)
            attn = self.blocks.attn
            logits = quant.int8_dense(
                h_btd, w[...], s[...], None, self.dtype, out_dtype=jnp.float32, out_axis="vocab",
                kernels=attn_lib.resolve_impl(attn.attn_impl) in attn_lib.GPU_IMPLS,
                interpret=attn.attn_interpret)
        else:
            w_vd = self.output_embedding()
            logits = jnp.einsum("...d,vd->...v", h_btd.astype(self.dtype),
                                w_vd.astype(self.dtype), preferred_element_type=jnp.float32)
        scale = self.config.logit_scale_value
        return logits if scale is None else logits * scale

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache in `dtype` (default the compute dtype; int8: quantized, with
        per-token scales, quant.QuantizedKV)."""
        cfg = self.config
        shape = (cfg.n_layers, batch_size, cfg.kv_n_heads, max_len, cfg.head_dim)
        dt = self.dtype if dtype is None else dtype
        return KVCache(quant.empty_cache(shape, dt), quant.empty_cache(shape, dt))

    def hidden_states(self, input_ids, *, attention_mask=None, segment_ids=None,
                      dropout_rng=None, cache=None, cache_index=None, mode: str | None = None,
                      layers=None):
        """Token ids -> final normed hidden states `[B, T, D]` (and the updated cache); the
        arguments as for `__call__`.

        layers: per-layer block states (each the stacked `blocks` state without its leading
        axis) to run, unrolled, instead of `blocks`; `cache` is then a sequence of per-layer
        (k, v) pairs `[B, KV, S, hd]`, returned likewise. The generator keeps its weights so:
        decoding reads every weight in place, with no slice of a stacked array in its loop."""
        cfg, dtype = self.config, self.dtype
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        mode = _check_mode(mode, cache, cache_index, segment_ids)
        if mode == "prefill":
            cache_index = 0
        if mode == "mixed":
            return self._mixed_hidden_states(input_ids, cache, cache_index, layers)
        if cache is not None:  # (before cache_index becomes an array below)
            slots = jax.tree.leaves(cache)[0].shape[-2]
            attn_lib.check_cache_index(cache_index, t, slots, batch=b)
        want = (b, t) if cache is None else (b, slots)
        if attention_mask is not None and tuple(jnp.shape(attention_mask)) != want:
            raise ValueError(f"attention_mask must be {list(want)} (batch, "
                             f"{'positions' if cache is None else 'cache slots'}), got "
                             f"{list(jnp.shape(attention_mask))}")

        x_btd = self.embed(input_ids, attention_mask=attention_mask, cache_index=cache_index)
        keys = None
        if dropout_rng is not None:
            emb_key, layers_key = jax.random.split(dropout_rng)
            x_btd = dropout(x_btd, cfg.emb_pdrop, emb_key)
            keys = jax.random.split(layers_key, cfg.n_layers)
        x_btd = sharding.constrain(x_btd.astype(dtype), ("batch", "seq", "act_embed"))

        ctx = self._context(mode, t, attention_mask, segment_ids, cache_index)
        x_btd, pending, new_cache = self._run_blocks(x_btd, ctx, cache, keys, layers)
        if ctx.norm_kernels:  # the last block's MLP residual rides in norm_f's kernel
            _, h_btd = self.norm_f.fused(x_btd, pending, dtype,
                                         interpret=self.blocks.attn.attn_interpret)
        else:
            h_btd = self.norm_f(x_btd, dtype)
        return h_btd, new_cache

    def _mixed_hidden_states(self, input_ids, cache, cache_index, layers):
        """hidden_states for mode "mixed" (see MODES): input_ids `[1, B + C]`, cache per layer
        ((k, v) `[B, KV, S, hd]`, (k, v) `[1, KV, S', hd]`), cache_index (positions `[B]`,
        the chunk's start)."""
        if layers is None:
            raise ValueError("mode='mixed' runs over per-layer weights (layers=...)")
        if input_ids.shape[0] != 1 or not isinstance(cache_index, tuple) or len(cache_index) != 2:
            raise ValueError("mode='mixed' takes input_ids [1, B + C] and cache_index (positions "
                             "[B], chunk start)")
        pos_b, start = (jnp.asarray(i, jnp.int32) for i in cache_index)
        nd = pos_b.shape[0]
        if pos_b.ndim != 1 or start.ndim != 0 or not 0 < nd < input_ids.shape[1]:
            raise ValueError(f"mode='mixed': positions must be [B] with B < {input_ids.shape[1]}"
                             f" tokens and the chunk start a scalar, got {pos_b.shape}, "
                             f"{start.shape}")
        positions = jnp.concatenate(
            [pos_b, start + jnp.arange(input_ids.shape[1] - nd, dtype=jnp.int32)])[None]
        x_btd = self.embed(input_ids, positions=positions).astype(self.dtype)
        ctx = LayerContext("mixed", None, None, (pos_b, start), False, nd)
        x_btd, _, new_cache = self._run_blocks(x_btd, ctx, cache, None, layers)
        return self.norm_f(x_btd, self.dtype), new_cache

    def embed(self, input_ids, *, attention_mask=None, cache_index=None, positions=None):
        """Token (and learned position) embeddings `[B, T, D]` float32, before dropout;
        `embedding_fraction` scales the gradient reaching them, as in llm-foundry. positions
        (`[B, T]`, optional): each token's position, instead of counting from cache_index."""
        if self.wte_scale is not None:
            x_btd = quant.embed_rows(self.wte[...], self.wte_scale[...], input_ids)
        else:
            x_btd = jnp.take(self.wte[...], input_ids, axis=0).astype(jnp.float32)
        if self.wpe is not None:
            if positions is None:
                positions = self._positions(input_ids.shape[1], attention_mask, cache_index)
            x_btd = x_btd + jnp.take(self.wpe[...], positions, axis=0).astype(jnp.float32)
        f = self.config.embedding_fraction
        if f < 1.0:
            x_btd = x_btd * f + jax.lax.stop_gradient(x_btd) * (1 - f)
        return x_btd

    # -- internals -------------------------------------------------------------------------
    def _positions(self, t, attention_mask, cache_index):
        """llm-foundry's learned positions `[1 or B, T]`: left padding does not advance the
        position. Each row starts at its cache_index (scalar or [B]; 0 without a cache)."""
        start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        pos_bt = start.reshape(-1, 1) + jnp.arange(t, dtype=jnp.int32)[None, :]  # [1 or B, T]
        if attention_mask is not None:
            pads_bs = jnp.cumsum(1 - jnp.asarray(attention_mask).astype(jnp.int32), axis=1)
            pos_bt = jnp.broadcast_to(pos_bt, (pads_bs.shape[0], t))
            pos_bt = jnp.maximum(pos_bt - jnp.take_along_axis(pads_bs, pos_bt, axis=1), 0)
        return pos_bt

    def _context(self, mode, t, attention_mask, segment_ids, cache_index) -> LayerContext:
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if mode == "decode":
            return LayerContext(mode, None, mask, jnp.asarray(cache_index, jnp.int32),
                                self._norm_kernels(t))
        seg = segment_ids if self.config.attn_config.attn_uses_sequence_id else None
        if mask is not None:  # (prefill: the prompt's columns of the cache's mask)
            seg = jnp.where(mask[:, :t], 1 if seg is None else seg + 1, 0).astype(jnp.int32)
        return LayerContext(mode, seg, None, None, False)

    def _norm_kernels(self, t: int) -> bool:
        """Whether a decode call of t tokens a row runs its adds and norms as add+norm kernels
        (kernels/norm_gpu.py): one token a row on a Pallas GPU impl, a power-of-two width. One
        launch replaces XLA's four or five small kernels each time (bench/PERF_NOTES.md)."""
        attn = self.blocks.attn
        return (t == 1 and attn_lib.resolve_impl(attn.attn_impl) in attn_lib.GPU_IMPLS
                and norm_gpu.supported(self.config.d_model))

    def _run_blocks(self, x_btd, ctx: LayerContext, cache, keys, layers):
        """-> (x, the last block's pending MLP output or None, new cache)."""
        graphdef, stacked = nnx.split(self.blocks)
        dtype = self.dtype

        def layer(x, pending, layer_state, cache_kv, key, index):
            # index: layer `index` of the stacked weights, sliced here, inside the remat, so
            # the backward keeps the stacked weights it already holds rather than a copy of
            # every layer's slice. That matters where weights feed the matmuls uncast (a bf16
            # base at bf16 compute: each slice a buffer of its own, live from the forward to
            # the backward: 12 GiB on MPT-7B); weights cast to the compute dtype are sliced
            # outside, where XLA fuses the slice into the cast (MPT-1B's fp32 step: 3.6%
            # faster so, bench/RESULTS.md).
            if index is not None:
                layer_state = jax.tree.map(lambda a: a[index], layer_state)
            return nnx.merge(graphdef, layer_state)(x, pending, ctx, cache_kv, key, dtype=dtype)

        policy = REMAT_POLICIES[self.remat_policy]
        if policy == "full":
            layer = jax.checkpoint(layer, static_argnums=(5,))
        elif policy is not None:
            layer = jax.checkpoint(layer, policy=policy, static_argnums=(5,))

        pending = None  # nothing for the first block's norm kernel to add
        if layers is None and self.scan_layers:
            if ctx.norm_kernels:  # a scan carry needs an array
                pending = jnp.zeros_like(x_btd)

            def body(carry, xs):
                x, p, kv = layer(*carry, *xs, None)
                return (x, p), kv

            cache_xs = None if cache is None else (cache.k, cache.v)
            (x_btd, pending), new_kv = jax.lax.scan(body, (x_btd, pending),
                                                    (stacked, cache_xs, keys))
            return x_btd, pending, None if cache is None else KVCache(*new_kv)
        n = self.config.n_layers
        per_layer = layers is not None  # the caller's per-layer weights and caches
        caches = cache
        uncast = any(a.dtype == dtype for a in jax.tree.leaves(stacked) if a.ndim >= 3)
        inside = not per_layer and uncast  # (see `layer`)
        if not per_layer:  # unrolled over the stacked weights and cache
            layers = [stacked] * n if inside else _unstack(stacked, n)
            if cache is not None:
                caches = [jax.tree.map(lambda a, i=i: a[i], (cache.k, cache.v)) for i in range(n)]
        new_kv = []
        for i, layer_state in enumerate(layers):
            x_btd, pending, kv = layer(x_btd, pending, layer_state,
                                       None if caches is None else caches[i],
                                       None if keys is None else keys[i],
                                       i if inside else None)
            new_kv.append(kv)
        if cache is None:
            return x_btd, pending, None
        if per_layer:
            return x_btd, pending, tuple(new_kv)
        return x_btd, pending, KVCache(*jax.tree.map(lambda *a: jnp.stack(a), *new_kv))


def _subkey(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


def _check_mode(mode, cache, cache_index, segment_ids) -> str:
    """The call's mode (default: "full" without a cache, "decode" with one), checked against
    the other arguments."""
    if mode is None:
        mode = "full" if cache is None else "decode"
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if (mode == "full") != (cache is None):
        raise ValueError(f"mode={mode!r} " + ("takes no cache" if cache is not None else
                                              "needs a cache (init_cache)"))
    if mode in ("decode", "mixed") and cache_index is None:
        raise ValueError("cache given without cache_index")
    if mode == "prefill" and not (cache_index is None or (
            isinstance(cache_index, (int, np.integer)) and cache_index == 0)):
        raise ValueError(f"mode='prefill' fills an empty cache from slot 0, got cache_index="
                         f"{cache_index!r}; chunks at other positions run with mode='decode'")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed documents) are for the full forward; a KV cache "
                         "holds one sequence per row")
    return mode


def abstract_model(config: MPTConfig, **kwargs) -> MPTForCausalLM:
    """The model's shapes and dtypes only (nothing allocated): `nnx.eval_shape`."""
    return nnx.eval_shape(lambda: MPTForCausalLM(config, rngs=nnx.Rngs(0), **kwargs))


def quantize_model(model: MPTForCausalLM, mode: str = "int8") -> MPTForCausalLM:
    """The model with its matrices quantized as `mode` (model/quant.py), computed on the
    devices the weights are on, one layer at a time; `model` is left as it was. A model
    already in `mode` is returned as is."""
    cfg = model.config
    if cfg.quantization == mode:
        return model
    if cfg.quantization is not None:
        raise ValueError(f"the model is already quantized ({cfg.quantization}); quantize the "
                         f"floating-point model to {mode}")
    qcfg = cfg.replace(quantization=mode)
    attn = model.blocks.attn
    abstract = nnx.eval_shape(lambda: MPTForCausalLM(
        qcfg, rngs=nnx.Rngs(0), dtype=model.dtype, param_dtype=model.norm_f.weight[...].dtype,
        attn_impl=attn.attn_impl, remat_policy=model.remat_policy,
        scan_layers=model.scan_layers, attn_interpret=attn.attn_interpret))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, quant.quantize_pure_dict(nnx.to_pure_dict(nnx.state(model))))
    return nnx.merge(graphdef, state)
