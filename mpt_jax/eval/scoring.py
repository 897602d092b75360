"""The scoring core: log-probabilities of continuations given contexts, for every evaluation.

    scorer = Scorer(model)                          # or Scorer(model, mesh=mesh)
    scores = scorer.score([Request(ctx_ids, cont_ids), ...])
    scores[i].logprob  # sum of log p(cont token | everything before it)
    scores[i].greedy   # every continuation token is the argmax (lm-eval's is_greedy)
    scores[i].token_logprobs  # [len(cont)] float32

A request is scored as lm-eval's `HFLM._loglikelihood_tokens` scores it: the row
`context + continuation` runs through the model once, position t's logits predict token t + 1,
and the continuation's tokens are read off the positions that predict them. Nothing is
truncated here; callers decide what an over-long request means (ICL tasks refuse it, the lm-eval
backend truncates from the left as HFLM does).

Two paths, one compiled function per bucket shape on each:

  flat    requests whose context is their own. Rows are right-padded to a bucket length L (no
          attention mask is needed: causal attention never lets a token see the padding after
          it), `rows = batch_tokens // L` per batch, the last batch padded with dummy rows.
  shared  requests with identical contexts (a multiple-choice question's choices, lm-eval's
          loglikelihood requests of one document) form a group. The context runs once, as a
          prefill into the KV cache (left-padded to a bucket, so each row's context ends at the
          same slot and the continuation follows it contiguously: ALiBi distances stay exact;
          the cache in whole key blocks of the chunk kernel, which reads it in place); it is
          repeated for each member and the members' continuations run against it in one call.
          A question of C choices costs P + C * S token-forwards instead of C * (P + S).
          (Only for continuations of at most MAX_SHARED_CONTINUATION tokens.)

Buckets are lengths 2^k and 3 * 2^(k-1) (16, 24, 32, 48, 64, ...): at most a third of a row is
padding, and a handful of shapes cover a task. Each bucket then shrinks to its longest request in
the call, rounded up to TIGHT_MULTIPLE tokens: as many shapes, less padding (a 10-shot context of
647 tokens ran as 768 rows). Log-probabilities come from the final hidden
states at the scored positions only, unembedded in chunks (never the whole `[B, L, V]` logits):
float32 logits, log-softmax, the target's entry and the argmax.

Sharding: with `mesh=`, parameters are placed by the logical-axis rules (sharding.py), batches
are sharded over the `batch` rule's mesh axes, and outputs are replicated. With several
processes every process plans the same batches from the same requests (tokenization is
deterministic), feeds the rows of its own devices (`jax.make_array_from_callback`), and reads
every result from the replicated output: each process scores its share, all get all results.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpt_jax import sharding
from mpt_jax.kernels import flash_gpu
from mpt_jax.model import KVCache, MPTForCausalLM

DEFAULT_BATCH_TOKENS = 32768
# Longest continuation scored against a shared context: its tokens attend through the KV-cache
# path (on a GPU the chunk flash kernel; elsewhere jnp attention, [T, S] scores per head), so
# this keeps that small; longer continuations (perplexity windows) take the flat path.
MAX_SHARED_CONTINUATION = 128
# Bucket lengths shrink to the longest member rounded up to this (whole TMA tiles of 8 rows and
# bf16 wgmma K steps of 16 on Hopper: no padding copy in the kernels' wrappers).
TIGHT_MULTIPLE = 16
# Logits held at once while scoring: rows x positions per unembedding chunk (x vocab x 4 bytes:
# 8192 x 50432 x 4 = 1.65 GB for MPT-7B).
_CHUNK_TOKENS = 8192

# (kind, spec) -> number of times the jitted function was traced (compiled); tests read it.
TRACES: collections.Counter = collections.Counter()


class Request(NamedTuple):
    context: tuple[int, ...]  # at least one token
    continuation: tuple[int, ...]  # at least one token


class Score(NamedTuple):
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token is the argmax of its logits
    token_logprobs: np.ndarray  # [len(continuation)] float32


def bucket_length(n: int, minimum: int = 1) -> int:
    """The smallest bucket >= max(n, minimum) among 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (2^k and 3 * 2^(k-1))."""
    n = max(int(n), int(minimum), 1)
    b = 1
    while True:
        if b >= n:
            return b
        if b >= 2 and b * 3 // 2 >= n:
            return b * 3 // 2
        b *= 2


def parse_mesh(mesh=None):
    """A Mesh as is; None or "data,fsdp,tensor" sizes (one may be -1; None = every device on
    `data`) -> sharding.make_mesh's mesh. ValueError naming a bad spec."""
    if mesh is not None and not isinstance(mesh, str):
        return mesh
    return sharding.make_mesh(sharding.parse_mesh_sizes("-1,1,1" if mesh is None else mesh))


