"""Invariant 2: for every spec in specs/, the runtime model has exactly the parameter count the
plan states, in total and per component (built on the meta device: no memory for the weights)."""

from pathlib import Path

import pytest
import torch

from llmc.compiler.plan import build_plan
from llmc.compiler.spec import load_spec
from llmc.runtime.model import Transformer, count_by_component

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_model_parameters_equal_plan(path):
    spec = load_spec(path)
    params = build_plan(spec, strict=False).model_dump(mode="json")["params"]  # params need no layout
    with torch.device("meta"):
        model = Transformer(spec.model)
    assert count_by_component(model) == params["components"]
    assert sum(p.numel() for p in model.parameters()) == params["total"]
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.")) == params["mtp"]
    assert model.embed.weight.numel() == params["embedding"]


def test_published_counts_through_the_model():
    """Independent anchors: Llama-3-8B has 8,030,261,248 parameters; DeepSeek-V3 without MTP
    671,026,404,352 (ds_v32 adds the DSA indexers to the same backbone)."""
    with torch.device("meta"):
        llama = Transformer(load_spec(Path(SPECS[0]).parent / "llama3_8b.toml").model)
        ds = Transformer(load_spec(Path(SPECS[0]).parent / "ds_v32.toml").model)
    assert sum(p.numel() for p in llama.parameters()) == 8_030_261_248
    main = sum(p.numel() for n, p in ds.named_parameters() if not n.startswith("mtp.") and ".indexer." not in n)
    assert main == 671_026_404_352
