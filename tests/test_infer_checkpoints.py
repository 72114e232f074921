"""Tiny checkpoints for the inference tests (random init, or a few seconds of fitting), and tests
that the inference loader reads back exactly what save_model wrote."""

import functools
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from llmc.compiler.spec import load_spec
from llmc.runtime.data.tokenizer import train_tokenizer
from llmc.runtime.model import Transformer
from llmc.runtime.model.io import save_model


SPECS = Path(__file__).resolve().parent.parent / "specs"

# A real text (Python's own textwrap module), plus a little Chinese so multi-byte characters occur.
REAL_TEXT = Path(inspect.getsourcefile(textwrap)).read_text(encoding="utf-8")
CHINESE = "深度学习模型可以生成文本。我们测试流式输出是否正确处理多字节字符。你好，世界！"

DENSE = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_hidden=128", "model.max_seq_len=256"]
# GPT-2 style: learned positions, LayerNorm, plain GELU, biases, tied embeddings, MHA.
GPT2 = DENSE[:4] + ["model.n_kv_heads=4", "model.ffn_hidden=128", "model.max_seq_len=256", "model.positions='learned'",
                    "model.norm='layernorm'", "model.activation='gelu_tanh'", "model.qkv_bias=true",
                    "model.out_bias=true", "model.mlp_bias=true", "model.tie_embeddings=true",
                    "model.attention.kind='mha'"]
# Qwen3 style: qk-norm and q/k/v biases.
QWEN = DENSE + ["model.qk_norm=true", "model.qkv_bias=true"]
# Mixtral style: GQA with a softmax-routed MoE in every layer.
MIXTRAL = DENSE + ["model.moe={n_experts=4, top_k=2, expert_hidden=64, score='softmax'}"]
DRAFT = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=1", "model.ffn_hidden=64", "model.max_seq_len=256"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription stalls
    (measured 30x slower with 2 threads under load). Restored afterwards for other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_with(overrides, base: str = "tiny.toml"):
    return load_spec(SPECS / base, overrides)


@functools.lru_cache(maxsize=None)
def tokenizer(vocab: int = 512):
    """A byte-level BPE trained on the real text (cached: the tests only read it)."""
    return train_tokenizer([REAL_TEXT, CHINESE * 3], vocab)


def random_model(spec, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(spec.model)
    model.init_weights()
    return model.eval()


def fit(model: Transformer, ids: list[int], steps: int, seq: int = 64, batch: int = 8, lr: float = 3e-3, seed=0):
    """A short deterministic fit on a token stream (seconds), so the model has learned something."""
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def plan_of(spec) -> dict:
    from llmc.compiler.plan import build_plan
    return build_plan(spec).model_dump(mode="json")


def checkpoint(tmp_path: Path, overrides=DENSE, base="tiny.toml", name="ckpt", seed=0, tok=None,
               fit_steps: int = 0) -> Path:
    """Save a model (random, or fitted for fit_steps on REAL_TEXT) with plan.json and tokenizer.json."""
    spec = spec_with(overrides, base)
    tok = tok or tokenizer(spec.model.vocab_size)
    model = random_model(spec, seed)
    if fit_steps:
        fit(model, tok.encode(REAL_TEXT).ids, fit_steps)
    return save_model(model, plan_of(spec), tmp_path / name, tok)


def test_inference_loader_reads_back_saved_weights(tmp_path):
    from llmc.runtime.infer.checkpoint import load_for_inference
    spec = spec_with(DENSE)
    path = checkpoint(tmp_path)
    model, plan, tok = load_for_inference(path)
    reference = random_model(spec, seed=0)
    assert not model.training
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert plan["spec"]["model"]["d_model"] == 64
    assert tok.get_vocab_size() <= 512


def test_missing_checkpoint_is_a_user_error(tmp_path):
    from llmc.compiler.errors import UserError
    from llmc.runtime.infer.checkpoint import load_for_inference
    with pytest.raises(UserError, match="not an llmc model folder"):
        load_for_inference(tmp_path / "nowhere")


def test_output_onto_the_input_is_refused_and_the_input_kept(tmp_path):
    """quantize, export and import write a model folder: -o naming the folder they read (the
    model folder or its run directory) would replace the input, so they refuse and write nothing."""
    import hashlib
    import subprocess
    import sys

    from llmc.compiler.errors import UserError
    from llmc.runtime.hf_weights import export_checkpoint
    from llmc.runtime.infer.checkpoint import QuantConfig, quantize_checkpoint

    run = tmp_path / "run"
    model_dir = checkpoint(run, name="model")        # a training run directory: run/model/
    (run / "plan.json").write_text("{}")             # the run's own plan beside it

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    before = {run: digest(run), model_dir: digest(model_dir)}
    for out in (run, model_dir):
        with pytest.raises(UserError, match="is the input folder"):
            quantize_checkpoint(run, out, QuantConfig(bits=8))
        with pytest.raises(UserError, match="is the input folder"):
            export_checkpoint(run, out)
    assert {run: digest(run), model_dir: digest(model_dir)} == before

    hf = tmp_path / "hf"
    export_checkpoint(model_dir, hf)
    kept = digest(hf)
    out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "import", "hf", str(hf), "-o", str(hf)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "is the input folder" in out.stderr and "Traceback" not in out.stderr
    assert digest(hf) == kept


def test_damaged_model_folder_is_one_error_line_for_every_verb(tmp_path, capsys):
    """A model folder whose plan.json, weights or tokenizer is damaged (or whose weights do not fit
    its plan) is named in one error line by every verb that reads it, and nothing is written."""
    import json

    from llmc.compiler.cli import main as llmc

    good = checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(REAL_TEXT[:2000])
    damages = {
        "plan.json": lambda d: (d / "plan.json").write_text("{broken"),
        "list plan": lambda d: (d / "plan.json").write_text("[1]"),
        "model.safetensors": lambda d: (d / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:1000]),
        "empty weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "tokenizer.json": lambda d: (d / "tokenizer.json").write_text("garbage"),
        "shapes": lambda d: (d / "plan.json").write_text(json.dumps(_with_d_model(good, 32))),
    }
    for what, damage in damages.items():
        folder = tmp_path / what.replace(" ", "_")
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        damage(folder)
        for verb in (["eval", str(folder), "--text-file", str(text)],
                     ["generate", str(folder), "--prompt", "def", "--max-new-tokens", "2"],
                     ["quantize", str(folder), "--bits", "8", "-o", str(tmp_path / "q")],
                     ["export", "hf", str(folder), "-o", str(tmp_path / "hf")]):
            assert llmc(verb) == 1, (what, verb)
            err = capsys.readouterr().err
            assert err.count("error:") == 1 and "Traceback" not in err, (what, verb, err)
            assert str(folder) in err, (what, verb, err)
        assert not (tmp_path / "q").exists() and not (tmp_path / "hf").exists()


