"""Incremental detokenisation: text is emitted as tokens arrive, never half a UTF-8 character.

A byte-level BPE token can end in the middle of a multi-byte character (a Chinese character is 3
bytes and often spans 2-3 tokens). `tokenizers`' DecodeStream buffers such tokens until the bytes
form whole characters; on top of it this module cuts the text at stop strings, holding back a tail
that might be the start of one so that a stop string is never printed.
"""

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def raw_tokenizer(tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` inside whatever wrapper the data package hands out."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for name in ("tokenizer", "_tokenizer", "backend", "tok"):
        inner = getattr(tokenizer, name, None)
        if isinstance(inner, Tokenizer):
            return inner
    raise TypeError(f"not a tokenizers.Tokenizer or a wrapper of one: {type(tokenizer).__name__}")


CONTEXT_TOKENS = 8


class TextStream:
    """Turns a row's new token ids into text, chunk by chunk.

    `push(token_id)` returns the text that is now safe to show (possibly ""); `finish()` returns
    what was held back. `stopped` turns True once a stop string appeared; `text` is everything
    emitted so far, cut before the stop string.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 prompt_ids: list[int] | None = None):
        self.tokenizer = raw_tokenizer(tokenizer)
        # The prompt's last tokens are context, not output: SentencePiece-style decoders drop the
        # leading space of a sequence's first word, which the new text is not.
        context = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]] if prompt_ids else None
        self.decoder = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.pending = ""        # decoded but not yet emitted (might begin a stop string)
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        chunk = self.decoder.step(self.tokenizer, int(token_id))
        if chunk:
            self.pending += chunk
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # Holding back len(longest stop) - 1 characters means a stop string can never start in
        # text already emitted, so searching the pending text is enough.
        hits = [h for h in (self.pending.find(s) for s in self.stop_strings) if h >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            self.text += out
            return out
        keep = 0 if final else min(self.hold, len(self.pending))
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        self.text += out
        return out
