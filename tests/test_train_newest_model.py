"""A finished run (RUN_DIR/model/ of step 2) resumed for more steps and stopped before its end (its
checkpoint of step 4 written, not its final model): eval, generate and export hf given RUN_DIR read
the newest weights, the checkpoint's, and say so in one stderr line (they served the old model/).
Once the run finishes, RUN_DIR is its final model again, without a note (the last test: it
finishes the module's run).

The expected loss comes from the checkpoint's weights read with torch's own DCP converter into a
Transformer built here, and torch's cross entropy."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llmc.compiler.cli import main as llmc
from train_helpers import train_args

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n"
RUN = ["train.checkpoint_every=1", "train.keep_checkpoints=2", "train.eval_every=0"]


class Killed(BaseException):
    """The process dying after its last checkpoint, before the final model is saved."""


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run finished at step 2, then resumed to 4 and killed before writing its final model."""
    from llmc.runtime.train.loop import Trainer

    def killed(*args, **kwargs):
        raise Killed

    tmp = tmp_path_factory.mktemp("newest")
    assert llmc(train_args(tmp, "run", *RUN, "train.max_steps=2")) == 0
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(Trainer, "save_final_model", killed)
        llmc(train_args(tmp, "run", *RUN, "train.max_steps=4", resume=True))
    run = tmp / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]
    (tmp / "text.txt").write_text(TEXT)
    return tmp


def reference(tmp, ckpt):
    """(model, tokenizer): the checkpoint's weights, read by torch's DCP-to-torch.save converter."""
    from tokenizers import Tokenizer
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from llmc.compiler.spec import ModelSpec
    from llmc.runtime.model.transformer import Transformer

    dcp_to_torch_save(str(ckpt), str(tmp / f"{ckpt.name}.pt"))
    state = torch.load(tmp / f"{ckpt.name}.pt", weights_only=False)["model"]
    model = Transformer(ModelSpec.model_validate(json.loads((ckpt / "meta.json").read_text())["spec"]["model"]))
    model.load_state_dict(state, strict=True)
    tokenizer = Tokenizer.from_file(str(next((tmp / "cache").glob("*/tokenizer.json"))))
    return model.float().eval(), tokenizer


def reference_loss(model, tokenizer) -> float:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    return F.cross_entropy(logits.float(), torch.tensor(ids[1:])).item()


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:")]


def test_run_directory_serves_the_checkpoint_newer_than_its_final_model(stopped, capsys):
    run, newest = stopped / "run", stopped / "run" / "checkpoints" / "step-00000004"
    model, tokenizer = reference(stopped, newest)
    expected = reference_loss(model, tokenizer)

    assert llmc(["eval", str(run), "--text-file", str(stopped / "text.txt"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["loss"] == pytest.approx(expected, abs=1e-5)
    assert len(_notes(out.err)) == 1 and "step 2" in _notes(out.err)[0] and str(newest) in _notes(out.err)[0], out.err

    # the old final model is still there and still what RUN_DIR/model names: a different loss
    assert llmc(["eval", str(run / "model"), "--text-file", str(stopped / "text.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != pytest.approx(expected, abs=1e-5)

    assert llmc(["export", "hf", str(run), "-o", str(stopped / "hf")]) == 0
    capsys.readouterr()
    embedding = load_file(str(stopped / "hf" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(embedding, model.embed.weight.to(embedding.dtype))


def test_generate_of_the_stopped_run_decodes_the_checkpoint(stopped, capsys):
    newest = stopped / "run" / "checkpoints" / "step-00000004"
    assert llmc(["generate", str(stopped / "run"), "--prompt", "def ", "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tokenizer = reference(stopped, newest)
    ids, expected = tokenizer.encode("def ", add_special_tokens=False).ids, []
    with torch.no_grad():  # greedy decoding, one full forward per token
        for _ in range(len(got["token_ids"])):
            expected.append(int(model(torch.tensor([ids + expected])).logits[0, -1].argmax()))
    assert got["token_ids"] == expected and len(expected) >= 1


def test_once_finished_the_run_directory_is_its_final_model_again(stopped, capsys):
    run = stopped / "run"
    assert llmc(train_args(stopped, "run", *RUN, "train.max_steps=4", resume=True)) == 0
    capsys.readouterr()
    expected = reference_loss(*reference(stopped, run / "checkpoints" / "step-00000004"))
    assert llmc(["eval", str(run), "--text-file", str(stopped / "text.txt"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["loss"] == pytest.approx(expected, abs=1e-5) and not _notes(out.err), out.err
