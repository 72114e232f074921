"""apply_tp called directly on what its tensor parallelism does not shard (tied embeddings, the
DSA indexer; the planner never chooses those) refuses with a ValueError before touching a mesh."""

import pytest

from llmc.compiler.spec import load_spec
from llmc.runtime.model import Transformer
from llmc.runtime.parallel.tensor import _attention_plan, apply_tp

from parallel_helpers import SPEC

DSA = ["model.attention.index_n_heads=2", "model.attention.index_head_dim=16", "model.attention.index_topk=8"]


class TwoRanks:
    """A stand-in tp mesh of size 2: the checks run before any collective."""

    def size(self):
        return 2


def model(*sets):
    return Transformer(load_spec(SPEC, ["model.mtp.depth=0", *sets]).model)


def test_tied_embeddings_are_refused():
    with pytest.raises(ValueError, match="tied embeddings.*planner"):
        apply_tp(model("model.tie_embeddings=true"), TwoRanks())


def test_sparse_indexer_is_refused():
    attn = model(*DSA).layers["0"].attn
    assert attn.indexer is not None
    with pytest.raises(ValueError, match="sparse indexer.*planner"):
        _attention_plan(attn, 2, False)
