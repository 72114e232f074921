"""train.init_from: a run starts from a model folder's weights and tokenizes its data with the
folder's tokenizer; a folder it cannot start from is refused in one line before anything runs.

The folder is made here: a bf16 model of seed 123 (the run's own initialisation is of seed 0) and
a byte-level BPE of 400 tokens trained with the tokenizers library on a text of its own, so the
run's weights and vocabulary can only be the folder's if it read them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmc.compiler.cli import main as llmc
from train_helpers import REPO, SMALL, llmc_train, metrics, train_args

# The first step's lr is the peak's 1e-9th (2e-12): Adam's first update moves a weight by at most
# the lr, which fp32 rounding makes at most twice the lr (one unit in the last place of a weight
# where that unit is below 2 lr; a weight the update does not round to another value keeps its own).
FROZEN = ["train.max_steps=1", "train.schedule.warmup_steps=1000000000", "train.optimizer.weight_decay=0",
          "train.eval_every=0"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the folder's own tokenizer, trained on this line alone " * 50], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder of SMALL's model: bf16 weights of seed 123, its own tokenizer.json."""
    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import load_spec
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model

    out = tmp_path_factory.mktemp("init") / "folder"
    spec = load_spec(REPO / "specs" / "tiny.toml", SMALL)
    torch.manual_seed(123)
    model = Transformer(spec.model)
    model.init_weights()
    save_model(model.to(torch.bfloat16), build_plan(spec).model_dump(mode="json"), out, tokenizer=_tokenizer())
    return out