# ---------------------------------------------------------------------------------------------
# The jitted functions
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a scorer (hashable): Scorers of one model graph on one mesh share
    compiled code, whatever the weights (the trainer evaluates new weights with its one
    graphdef every eval_every steps). (flax's GraphDefs of two separately built models compare
    equal but hash apart, so those compile anew.)"""

    graphdef: nnx.GraphDef
    mesh: object
    rules: tuple


def _token_scores(model: MPTForCausalLM, h_bkd, tgt_bk):
    """Final hidden states at the scored positions `[B, K, D]` and their targets `[B, K]` ->
    (log p(target) `[B, K]` float32, target == argmax `[B, K]`). Unembedded in chunks of
    positions (every row's, so the batch axis keeps its sharding) with at most ~_CHUNK_TOKENS
    rows of logits at once."""
    b, k, d = h_bkd.shape
    c = max(1, min(k, _CHUNK_TOKENS // b))
    n = -(-k // c)
    if n * c != k:  # pad the positions to whole chunks (the padding's scores are dropped)
        h_bkd = jnp.pad(h_bkd, ((0, 0), (0, n * c - k), (0, 0)))
        tgt_bk = jnp.pad(tgt_bk, ((0, 0), (0, n * c - k)))

    def chunk(xs):
        h_bcd, tgt_bc = xs
        logits_bcv = model.unembed(h_bcd)  # float32
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logits_bcv, tgt_bc[..., None], axis=-1)[..., 0]
        greedy_bc = jnp.argmax(logits_bcv, axis=-1).astype(jnp.int32) == tgt_bc
        return picked_bc - lse_bc, greedy_bc

    h_nbcd = h_bkd.reshape(b, n, c, d).swapaxes(0, 1)
    tgt_nbc = tgt_bk.reshape(b, n, c).swapaxes(0, 1)
    lp_nbc, greedy_nbc = jax.lax.map(chunk, (h_nbcd, tgt_nbc))
    lp_bk = lp_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :k]
    return lp_bk, greedy_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :k]


def _flat_impl(spec: _Spec, state, ids_bl, tgt_bk, start_b):
    """Rows `[B, L]` (context + continuation minus its last token, right-padded); continuation
    token j of row b is predicted at position start_b + j."""
    TRACES[("flat", spec)] += 1
    model = nnx.merge(spec.graphdef, state)
    h_bld, _ = model.hidden_states(ids_bl)
    l, k = ids_bl.shape[1], tgt_bk.shape[1]
    pos_bk = jnp.clip(start_b[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :], 0, l - 1)
    h_bkd = jnp.take_along_axis(h_bld, pos_bk[..., None], axis=1)
    return _token_scores(model, h_bkd, tgt_bk)


def _shared_impl(spec: _Spec, state, prefix_gp, prefix_mask_gp, suffix_rs, tgt_rk):
    """G shared contexts `[G, P]` (left-padded, mask 1 = token), each followed by C
    continuations: rows r = g * C + c of `suffix_rs` hold continuation[:-1] (right-padded) and
    `tgt_rk` the continuation. Continuation token 0 is predicted by the context's last position,
    token j > 0 by suffix position j - 1."""
    TRACES[("shared", spec)] += 1
    model = nnx.merge(spec.graphdef, state)
    g, p = prefix_gp.shape
    r, s = suffix_rs.shape
    c, k = r // g, tgt_rk.shape[1]
    # the cache runs past p + s to whole key blocks of the chunk kernel, which then reads it in
    # place for the continuations (a part block would send them to the jnp path); causality
    # keeps the extra slots out of every row's view
    slots = flash_gpu.chunk_slots(p + s)
    kv_mask_gs = jnp.concatenate([prefix_mask_gp.astype(bool), jnp.ones((g, s), bool),
                                  jnp.zeros((g, slots - p - s), bool)], axis=1)
    cache = model.init_cache(g, slots)
    # the contexts as a prefill (the flash forward, their left padding as segment ids: on
    # Hopper the Mosaic GPU kernels, which skip the padding's blocks), writing the cache
    h_gpd, cache = model.hidden_states(prefix_gp, attention_mask=kv_mask_gs, cache=cache,
                                       cache_index=0, mode="prefill")
    cache = KVCache(jnp.repeat(cache.k, c, axis=1), jnp.repeat(cache.v, c, axis=1))
    h_rsd, _ = model.hidden_states(suffix_rs, attention_mask=jnp.repeat(kv_mask_gs, c, axis=0),
                                   cache=cache, cache_index=p)
    h_last_rd = jnp.repeat(h_gpd[:, -1], c, axis=0)
    h_rjd = jnp.concatenate([h_last_rd[:, None].astype(h_rsd.dtype), h_rsd], axis=1)
    pos_k = jnp.clip(jnp.arange(k, dtype=jnp.int32), 0, s)
    return _token_scores(model, h_rjd[:, pos_k], tgt_rk)


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, spec: _Spec):
    impl = {"flat": _flat_impl, "shared": _shared_impl}[kind]
    kwargs = {}
    if spec.mesh is not None:
        kwargs["out_shardings"] = NamedSharding(spec.mesh, P())
    return jax.jit(functools.partial(impl, spec), **kwargs)


# ---------------------------------------------------------------------------------------------
# Batch plans (host side)
# ---------------------------------------------------------------------------------------------
class _Batch(NamedTuple):
    kind: str  # "flat" | "shared"
    arrays: tuple  # numpy inputs after the state
    rows: list  # per output row: request index or -1 (padding)
    lengths: list  # per output row: continuation length


def _check(requests: Sequence[Request], vocab_size: int) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i}: context ({len(ctx)} tokens) and continuation "
                             f"({len(cont)} tokens) both need at least one token")
        lo, hi = min(min(ctx), min(cont)), max(max(ctx), max(cont))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"request {i}: token id {lo if lo < 0 else hi} is outside the "
                             f"model's vocabulary [0, {vocab_size})")


class Scorer:
    """Scores requests with `model` (see the module docstring).

    mesh / rules: place the model and shard batches (sharding.py); None = one device.
    batch_tokens: tokens per batch (rows x bucket length; for shared contexts also the rows of
    repeated KV cache), the memory knob. min_bucket: the shortest row bucket (tests raise it to
    put every request in one shape). share_contexts: False scores every request as its own
    row. progress: a tqdm bar (process 0 only).
    """

    def __init__(self, model: MPTForCausalLM, *, mesh=None, rules=sharding.DEFAULT_RULES,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, min_bucket: int = 16,
                 share_contexts: bool = True, progress: bool = True):
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.config = model.config
        self.mesh = mesh
        self.rules = rules
        self.batch_tokens = int(batch_tokens)
        self.min_bucket = int(min_bucket)
        self.share_contexts = share_contexts
        self.progress = progress
        graphdef, state = nnx.split(model)
        self._spec = _Spec(graphdef, mesh, tuple(rules))
        self.state = state if mesh is None else self._place(state)
        self.shards = 1 if mesh is None else sharding.batch_shards(mesh, rules)

    def _place(self, state):
        def put(var):
            spec = sharding.logical_to_spec(var.get_metadata().get("logical_axes"), self.rules)
            spec = sharding.fit_spec(spec, var.shape, self.mesh)
            return var.replace(jax.device_put(var[...], NamedSharding(self.mesh, spec)))

        return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    @property
    def traces(self) -> int:
        """How many shapes this scorer's functions were compiled for (all scorers sharing its
        model and mesh included)."""
        return TRACES[("flat", self._spec)] + TRACES[("shared", self._spec)]

    # -- public API ------------------------------------------------------------------------
    def score(self, requests: Sequence[Request], *, desc: str = "scoring") -> list[Score]:
        requests = [Request(tuple(int(t) for t in c), tuple(int(t) for t in k))
                    for c, k in requests]
        _check(requests, self.config.vocab_size)
        limit = self.config.max_seq_len if self.config.use_wpe else None
        if limit is not None:
            for i, (ctx, cont) in enumerate(requests):
                if len(ctx) + len(cont) - 1 > limit:
                    raise ValueError(
                        f"request {i}: {len(ctx) + len(cont) - 1} input tokens, more than "
                        f"max_seq_len {limit} of this model (learned positions, no ALiBi)")
        out: list[Score | None] = [None] * len(requests)
        batches = self._plan(requests)
        bar = _progress(len(requests), desc, self.progress)
        pending = None
        with self._mesh_context():
            for batch in batches:
                launched = (batch, self._launch(batch))
                if pending is not None:  # read the previous batch while this one runs
                    bar.update(self._collect(*pending, out))
                pending = launched
            if pending is not None:
                bar.update(self._collect(*pending, out))
        bar.close()
        return out

    # -- internals -------------------------------------------------------------------------
    def _mesh_context(self):
        import contextlib

        return contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh)

    def _rows_multiple(self, n: int) -> int:
        """n rows rounded up to a multiple of the batch shards."""
        return -(-max(n, 1) // self.shards) * self.shards

    def _row_bucket(self, n: int) -> int:
        b = bucket_length(n, self.min_bucket)
        if self.config.use_wpe:  # padding past the position table would read NaNs
            b = min(b, self.config.max_seq_len)
        return b

    def _tight(self, bucket: int, longest: int) -> int:
        """A bucket shrunk to its longest member (rounded up to TIGHT_MULTIPLE, at least
        min_bucket): one shape still, fewer padded tokens."""
        m = TIGHT_MULTIPLE
        return min(bucket, max(self.min_bucket, -(-longest // m) * m))

    def _plan(self, requests: list[Request]) -> list[_Batch]:
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, req in enumerate(requests):
            groups[req.context].append(i)
        flat, shared = [], {}
        for members in groups.values():
            longest = max(len(requests[i].continuation) for i in members)
            # (suffixes of at least 8: a few tokens more per choice, far fewer shapes)
            key = (self._row_bucket(len(requests[members[0]].context)),
                   bucket_length(len(members)), bucket_length(longest - 1, 8))
            # learned positions: slots past the position table would hold NaNs, which reach
            # even masked attention (0 * NaN)
            fits = not self.config.use_wpe or key[0] + key[2] <= self.config.max_seq_len
            if (self.share_contexts and len(members) > 1 and fits
                    and longest <= MAX_SHARED_CONTINUATION):
                shared.setdefault(key, []).append(members)
            else:
                flat.extend(members)
        return self._plan_flat(requests, flat) + self._plan_shared(requests, shared)

    def _plan_flat(self, requests, indices) -> list[_Batch]:
        by_shape = collections.defaultdict(list)
        for i in indices:
            ctx, cont = requests[i]
            l = self._row_bucket(len(ctx) + len(cont) - 1)
            # (the scored-positions axis costs only unembedding: a coarse bucket, few shapes)
            by_shape[(l, bucket_length(len(cont), 16))].append(i)
        batches = []
        for (l, k), members in sorted(by_shape.items(), reverse=True):
            l = self._tight(l, max(len(requests[i].context) + len(requests[i].continuation) - 1
                                   for i in members))
            rows = self._rows_multiple(max(1, self.batch_tokens // l))
            members.sort(key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
            for start in range(0, len(members), rows):
                chunk = members[start:start + rows]
                ids = np.zeros((rows, l), np.int32)
                tgt = np.zeros((rows, k), np.int32)
                first = np.zeros((rows,), np.int32)
                for r, i in enumerate(chunk):
                    ctx, cont = requests[i]
                    row = ctx + cont
                    ids[r, :len(row) - 1] = row[:-1]
                    tgt[r, :len(cont)] = cont
                    first[r] = len(ctx) - 1
                pad = rows - len(chunk)
                batches.append(_Batch("flat", (ids, tgt, first), chunk + [-1] * pad,
                                      [len(requests[i].continuation) for i in chunk] + [0] * pad))
        return batches

    def _plan_shared(self, requests, by_shape: dict) -> list[_Batch]:
        """by_shape: (prefix bucket, choices bucket, suffix bucket) -> groups of requests."""
        batches = []
        for (p, c, s), member_groups in sorted(by_shape.items(), reverse=True):
            p = self._tight(p, max(len(requests[m[0]].context) for m in member_groups))
            k = s + 1  # the context's last position, then the suffix's
            g_rows = max(1, min(self.batch_tokens // (p + c * s),  # (the repeated cache)
                                self.batch_tokens // (c * flash_gpu.chunk_slots(p + s))))
            g_rows = self._rows_multiple(g_rows)
            for start in range(0, len(member_groups), g_rows):
                chunk = member_groups[start:start + g_rows]
                prefix = np.zeros((g_rows, p), np.int32)
                mask = np.zeros((g_rows, p), np.int32)
                mask[:, -1] = 1  # dummy groups: one visible (pad) token
                suffix = np.zeros((g_rows * c, s), np.int32)
                tgt = np.zeros((g_rows * c, k), np.int32)
                rows, lengths = [-1] * (g_rows * c), [0] * (g_rows * c)
                for gi, members in enumerate(chunk):
                    ctx = requests[members[0]].context
                    prefix[gi, p - len(ctx):] = ctx
                    mask[gi, p - len(ctx):] = 1
                    for ci, i in enumerate(members):
                        cont = requests[i].continuation
                        r = gi * c + ci
                        suffix[r, :len(cont) - 1] = cont[:-1]
                        tgt[r, :len(cont)] = cont
                        rows[r], lengths[r] = i, len(cont)
                batches.append(_Batch("shared", (prefix, mask, suffix, tgt), rows, lengths))
        return batches

    def _device_array(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        spec = sharding.fit_spec(P(*sharding.batch_spec(self.rules)[:1]), x.shape, self.mesh)
        shard = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(x.shape, shard, lambda index: x[index])

    def _launch(self, batch: _Batch):
        fn = _compiled(batch.kind, self._spec)
        return fn(self.state, *(self._device_array(a) for a in batch.arrays))

    @staticmethod
    def _collect(batch: _Batch, result, out) -> int:
        logprob_bk, greedy_bk = (np.asarray(x) for x in result)
        n = 0
        for r, (i, m) in enumerate(zip(batch.rows, batch.lengths)):
            if i < 0:
                continue
            lp = logprob_bk[r, :m].astype(np.float32)
            out[i] = Score(float(lp.sum(dtype=np.float64)), bool(greedy_bk[r, :m].all()), lp)
            n += 1
        return n


def _progress(total: int, desc: str, enabled: bool):
    import tqdm

    return tqdm.tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, smoothing=0.1,
                     disable=not enabled or jax.process_index() != 0 or total == 0)


__all__ = ["DEFAULT_BATCH_TOKENS", "Request", "Score", "Scorer", "TRACES", "bucket_length",
           "parse_mesh"]
