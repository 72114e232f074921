"""tokens/s of the progress line, metrics.jsonl and report.json counts the input tokens that are not
padding (it counted global batch x seq_len, padding included), and MFU still counts every position
computed, padding included (the FLOPs the device ran). `padded_tokens_per_s` in the report is that rate.

The run's batches are replaced by ones of known padding: row r of each micro-batch of 2 ends with
10 + 6 r pad ids (the label before them is masked too: it predicts padding) and its first 4 labels
are masked as an SFT prompt's are, so a step of 4 micro-batches x 2 rows x 64 positions holds
4 x (54 + 48) = 408 input tokens and 4 x (49 + 43) = 368 targets."""

import json

import pytest
import torch

from llmc.compiler.cli import main as llmc
from train_helpers import metrics, train_args

POSITIONS, INPUTS, TARGETS = 8 * 64, 408, 368


def known_padding(tmp_path):
    """TrainData.next_step with every sample replaced: token 7 (not pad), padded at the end as above."""
    from tokenizers import Tokenizer

    from llmc.runtime.data.dataset import TrainData
    original = TrainData.next_step

    def next_step(self):
        pad = Tokenizer.from_file(str(next((tmp_path / "cache").glob("*/tokenizer.json")))).token_to_id("<|pad|>")
        assert pad is not None and pad != 7
        batches = []
        for tokens, labels in original(self):
            assert tokens.shape == (2, 64)
            tokens, labels = torch.full_like(tokens, 7), torch.full_like(labels, 7)
            labels[:, :4] = -100  # a prompt: input tokens, not targets
            for row in range(2):
                tokens[row, 64 - (10 + 6 * row):] = pad
                labels[row, 64 - (10 + 6 * row) - 1:] = -100  # (the last real token predicts padding)
            batches.append((tokens, labels))
        return batches
    return next_step


def test_tokens_per_s_counts_the_tokens_that_are_not_padding(tmp_path, monkeypatch, capsys):
    from llmc.runtime.data.dataset import TrainData
    from llmc.runtime.train.report import peak_flops

    monkeypatch.setattr(TrainData, "next_step", known_padding(tmp_path))
    assert llmc(train_args(tmp_path, "run", "train.max_steps=6", "train.eval_every=0", "train.log_every=1",
                           "train.global_batch_size=8", "train.micro_batch_size=2")) == 0
    err = capsys.readouterr().err
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    peak = peak_flops(json.loads((run / "plan.json").read_text())) * report["world_size"]
    fpt = report["flops_per_token"]

    records = metrics(run)
    assert len(records) == 6
    for r in records:
        assert (r["input_tokens"], r["tokens"]) == (INPUTS, TARGETS)
        assert r["tokens_per_s"] == pytest.approx(INPUTS / r["step_time"], rel=1e-9)
        assert r["mfu"] == pytest.approx(fpt * POSITIONS / r["step_time"] / peak, rel=1e-9)

    progress = [line for line in err.splitlines() if line.startswith("step 6/6")]
    assert progress and f"{records[-1]['tokens_per_s']:,.0f} tok/s" in progress[0], err

    assert (report["tokens"], report["positions"]) == (6 * INPUTS, 6 * POSITIONS)
    assert f"Steps: 6 ({6 * INPUTS:,} tokens, {6 * POSITIONS:,} positions with padding)" in (run / "report.md").read_text()

    m = report["measured"]
    assert m["padded_tokens_per_s"] == pytest.approx(POSITIONS / m["step_time_s"], rel=1e-9)
    assert m["tokens_per_s"] == pytest.approx(INPUTS / m["step_time_s"], rel=1e-9)
    assert m["mfu"] == pytest.approx(fpt * POSITIONS / m["step_time_s"] / peak, rel=1e-9)
