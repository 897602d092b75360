"""Text out of tokens as they arrive: incremental detokenization and stop strings.

`Detokenizer.push(token)` returns the new text a token adds. It decodes a short window (the
tokens since the last emitted text, after the ones before them as context) instead of the
whole sequence, so each token costs O(window), and it holds text back while the window ends in
an unfinished UTF-8 character (a byte-level token can carry part of one). The context token
in front keeps decoders that treat a sequence's first token specially (SentencePiece's
leading-space strip) from changing the text; for byte-level BPE (MPT's GPT-NeoX tokenizer)
the deltas concatenate to exactly `tokenizer.decode(all tokens)`. Special tokens are skipped,
as HF's `decode(..., skip_special_tokens=True)` and the OpenAI API do.

`StopMatcher.feed(delta)` finds stop strings across token boundaries: it returns the text that
can safely go out and holds back any tail that could still be the start of a stop string, so a
stop string never leaks into the output, even in part.
"""
from __future__ import annotations

from collections.abc import Sequence

import tokenizers

# Earlier tokens decoded in front of the window (vLLM uses the same five).
_CONTEXT = 5


class Detokenizer:
    """Text deltas of a token stream that follows `prompt_ids` (see the module docstring)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids = [int(t) for t in prompt_ids[-_CONTEXT:]]
        self._prefix = 0  # window start: context tokens from here
        self._read = len(self._ids)  # tokens before this are emitted text

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ('' while a character is unfinished)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        # The tokens just emitted are the next window's context; older ones are dropped.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is held back (an unfinished character decodes as U+FFFD), at the end."""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):] if len(text) > len(before) else ""


class StopMatcher:
    """Cuts a text stream at the first of `stops` (empty strings are ignored)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached). After a stop the output
        ends: the stop string and everything after it are dropped."""
        if not self.stops:
            return delta, False
        text = self._held + delta
        # Held text never holds a whole stop string, so any match ends inside `delta`.
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        hold = 0
        for s in self.stops:  # the longest tail of text that begins some stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if s.startswith(text[len(text) - n:]):
                    hold = n
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the end of a stream that stopped for another reason."""
        held, self._held = self._held, ""
        return held


__all__ = ["Detokenizer", "StopMatcher"]
