"""Preallocated KV caches for generation, one object per layer behind one whole-model cache.

The model's hook (runtime/model/attention.py, mla.py) is small: layer i calls
`cache[i].update(...)` with its new keys/values and gets back everything cached so far, then
reads `cache[i].mask` (None, or bool [B, 1, T, S], True = may attend) for the attention mask.

Slots vs positions. A batch of prompts of different lengths is left-padded into one block of
slots; slot s of row b holds that row's token at position s - pad[b]. The cache owns the slot
counter (`length`) and writes the chunk there, whatever start_pos the model passes (the model's
start_pos is a position, and positions differ by row); the mask hides padding slots from real
queries, so each row computes exactly what it would alone.

Sizes. MHA/GQA/MQA store k and v: 2 x n_kv_heads x head_dim values per token per layer. MLA
stores only the compressed latent and the shared RoPE key: kv_lora_rank + qk_rope_head_dim
(decoded with absorbed projections in runtime/model/mla.py). DSA adds its indexer keys, kept as
DeepSeek-V3.2 serves them: fp8 (e4m3) with one fp32 scale per block of 128 dims, i.e.
index_head_dim + 4 x ceil(index_head_dim / 128) bytes per token per layer. `nbytes()` counts the
tensors actually held; at bf16 it equals the plan's memory.inference.kv_cache_bytes_per_token.
"""

import torch


class WholeCache:
    """Slot bookkeeping shared by every layer: the fill level, which slots are padding, the mask."""

    def __init__(self, batch: int, max_len: int, device):
        self.batch, self.max_len = batch, max_len
        self.length = 0                                  # slots already filled
        self.real = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.mask: torch.Tensor | None = None            # for the chunk being written
        self.padded = False                              # any padding slot so far
        self.layers: dict[int, object] = {}
        self.chunk = 0

    def __getitem__(self, layer_id: int):
        return self.layers[layer_id]

    def begin(self, n_new: int, real: torch.Tensor | None = None) -> None:
        """Before a forward of n_new tokens per row: mark which are real (bool [B, n_new]), build the mask."""
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} + {n_new} do not fit")
        s0, s1 = self.length, self.length + n_new
        self.real[:, s0:s1] = True if real is None else real
        if real is not None and not bool(real.all()):
            self.padded = True
        self.chunk = n_new
        if not self.padded:
            # No padding: causal with offset, which the attention derives from start_pos itself
            # (start_pos == slot when nothing is padded).
            self.mask = None
            return
        q_slot = torch.arange(s0, s1, device=self.real.device)
        k_slot = torch.arange(s1, device=self.real.device)
        causal = k_slot[None, :] <= q_slot[:, None]                           # [T, S]
        mask = causal[None] & self.real[:, None, :s1]                         # [B, T, S]
        # A padding query sees itself only, so its (ignored) output stays finite.
        mask |= (k_slot[None, :] == q_slot[:, None])[None]
        self.mask = mask[:, None]                                             # [B, 1, T, S]

    def commit(self) -> None:
        """After the forward: the chunk is now part of the cache."""
        self.length += self.chunk
        self.chunk = 0

    def truncate(self, length: int) -> None:
        """Forget slots from `length` on (speculative decoding drops rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes of every cached tensor (keys, values, latents, indexer keys) at full capacity."""
        return sum(layer.nbytes() for layer in self.layers.values())


class LayerCache:
    """Named preallocated buffers [B, max_len, *shape] of one layer, written chunk by chunk."""

    def __init__(self, owner: WholeCache, shapes: dict[str, tuple[int, ...]], dtype, device):
        self.owner = owner
        self.buffers = {name: torch.zeros(owner.batch, owner.max_len, *shape, dtype=dtype, device=device)
                        for name, shape in shapes.items()}

    @property
    def mask(self):
        return self.owner.mask

    def write(self, **new: torch.Tensor) -> list[torch.Tensor]:
        """Store the chunk's tensors [B, T, ...] at the current slots; return each buffer up to them."""
        s0 = self.owner.length
        s1 = s0 + self.owner.chunk
        out = []
        for name, t in new.items():
            buf = self.buffers[name]
            if t.shape[1] != s1 - s0:
                raise ValueError(f"cache.begin({s1 - s0}) was called but {t.shape[1]} tokens arrived")
            buf[:, s0:s1] = t            # copy_ converts to the cache's dtype
            out.append(buf[:, :s1])
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class KVLayerCache(LayerCache):
    """Keys and values of MHA / GQA / MQA: update(k, v, start_pos) -> (k_all, v_all), [B, H_kv, T, D].

    Stored head-major [B, H_kv, max_len, D], SDPA's layout: each head's keys are one contiguous
    block, handed to the attention as a view (no copy, no transpose per step)."""

    def __init__(self, owner: WholeCache, shapes: dict[str, tuple[int, ...]], dtype, device):
        self.owner = owner
        self.buffers = {name: torch.zeros(owner.batch, shape[0], owner.max_len, *shape[1:], dtype=dtype, device=device)
                        for name, shape in shapes.items()}

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0):
        del start_pos  # the owner's slot counter decides where the chunk goes (see module docstring)
        s0 = self.owner.length
        s1 = s0 + self.owner.chunk
        if k.shape[2] != s1 - s0:
            raise ValueError(f"cache.begin({s1 - s0}) was called but {k.shape[2]} tokens arrived")
        k_buf, v_buf = self.buffers["k"], self.buffers["v"]
        k_buf[:, :, s0:s1] = k           # copy_ converts to the cache's dtype
        v_buf[:, :, s0:s1] = v
        return k_buf[:, :, :s1], v_buf[:, :, :s1]


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
INDEX_BLOCK = 128   # dims sharing one fp32 scale in the indexer's key cache