def _with_d_model(folder: Path, d_model: int) -> dict:
    import json
    plan = json.loads((folder / "plan.json").read_text())
    plan["spec"]["model"]["d_model"] = d_model
    return plan


def test_output_into_a_folder_that_holds_files_is_refused_and_kept(tmp_path, capsys):
    """quantize, export hf and import hf -o naming another run or model folder replaced its
    plan.json and weights (or left its old tokenizer.json beside new weights): refused, kept."""
    import hashlib

    from llmc.compiler.cli import main as llmc
    from llmc.runtime.hf_weights import export_checkpoint

    src = checkpoint(tmp_path, name="src")
    other = tmp_path / "other_run"
    checkpoint(other, name="model", seed=1)
    (other / "plan.json").write_text("{}")
    export_checkpoint(src, tmp_path / "hf")

    def digest(folder):
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(other)
    for verb in (["quantize", str(src), "--bits", "8", "-o", str(other)],
                 ["export", "hf", str(src), "-o", str(other)],
                 ["import", "hf", str(tmp_path / "hf"), "-o", str(other)],
                 ["quantize", str(src), "--bits", "8", "-o", str(other / "model")]):
        assert llmc(verb) == 1, verb
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "already holds files" in err, (verb, err)
    assert digest(other) == before
    (tmp_path / "empty").mkdir()   # an empty folder is fine
    assert llmc(["quantize", str(src), "--bits", "8", "-o", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


WRITES = {  # verb: (arguments before the output folder, the module whose weights writer it calls, files written)
    "quantize": (["quantize", "{src}", "--bits", "8", "-o"], "llmc.runtime.infer.checkpoint",
                 ["model.safetensors", "plan.json", "quantization.json", "tokenizer.json"]),
    "export": (["export", "hf", "{src}", "-o"], "llmc.runtime.hf_weights",
               ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
    "import": (["import", "hf", "{hf}", "-o"], "llmc.runtime.model.io", ["model.safetensors", "plan.json", "tokenizer.json"]),
}


@pytest.mark.parametrize("verb", WRITES)
def test_a_failure_while_writing_leaves_no_partial_output_folder(tmp_path, monkeypatch, capsys, verb):
    """quantize, export hf and import hf wrote straight into -o: one that failed or was interrupted
    while writing left a partial folder, which a re-run then refused ("already holds files"). Now
    -o stays as it was (absent, or the empty folder given) with nothing left beside it, and a
    re-run writes the whole model (into the folder given: the same folder, the same files)."""
    import importlib

    from safetensors.torch import load_file, save_file

    from llmc.compiler.cli import main as llmc
    from llmc.runtime.hf_weights import export_checkpoint

    src = checkpoint(tmp_path, name="src")
    export_checkpoint(src, tmp_path / "hf")
    words, module, files = WRITES[verb]
    args = [w.format(src=src, hf=tmp_path / "hf") for w in words]
    writer = importlib.import_module(module)

    def failing(error):
        def write(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)  # the weights are on disk,
            raise error                                   # the rest is not
        return write

    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    monkeypatch.setattr(writer, "save_file", failing(OSError(28, "No space left on device")))
    assert llmc(args + [str(out)]) == 1   # said in one line (compiler/cli.py), not a traceback
    assert capsys.readouterr().err.rstrip().endswith("error: No space left on device")
    assert not out.exists()
    out.mkdir()
    monkeypatch.setattr(writer, "save_file", failing(KeyboardInterrupt()))
    assert llmc(args + [str(out)]) == 130
    assert out.is_dir() and not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out"])  # no temporary folder left

    monkeypatch.undo()
    inode = out.stat().st_ino
    assert llmc(args + [str(out)]) == 0 and llmc(args + [str(tmp_path / "new" / "out")]) == 0
    assert sorted(p.name for p in out.iterdir()) == files and out.stat().st_ino == inode
    for name in files:  # (safetensors orders its metadata at random: the tensors are compared)
        a, b = out / name, tmp_path / "new" / "out" / name
        if name == "model.safetensors":
            a, b = load_file(a), load_file(b)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert a.read_bytes() == b.read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["new", "out"])


def test_a_folder_filled_meanwhile_is_neither_replaced_nor_mixed_into(tmp_path):
    """Another process wrote `out` while this one was writing (e.g. two `data prepare` of the same
    data): the rename is refused in one error line, their folder is kept and ours removed."""
    from llmc.compiler.errors import UserError
    from llmc.runtime.folders import staged_folder

    out = tmp_path / "out"
    with pytest.raises(UserError, match="could not put the written files there"):
        with staged_folder(out) as tmp:
            (tmp / "ours").write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs"]
