"""The serving engine's device side: a fixed pool of KV-cache slots and the compiled steps over
it (engine.py drives them).

    pool = Pool(generator._spec, batch=64, slots=2048, chunk=256, top_n=20, n_stop=8)
    state = init_jit(pool)                                  # zeros: every slot free
    state, out, top = decode_jit(pool, w, state, owned_b, n_steps, full)
    state, logits_v = prefill_jit(pool, w, state, ids_1c, slot, start, n_valid, span)
    state, out, top, logits_v = mixed_jit(pool, w, state, owned_b, ids_1c, slot, start,
                                          n_valid, span, full)  # decode_jit + prefill_jit
    state, out, top = admit_jit(pool, state, logits_v, rows)
    state = copy_jit(pool, state, src, dst)

Every step runs the Generator's own forward (`_Spec._forward`, the model's `hidden_states`
over the Generator's per-layer weights `w`), so serving computes what `generate` computes, on
the same kernels. Shapes are fixed by the pool: a decode step is `[batch, 1]` over every slot,
a prefill chunk `[1, chunk]` into one slot at a traced position, attending over one of a few
cache spans (`Pool.spans`), so serving compiles each step once (decode once per (n_steps, full)
pair, a chunk once per span) and never again.

Slot invariants (what makes inactive rows harmless in a step over all of them):
  - a decode step writes each row's `last` token at `pos` and attends up to it. A slot nobody
    owns has pos 0; a slot being prefilled has pos = the start of its next chunk; either way
    the write lands where the next prefill chunk writes before anything reads it, and the
    decode kernel reads one block of such a row.
  - a finished or not-yet-admitted row is `active` False: its token is marked invalid, its
    position, counts and budget do not move.
  - the device ends a row itself at EOS / a stop id / its token budget, so it never runs past
    the cache; the host ends rows for stop strings and cancellations (`owned` False).

Sampling happens inside the step with each slot's parameters as arrays (sampling.sample_rows):
temperature (0 = greedy, exactly argmax), top-k, top-p, OpenAI's presence / frequency penalties
(logit -= frequency * count + presence * (count > 0), over the tokens the slot produced), and a
key per slot (its seed, its choice index, its token count): a seeded request draws the same
tokens whatever else is in the batch. `full=False` compiles the step without top-k / top-p
(no sort) and without top logprobs, for batches where no row asks for them. Log-probabilities
are the model's own (log-softmax of the raw logits, before penalties and temperature).

Outputs are packed for one device-to-host copy a step: `out` int32 `[k, B, 3]` holds the token,
whether it is valid (the row was decoding) and the float32 bits of its log-probability; `top`
is (ids int32 `[k, B, top_n]`, log-probs float32 `[k, B, top_n]`) or None.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.infer.generate import _Spec, _under_rules
from mpt_jax.infer.sampling import sample_rows
from mpt_jax.kernels import flash_gpu

log = logging.getLogger(__name__)

# Every backend compilation in the process (XLA compiles, or persistent-cache loads): serving
# must not add any after warm-up.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]
# Traces of this module's steps by name: each is one compilation of that step.
TRACES: dict[str, int] = {}


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def backend_compiles() -> int:
    """Backend compilations in this process so far."""
    return _compiles[0]


# Prefill spans are whole multiples of the chunk flash kernel's key block (bf16 and float32
# blocks alike), so every span runs it on the cache in place.
SPAN_BLOCK = flash_gpu.chunk_slots(1)


@dataclasses.dataclass(frozen=True)
class Pool:
    """Everything static about a slot pool (the steps' jit key)."""

    spec: _Spec
    batch: int  # slots
    slots: int  # cache positions per slot
    chunk: int  # prefill chunk length
    top_n: int  # top log-probabilities a step can return (0: none)
    n_stop: int  # stop token ids per slot

    @property
    def rules(self):
        return self.spec.rules

    @property
    def spans(self) -> tuple[int, ...]:
        """The cache lengths a prefill chunk attends over: chunk x 1, 2, 4, ... rounded up to
        whole key blocks of the chunk kernel (SPAN_BLOCK; a span of part blocks would take the
        jnp path), and the whole slot (each its own compilation, all made by warm-up)."""
        out, n = [], self.chunk
        while n < self.slots:
            span = min(-(-n // SPAN_BLOCK) * SPAN_BLOCK, self.slots)
            if span < self.slots and (not out or span > out[-1]):
                out.append(span)
            n *= 2
        return (*out, self.slots)

    def span_for(self, end: int) -> int:
        """The shortest span holding cache positions [0, end)."""
        for n in self.spans:
            if n >= end:
                return n
        raise ValueError(f"a chunk ending at {end} is past the slot's {self.slots} positions")


class SlotState(NamedTuple):
    """The pool on the device (donated through every step)."""

    cache: tuple  # per layer (k, v), each [B, KV, S, hd]
    last: jax.Array  # [B] int32: the latest token, not yet in the cache
    pos: jax.Array  # [B] int32: where a decode step writes `last`
    active: jax.Array  # [B] bool: decoding
    remaining: jax.Array  # [B] int32: tokens the row may still produce
    n_gen: jax.Array  # [B] int32: tokens produced (the sampling keys' counter)
    counts: jax.Array  # [B, V] int32: each token's count among those produced
    temperature: jax.Array  # [B] float32 (0 = greedy)
    top_k: jax.Array  # [B] int32 (0 = off)
    top_p: jax.Array  # [B] float32 (1 = off)
    presence: jax.Array  # [B] float32
    frequency: jax.Array  # [B] float32
    key: jax.Array  # [B, ...] uint32 key data (jax.random.key_data)
    stop_ids: jax.Array  # [B, n_stop] int32 (-1 = none)


class AdmitRows(NamedTuple):
    """Host arrays `[B]` for the rows an admission starts (`mask`); other rows are ignored."""

    mask: np.ndarray  # bool
    pos: np.ndarray  # int32: the prompt length
    max_tokens: np.ndarray  # int32
    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int32
    top_p: np.ndarray  # float32
    presence: np.ndarray  # float32
    frequency: np.ndarray  # float32
    seed_lo: np.ndarray  # uint32
    seed_hi: np.ndarray  # uint32
    choice: np.ndarray  # int32: the row's choice index (n > 1 draws differ)
    stop_ids: np.ndarray  # [B, n_stop] int32


def empty_rows(pool: Pool) -> AdmitRows:
    """Fresh host arrays for an admission (no row set)."""
    def full(dtype, fill=0):
        return np.full(pool.batch, fill, dtype)

    return AdmitRows(mask=full(bool), pos=full(np.int32), max_tokens=full(np.int32, 1),
                     temperature=full(np.float32), top_k=full(np.int32),
                     top_p=full(np.float32, 1), presence=full(np.float32),
                     frequency=full(np.float32), seed_lo=full(np.uint32),
                     seed_hi=full(np.uint32), choice=full(np.int32),
                     stop_ids=np.full((pool.batch, pool.n_stop), -1, np.int32))


def _traced(name):
    """Counts (and logs) each trace of a step: one trace, one compilation."""
    def wrap(impl):
        def run(pool, *args):
            TRACES[name] = TRACES.get(name, 0) + 1
            statics = ", ".join(f"{a}" for a in args if isinstance(a, (bool, int, str)))
            log.info("compiling %s%s (batch %d, %d slots, chunk %d)", name,
                     f" ({statics})" if statics else "", pool.batch, pool.slots, pool.chunk)
            return impl(pool, *args)

        return run

    return wrap


def _keys(data):
    return jax.random.wrap_key_data(data)


@_under_rules
@_traced("init")
def _init_impl(pool: Pool) -> SlotState:
    spec, cfg, b = pool.spec, pool.spec.config, pool.batch
    shape = (b, cfg.kv_n_heads, pool.slots, cfg.head_dim)
    shard = spec._cache_sharding(shape)

    def zeros():
        z = jnp.zeros(shape, spec.cache_dtype)
        return z if shard is None else jax.lax.with_sharding_constraint(z, shard)

    i32, f32 = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)
    key = jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)))
    return SlotState(tuple((zeros(), zeros()) for _ in range(cfg.n_layers)), i32, i32,
                     jnp.zeros((b,), bool), i32, i32,
                     jnp.zeros((b, cfg.vocab_size), jnp.int32), f32, i32, f32 + 1, f32, f32,
                     key, jnp.full((b, pool.n_stop), -1, jnp.int32))


