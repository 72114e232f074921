"""`llmc eval CKPT --text-file F --json`: mean next-token loss and perplexity, against references."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.plan import build_plan
from llmc.compiler.spec import load_spec
from llmc.runtime.data.tokenizer import train_tokenizer
from llmc.runtime.model import Transformer
from llmc.runtime.model.io import save_model

from test_infer_checkpoints import one_thread  # noqa: F401  (tiny models: one thread on shared cores)
from train_helpers import REPO

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 3
CONTEXT = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer([TEXT] * 4, 300)
    spec = load_spec(REPO / "specs" / "tiny.toml", [
        "model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=48", f"model.max_seq_len={CONTEXT}", f"train.seq_len={CONTEXT}"])
    plan = build_plan(spec).model_dump(mode="json")
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    save_model(model, plan, tmp / "random", tokenizer=tok)
    with torch.no_grad():
        model.head.weight.zero_()
    save_model(model, plan, tmp / "uniform", tokenizer=tok)
    (tmp / "text.txt").write_text(TEXT)
    return tmp, tok


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "eval", *map(str, args)],
                          capture_output=True, text=True)


def test_uniform_model_has_loss_log_vocab(checkpoint):
    tmp, tok = checkpoint
    r = run_eval(tmp / "uniform", "--text-file", tmp / "text.txt", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    n_ids = len(tok.encode(TEXT, add_special_tokens=False).ids)
    assert out["tokens"] == n_ids - 1
    assert out["loss"] == pytest.approx(math.log(300), abs=1e-5)      # zero logits: uniform over 300 tokens
    assert out["perplexity"] == pytest.approx(300, rel=1e-4)


def test_windowed_loss_matches_a_token_by_token_reference(checkpoint):
    """Each token j >= 1 is predicted from the tokens of its window before it (windows of CONTEXT
    predictions, starting at 0, CONTEXT, 2 CONTEXT, ...): computed one prefix at a time here."""
    tmp, tok = checkpoint
    losses = prefix_losses(tmp / "random", tok)
    r = run_eval(tmp / "random", "--text-file", tmp / "text.txt", "--json")
    out = json.loads(r.stdout)
    assert out["tokens"] == len(losses)
    assert out["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-6)
    plain = run_eval(tmp / "random", "--text-file", tmp / "text.txt")
    assert plain.returncode == 0 and "perplexity" in plain.stdout


def prefix_losses(folder, tok, stride: int = CONTEXT) -> list[float]:
    """The loss of each token j >= 1 of TEXT given the tokens of its window before it: windows of
    CONTEXT tokens starting every `stride`, j in the first that holds it with the tokens before it."""
    from llmc.runtime.model.io import load_model
    model, _, _ = load_model(folder, "cpu", "fp32")
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > 3 * CONTEXT  # several windows
    losses = []
    with torch.no_grad():
        for j in range(1, len(ids)):
            start = max(0, math.ceil((j - CONTEXT) / stride) * stride)
            logits = model(torch.tensor([ids[start:j]])).logits[0, -1]
            losses.append(-F.log_softmax(logits.float(), -1)[ids[j]].item())
    return losses


@pytest.mark.parametrize("stride", [5, 1])
def test_a_stride_gives_each_prediction_more_history(checkpoint, stride):
    """--stride 5 (of a context of 16): windows start every 5 tokens and each predicts the tokens
    no window before it did, so a token after the first window has at least 11 before it; 1:
    every token has all the context it can. Against the prefix reference, whose mean differs from
    that of consecutive windows (by 3e-4 for this model) more than the tolerance."""
    from llmc.runtime.evaluate import windows
    # 12 tokens (predictions 1..11), context 4, stride 2: (start, first, last) derived by hand
    assert windows(12, 4, 2) == [(0, 1, 4), (2, 5, 6), (4, 7, 8), (6, 9, 10), (8, 11, 11)]
    tmp, tok = checkpoint
    losses, consecutive = prefix_losses(tmp / "random", tok, stride), prefix_losses(tmp / "random", tok)
    assert abs(sum(losses) / len(losses) - sum(consecutive) / len(consecutive)) > 1e-4
    out = json.loads(run_eval(tmp / "random", "--text-file", tmp / "text.txt", "--json", "--stride", stride).stdout)
    assert out["tokens"] == len(losses)
    assert out["loss"] == pytest.approx(sum(losses) / len(losses), abs=2e-5)


def test_a_stride_beyond_the_context_is_refused(checkpoint):
    tmp, _ = checkpoint
    r = run_eval(tmp / "random", "--text-file", tmp / "text.txt", "--stride", CONTEXT + 1)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: --stride must be between 1 and the model's context (max_seq_len = {CONTEXT}), "
                                f"found {CONTEXT + 1}: tokens between windows would not be predicted")


def test_a_text_the_tokenizer_cannot_spell_is_a_warning_or_refused(tmp_path):
    """A word-level tokenizer writes [UNK] for words it lacks: eval warns when more than 1% of the
    text's tokens are unknown (as data prepare does) and refuses a text of nothing else."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"alpha": 0, "beta": 1, "gamma": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    spec = load_spec(REPO / "specs" / "tiny.toml", [
        "model.vocab_size=8", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=32", f"model.max_seq_len={CONTEXT}", f"train.seq_len={CONTEXT}"])
    model = Transformer(spec.model)
    model.init_weights()
    save_model(model, build_plan(spec).model_dump(mode="json"), tmp_path / "words", tokenizer=tok)
    (tmp_path / "some.txt").write_text("alpha beta gamma " * 3 + "epsilon")
    (tmp_path / "none.txt").write_text("der Tokenizer kennt kein Wort")
    r = run_eval(tmp_path / "words", "--text-file", tmp_path / "some.txt", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == 9
    assert r.stderr.strip() == (f"warning: {tmp_path / 'some.txt'}: 1 of its 10 tokens (10.0%) are the tokenizer's "
                                f"unknown token '[UNK]' (id 3); the tokenizer (the model's, {tmp_path / 'words'}) is "
                                "likely the wrong one for this text, and its loss is lowered by the easy predictions "
                                "of that one id")
    r = run_eval(tmp_path / "words", "--text-file", tmp_path / "none.txt")
    assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / 'none.txt'}: every token of it (5 tokens) "
                                                     "is the tokenizer's unknown token '[UNK]' (id 3)")