def test_a_run_starts_from_the_folders_weights_and_tokenizer(folder, tmp_path):
    result = llmc_train(tmp_path, "run", f"train.init_from={folder}", *FROZEN)
    assert result.returncode == 0, result.stdout + result.stderr
    start = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    lr = metrics(tmp_path / "run")[0]["lr"]
    assert 0 < lr < 1e-11
    assert trained.keys() == start.keys()
    for name, tensor in trained.items():
        assert tensor.dtype == torch.float32  # the fp32 master weights, holding the bf16 values
        torch.testing.assert_close(tensor, start[name], rtol=0, atol=2 * lr, msg=name)
    vocab = json.loads((tmp_path / "run" / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == _tokenizer().get_vocab(with_added_tokens=False)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["init_from"] == str(folder)
    assert f"Started from the weights of `{folder}`." in (tmp_path / "run" / "report.md").read_text()

    # the control: the same run without init_from starts from its own initialisation, not the folder's
    fresh = llmc_train(tmp_path, "fresh", *FROZEN)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    weight = load_file(tmp_path / "fresh" / "model" / "model.safetensors")["embed.weight"]
    assert (weight - start["embed.weight"]).abs().max() > 1e-3
    assert json.loads((tmp_path / "fresh" / "report.json").read_text())["init_from"] is None
    assert "Started from" not in (tmp_path / "fresh" / "report.md").read_text()


def test_a_resumed_run_continues_from_its_checkpoint_not_the_folder(folder, tmp_path):
    """A run of 2 steps, and the same run stopped after step 1 and resumed after its folder was
    replaced by one of another model: the resumed run neither reads nor checks it, and its step 2
    has the loss of the uninterrupted one."""
    import shutil

    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import load_spec
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    run = ["train.checkpoint_every=1", "train.eval_every=0"]
    whole = llmc_train(tmp_path, "whole", f"train.init_from={folder}", *run, "train.max_steps=2")
    assert whole.returncode == 0, whole.stderr
    first = llmc_train(tmp_path, "resumed", f"train.init_from={copy}", *run, "train.max_steps=1")
    assert first.returncode == 0, first.stderr
    spec = load_spec(REPO / "specs" / "tiny.toml", SMALL + ["model.n_layers=3"])
    save_model(Transformer(spec.model), build_plan(spec).model_dump(mode="json"), copy)  # what no run could start from
    second = llmc_train(tmp_path, "resumed", f"train.init_from={copy}", *run, "train.max_steps=2", resume=True)
    assert second.returncode == 0, second.stderr
    expected = [m["loss"] for m in metrics(tmp_path / "whole")]
    assert [m["loss"] for m in metrics(tmp_path / "resumed")] == pytest.approx(expected, rel=1e-6)


def test_a_run_directory_names_its_final_model(folder, tmp_path):
    from llmc.compiler.spec import load_spec
    from llmc.runtime.data.prepare import tokenizer_source
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    spec = load_spec(REPO / "specs" / "tiny.toml", SMALL + [f"train.init_from={run}"])
    assert tokenizer_source(spec) == run / "model" / "tokenizer.json"


def test_init_from_in_a_spec_is_relative_to_the_spec(tmp_path):
    from llmc.compiler.spec import load_spec
    (tmp_path / "ft.toml").write_text(f'extends = "{REPO / "specs" / "tiny.toml"}"\n[train]\ninit_from = "base"\n')
    assert load_spec(tmp_path / "ft.toml").train.init_from == str(tmp_path / "base")


@pytest.mark.parametrize("case, expected", [
    ("missing", "is not a model folder (expected plan.json and model.safetensors in it"),
    ("other model", "holds another model than the spec's: model.n_layers: 2 there, 3 here"),
    ("no tokenizer", "has no tokenizer.json: give data.tokenizer.path"),
    ("quantized", "holds a quantized model, which cannot be trained"),
])
def test_a_folder_a_run_cannot_start_from_is_refused_in_one_line(folder, tmp_path, capsys, case, expected):
    path, sets = folder, []
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "other model":
        sets = ["model.n_layers=3"]
    elif case in ("no tokenizer", "quantized"):
        path = tmp_path / "copy"
        path.mkdir()
        for f in folder.iterdir():
            if f.name != "tokenizer.json":
                (path / f.name).write_bytes(f.read_bytes())
        if case == "quantized":
            (path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
            (path / "quantization.json").write_text("{}")
    for verb in (train_args(tmp_path, "run", f"train.init_from={path}", *sets),
                 ["run", str(REPO / "specs" / "tiny.toml"), "--scheduler", "local", *_sets(tmp_path, path, sets)]):
        assert llmc(verb) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: train.init_from: {path} ") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()  # refused before any data was prepared
    assert not (tmp_path / "run").exists()


def _sets(tmp_path, path, sets):
    out = []
    for s in SMALL + [f"data.cache_dir={tmp_path / 'cache'}", f"job.out_dir={tmp_path / 'runs'}",
                      f"train.init_from={path}", *sets]:
        out += ["--set", s]
    return out


# ------------------------------------------------------------------ the folder's chat template
BRACKETS = "[{{ role }}] {{ content }}\n"  # a folder's template (`llmc import hf` writes a model's into plan.json)


def _sft_spec(tmp_path, init_from, *sets):
    """An SFT spec that starts from `init_from` and does not name a chat template, on 16 one-turn chats."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text((json.dumps({"messages": chat}) + "\n") * 16)
    (tmp_path / "sft.toml").write_text(f'extends = "{REPO / "specs" / "tiny.toml"}"\n[train]\nobjective = "sft"\n'
                                       f'init_from = "{init_from}"\n[data]\nval_fraction = 0.0\n'
                                       'sources = [{ path = "chat.jsonl", format = "jsonl" }]\n')
    from llmc.compiler.spec import load_spec
    return load_spec(tmp_path / "sft.toml", SMALL + [f"data.cache_dir={tmp_path / 'cache'}", *sets])


def _learned_text(prepared) -> str:
    """What the loss trains on in the prepared data (the assistant turns), decoded."""
    import numpy as np
    from tokenizers import Tokenizer

    from llmc.runtime.data.prepare import load_manifest
    from llmc.runtime.data.shards import TokenShard
    manifest = load_manifest(prepared)
    shard = TokenShard(prepared / manifest["sources"][0]["train"]["name"], manifest["dtype"])
    ids, mask = np.asarray(shard.tokens), np.asarray(shard.mask)
    return Tokenizer.from_file(str(prepared / "tokenizer.json")).decode(ids[mask == 1].tolist())


@pytest.fixture(scope="module")
def templated(folder, tmp_path_factory):
    """`folder` with BRACKETS as its chat template."""
    import shutil
    out = tmp_path_factory.mktemp("templated") / "folder"
    shutil.copytree(folder, out)
    plan = json.loads((out / "plan.json").read_text())
    plan["spec"]["data"]["tokenizer"]["chat_template"] = BRACKETS
    (out / "plan.json").write_text(json.dumps(plan))
    return out


def test_an_sft_run_renders_chats_with_its_folders_template_and_its_model_keeps_it(templated, tmp_path):
    from llmc.runtime.data.prepare import prepared_dir
    from llmc.runtime.folders import plan_chat_template
    spec = _sft_spec(tmp_path, templated)
    assert spec.data.tokenizer.chat_template is None  # (the spec names none)
    result = llmc_train(tmp_path, "run", *FROZEN, spec=tmp_path / "sft.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _learned_text(prepared_dir(spec)) == "hello\n" * 16  # the folder's footer, not ChatML's <|im_end|>
    model_plan = json.loads((tmp_path / "run" / "model" / "plan.json").read_text())
    assert model_plan["spec"]["data"]["tokenizer"]["chat_template"] == BRACKETS  # written out: chat and export
    assert plan_chat_template(model_plan) == BRACKETS                            # need not find the folder
    run_plan = json.loads((tmp_path / "run" / "plan.json").read_text())          # a checkpoint's plan finds it there
    assert run_plan["spec"]["data"]["tokenizer"]["chat_template"] is None and plan_chat_template(run_plan) == BRACKETS


def test_a_template_the_spec_names_wins_over_the_folders(templated, tmp_path):
    from llmc.runtime.data.prepare import prepare
    spec = _sft_spec(tmp_path, templated, "data.tokenizer.chat_template=chatml")
    assert _learned_text(prepare(spec)) == "hello<|im_end|>\n" * 16


def test_a_folder_without_a_template_renders_chatml(folder, tmp_path):
    from llmc.runtime.data.prepare import prepare
    assert _learned_text(prepare(_sft_spec(tmp_path, folder))) == "hello<|im_end|>\n" * 16
