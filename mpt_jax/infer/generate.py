"""Generation: prefill the whole prompt in one call, then a jitted decode loop over a
preallocated KV cache; greedy, temperature, top-k and top-p sampling (sampling.py), seeded;
per-row EOS.

    gen = Generator(model)                       # or Generator(model, mesh=mesh)
    out = gen.generate([[5, 7, 9], [3, 4]], max_new_tokens=32, temperature=0.0, eos_id=0)
    out.tokens  # [B, N] int32, pad_id after a row's EOS;  out.lengths  # [B] (EOS included)

The model's own forward runs both (`MPTForCausalLM.hidden_states`, mode "prefill" then
"decode"): the prompt goes through the flash kernels into an empty cache, each new token through
the decode path.

Layout for speed. Decoding one token reads every weight once, so the loop must read weights in
place: the model's stacked `[L, ...]` block parameters are split once into per-layer arrays
(dynamic slices of a stacked operand inside a scan can be copied before each matmul) that the
model runs unrolled (`layers=`) inside the decode `while_loop`. The cache is a tuple of per-layer
`[B, KV, S, hd]` buffers carried through the loop and donated between calls, so each step writes
only the new token's keys and values, in place. Shapes are fixed for a (batch, prompt length,
cache length) triple: one compilation for prefill, one for the decode loop, none per step.

Prompts of different lengths are left-padded; `attention_mask` marks real tokens. ALiBi uses raw
cache-slot positions: left padding shifts every key of a row by the same amount, which softmax
ignores, so results equal HF's with left padding. With ALiBi nothing limits the length:
`max_len` may exceed `config.max_seq_len` (ALiBi extrapolation, as MPT-7B-StoryWriter does).

Streaming: `generate(..., on_tokens=fn)` runs the loop in host-driven chunks of
`stream_chunk` steps and calls `fn(tokens_bn, n_done)` after each; the next chunk is queued
before the previous one is read, so the device never waits for the host. Without `on_tokens`
the whole loop is a single call.

Sharding: with `mesh=`, parameters are placed by the logical-axis rules (`rules`, sharding.py),
the cache's KV heads follow the `kv_heads` rule, and prefill and decode run under that mesh and
those rules (activation constraints, and the kernels once per shard); jit propagates the rest.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mpt_jax import sharding
from mpt_jax.infer.sampling import SamplingParams, filter_logits, sample
from mpt_jax.kernels import decode_gpu
from mpt_jax.model import MPTForCausalLM, quant


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Token lists -> (ids `[B, T]` int32, mask `[B, T]` int32), left-padded to the longest."""
    if not prompts:
        raise ValueError("no prompts given")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty; every prompt needs a token")
    t = max(lens)
    ids = np.full((len(prompts), t), pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = np.asarray(p, np.int32)
        mask[i, t - len(p):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
class DecodeState(NamedTuple):
    """Everything the decode loop carries. `step` tokens have been produced so far; the last
    of them, `last`, is not yet in the cache (it goes in at slot prompt_len + step - 1)."""

    cache: tuple  # per layer (k, v), each [B, KV, S, hd]
    kv_mask: jax.Array  # [B, S] bool: real prompt tokens and every generated slot
    tokens: jax.Array  # [B, N] int32
    last: jax.Array  # [B] int32
    step: jax.Array  # int32 scalar
    done: jax.Array  # [B] bool
    key: jax.Array  # PRNG key
    logits: jax.Array | None  # [B, N, V] float32 when keep_logits (tests), else None


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, N] int32; pad_id after a row's EOS
    lengths: np.ndarray  # [B] tokens generated per row, EOS included
    logits: np.ndarray | None  # [B, N, V] float32 when keep_logits


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How the decode loop runs on the device (variants bench/generate.py times; the defaults
    are what was measured best).

    steps_per_sync: decode steps per iteration of the loop whose exit test (every row done, or
    N tokens made) the device reports to the host: XLA's GPU while loop copies its predicate to
    the host and waits for it every iteration, which drains the stream once per step. With
    K > 1 the steps run K at a time in a loop of fixed trip count (no host round trip inside),
    and a step past the end leaves the tokens as they were (at most K - 1 steps computed in
    vain at the end).
    compiler_options: XLA options for the decode loop's compilation alone, as (name, value)
    pairs (`jax.jit(..., compiler_options=...)`), e.g. ("xla_gpu_enable_command_buffer",
    "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL") to capture the whole loop in
    one CUDA graph (the list replaces XLA's default one)."""

    steps_per_sync: int = 1
    compiler_options: tuple = ()

    def __post_init__(self):
        if not isinstance(self.steps_per_sync, int) or self.steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be an int >= 1, got {self.steps_per_sync!r}")


class _Weights(NamedTuple):
    top: nnx.State  # everything but the blocks
    placeholder: nnx.State  # scalar stand-ins for the stacked blocks (never read)
    layers: tuple  # per-layer block states, no leading `layers` axis


def _under_rules(impl):
    """A _Spec method traced under the spec's sharding rules (the jitted functions are keyed on
    the spec, so each compiled form carries its rules)."""
    @functools.wraps(impl)
    def run(spec, *args):
        with sharding.use_rules(spec.rules):
            return impl(spec, *args)

    return run


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a model's decoding (hashable): the jitted functions are keyed on
    it, so Generators of equal models share compiled code."""

    graphdef: nnx.GraphDef
    config: object
    dtype: object
    cache_dtype: object
    mesh: object
    rules: tuple
    steps_per_sync: int = 1  # the decode loop's (DecodeOptions); the prefill's spec keeps 1

    def _cache_sharding(self, shape):
        if self.mesh is None:
            return None
        spec = sharding.logical_to_spec(("batch", "kv_heads") + (None,) * (len(shape) - 2),
                                        self.rules)
        return NamedSharding(self.mesh, sharding.fit_spec(spec, shape, self.mesh))

    # -- the model's forward over the per-layer weights -------------------------------------
    def _forward(self, w: _Weights, ids_bt, kv_mask_bs, cache, cache_index, mode, at=None):
        """T new tokens through the model against the cache (`mode` "prefill" or "decode");
        returns the float32 logits `[B, V]` of the last position (or of position `at`, an
        int32 scalar: the serving engine's padded prompt chunks) and the new cache."""
        model = nnx.merge(self.graphdef, w.placeholder, w.top)
        h_btd, cache = model.hidden_states(ids_bt, attention_mask=kv_mask_bs, cache=cache,
                                           cache_index=cache_index, mode=mode, layers=w.layers)
        h_bd = h_btd[:, -1] if at is None else jax.lax.dynamic_index_in_dim(h_btd, at, 1, False)
        return model.unembed(h_bd), cache

    def _forward_mixed(self, w: _Weights, ids_1t, cache, pos_b, start, at):
        """A decode step's B tokens (`ids_1t[0, :B]`, one per row of the cache's first part,
        at pos_b) and a prompt chunk (the rest, into its one-row second part at `start`) in
        one pass: the model's mode "mixed". -> the float32 logits `[B + 1, V]` (the B rows',
        then the chunk's at its token `at`) and the new cache."""
        model = nnx.merge(self.graphdef, w.placeholder, w.top)
        h_1td, cache = model.hidden_states(ids_1t, cache=cache, cache_index=(pos_b, start),
                                           mode="mixed", layers=w.layers)
        b = pos_b.shape[0]
        h_d = jnp.concatenate([h_1td[0, :b], jax.lax.dynamic_slice_in_dim(h_1td[0], b + at, 1)])
        return model.unembed(h_d), cache

    @_under_rules
    def _prefill_impl(self, w, ids_bt, mask_bt, key, pad_id, cache_len, n_new, params,
                      keep_logits, padded=True):
        """padded (static): whether any row of mask_bt has left padding. Without, the prompt
        runs with no mask (attention without segment ids: the faster kernels)."""
        cfg = self.config
        b, t = ids_bt.shape
        shape = (b, cfg.kv_n_heads, cache_len, cfg.head_dim)
        shard = self._cache_sharding(shape)

        def zeros():
            z = quant.empty_cache(shape, self.cache_dtype)
            if shard is None:
                return z
            if quant.is_quantized(z):  # the scales [B, KV, S] split as the values do
                return quant.QuantizedKV(
                    jax.lax.with_sharding_constraint(z.values, shard),
                    jax.lax.with_sharding_constraint(z.scales, self._cache_sharding(shape[:-1])))
            return jax.lax.with_sharding_constraint(z, shard)

        cache = tuple((zeros(), zeros()) for _ in range(cfg.n_layers))
        kv_mask = jnp.concatenate(
            [mask_bt.astype(bool), jnp.ones((b, cache_len - t), bool)], axis=1)
        logits_bv, cache = self._forward(w, ids_bt, kv_mask if padded else None, cache, 0,
                                         "prefill")
        tok_b = sample(logits_bv, jax.random.fold_in(key, 0), params)
        tokens = jnp.full((b, n_new), pad_id, jnp.int32).at[:, 0].set(tok_b)
        logits = None
        if keep_logits:
            logits = jnp.zeros((b, n_new, logits_bv.shape[-1]), jnp.float32)
            logits = logits.at[:, 0].set(logits_bv)
        return DecodeState(cache, kv_mask, tokens, tok_b, jnp.int32(1), jnp.zeros((b,), bool),
                           key, logits)

    @_under_rules
    def _decode_impl(self, w, state: DecodeState, prompt_len, n_steps, params, eos_id, pad_id):
        """Up to n_steps decode steps (fewer once every row is done or N tokens exist).
        eos_id: int32 scalar, -1 for none (traced: no recompile per EOS id)."""
        n_new = state.tokens.shape[1]
        stop = jnp.minimum(state.step + n_steps, n_new)

        def cond(s: DecodeState):
            return (s.step < stop) & ~jnp.all(s.done)

        def step(s: DecodeState):
            done = s.done | (s.last == eos_id)
            index = prompt_len + s.step - 1
            logits_bv, cache = self._forward(w, s.last[:, None], s.kv_mask, s.cache, index,
                                             "decode")
            tok_b = sample(logits_bv, jax.random.fold_in(s.key, s.step), params)
            tok_b = jnp.where(done, pad_id, tok_b)
            tokens = jax.lax.dynamic_update_slice(s.tokens, tok_b[:, None], (0, s.step))
            logits = s.logits
            if logits is not None:
                logits = jax.lax.dynamic_update_slice(logits, logits_bv[:, None], (0, s.step, 0))
            return DecodeState(cache, s.kv_mask, tokens, tok_b, s.step + 1, done, s.key, logits)

        def masked_step(_, s: DecodeState):
            # Past the end the step still runs (a fixed trip count) but changes no output; its
            # cache write lands in the slot of `last`, which the next real step writes again.
            live = cond(s)
            new = step(s)

            def keep(a, b):
                return None if a is None else jnp.where(live, a, b)

            return new._replace(tokens=keep(new.tokens, s.tokens), last=keep(new.last, s.last),
                                step=keep(new.step, s.step), done=keep(new.done, s.done),
                                logits=keep(new.logits, s.logits))

        k = self.steps_per_sync
        body = step if k == 1 else lambda s: jax.lax.fori_loop(0, k, masked_step, s)
        # A row whose latest token is EOS is done before the loop test.
        state = state._replace(done=state.done | (state.last == eos_id))
        state = jax.lax.while_loop(cond, body, state)
        done = state.done | (state.last == eos_id)
        state = state._replace(done=done)
        return state, state.tokens + 0, state.step + 0, jnp.all(done)

_prefill_jit = jax.jit(_Spec._prefill_impl, static_argnums=(0, 6, 7, 8, 9, 10))
_decode_jit = jax.jit(_Spec._decode_impl, static_argnums=(0, 3, 4, 5), donate_argnums=(2,))


@functools.cache
def _decode_jit_with(compiler_options: tuple):
    """The decode loop's jit with its own XLA options (DecodeOptions.compiler_options)."""
    if not compiler_options:
        return _decode_jit
    return jax.jit(_Spec._decode_impl, static_argnums=(0, 3, 4, 5), donate_argnums=(2,),
                   compiler_options=dict(compiler_options))


class Generator:
    """Prefill + jitted decode for one model; holds per-layer copies of the block weights.

    model: an `MPTForCausalLM` (its parameters' dtype is what decoding reads; build or load it
    in bfloat16 for speed). mesh: optional `jax.sharding.Mesh` with axes from sharding.MESH_AXES;
    parameters are placed, and activations and kernels split, by `rules` (default: the rules in
    force when the Generator is made, sharding.DEFAULT_RULES unless `sharding.use_rules` says
    otherwise). cache_dtype: defaults to the model's compute dtype; int8 keeps an int8 cache
    with per-token scales (model/quant.py). A quantized model (config.quantization) decodes
    from its int8 weights. decode: DecodeOptions (benchmark variants of the decode loop). The
    model may be dropped after construction to free its stacked weights.
    """

    def __init__(self, model: MPTForCausalLM, *, mesh=None, rules=None, cache_dtype=None,
                 decode: DecodeOptions | None = None):
        self.config = model.config
        self.dtype = model.dtype
        self.cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
        self.decode_options = DecodeOptions() if decode is None else decode
        self.mesh = mesh
        self.rules = sharding.current_rules() if rules is None else tuple(rules)
        graphdef, blocks_state, top = nnx.split(model, nnx.PathContains("blocks"), ...)
        stacked = nnx.state(model.blocks)
        self._spec = _Spec(graphdef, self.config, self.dtype, self.cache_dtype, mesh, self.rules)
        n = self.config.n_layers
        if mesh is not None:
            top = self._place(top)
            stacked = self._place(stacked)  # per-layer slices keep the sharding of dims 1..
        layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))
        placeholder = jax.tree.map(lambda a: jnp.zeros((), a.dtype), blocks_state)
        self.weights = _Weights(top, placeholder, layers)
        self._set_jits()

    def variant(self, *, cache_dtype=None, decode: DecodeOptions | None = None) -> Generator:
        """A Generator sharing these weights (no copy) with another KV cache dtype and/or
        DecodeOptions (None: this one's)."""
        other = copy.copy(self)
        if cache_dtype is not None:
            other.cache_dtype = jnp.dtype(cache_dtype)
        if decode is not None:
            other.decode_options = decode
        other._spec = dataclasses.replace(self._spec, cache_dtype=other.cache_dtype)
        other._set_jits()
        return other

    def _set_jits(self):
        self._prefill = functools.partial(_prefill_jit, self._spec)
        # (the prefill's spec leaves steps_per_sync at 1: a decode variant shares its prefill)
        self._decode = functools.partial(
            _decode_jit_with(tuple(self.decode_options.compiler_options)),
            dataclasses.replace(self._spec, steps_per_sync=self.decode_options.steps_per_sync))

    # -- placement -------------------------------------------------------------------------
    def _place(self, state):
        def put(var):
            spec = sharding.logical_to_spec(var.get_metadata().get("logical_axes"), self.rules)
            spec = sharding.fit_spec(spec, var.shape, self.mesh)
            return var.replace(jax.device_put(var[...], NamedSharding(self.mesh, spec)))

        return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    # -- public API ------------------------------------------------------------------------
    def generate(self, prompts, *, attention_mask=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None, pad_id: int = 0, max_len: int | None = None,
                 on_tokens: Callable[[np.ndarray, int], None] | None = None,
                 stream_chunk: int = 1, keep_logits: bool = False) -> GenerateOutput:
        """prompts: token lists (left-padded here) or int `[B, T]` ids with `attention_mask`
        (1 = token, 0 = left padding). max_len: the longest sequence (prompt + new tokens)
        allowed, `config.max_seq_len` by default; with ALiBi it may be set past it.
        on_tokens(tokens_bn, n): called as tokens arrive (streaming); tokens_bn holds the first
        n tokens of every row. Returns tokens `[B, max_new_tokens]` and per-row lengths.
        """
        params = SamplingParams(float(temperature), int(top_k), float(top_p))
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None and not isinstance(prompts, (np.ndarray, jax.Array)):
            ids, mask = left_pad(prompts, pad_id)
        else:
            ids = np.asarray(prompts, np.int32)
            mask = (np.ones_like(ids) if attention_mask is None
                    else np.asarray(attention_mask, np.int32))
            if ids.ndim != 2 or mask.shape != ids.shape:
                raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must be equal "
                                 "[batch, seq] shapes")
            if not mask[:, -1].all():
                raise ValueError("attention_mask must use left padding (last column all 1)")
        t = ids.shape[1]
        limit = self.config.max_seq_len if max_len is None else int(max_len)
        if self.config.use_wpe and limit > self.config.max_seq_len:
            raise ValueError(f"max_len={limit} > max_seq_len={self.config.max_seq_len}: this "
                             "model has learned positions (no ALiBi) and cannot extrapolate")
        cache_len = t + max_new_tokens
        if cache_len > limit:
            raise ValueError(
                f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) = {cache_len} exceeds "
                f"max_len={limit}; pass a larger max_len (--max_seq_len) to extrapolate")
        seed = int(seed) % (1 << 64)  # any int, as the server takes it; key() wants an int64
        key = jax.random.key(seed - (1 << 64) if seed >= 1 << 63 else seed)
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        pad = jnp.int32(pad_id)
        # Slots past cache_len are never attended (decode masks slot >= tokens so far); rounding
        # the allocation up lets the decode kernel stream the cache in whole blocks.
        alloc = decode_gpu.alloc_slots(cache_len)
        statics = (t, max_new_tokens if on_tokens is None else max(1, stream_chunk), params,
                   jnp.int32(-1 if eos_id is None else eos_id), pad)
        with contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh):
            state = self._prefill(self.weights, jnp.asarray(ids), jnp.asarray(mask), key, pad,
                                  alloc, max_new_tokens, params, keep_logits,
                                  not bool(np.all(mask)))
            if on_tokens is None:
                state, tokens, _, _ = self._decode(self.weights, state, *statics)
            else:
                on_tokens(np.asarray(state.tokens), 1)
                state, tokens, step, all_done = self._decode(self.weights, state, *statics)
                while True:
                    # Queue the next chunk before reading this one: the device never waits.
                    n, finished = int(step), bool(all_done) or int(step) >= max_new_tokens
                    nxt = None if finished else self._decode(self.weights, state, *statics)
                    on_tokens(np.asarray(tokens), n)
                    if nxt is None:
                        break
                    state, tokens, step, all_done = nxt
        tokens = np.asarray(tokens)
        lengths = _lengths(tokens, eos_id)
        logits = None if state.logits is None else np.asarray(state.logits)
        return GenerateOutput(tokens, lengths, logits)


def _lengths(tokens_bn, eos_id):
    n = tokens_bn.shape[1]
    if eos_id is None:
        return np.full((tokens_bn.shape[0],), n, np.int32)
    is_eos = tokens_bn == eos_id
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, n)
    return first.astype(np.int32)


def generate(model: MPTForCausalLM, prompts, **kwargs) -> GenerateOutput:
    """One-off convenience: `Generator(model).generate(prompts, **kwargs)` (see there).
    Build a `Generator` once to reuse its compiled functions across calls."""
    mesh = kwargs.pop("mesh", None)
    return Generator(model, mesh=mesh).generate(prompts, **kwargs)


__all__ = [
    "DecodeOptions",
    "GenerateOutput",
    "Generator",
    "SamplingParams",
    "filter_logits",
    "generate",
    "left_pad",
    "sample",
]
