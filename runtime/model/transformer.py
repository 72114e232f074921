"""The decoder-only Transformer built from a ModelSpec (never from TOML).

Layout (torchtitan style, so parallel wrappers can act from outside):
    embed            token embedding
    pos_embed        learned absolute positions (positions = "learned" only)
    layers["i"]      Block: attn_norm -> attn (Attention | MLA) ; ffn_norm -> ffn (MLP | MoE)
    norm, head       final norm and output projection (head is None when tied to embed)
    mtp              DeepSeek-V3 multi-token prediction modules (ModuleList, may be empty)
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..precision import Fp32Buffers, autocast_stream_dtype, compute_dtype
from .attention import Attention
from .linear import Linear, linear
from .loss import chunked_cross_entropy, cross_entropy
from .mlp import MLP
from .norm import build_norm
from .rope import rope_attention_factor, rope_cos_sin, rope_inv_freq


@dataclass
class ModelOutput:
    """What the model returns. Losses are None when not applicable (no labels, no MoE, no MTP)."""

    logits: torch.Tensor | None                   # [B, T, V]; None with labels and a chunked loss
    loss: torch.Tensor | None = None              # lm_loss + aux_loss + mtp.loss_weight * mtp_loss
                                                  #   (+ indexer_loss with the DSA indexer)
    lm_loss: torch.Tensor | None = None           # mean next-token cross entropy over labels != -100
    aux_loss: torch.Tensor | None = None          # MoE balance loss, already weighted by aux_loss_coef
    mtp_loss: torch.Tensor | None = None          # mean over MTP depths of their cross entropy
    expert_counts: torch.Tensor | None = None     # [n_moe_layers, n_experts] tokens routed per expert,
                                                  #   then a row per MoE MTP block (with labels)
    indexer_loss: torch.Tensor | None = None      # DSA indexers' alignment KL, summed over layers


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if cfg.attention.kind == "mla":
            from .mla import MLA
            self.attn = MLA(cfg)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            from .moe import MoE
            self.ffn = MoE(cfg)
        else:
            self.ffn = MLP(cfg.d_model, cfg.ffn_hidden, cfg.activation, cfg.mlp_bias)

    def forward(self, x, cos=None, sin=None, cache=None, start_pos: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache=cache, start_pos=start_pos)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(Fp32Buffers, nn.Module):
    """A decoder-only Transformer covering every architecture a ModelSpec can express."""

    fp32_buffers = ("inv_freq",)  # cast to bf16, RoPE would rotate long positions by wrong angles

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.mtp.depth:
            from .mtp import MTPModule
            self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp.depth + 1))
        else:
            self.mtp = nn.ModuleList()
        self.loss_chunk = 0  # tokens per chunk of the loss (runtime/model/loss.py); 0: whole logits
        self.moe_layer_ids = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        self.mtp_moe_depths = [k for k, m in enumerate(self.mtp) if m.block.is_moe]  # 0-based
        self.rope_attention_factor = rope_attention_factor(cfg.rope)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope_dim, cfg.rope), persistent=False)

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter and buffer; valid after `to_empty` from the meta device.

        Normal(0, init_std) for embeddings and projections; the projections that write into the
        residual stream (attention wo, FFN/expert w2, MTP block outputs) get init_std / sqrt(2 L)
        so the residual's variance does not grow with depth (GPT-2); norms 1, biases 0.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        self.init_buffers()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("attn.wo", ".w2"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()  # norms, experts, router extras
        for module in self.modules():
            if hasattr(module, "init_extra"):
                module.init_extra(std, out_std)  # stacked expert weights, correction biases

    def init_buffers(self, device=None):
        """Compute the buffers no checkpoint stores (RoPE's inverse frequencies) on `device`, by
        default where they are; after weights are loaded into a model built on meta, give one."""
        device = self.inv_freq.device if device is None else device
        self.inv_freq = rope_inv_freq(self.cfg.rope_dim, self.cfg.rope).to(device)

    # ---------------------------------------------------------------- forward
    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        if self.cfg.positions != "rope":
            return None, None
        return rope_cos_sin(positions, self.inv_freq, self.rope_attention_factor, dtype)

    def forward(self, tokens, labels=None, *, positions=None, cache=None, last_only: bool = False) -> ModelOutput:
        """tokens [B, T] int64 -> ModelOutput. labels[:, t] is the token after tokens[:, t] (-100 = ignore).

        positions: [T] or [B, T] absolute positions (default 0..T-1). cache: per-layer KV caches,
        indexed `cache[layer_id]` (int); start_pos, the first new position, is positions[..., 0]
        of the first row; rows with other offsets need a cache carrying `mask` (see attention.py
        and mla.py for the per-layer hook). last_only: logits [B, 1, V] of the last position only
        (a prefill needs no more; a long prompt's full logits would be T x V floats). With labels
        and `loss_chunk` set (training under recompute), the loss is chunked and logits None.
        """
        if last_only and labels is not None:
            raise ValueError("last_only computes no logits to take a loss over: pass labels or last_only, not both")
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        start_pos = int(positions.reshape(-1)[0]) if cache is not None else 0
        h = self.embed_tokens(tokens, positions)
        cos, sin = self.rope(positions, compute_dtype(h))  # cast once, not in every layer
        for layer_id, layer in self.layers.items():
            layer_cache = cache[int(layer_id)] if cache is not None else None
            h = layer(h, cos, sin, cache=layer_cache, start_pos=start_pos)
        chunked = labels is not None and self.loss_chunk
        out = ModelOutput(logits=None if chunked else self.output(h[:, -1:] if last_only else h))
        aux, counts = self._collect_moe_stats(h.device)
        out.aux_loss, out.expert_counts = aux, counts
        if labels is not None:
            out.lm_loss = self.lm_loss(h, labels) if chunked else cross_entropy(out.logits, labels)
            out.loss = out.lm_loss
            if self.mtp:
                out.mtp_loss = self._mtp_loss(h, tokens, labels, cos, sin)
                mtp_aux, mtp_counts = self._collect_moe_stats(h.device, mtp=True)
                if mtp_aux is not None:
                    out.aux_loss = mtp_aux if out.aux_loss is None else out.aux_loss + mtp_aux
                if self.mtp_moe_depths:
                    rows = mtp_counts[self.mtp_moe_depths]
                    out.expert_counts = rows if out.expert_counts is None else torch.cat((out.expert_counts, rows))
                out.loss = out.loss + self.cfg.mtp.loss_weight * out.mtp_loss
            if out.aux_loss is not None:
                out.loss = out.loss + out.aux_loss
            if self.cfg.attention.sparse:
                out.indexer_loss = self._indexer_loss()
                if out.indexer_loss is not None:  # trains only the indexers (their inputs are detached)
                    out.loss = out.loss + out.indexer_loss
        return out

    def _indexer_loss(self):
        losses = [m.attn.indexer.last_loss for m in self.modules()
                  if isinstance(m, Block) and m.attn.indexer.last_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream's start: token (+ learned position) embeddings, bf16 under a bf16
        autocast (runtime/precision.py says why). MTP's embeddings of later tokens come here too."""
        h = self.embed(tokens)
        if self.pos_embed is not None and positions is not None:
            h = h + self.pos_embed(positions)
        return h.to(autocast_stream_dtype(h))

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The next-token loss of hidden states h through `norm` (default: the final norm) and the
        head; `loss_chunk` tokens at a time when set (runtime/model/loss.py)."""
        x = (norm or self.norm)(h)
        if not self.loss_chunk:
            return cross_entropy(self.project(x), labels)
        weight = self.head.weight if self.head is not None else self.embed.weight
        return chunked_cross_entropy(x, weight, labels, self.loss_chunk, compute_dtype(x))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head: the logits."""
        return self.project(self.norm(h))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The head (the embedding matrix when tied), shared by the MTP modules."""
        return self.head(x) if self.head is not None else linear(x, self.embed.weight)

    def _mtp_loss(self, h, tokens, labels, cos, sin):
        """DeepSeek-V3 MTP: depth k at position t reads token t+k and predicts token t+k+1."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            next_tokens = tokens.roll(-k, dims=1)          # token t+k (last k positions wrap: ignored)
            targets = labels.roll(-k, dims=1).clone()      # token t+k+1
            targets[:, -k:] = -100
            h = module(h, self.embed_tokens(next_tokens), cos, sin)
            losses.append(self.lm_loss(h, targets, module.norm))
        return torch.stack(losses).mean()

    def _collect_moe_stats(self, device, mtp: bool = False):
        """Sum of the MoE layers' weighted aux losses and their expert counts from the last forward."""
        if self.cfg.moe is None:
            return None, None
        blocks = [m.block for m in self.mtp] if mtp else [self.layers[str(i)] if str(i) in self.layers else None
                                                           for i in self.moe_layer_ids]
        aux, counts = None, []
        for block in blocks:
            moe = block.ffn if block is not None and block.is_moe else None
            if moe is None or moe.last_counts is None:
                counts.append(torch.zeros(self.cfg.moe.n_experts, dtype=torch.long, device=device))
                continue
            counts.append(moe.last_counts)
            if moe.last_aux_loss is not None:
                aux = moe.last_aux_loss if aux is None else aux + moe.last_aux_loss
        return aux, (torch.stack(counts) if counts else None)

    @torch.no_grad()
    def update_router_bias(self, expert_counts: torch.Tensor):
        """Aux-loss-free balancing (DeepSeek-V3): call after each optimizer step with the step's
        expert_counts (summed over micro-batches and ranks): a row per MoE layer, then, when
        present, a row per MoE MTP block."""
        for row, layer_id in enumerate(self.moe_layer_ids):
            if str(layer_id) in self.layers:
                self.layers[str(layer_id)].ffn.update_bias(expert_counts[row])
        mtp_rows = expert_counts[len(self.moe_layer_ids):]
        for row, depth in zip(mtp_rows, self.mtp_moe_depths):
            if depth < len(self.mtp):  # a pipeline stage other than the last holds no MTP modules
                self.mtp[depth].block.ffn.update_bias(row)
