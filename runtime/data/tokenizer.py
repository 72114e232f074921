"""The tokenizer: a byte-level BPE trained with the `tokenizers` library, or a given tokenizer.json.

A trained tokenizer carries llmc's special tokens: `<|endoftext|>` (end of a document; packing puts
it between documents), `<|bos|>`, `<|pad|>` and the ChatML turn markers `<|im_start|>`/`<|im_end|>`
used by the SFT chat template. A loaded tokenizer keeps its own tokens; its end-of-text token is
found among the usual names (and added if it has none).
"""

import json
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .sources import DataError
from .wording import counted

SPECIAL_TOKENS = {"eos": "<|endoftext|>", "bos": "<|bos|>", "pad": "<|pad|>",
                  "im_start": "<|im_start|>", "im_end": "<|im_end|>"}

# Names other tokenizers give their special tokens, most common first.
_CANDIDATES = {
    "eos": ["<|endoftext|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<eos>", "<|eot_id|>"],
    "bos": ["<|bos|>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>"],
    "pad": ["<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<｜▁pad▁｜>"],
    "im_start": ["<|im_start|>"],
    "im_end": ["<|im_end|>"],
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; add an end-of-text token if it has none (documents need a separator)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
    if special_ids(tok).get("eos") is None:
        tok.add_special_tokens([SPECIAL_TOKENS["eos"]])
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    """Ids of eos/bos/pad/im_start/im_end (None where the tokenizer has no such token); pad falls back to eos."""
    ids: dict[str, int | None] = {}
    for role, names in _CANDIDATES.items():
        ids[role] = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    return ids


def text_prefix(tok: Tokenizer) -> list[int]:
    """The ids the tokenizer's template puts before a text: the BOS of Llama, Mistral and DeepSeek,
    whose models were trained on documents that begin with it; nothing for GPT-2, Qwen or llmc's
    own tokenizer. (Not what a template puts after a text: an end of sequence would end a prompt,
    and packing puts llmc's own between documents.)"""
    plain, framed = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start]
    return []  # a template that changes the text's own tokens: add nothing


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """The ids a model reads for `text` on its own (a document, a prompt, a text to evaluate)."""
    return text_prefix(tok) + tok.encode(text, add_special_tokens=False).ids


def unknown_token(tok: Tokenizer) -> tuple[str, int] | None:
    """(name, id) of the token the tokenizer's model writes for text it has no token for, or None
    if it has none (a byte-level BPE, llmc's own, spells any text in bytes). From the model's own
    config: `unk_token` for WordLevel, WordPiece and BPE, `unk_id` for Unigram."""
    model = json.loads(tok.to_str())["model"]
    if model.get("unk_id") is not None:
        return tok.id_to_token(model["unk_id"]), model["unk_id"]
    name = model.get("unk_token")
    unk = tok.token_to_id(name) if name else None
    return (name, unk) if unk is not None else None


# A tokenizer made for the text spells next to all of it: byte-level BPEs never need their unknown
# token, and WordPiece or SentencePiece vocabularies on their own language leave well under 0.1%
# unknown (a rare symbol, an emoji). At 1%, one target in a hundred is the same id, which the model
# learns for free (the loss looks better than the model is): the tokenizer is not this text's.
UNKNOWN_WARN_FRACTION = 0.01


def check_unknown(source: str, unknown: int, total: int, unk: tuple[str, int], where: str, effect: str) -> None:
    """Refuse a text the tokenizer cannot spell at all; warn (one stderr line, ending in the
    `effect` on its use) when more than UNKNOWN_WARN_FRACTION of its tokens are the unknown token."""
    name = f"unknown token {unk[0]!r} (id {unk[1]})"
    if total and unknown == total:
        raise DataError(f"{source}: every token of it ({counted(total, 'token')}) is the tokenizer's {name}: "
                        f"the tokenizer ({where}) is not one for this text")
    if unknown > UNKNOWN_WARN_FRACTION * total:
        print(f"warning: {source}: {unknown:,} of its {counted(total, 'token')} ({unknown / total:.1%}) are the "
              f"tokenizer's {name}; the tokenizer ({where}) is likely the wrong one for this text, and {effect}",
              file=sys.stderr)


def check_vocab(tok: Tokenizer, model_vocab: int, where: str) -> None:
    """A tokenizer whose ids do not fit the model's embedding is refused."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > model_vocab:
        raise DataError(f"{where}: the tokenizer has {counted(n, 'token')} but model.vocab_size is {model_vocab} "
                        f"(expected model.vocab_size >= {n})")
