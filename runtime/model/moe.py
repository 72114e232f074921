"""Mixture of experts: a router, routed experts computed grouped by expert, shared experts.

The pieces are separate modules so expert parallelism can wrap them from outside:
    router   Router: x [N, D] -> (weights [N, k], expert ids [N, k], scores [N, E])
    experts  GroupedExperts: stacked weights [E, ...] as plain Parameters;
             forward(x_sorted [M, D], tokens_per_expert [E]) with rows sorted by expert id
             (the torchtitan contract an all-to-all dispatch can wrap)
    shared   MLP of the always-active shared experts, optional sigmoid `shared_gate` (Qwen2-MoE)

After each forward the MoE keeps `last_counts` (tokens per expert, LongTensor [E]) and
`last_aux_loss` (weighted balance loss or None) for the Transformer to collect.
"""

import torch
from torch import nn

from ..precision import Fp32Buffers
from .linear import Linear, linear
from .mlp import ACTIVATIONS, GATED, MLP, gated


class Router(Fp32Buffers, nn.Module):
    """Scores tokens against experts and picks top-k (with optional group-limited routing)."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.score, self.norm_topk, self.routed_scaling = m.score, m.norm_topk, m.routed_scaling
        self.n_groups, self.topk_groups = m.n_groups, m.topk_groups
        self.gate = Linear(cfg.d_model, m.n_experts, bias=m.router_bias)
        # DeepSeek-V3 aux-loss-free balancing: a bias that only steers the top-k choice; updated by
        # a rule (update_bias), not by gradients, so it is a buffer (saved in the state dict).
        if m.balance == "aux_free":
            self.register_buffer("e_score_correction_bias", torch.zeros(m.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def init_extra(self, std, out_std):
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def forward(self, x):
        logits = self.gate(x).float()
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_groups > 1:
            choice = self._limit_to_groups(choice)
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)  # the bias never changes the weights, only the choice
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling, idx, scores

    def _limit_to_groups(self, choice):
        """Keep the experts of the topk_groups best groups. A group's score is its best expert,
        or its best two summed when a correction bias is used (DeepSeek-V2 / V3)."""
        N, E = choice.shape
        grouped = choice.view(N, self.n_groups, E // self.n_groups)
        if self.e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, E // self.n_groups), dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(self.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, speed: float):
        """Raise the bias of under-loaded experts and lower it for over-loaded ones by `speed`."""
        counts = counts.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias.add_(speed * torch.sign(counts.mean() - counts))


class GroupedExperts(nn.Module):
    """E FFNs with stacked weights; tokens arrive sorted by expert, one matmul chain per expert."""

    use_grouped_mm = hasattr(torch, "_grouped_mm")  # else (older torch) a loop over experts

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation, self.act = activation, ACTIVATIONS[activation]
        E, D, H = n_experts, d_model, hidden
        self.w1 = nn.Parameter(torch.empty(E, H, D))  # gate (or up) projection, nn.Linear layout
        self.w2 = nn.Parameter(torch.empty(E, D, H))  # down projection
        self.w3 = nn.Parameter(torch.empty(E, H, D)) if activation in GATED else None
        self.b1 = nn.Parameter(torch.empty(E, H)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, D)) if bias else None
        self.b3 = nn.Parameter(torch.empty(E, H)) if bias and self.w3 is not None else None

    def init_extra(self, std, out_std):
        nn.init.normal_(self.w1, 0.0, std)
        nn.init.normal_(self.w2, 0.0, out_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, 0.0, std)
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's FFN on its tokens x [n, D]."""
        b = lambda p: None if p is None else p[e]  # noqa: E731
        h = linear(x, self.w1[e], b(self.b1))
        if self.w3 is not None:
            h = gated(self.activation, h, linear(x, self.w3[e], b(self.b3)))
        else:
            h = self.act(h)
        return linear(h, self.w2[e], b(self.b2))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D], rows grouped by expert in id order; tokens_per_expert [E] sums to M."""
        # torch._grouped_mm runs fp32 in eager on CPU, but its compile-time (meta) kernel wants bf16
        if self.use_grouped_mm and self.b1 is None and (
                x_sorted.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
            return self._grouped_mm_forward(x_sorted, tokens_per_expert)
        outs = [self.expert_forward(e, chunk)
                for e, chunk in enumerate(torch.split(x_sorted, tokens_per_expert.tolist()))
                if chunk.shape[0] > 0]
        return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)

    def _grouped_mm_forward(self, x, tokens_per_expert):
        """The same FFNs as one grouped matmul per weight (no host sync, one kernel per matrix)."""
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        w = lambda p: p.to(x.dtype).transpose(-2, -1)  # noqa: E731  [E, in, out]; cast as autocast would
        h = torch._grouped_mm(x, w(self.w1), offs=offs)
        if self.w3 is not None:
            h = gated(self.activation, h, torch._grouped_mm(x, w(self.w3), offs=offs))
        else:
            h = self.act(h)
        return torch._grouped_mm(h, w(self.w2), offs=offs)


def balance_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / DeepSeek balance loss: sum_e f_e * P_e with f_e = E * count_e / (k N) the load
    fraction relative to uniform and P_e the mean (per-token normalised) score; 1 when balanced."""
    N, E = scores.shape
    probs = scores / scores.sum(dim=-1, keepdim=True)
    load = counts.to(scores.dtype) * E / (top_k * N)
    return (load * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """Routed experts (+ shared experts) replacing the dense FFN of a block."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.aux_loss_coef = m.aux_loss_coef if m.balance != "none" else 0.0
        self.bias_update_speed = m.bias_update_speed
        self.router = Router(cfg)
        self.experts = GroupedExperts(m.n_experts, cfg.d_model, m.expert_hidden, cfg.activation, cfg.mlp_bias)
        self.shared = MLP(cfg.d_model, m.shared_hidden, cfg.activation, cfg.mlp_bias) if m.shared_hidden else None
        self.shared_gate = Linear(cfg.d_model, 1, bias=False) if m.shared_expert_gate else None
        self.last_counts = None
        self.last_aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, scores = self.router(x)
        out, counts = self.routed(x, weights, idx)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        self.last_counts = counts.detach()
        self.last_aux_loss = None
        if self.aux_loss_coef > 0 and torch.is_grad_enabled():
            self.last_aux_loss = self.aux_loss_coef * balance_loss(scores, counts, self.top_k)
        return out.view(shape)

    def routed(self, x, weights, idx):
        """Dispatch tokens to experts sorted by expert id, compute, and combine weighted by the router.

        Returns (out [N, D], tokens_per_expert [E])."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        # scatter_add, not bincount: a fixed output shape keeps torch.compile in one graph
        tokens_per_expert = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        token_of = order // k  # which token each sorted row came from
        y = self.experts(x[token_of], tokens_per_expert)
        # back to (token, slot) order, then the router-weighted sum over each token's k slots; an
        # index_add_ of the weighted rows would keep those rows too, beside the experts' outputs
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y = y[unsort].view(N, k, -1)
        out = (y * weights.to(y.dtype)[..., None]).sum(1)
        return out.to(x.dtype), tokens_per_expert

    def update_bias(self, counts: torch.Tensor):
        """Aux-loss-free balancing step (no-op unless balance = "aux_free")."""
        if self.router.e_score_correction_bias is not None:
            self.router.update_bias(counts, self.bias_update_speed)
