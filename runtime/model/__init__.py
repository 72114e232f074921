"""The llmc runtime model: `Transformer(cfg: ModelSpec)` and the parameter-component map."""

from .components import COMPONENTS, component_of, count_by_component
from .transformer import ModelOutput, Transformer

__all__ = ["COMPONENTS", "ModelOutput", "Transformer", "component_of", "count_by_component"]
