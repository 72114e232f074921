"""Packed training samples from memory-mapped shards.

Packing: a shard is one stream of documents separated by the end-of-text token; sample i is the
window of seq_len + 1 tokens starting at i * seq_len (inputs are its first seq_len tokens, labels
the last seq_len). Documents are packed back to back, so attention does cross a document
boundary inside a window: the end-of-text token between them tells the model a new document starts
(GPT-2 / nanoGPT practice). Labels are -100 where the shard's loss mask is 0 (SFT prompts) and on
the padding that fills the last window of a shard.
"""

from pathlib import Path

import numpy as np
import torch

from .prepare import load_manifest
from .sampler import MixtureSampler
from .shards import TokenShard


class PackedWindows:
    """Fixed-length windows over one shard."""

    def __init__(self, shard: TokenShard, seq_len: int, pad_id: int):
        self.shard, self.seq_len, self.pad_id = shard, seq_len, pad_id
        self.n = max(1, -(-(len(shard) - 1) // seq_len))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [T], labels [T]) as int64 arrays."""
        T, start = self.seq_len, i * self.seq_len
        chunk = np.asarray(self.shard.tokens[start:start + T + 1], dtype=np.int64)
        valid = np.ones(len(chunk), dtype=bool)
        if self.shard.mask is not None:
            valid = np.asarray(self.shard.mask[start:start + T + 1], dtype=bool)
        if len(chunk) < T + 1:
            pad = T + 1 - len(chunk)
            chunk = np.concatenate([chunk, np.full(pad, self.pad_id, dtype=np.int64)])
            valid = np.concatenate([valid, np.zeros(pad, dtype=bool)])
        inputs, labels = chunk[:-1].copy(), chunk[1:].copy()
        labels[~valid[1:]] = -100
        return inputs, labels


def _stack(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([s[0] for s in samples])),
            torch.from_numpy(np.stack([s[1] for s in samples])))


class TrainData:
    """The data of one rank: its micro-batches per step, the validation batches, the sampler state."""

    def __init__(self, prepared: Path, weights: list[float], seq_len: int, seed: int, global_batch: int,
                 micro_batch: int, dp_rank: int = 0, dp_size: int = 1):
        self.manifest = load_manifest(prepared)
        pad = self.manifest["special"]["pad"]
        dtype = self.manifest["dtype"]
        self.train = [PackedWindows(TokenShard(prepared / s["train"]["name"], dtype), seq_len, pad)
                      for s in self.manifest["sources"]]
        self.val = [PackedWindows(TokenShard(prepared / s["val"]["name"], dtype), seq_len, pad)
                    for s in self.manifest["sources"] if s["val"] and s["val"]["tokens"] > 1]
        self.micro_batch = micro_batch
        self.rank, self.dp = dp_rank, dp_size
        self.sampler = MixtureSampler([len(w) for w in self.train], weights, seed, global_batch, dp_rank, dp_size)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step: [(tokens [mb, T], labels [mb, T]), ...]."""
        picks = self.sampler.next_step()
        samples = [self.train[s][i] for s, i in picks]
        return [_stack(samples[j:j + self.micro_batch]) for j in range(0, len(samples), self.micro_batch)]

    def val_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of a fixed validation set of n_batches x micro_batch samples (interleaving
        the sources); the set does not depend on the number of ranks.

        Every rank gets as many batches as the rank with the most samples: a sharded model (FSDP,
        EP, TP) runs collectives in each forward, so a rank that skipped one would leave the others
        waiting. A rank short of samples makes up the count with a window whose labels are all
        ignored (it adds no tokens to the loss)."""
        if not self.val:
            return []
        total = n_batches * self.micro_batch
        lo, hi = self.rank * total // self.dp, (self.rank + 1) * total // self.dp
        picks = [self._val_sample(j) for j in range(lo, hi)]
        batches = [_stack(picks[j:j + self.micro_batch]) for j in range(0, len(picks), self.micro_batch)]
        most_samples = -(-total // self.dp)                  # ceil: the rank with the most samples
        while len(batches) < -(-most_samples // self.micro_batch):
            tokens, labels = _stack([self._val_sample(lo)])
            batches.append((tokens, torch.full_like(labels, -100)))
        return batches

    def _val_sample(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        windows = self.val[j % len(self.val)]
        return windows[(j // len(self.val)) % len(windows)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