def _choose(pool: Pool, logits_bv, keys_b, temperature, top_k, top_p, counts, presence,
            frequency, full: bool):
    """-> tokens [B], their log-probabilities [B], (top ids, top log-probs) or None."""
    logits_bv = logits_bv.astype(jnp.float32)
    c_bv = counts.astype(jnp.float32)
    x_bv = (logits_bv - frequency[:, None] * c_bv
            - presence[:, None] * (counts > 0).astype(jnp.float32))
    tok_b = sample_rows(x_bv, keys_b, temperature, top_k, top_p, filtered=full)
    lse_b1 = jax.nn.logsumexp(logits_bv, axis=-1, keepdims=True)
    lp_b = jnp.take_along_axis(logits_bv, tok_b[:, None], axis=-1)[:, 0] - lse_b1[:, 0]
    top = None
    if full and pool.top_n:
        vals, ids = jax.lax.top_k(logits_bv, pool.top_n)
        top = (ids.astype(jnp.int32), vals - lse_b1)
    return tok_b, lp_b, top


def _pack(tok_b, valid_b, lp_b):
    return jnp.stack([tok_b, valid_b.astype(jnp.int32),
                      jax.lax.bitcast_convert_type(lp_b.astype(jnp.float32), jnp.int32)], -1)


def _hit_stop(tok_b, stop_ids):
    return jnp.any(tok_b[:, None] == stop_ids, axis=-1)


