"""Packing windows, the mixture sampler (weights, determinism, epochs), rank slices and sampler state."""

import numpy as np
import pytest

from llmc.runtime.data.dataset import PackedWindows
from llmc.runtime.data.sampler import MixtureSampler
from llmc.runtime.data.shards import ShardWriter, TokenShard


def make_shard(tmp_path, docs, mask=None):
    writer = ShardWriter(tmp_path / "s", np.uint16, eos=0, with_mask=mask is not None)
    for i, d in enumerate(docs):
        writer.add(d, mask[i] if mask else None)
    entry = writer.close()
    return TokenShard(tmp_path / "s", entry["dtype"])


def test_packing_puts_eos_between_documents_and_pads_the_last_window(tmp_path):
    shard = make_shard(tmp_path, [[1, 2, 3], [4, 5]])  # stream: 1 2 3 0 4 5 0
    assert shard.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0]
    assert shard.docs.tolist() == [0, 4]
    w3 = PackedWindows(shard, 3, pad_id=9)
    assert len(w3) == 2
    assert [x.tolist() for x in w3[0]] == [[1, 2, 3], [2, 3, 0]]
    assert [x.tolist() for x in w3[1]] == [[0, 4, 5], [4, 5, 0]]
    w4 = PackedWindows(shard, 4, pad_id=9)
    assert len(w4) == 2
    assert [x.tolist() for x in w4[0]] == [[1, 2, 3, 0], [2, 3, 0, 4]]
    assert [x.tolist() for x in w4[1]] == [[4, 5, 0, 9], [5, 0, -100, -100]]


def test_mask_turns_labels_off(tmp_path):
    shard = make_shard(tmp_path, [[1, 2, 3], [4, 5]], mask=[[0, 1, 1], [0, 1]])
    inputs, labels = PackedWindows(shard, 6, pad_id=9)[0]
    # stream 1 2 3 0 4 5 0 with mask 0 1 1 0 0 1 0: labels are tokens 1..6 where the mask is 1
    assert inputs.tolist() == [1, 2, 3, 0, 4, 5]
    assert labels.tolist() == [2, 3, -100, -100, 5, -100]


def test_mixture_follows_the_weights_deterministically():
    a = MixtureSampler([1000, 1000], [3.0, 1.0], seed=7, global_batch=64)
    b = MixtureSampler([1000, 1000], [3.0, 1.0], seed=7, global_batch=64)
    c = MixtureSampler([1000, 1000], [3.0, 1.0], seed=8, global_batch=64)
    steps_a = [a.next_step() for _ in range(100)]
    assert steps_a == [b.next_step() for _ in range(100)]
    assert steps_a != [c.next_step() for _ in range(100)]
    share = np.mean([s for step in steps_a for s, _ in step])
    assert abs(share - 0.25) < 0.02  # 6400 draws: the standard error is 0.005


def test_each_epoch_visits_every_sample_once():
    s = MixtureSampler([10], [1.0], seed=0, global_batch=5)
    first = [i for _ in range(2) for _, i in s.next_step()]
    second = [i for _ in range(2) for _, i in s.next_step()]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second  # a new permutation per epoch


@pytest.mark.parametrize("dp", [2, 4])
def test_ranks_read_disjoint_slices_that_make_up_the_global_batch(dp):
    single = MixtureSampler([50, 30, 20], [1.0, 2.0, 1.0], seed=3, global_batch=8)
    ranks = [MixtureSampler([50, 30, 20], [1.0, 2.0, 1.0], seed=3, global_batch=8, dp_rank=r, dp_size=dp)
             for r in range(dp)]
    for _ in range(40):
        whole = single.next_step()
        parts = [r.next_step() for r in ranks]
        assert all(len(p) == 8 // dp for p in parts)
        assert sum(parts, []) == whole


def test_state_restores_the_exact_continuation():
    s = MixtureSampler([17, 5], [1.0, 1.0], seed=1, global_batch=4)
    for _ in range(9):
        s.next_step()
    state = s.state_dict()
    expected = [s.next_step() for _ in range(20)]
    fresh = MixtureSampler([17, 5], [1.0, 1.0], seed=1, global_batch=4)
    fresh.load_state_dict(state)
    assert [fresh.next_step() for _ in range(20)] == expected
    with pytest.raises(ValueError, match="data changed"):
        MixtureSampler([18, 5], [1.0, 1.0], seed=1, global_batch=4).load_state_dict(state)