class MLALayerCache(LayerCache):
    """MLA: the normalised kv latent [B, T, kv_lora_rank] and the roped shared key [B, T, rope_dim],
    plus the DSA indexer's keys [B, T, index_head_dim] (fp8 with fp32 block scales) when sparse."""

    def __init__(self, owner, shapes, dtype, device, index_fp8: bool = True):
        shapes = dict(shapes)
        index_dim = shapes.pop("index_k", None) if index_fp8 else None
        super().__init__(owner, shapes, dtype, device)
        self.index_fp8 = index_fp8
        if index_dim is not None:
            blocks = -(-index_dim[0] // INDEX_BLOCK)
            self.buffers["index_k"] = torch.zeros(owner.batch, owner.max_len, *index_dim, dtype=FP8, device=device)
            self.buffers["index_scale"] = torch.ones(owner.batch, owner.max_len, blocks, dtype=torch.float32,
                                                     device=device)

    def update(self, kv_latent: torch.Tensor, k_rope: torch.Tensor, start_pos: int = 0):
        del start_pos
        return tuple(self.write(latent=kv_latent, k_rope=k_rope))

    def update_index(self, index_k: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Store the indexer keys [B, T, D] as fp8 blocks; return all of them dequantised."""
        del start_pos
        if not self.index_fp8:
            return self.write(index_k=index_k)[0]
        B, T, D = index_k.shape
        pad = (-D) % INDEX_BLOCK
        blocks = torch.nn.functional.pad(index_k.float(), (0, pad)).view(B, T, -1, INDEX_BLOCK)
        scale = blocks.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
        codes = (blocks / scale[..., None]).to(FP8).flatten(2)[..., :D]
        k_all, s_all = self.write(index_k=codes, index_scale=scale)
        full = torch.nn.functional.pad(k_all.float(), (0, pad)).view(*k_all.shape[:2], -1, INDEX_BLOCK)
        return (full * s_all[..., None]).flatten(2)[..., :D].to(index_k.dtype)


def layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """What one layer caches per token, by name (the size contract with the planner)."""
    att = cfg.attention
    if att.kind == "mla":
        shapes = {"latent": (att.kv_lora_rank,), "k_rope": (att.qk_rope_head_dim,)}
        if att.sparse:
            shapes["index_k"] = (att.index_head_dim,)
        return shapes
    return {"k": (cfg.kv_heads, cfg.dim_per_head), "v": (cfg.kv_heads, cfg.dim_per_head)}


def build_cache(model, batch: int, max_len: int, dtype=None, device=None, index_fp8: bool = True) -> WholeCache:
    """A cache for every layer of `model` (the layers this process holds).

    index_fp8: keep DSA indexer keys in fp8 as DeepSeek-V3.2 serves them (the plan's size); False
    keeps them in `dtype`, so top-k selection is bit-for-bit that of the uncached model."""
    cfg = model.cfg
    param = next(model.parameters())
    dtype = dtype or (param.dtype if param.is_floating_point() else torch.float32)
    device = device or param.device
    cache = WholeCache(batch, max_len, device)
    for layer_id in model.layers.keys():
        if cfg.attention.kind == "mla":
            layer = MLALayerCache(cache, layer_shapes(cfg), dtype, device, index_fp8)
        else:
            layer = KVLayerCache(cache, layer_shapes(cfg), dtype, device)
        cache.layers[int(layer_id)] = layer
    return cache