def _advance(pool: Pool, s: SlotState, owned_b, logits_bv, cache, full: bool):
    """A decode step's sampling and bookkeeping from its logits and new cache: -> (state, out,
    top)."""
    pos = jnp.where(owned_b, s.pos, 0)
    active = s.active & owned_b
    keys = jax.vmap(jax.random.fold_in)(_keys(s.key), s.n_gen)
    tok, lp, top = _choose(pool, logits_bv, keys, s.temperature, s.top_k, s.top_p, s.counts,
                           s.presence, s.frequency, full)
    inc = active.astype(jnp.int32)
    remaining = s.remaining - inc
    s = s._replace(
        cache=cache, pos=pos + inc, last=jnp.where(active, tok, s.last),
        active=active & ~_hit_stop(tok, s.stop_ids) & (remaining > 0), remaining=remaining,
        n_gen=s.n_gen + inc, counts=s.counts.at[jnp.arange(pool.batch), tok].add(inc))
    return s, _pack(tok, active, lp), top


def _decode_step(pool: Pool, w, owned_b, full: bool):
    """One decode step over every slot, as a function of the state: -> (state, out, top)."""
    def step(s: SlotState):
        logits_bv, cache = pool.spec._forward(w, s.last[:, None], None, s.cache,
                                              jnp.where(owned_b, s.pos, 0), "decode")
        return _advance(pool, s, owned_b, logits_bv, cache, full)

    return step


def _one(step_out):
    state, out, top = step_out
    return state, out[None], None if top is None else (top[0][None], top[1][None])


@_under_rules
@_traced("decode")
def _decode_impl(pool: Pool, w, state: SlotState, owned_b, n_steps: int, full: bool):
    b = pool.batch
    step = _decode_step(pool, w, owned_b, full)
    if n_steps == 1:
        return _one(step(state))

    n = pool.top_n if full else 0
    outs = (jnp.zeros((n_steps, b, 3), jnp.int32), jnp.zeros((n_steps, b, n), jnp.int32),
            jnp.zeros((n_steps, b, n), jnp.float32))

    def body(i, carry):
        s, (out_kb3, ids_kbn, lp_kbn) = carry
        s, out, top = step(s)
        out_kb3 = out_kb3.at[i].set(out)
        if top is not None:
            ids_kbn, lp_kbn = ids_kbn.at[i].set(top[0]), lp_kbn.at[i].set(top[1])
        return s, (out_kb3, ids_kbn, lp_kbn)

    state, (out, ids, lps) = jax.lax.fori_loop(0, n_steps, body, (state, outs))
    return state, out, (ids, lps) if n else None


