"""Perplexity by context length: token-level loss at several window lengths, and the loss of the
same final tokens given each length (how ALiBi extrapolates past the training length).

Data: a prepared shards directory (mpt_jax.data.prepare's manifest.json; its records in manifest
order) or text / JSON-lines files (or a directory of them; mpt_jax.data.readers reads them as
prepare does: a text file is one document, a JSON line's `text_field` is one), tokenized with the
checkpoint's tokenizer, each document followed by EOS. Either way the documents form one token
stream t_0 .. t_{N-1}, as MPT's pretraining data concatenates them.

Windows of L input tokens, stride S (S = L, non-overlapping, by default): window k reads
t[kS : kS + L] and predicts the tokens after each of its positions; it scores only the targets no
earlier window predicted (the first window all L, later ones their last S). Every token t_1 ..
t_{N-1} is scored exactly once, with between 1 and L tokens of context for S = L, and at least
L - S tokens otherwise. (HF's perplexity guide uses the same windows but predicts L - 1 tokens of
each; lm-eval's rolling windows start from an EOS prefix and so also score t_0.) Reported per L:
mean loss (nats per token), perplexity exp(loss), token count, and the loss by context length
(log2 bins of how many tokens of the window precede the target: loss, tokens, mean context).

Final tokens: the stream is cut into chunks of max(L) + 1 tokens; for each chunk and each L, the
chunk's last F tokens (`final_tokens`, min(L) // 2 by default) are scored given the L + 1 - F
tokens before them. The same tokens at every L: the loss can only change through the context.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from mpt_jax import storage
from mpt_jax.eval.scoring import Request, Scorer


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_stream(data: str, tokenizer=None, *, text_field: str = "text",
                max_tokens: int | None = None) -> np.ndarray:
    """The token stream of `data` (see the module docstring) as int32 `[N]`, at most
    max_tokens long; ValueError naming the file on bad input."""
    from mpt_jax.data import prepare, readers
    from mpt_jax.data.tokenizer import ENDOFTEXT, tokenizer_sha256

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    pieces, total = [], 0

    def add(ids: np.ndarray) -> bool:
        nonlocal total
        take = ids if max_tokens is None else ids[:max_tokens - total]
        pieces.append(take.astype(np.int32))
        total += take.size
        return max_tokens is not None and total >= max_tokens

    if storage.isfile(storage.join(data, prepare.MANIFEST)):
        from mpt_jax.data.pipeline import shard_source

        manifest = prepare.read_manifest(data)
        if tokenizer is not None:
            want = manifest["tokenizer"]["sha256"]
            if tokenizer_sha256(tokenizer) != want:
                raise ValueError(f"{data}: prepared with tokenizer "
                                 f"{manifest['tokenizer']['name']!r} (sha256 {want[:12]}), not "
                                 "the checkpoint's (pass the right --tokenizer)")
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        records = shard_source(prepare.shard_paths(data, manifest))
        with storage.errors(data, "reading shards"):
            for start in range(0, len(records), 256):
                batch = records.__getitems__(range(start, min(start + 256, len(records))))
                if any(add(np.frombuffer(record, dtype)) for record in batch):
                    break
    else:
        if tokenizer is None:
            raise ValueError(f"{data}: text data needs a tokenizer")
        eos = tokenizer.token_to_id(ENDOFTEXT)
        eos_ids = [] if eos is None else [eos]
        done = False
        for path in readers.expand_inputs([data]):
            bad = readers.BadLines()
            batch = []

            def flush():
                encoded = tokenizer.encode_batch(batch, add_special_tokens=False)
                batch.clear()
                return any(add(np.asarray(e.ids + eos_ids, np.int64)) for e in encoded)

            for doc in readers.iter_documents(path, text_field, bad):
                if bad.count:
                    break
                batch.append(doc)
                if len(batch) == 256 and flush():
                    done = True
                    break
            if bad.count:
                raise ValueError(f"{path}: {bad.examples[0]}")
            if not done and batch and flush():
                done = True
            if done:
                break
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    if stream.size < 2:
        raise ValueError(f"{data}: {stream.size} tokens; perplexity needs at least 2")
    return stream


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------
def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first scored target, end) per window (see the module docstring): the window
    reads tokens [start, end - 1) and scores targets [first, end)."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be between 1 and the window length {seq_len}")
    out, start, done = [], 0, 1  # done: targets < done are scored
    while done < n_tokens:
        end = min(start + seq_len + 1, n_tokens)
        if end > done:
            out.append((start, done, end))
            done = end
        start += stride
    return out


def _bin_sums(ctx_lengths: np.ndarray, nll: np.ndarray, sums: dict) -> None:
    """Accumulates (loss sum, context-length sum, count) per log2 bin of context length."""
    bins = np.floor(np.log2(ctx_lengths)).astype(np.int64)
    for b in np.unique(bins):
        sel = bins == b
        s, ctx, c = sums.get(int(b), (0.0, 0, 0))
        sums[int(b)] = (s + float(nll[sel].sum(dtype=np.float64)),
                        ctx + int(ctx_lengths[sel].sum()), c + int(sel.sum()))


def evaluate(scorer: Scorer, stream: np.ndarray, seq_lens: Sequence[int], *,
             stride: int | None = None, final_tokens: int | None = None) -> dict:
    """The measurements of the module docstring, as a JSON-able dict."""
    seq_lens = sorted({int(x) for x in seq_lens})
    n = int(stream.size)
    if not seq_lens or seq_lens[0] < 1:
        raise ValueError(f"seq_lens must be positive, got {seq_lens}")
    cfg = scorer.config
    if cfg.use_wpe and seq_lens[-1] > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_lens[-1]} > max_seq_len {cfg.max_seq_len}: this model "
                         "has learned positions (no ALiBi) and cannot read longer windows")
    if n < seq_lens[-1] + 1:
        raise ValueError(f"the data has {n} tokens; the longest seq_len {seq_lens[-1]} needs "
                         f"at least {seq_lens[-1] + 1}")
    hi = int(stream.max())
    if hi >= cfg.vocab_size:
        raise ValueError(f"token id {hi} in the data is outside the model's vocabulary "
                         f"[0, {cfg.vocab_size})")
    f = max(seq_lens[0] // 2, 1) if final_tokens is None else int(final_tokens)
    if not 1 <= f <= seq_lens[0]:  # checked before any scoring: it would be hours at 65k
        raise ValueError(f"final_tokens {f} must be between 1 and the shortest seq_len "
                         f"{seq_lens[0]}")
    toks = [int(t) for t in stream]
    result = {"tokens": n, "stride": stride, "seq_lens": {}}
    for length in seq_lens:
        s = length if stride is None else stride
        wins = windows(n, length, s)
        reqs = [Request(tuple(toks[a:first]), tuple(toks[first:end])) for a, first, end in wins]
        scores = scorer.score(reqs, desc=f"perplexity @ {length}")
        nll_sum, count, bins = 0.0, 0, {}
        for (a, first, end), sc in zip(wins, scores):
            nll = -sc.token_logprobs.astype(np.float64)
            nll_sum += float(nll.sum())
            count += nll.size
            _bin_sums(np.arange(first, end) - a, nll, bins)
        loss = nll_sum / count
        result["seq_lens"][str(length)] = {
            "loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": len(wins),
            "stride": s,
            "loss_by_context": [{"context": [1 << b, (1 << (b + 1)) - 1],
                                 "mean_context": bins[b][1] / bins[b][2],
                                 "loss": bins[b][0] / bins[b][2], "tokens": bins[b][2]}
                                for b in sorted(bins)]}
    chunk = seq_lens[-1] + 1
    n_chunks = n // chunk
    final = {"final_tokens": f, "chunks": n_chunks, "loss": {}}
    for length in seq_lens:
        reqs = []
        for j in range(n_chunks):
            row = toks[(j + 1) * chunk - (length + 1):(j + 1) * chunk]
            reqs.append(Request(tuple(row[:-f]), tuple(row[-f:])))
        scores = scorer.score(reqs, desc=f"final {f} tokens @ {length}")
        final["loss"][str(length)] = -sum(sc.logprob for sc in scores) / (n_chunks * f)
    result["final"] = final
    return result


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = ["| seq_len | loss | perplexity | tokens | loss on the same final tokens |",
             "|---|---|---|---|---|"]
    final = result["final"]
    for length, r in result["seq_lens"].items():
        lines.append(f"| {length} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['tokens']} | "
                     f"{final['loss'][length]:.4f} |")
    return "\n".join(lines) + (f"\n\n(final tokens: the last {final['final_tokens']} of each of "
                               f"{final['chunks']} chunks)")


def plot(result: dict, path: str, title: str = "") -> None:
    """Loss against context length: one line per window length (loss by context-length bin),
    and the same final tokens' loss at each window length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for length, r in result["seq_lens"].items():
        xs = [b["mean_context"] for b in r["loss_by_context"]]
        ax.plot(xs, [b["loss"] for b in r["loss_by_context"]], "-", lw=1.2,
                label=f"window {length}: loss by context length")
    final = result["final"]
    lengths = [int(x) for x in final["loss"]]
    ax.plot(lengths, [final["loss"][str(x)] for x in lengths], "ko-", lw=2,
            label=f"last {final['final_tokens']} tokens of {final['chunks']} chunks, "
                  "given the window length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_atomic(path, png.getvalue())
