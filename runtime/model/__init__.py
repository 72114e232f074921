"""The llmc runtime model: `Transformer(cfg: ModelSpec)` and the parameter-component map.

    model = Transformer(plan_spec.model)          # or under torch.device("meta"), then
    model.to_empty(device=...); model.init_weights()
    out = model(tokens, labels)                   # ModelOutput: logits, loss, lm_loss, aux_loss,
                                                  #   mtp_loss, expert_counts
    model.update_router_bias(counts)              # after each optimizer step (aux-free balancing)

Files: norm (RMSNorm, LayerNorm), rope (RoPE + linear/llama3/YaRN scaling), attention (MHA/GQA/MQA
and the KV-cache hook), mla (DeepSeek MLA + absorbed cached decode), indexer (DSA top-k
selection), linear (the linear layers: fp32 CPU products on oneDNN), mlp, moe (router, grouped
experts, shared experts), mtp, transformer (Block, Transformer), components (component_of), io
(the checkpoint folder).
"""

from .components import COMPONENTS, component_of, count_by_component
from .transformer import ModelOutput, Transformer

__all__ = ["COMPONENTS", "ModelOutput", "Transformer", "component_of", "count_by_component"]