def _slot_rows(pool: Pool, cache, slot, span: int):
    """Copies of slot `slot`'s first `span` cache positions, per layer (k, v) `[1, KV, span,
    hd]`: what a chunk attends over."""
    def row(a):
        return jax.lax.slice_in_dim(jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), 0, span,
                                    axis=2)

    return tuple((row(k), row(v)) for k, v in cache)


def _chunk_forward(pool: Pool, w, rows, ids_1c, start, n_valid):
    """A prompt chunk through the model against its slot's rows (`_slot_rows`) at `start`: ->
    (float32 logits `[1, V]` after the chunk's last real token, the chunk's own keys and values
    per layer, `[1, KV, chunk, hd]` each)."""
    logits_1v, rows = pool.spec._forward(w, ids_1c, None, rows, start, "decode", at=n_valid - 1)
    return logits_1v, _chunk_kv(pool, rows, start)


def _chunk_kv(pool: Pool, rows, start):
    """The chunk's own keys and values, per layer `[1, KV, chunk, hd]`, out of the rows it
    attended over (as the forward returned them, with the chunk written at `start`)."""
    def new(r):
        return jax.lax.dynamic_slice_in_dim(r, start, pool.chunk, axis=2)

    return tuple((new(rk), new(rv)) for rk, rv in rows)


def _put_chunk(pool: Pool, state: SlotState, kv, slot, start) -> SlotState:
    """The chunk's keys and values into slot `slot` at `start` (only the chunk's positions are
    written, not the span it attended over); the slot's next write goes after the chunk, and
    it decodes nothing until its admission: an interleaved decode step writes this slot's
    garbage where the next chunk starts (even if its last owner had not ended on the device
    when the host gave the slot away)."""
    def put(a, r):
        return jax.lax.dynamic_update_slice(a, r.astype(a.dtype), (slot, 0, start, 0))

    cache = tuple((put(k, nk), put(v, nv)) for (k, v), (nk, nv) in zip(state.cache, kv))
    return state._replace(cache=cache, pos=state.pos.at[slot].set(start + pool.chunk),
                          active=state.active.at[slot].set(False))


@_under_rules
@_traced("prefill")
def _prefill_impl(pool: Pool, w, state: SlotState, ids_1c, slot, start, n_valid, span: int):
    """One chunk of a prompt into slot `slot` at position `start` (the chunk's first n_valid
    tokens are real; the rest is padding, after them); -> state, the float32 logits `[V]`
    after the chunk's last real token. The chunk attends over the slot's first `span` cache
    positions (static, `pool.span_for(start + chunk)`): its attention, scores over every
    position it covers, then costs what the prompt so far needs, not the whole slot."""
    logits_1v, kv = _chunk_forward(pool, w, _slot_rows(pool, state.cache, slot, span), ids_1c,
                                   start, n_valid)
    return _put_chunk(pool, state, kv, slot, start), logits_1v[0]


