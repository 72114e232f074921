"""eval / generate read a training checkpoint (RUN_DIR/checkpoints/step-N), and a run directory
without a final model through its newest complete checkpoint, saying so on stderr.

The run trains under two processes with ZeRO-3, so each checkpoint holds two ranks' shards that
inference reads in one process. The expected figures come from the checkpoint's weights read
with torch's own DCP converter into a Transformer built here, and torch's cross entropy.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.cli import main as llmc
from train_helpers import llmc_train

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2, and no final model."""
    tmp = tmp_path_factory.mktemp("ckpt")
    done = llmc_train(tmp, "run", "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                      "train.eval_every=0", "train.global_batch_size=4", "train.micro_batch_size=2",
                      "parallel.dp=2", "parallel.zero=3", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(tmp / "run" / "model")  # as if killed after its last checkpoint
    (tmp / "text.txt").write_text(TEXT)
    return tmp


def reference_model(tmp, ckpt):
    """The checkpoint's weights, read by torch's DCP-to-torch.save converter, in a Transformer."""
    from tokenizers import Tokenizer
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from llmc.compiler.spec import ModelSpec
    from llmc.runtime.model.transformer import Transformer

    assert len({p.name for p in ckpt.glob("__*.distcp")}) == 2  # one shard file per rank
    dcp_to_torch_save(str(ckpt), str(tmp / f"{ckpt.name}.pt"))
    state = torch.load(tmp / f"{ckpt.name}.pt", weights_only=False)["model"]
    meta = json.loads((ckpt / "meta.json").read_text())
    model = Transformer(ModelSpec.model_validate(meta["spec"]["model"]))
    model.load_state_dict(state, strict=True)
    tokenizer = Tokenizer.from_file(str(next((tmp / "cache").glob("*/tokenizer.json"))))
    return model.float().eval(), tokenizer


def reference_loss(tmp, ckpt) -> float:
    model, tokenizer = reference_model(tmp, ckpt)
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert 2 < len(ids) <= 65  # one window of the 64-token context
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    return F.cross_entropy(logits.float(), torch.tensor(ids[1:])).item()


def test_eval_of_a_checkpoint_folder_is_the_loss_of_its_weights(run, capsys):
    ckpts = run / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000001", "step-00000002"]
    losses = {}
    for name in ("step-00000001", "step-00000002"):
        assert llmc(["eval", str(ckpts / name), "--text-file", str(run / "text.txt"), "--json"]) == 0
        out = capsys.readouterr()
        losses[name] = json.loads(out.out)["loss"]
        assert losses[name] == pytest.approx(reference_loss(run, ckpts / name), abs=1e-5)
        assert "note:" not in out.err  # a checkpoint named directly needs no note
    assert losses["step-00000001"] != pytest.approx(losses["step-00000002"], abs=1e-6)


def test_generate_on_a_run_without_final_model_uses_its_newest_checkpoint(run, capsys):
    newest = run / "run" / "checkpoints" / "step-00000002"
    assert llmc(["generate", str(run / "run"), "--prompt", "def ", "--max-new-tokens", "6", "--json"]) == 0
    out = capsys.readouterr()
    notes = [line for line in out.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(newest) in notes[0], out.err
    got = json.loads(out.out)
    # greedy decoding of the newest checkpoint's weights, one full forward per token
    model, tokenizer = reference_model(run, newest)
    ids = tokenizer.encode("def ", add_special_tokens=False).ids
    expected = []
    with torch.no_grad():
        for _ in range(len(got["token_ids"])):
            expected.append(int(model(torch.tensor([ids + expected])).logits[0, -1].argmax()))
    assert got["token_ids"] == expected and len(expected) >= 1


def test_unusable_folders_are_one_line_errors(run, capsys):
    ckpts = run / "run" / "checkpoints"
    partial = ckpts / ".tmp-step-00000003"  # what a run killed while writing leaves
    shutil.copytree(ckpts / "step-00000001", partial)
    damaged = run / "damaged" / "checkpoints" / "step-00000001"
    shutil.copytree(ckpts / "step-00000001", damaged)
    next(damaged.glob("__1_*.distcp")).unlink()  # one rank's shard lost
    for folder, says in ((partial, "never finished writing"), (run / "nothing", "not an llmc model folder"),
                         (damaged, "cannot read this checkpoint's model weights")):
        assert llmc(["eval", str(folder), "--text-file", str(run / "text.txt")]) == 1
        err = capsys.readouterr().err
        assert says in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    shutil.rmtree(partial)


def test_export_hf_of_a_checkpoint_carries_its_runs_tokenizer(run, capsys):
    ckpt = run / "run" / "checkpoints" / "step-00000002"
    assert llmc(["export", "hf", str(ckpt), "-o", str(run / "hf")]) == 0
    capsys.readouterr()
    prepared = next((run / "cache").glob("*/tokenizer.json"))  # the tokenizer the run trained with
    assert (run / "hf" / "tokenizer.json").read_bytes() == prepared.read_bytes()
    assert json.loads((run / "hf" / "config.json").read_text())["eos_token_id"] is not None