def test_eval_batches_windows_within_a_logits_budget(checkpoint, monkeypatch):
    """A forward holds batch x context x vocab fp32 logits (and cross entropy as much again): eval
    took 8 windows whatever their size, 32 GiB of logits at 8k tokens and a 128k vocabulary. It
    now takes as many as fit LOGITS_BUDGET (here set to 3 windows' worth), with the same loss."""
    from llmc.runtime import evaluate
    from llmc.runtime.infer.checkpoint import load_for_inference
    tmp, tok = checkpoint
    model, _, _ = load_for_inference(tmp / "random", "cpu", "fp32")
    window_bytes = CONTEXT * 300 * 4
    monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 3 * window_bytes + 100)
    held = []
    model.register_forward_hook(lambda module, args, out: held.append(out.logits.numel() * 4))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    loss, n = evaluate.text_loss(model, ids, CONTEXT)
    windows = math.ceil((len(ids) - 1) / CONTEXT)
    assert max(held) <= 3 * window_bytes and len(held) == math.ceil(windows / 3)
    losses = prefix_losses(tmp / "random", tok)
    assert n == len(losses) and loss == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_eval_reports_progress_per_forward(checkpoint):
    """A long text evaluated in silence for minutes: text_loss now reports each forward's
    predictions (what the bar on a terminal advances by); they add up to every token after the first."""
    from llmc.runtime.evaluate import text_loss
    from llmc.runtime.infer.checkpoint import load_for_inference
    tmp, tok = checkpoint
    model, _, _ = load_for_inference(tmp / "random", "cpu", "fp32")
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    reported = []
    text_loss(model, ids, CONTEXT, batch_size=2, on_tokens=reported.append)
    assert len(reported) == math.ceil(math.ceil((len(ids) - 1) / CONTEXT) / 2) and sum(reported) == len(ids) - 1


def test_eval_errors_are_clear(checkpoint, tmp_path):
    tmp, _ = checkpoint
    r = run_eval(tmp / "random", "--text-file", tmp_path / "missing.txt")
    assert r.returncode == 1 and "missing.txt: file not found" in r.stderr and "Traceback" not in r.stderr
    r = run_eval(tmp / "random", "--text-file", tmp_path)
    assert r.returncode == 1 and f"{tmp_path}: a folder, not a text file" in r.stderr
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xfe\n")
    r = run_eval(tmp / "random", "--text-file", tmp_path / "bad.txt")
    assert r.returncode == 1 and "bad.txt:2: invalid UTF-8" in r.stderr


def test_eval_reads_a_quantized_checkpoint(checkpoint, tmp_path):
    """`llmc quantize` writes a model folder that generate reads; eval reads it too (it refused
    it as "does not match its plan.json"), with an int8 loss close to the original's."""
    from llmc.compiler.cli import main as llmc
    tmp, _ = checkpoint
    assert llmc(["quantize", str(tmp / "random"), "--bits", "8", "--group-size", "16", "-o", str(tmp_path / "int8")]) == 0
    plain = run_eval(tmp / "random", "--text-file", tmp / "text.txt", "--json")
    quantized = run_eval(tmp_path / "int8", "--text-file", tmp / "text.txt", "--json")
    assert quantized.returncode == 0, quantized.stderr
    a, b = json.loads(plain.stdout), json.loads(quantized.stdout)
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 0.02 and a["loss"] != b["loss"]