@_under_rules
@_traced("mixed")
def _mixed_impl(pool: Pool, w, state: SlotState, owned_b, ids_1c, slot, start, n_valid,
                span: int, full: bool):
    """A decode step over every slot and one prefill chunk into slot `slot`, in one call:
    -> (state, out, top) as `decode_jit` with n_steps 1, and the chunk's logits `[V]` as
    `prefill_jit`'s. What it computes is exactly the decode step then the chunk (the chunk's
    slot decodes nothing; the chunk reads only its own slot, so it reads nothing the decode
    step writes, and its keys land after the step's write there). One forward pass
    (the model's mode "mixed"): the B decode tokens and the chunk's go through each matmul
    together, so the step's weight read, its whole cost at small B, comes with the chunk's
    compute-bound matmuls."""
    b = pool.batch
    rows = _slot_rows(pool, state.cache, slot, span)
    logits_v, caches = pool.spec._forward_mixed(
        w, jnp.concatenate([state.last[None], jnp.asarray(ids_1c, jnp.int32)], axis=1),
        tuple(zip(state.cache, rows)), jnp.where(owned_b, state.pos, 0), start, n_valid - 1)
    state, out, top = _one(_advance(pool, state, owned_b, logits_v[:b],
                                    tuple(c[0] for c in caches), full))
    kv = _chunk_kv(pool, tuple(c[1] for c in caches), start)
    return _put_chunk(pool, state, kv, slot, start), out, top, logits_v[b]


@_under_rules
@_traced("admit")
def _admit_impl(pool: Pool, state: SlotState, logits_v, rows: AdmitRows):
    """Starts the rows of `rows.mask` from a prompt's last logits: sets their parameters and
    keys, samples their first tokens."""
    b, v = pool.batch, logits_v.shape[-1]
    m = rows.mask

    def pick(new, old):
        return jnp.where(m.reshape((b,) + (1,) * (old.ndim - 1)), new, old)

    seeded = jax.vmap(lambda lo, hi, c: jax.random.fold_in(
        jax.random.fold_in(jax.random.key(lo), hi), c))(rows.seed_lo, rows.seed_hi, rows.choice)
    key = pick(jax.random.key_data(seeded), state.key)
    temperature = pick(rows.temperature, state.temperature)
    top_k, top_p = pick(rows.top_k, state.top_k), pick(rows.top_p, state.top_p)
    zeros_bv = jnp.zeros((b, v), jnp.int32)
    tok, lp, top = _choose(pool, jnp.broadcast_to(logits_v[None], (b, v)),
                           jax.vmap(jax.random.fold_in)(_keys(key), jnp.zeros((b,), jnp.int32)),
                           temperature, top_k, top_p, zeros_bv, jnp.zeros((b,), jnp.float32),
                           jnp.zeros((b,), jnp.float32), True)
    stop_ids = pick(rows.stop_ids, state.stop_ids)
    remaining = rows.max_tokens - 1
    state = SlotState(
        state.cache, pick(tok, state.last), pick(rows.pos, state.pos),
        pick((remaining > 0) & ~_hit_stop(tok, stop_ids), state.active),
        pick(remaining, state.remaining), pick(jnp.ones((b,), jnp.int32), state.n_gen),
        pick(jax.nn.one_hot(tok, v, dtype=jnp.int32), state.counts), temperature, top_k,
        top_p, pick(rows.presence, state.presence), pick(rows.frequency, state.frequency), key,
        stop_ids)
    return state, _pack(tok, m, lp)[None], None if top is None else (top[0][None],
                                                                       top[1][None])


@_under_rules
@_traced("copy")
def _copy_impl(pool: Pool, state: SlotState, src, dst):
    """Slot src's cache into slot dst (n > 1: one prompt prefilled once)."""
    def cp(a):
        return jax.lax.dynamic_update_slice_in_dim(
            a, jax.lax.dynamic_slice_in_dim(a, src, 1, axis=0), dst, axis=0)

    return state._replace(cache=tuple((cp(k), cp(v)) for k, v in state.cache))


init_jit = jax.jit(_init_impl, static_argnums=(0,))
decode_jit = jax.jit(_decode_impl, static_argnums=(0, 4, 5), donate_argnums=(2,))
mixed_jit = jax.jit(_mixed_impl, static_argnums=(0, 8, 9), donate_argnums=(2,))
prefill_jit = jax.jit(_prefill_impl, static_argnums=(0, 7), donate_argnums=(2,))
admit_jit = jax.jit(_admit_impl, static_argnums=(0,), donate_argnums=(1,))
copy_jit = jax.jit(_copy_impl, static_argnums=(0,), donate_argnums=(1,))
