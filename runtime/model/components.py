"""Parameter name -> component, the names shared with the planner's `params.components`."""

from collections import Counter

COMPONENTS = ("embedding", "positions", "attention", "indexer", "mlp", "experts", "shared_experts",
              "router", "norms", "mtp", "head")

# name parts that wrappers insert (torch.compile, DDP, FSDP1, activation checkpointing)
WRAPPER_PARTS = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def component_of(name: str) -> str:
    """The component of a parameter name of `Transformer` (wrapper prefixes are ignored)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS]
    top = parts[0]
    if top == "embed":
        return "embedding"
    if top == "pos_embed":
        return "positions"
    if top == "head":
        return "head"
    if top == "norm":
        return "norms"
    if top == "mtp":
        return "mtp"
    if top == "layers" and len(parts) >= 4:
        sub, part = parts[2], parts[3]
        if sub in ("attn_norm", "ffn_norm"):
            return "norms"
        if sub == "attn":
            return "indexer" if part == "indexer" else "attention"
        if sub == "ffn":
            if part == "router":
                return "router"
            if part == "experts":
                return "experts"
            if part in ("shared", "shared_gate"):
                return "shared_experts"
            return "mlp"
    raise ValueError(f"parameter {name!r} belongs to no known component")


def count_by_component(model) -> dict[str, int]:
    """{component: parameter count} over model.named_parameters(), every component listed."""
    counts = Counter({c: 0 for c in COMPONENTS})
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    return dict(counts)
