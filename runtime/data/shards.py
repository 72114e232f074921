"""Token shards on disk: one per (source, split).

`NAME.bin` holds the token ids of every document back to back, each followed by the end-of-text
token (uint16 when the vocabulary fits, else uint32); `NAME.docs.npy` the start offset of every
document (int64, the index); `NAME.mask.bin` (SFT only) one uint8 per token, 1 where the token is a
training target. Readers memory-map all three, so a rank touches only the pages it samples.
"""

import os
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents (ids, optional mask) to a shard; `close()` writes the index."""

    def __init__(self, path: Path, dtype: np.dtype, eos: int, with_mask: bool):
        self.path, self.dtype, self.eos = Path(path), np.dtype(dtype), eos
        self._tokens = open(self.path.with_suffix(".bin"), "wb")
        self._mask = open(self.path.with_suffix(".mask.bin"), "wb") if with_mask else None
        self.doc_starts: list[int] = []
        self.n_tokens = 0

    def add(self, ids: list[int], mask: list[int] | None = None) -> None:
        self.doc_starts.append(self.n_tokens)
        self._tokens.write(np.asarray(ids + [self.eos], dtype=self.dtype).tobytes())
        if self._mask is not None:
            # The separator after a conversation is not a target: the template's own end marker is.
            self._mask.write(np.asarray((mask or [1] * len(ids)) + [0], dtype=np.uint8).tobytes())
        self.n_tokens += len(ids) + 1

    def close(self) -> dict:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self.path.with_suffix(".docs.npy"), np.asarray(self.doc_starts, dtype=np.int64))
        return {"name": self.path.name, "tokens": self.n_tokens, "documents": len(self.doc_starts),
                "dtype": self.dtype.name, "mask": self._mask is not None}


def split_tail(train: Path, val: Path, fraction: float, dtype: np.dtype, with_mask: bool) -> tuple[dict, dict]:
    """Move the last `fraction` of a shard's tokens into a new shard (a source with too few documents
    to hold some out whole). Returns the two shards' manifest entries."""
    tokens = np.fromfile(train.with_suffix(".bin"), dtype=dtype)
    cut = len(tokens) - max(2, int(len(tokens) * fraction))
    if cut < 2:
        cut = len(tokens) // 2
    starts = np.load(train.with_suffix(".docs.npy"))
    entries = []
    for path, lo, hi in ((val, cut, len(tokens)), (train, 0, cut)):
        tokens[lo:hi].tofile(path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path.with_suffix(".bin"))
        if with_mask:
            mask = np.fromfile(train.with_suffix(".mask.bin"), dtype=np.uint8)
            mask[lo:hi].tofile(path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path.with_suffix(".mask.bin"))
        docs = np.concatenate([[0], starts[(starts > lo) & (starts < hi)] - lo]).astype(np.int64)
        np.save(path.with_suffix(".docs.npy"), docs)
        entries.append({"name": path.name, "tokens": int(hi - lo), "documents": len(docs),
                        "dtype": np.dtype(dtype).name, "mask": with_mask})
    return entries[1], entries[0]


class TokenShard:
    """A memory-mapped shard: `tokens`, `docs` (start offsets) and `mask` (None for pretraining)."""

    def __init__(self, path: Path, dtype: str):
        path = Path(path)
        self.name = path.name
        self.tokens = np.memmap(path.with_suffix(".bin"), dtype=np.dtype(dtype), mode="r")
        self.docs = np.load(path.with_suffix(".docs.npy"), mmap_mode="r")
        mask_file = path.with_suffix(".mask.bin")
        self.mask = np.memmap(mask_file, dtype=np.uint8, mode="r") if mask_file.exists() else None

    def __len__(self) -> int:
        return len(self.tokens)
