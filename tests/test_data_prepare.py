"""Prepare: sources -> tokenizer -> shards; bad data named by file and line; re-prepare is a no-op."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmc.compiler.spec import load_spec
from llmc.runtime.data.dataset import TrainData
from llmc.runtime.data.prepare import load_manifest, prepare
from llmc.runtime.data.sources import DataError

MODEL = """
[model]
vocab_size = 320
d_model = 32
n_layers = 1
n_heads = 2
ffn_hidden = 64
max_seq_len = 32
[train]
seq_len = 16
global_batch_size = 2
max_steps = 1
objective = "{objective}"
[data]
val_fraction = {val}
on_bad_record = "{policy}"
cache_dir = "{cache}"
"""


def make_spec(tmp_path, sources: str, objective="pretrain", val=0.2, policy="error", extra=""):
    text = MODEL.format(objective=objective, val=val, policy=policy, cache=tmp_path / "cache") + sources + extra
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return load_spec(path)


def shard_documents(directory, entry, eos) -> list[list[int]]:
    tokens = np.fromfile(directory / f"{entry['name']}.bin", dtype=entry["dtype"])
    assert tokens[-1] == eos
    docs, current = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


def test_text_jsonl_csv_round_trip_with_eos_between_documents(tmp_path):
    (tmp_path / "a.txt").write_text("def hello():\n    return 'world'\n")
    texts = [f"record number {i} says héllo" for i in range(10)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "c.csv").write_text("id,content\n1,\"first, quoted\"\n2,second row\n")
    spec = make_spec(tmp_path, """
[[data.sources]]
path = "a.txt"
[[data.sources]]
path = "b.jsonl"
format = "jsonl"
field = "body"
[[data.sources]]
path = "c.csv"
format = "csv"
field = "content"
""")
    out = prepare(spec)
    manifest = load_manifest(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = manifest["special"]["eos"]
    assert tok.id_to_token(eos) == "<|endoftext|>"
    assert manifest["dtype"] == "uint16"

    def decoded(source):
        docs = shard_documents(out, source["train"], eos)
        if source["val"] and source["val"]["documents"]:
            docs += shard_documents(out, source["val"], eos)
        return sorted(tok.decode(d, skip_special_tokens=False) for d in docs)

    a, b, c = manifest["sources"]
    # a single-document source is split by tokens: train + val decode back to the text
    raw = [np.fromfile(out / f"{a[split]['name']}.bin", dtype=a[split]["dtype"]).tolist() for split in ("train", "val")]
    assert raw[1][-1] == eos and eos not in raw[0] + raw[1][:-1]
    assert tok.decode(raw[0] + raw[1][:-1]) == "def hello():\n    return 'world'\n"
    # every 5th record (val_fraction 0.2) is held out whole
    assert b["documents"] == 10 and b["val"]["documents"] == 2 and b["train"]["documents"] == 8
    assert decoded(b) == sorted(texts)
    assert sorted(tok.decode(d) for d in shard_documents(out, b["val"], eos)) == [texts[4], texts[9]]
    # two rows: too few to hold one out whole, so the tail of the token stream is the validation part
    both = sum((np.fromfile(out / f"{c[s]['name']}.bin", dtype=c[s]["dtype"]).tolist() for s in ("train", "val")), [])
    assert tok.decode(both, skip_special_tokens=False) == "first, quoted<|endoftext|>second row<|endoftext|>"


def test_second_prepare_is_a_no_op_and_a_change_re_prepares(tmp_path):
    (tmp_path / "a.txt").write_text("one two three\n" * 50)
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n')
    first = prepare(spec)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n'))
    assert again == first and (again / "manifest.json").stat().st_mtime_ns == stamp
    # mixture weights act at sampling time: no re-prepare
    reweighted = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\nweight = 3.0\n'))
    assert reweighted == first
    (tmp_path / "a.txt").write_text("four five six\n" * 50)
    os.utime(tmp_path / "a.txt", ns=(stamp + 10**9, stamp + 10**9))
    changed = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n'))
    assert changed != first


BAD = {
    "missing file": ("nothing.txt", None, "text", "text", "nothing.txt: file not found"),
    "empty file": ("empty.txt", b"", "text", "text", "empty.txt:1: file is empty"),
    "invalid utf-8": ("bad.txt", b"line one\nline two\nline \xff three\n", "text", "text",
                      "bad.txt:3: invalid UTF-8 (byte 0xff)"),
    "not json": ("d.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "jsonl", "text", "d.jsonl:2: not valid JSON"),
    "wrong field": ("d.jsonl", b'{"text": "fine"}\n{"text": "ok"}\n{"body": "x"}\n', "jsonl", "text",
                    "d.jsonl:3: field 'text' is missing"),
    "field not a string": ("d.jsonl", b'{"text": 5}\n', "jsonl", "text", "d.jsonl:1: field 'text' must be a string"),
    "csv column": ("d.csv", b"a,b\n1,2\n", "csv", "text", "d.csv:1: column 'text' not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_names_file_and_line(tmp_path, case):
    name, content, fmt, field, expected = BAD[case]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    spec = make_spec(tmp_path, f'[[data.sources]]\npath = "{name}"\nformat = "{fmt}"\nfield = "{field}"\n')
    with pytest.raises(DataError) as e:
        prepare(spec)
    assert expected in str(e.value)
    assert str(tmp_path / name) in str(e.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir()), "a failed prepare left a folder behind"


def test_bad_records_skipped_and_counted(tmp_path):
    lines = [b'{"text": "good one"}', b"not json", b'{"text": "good two"}', b'{"other": 1}',
             b'{"text": "bad \xff byte"}', b'{"text": "good three"}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "d.jsonl"\nformat = "jsonl"\n', val=0.0, policy="skip")
    manifest = load_manifest(prepare(spec))
    source = manifest["sources"][0]
    assert source["documents"] == 3
    assert source["skipped"] == {"not valid JSON": 1, "field 'text' is missing": 1, "invalid UTF-8": 1}
    assert source["val"] is None


def test_cli_reports_bad_data_without_traceback(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    make_spec(tmp_path, '[[data.sources]]\npath = "d.jsonl"\nformat = "jsonl"\n')
    r = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "data", "prepare", str(tmp_path / "spec.toml")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert f"error: {tmp_path / 'd.jsonl'}:2: expected a JSON object, found list" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctrl_c_during_prepare_is_one_line_and_leaves_no_folder(tmp_path):
    """Ctrl-C reaches the whole process group (the tokenizing workers too): the command says
    "interrupted" with no worker's traceback, exits 130, and no half-prepared folder stays."""
    import signal
    import time

    from llmc.runtime.data.tokenizer import train_tokenizer
    train_tokenizer(["alpha beta gamma delta epsilon"] * 50, 300).save(str(tmp_path / "tok.json"))
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"text": " ".join(words[(i + j) % 6] for j in range(12))}) + "\n")
    make_spec(tmp_path, '[[data.sources]]\npath = "big.jsonl"\nformat = "jsonl"\n',
              extra=f'[data.tokenizer]\npath = "{tmp_path / "tok.json"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "llmc.compiler.cli", "data", "prepare", str(tmp_path / "spec.toml")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "cache").glob("*.tmp*/tokenizer.json")):
        time.sleep(0.01)
    time.sleep(0.3)  # the workers are starting or tokenizing
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted", err
    assert not list((tmp_path / "cache").iterdir())


def test_given_tokenizer_is_used_and_must_fit_the_model(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta\n" * 20)
    first = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n'))
    given = tmp_path / "given.json"
    given.write_text((first / "tokenizer.json").read_text())
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n',
                     extra=f'[data.tokenizer]\npath = "{given}"\n')
    out = prepare(spec)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads(given.read_text())["model"]["vocab"]
    small = make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n',
                      extra=f'[data.tokenizer]\npath = "{given}"\n').model_copy()
    small.model.vocab_size = 100
    with pytest.raises(DataError, match="model.vocab_size is 100"):
        prepare(small)


def test_documents_begin_as_a_given_tokenizer_begins_a_text(tmp_path):
    """A Llama-style tokenizer.json, whose template puts <s> before a text: each document of the
    shards is the tokenizer's own encoding of it (BOS first, as Llama's pretraining saw them),
    then the end-of-text token; llmc's own tokenizer (no template) adds nothing (above)."""
    from tokenizers import models, pre_tokenizers, processors
    words = [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "<|endoftext|>", *words])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "<|endoftext|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "llama_like.json"))
    texts = [" ".join(words[(7 * i + j) % 300] for j in range(3 + i % 4)) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.jsonl"\nformat = "jsonl"\n',
                            extra=f'[data.tokenizer]\npath = "{tmp_path / "llama_like.json"}"\n'))
    manifest = load_manifest(out)
    (source,) = manifest["sources"]
    docs = shard_documents(out, source["train"], 2) + shard_documents(out, source["val"], 2)
    assert sorted(docs) == sorted(tok.encode(t).ids for t in texts)
    assert all(d[0] == 1 and d.count(1) == 1 for d in docs)


def test_stdlib_corpus_is_the_sorted_standard_library_capped_by_max_bytes(tmp_path):
    import hashlib
    import sysconfig
    from pathlib import Path
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "builtin:stdlib"\n', val=0.01)
    spec.data.max_bytes = 100_000
    source = load_manifest(prepare(spec))["sources"][0]
    # independently: the stdlib's .py files in sorted path order, no tests, site-packages or generated
    # data folders, no empty files
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1]))
    texts = [t for t in (p.read_text("utf-8") for p in files) if t.strip()]
    taken, total = [], 0
    for t in texts:
        if total >= 100_000:
            break
        if total + len(t.encode()) > 100_000:  # the last document is cut at the cap
            t = t.encode()[:100_000 - total].decode("utf-8", errors="ignore")
        taken.append(t)
        total += len(t.encode())
    assert source["documents"] == len(taken)
    assert source["sha256"] == hashlib.sha256("".join(taken).encode()).hexdigest()


# 3 x micro_batch samples split rank by rank (floor bounds): e.g. dp 8 of 6 samples -> 0,1,1,1,0,1,1,1
@pytest.mark.parametrize("dp, micro_batch, batches, filler", [(2, 1, 2, 1), (3, 2, 1, 0), (4, 1, 1, 1),
                                                               (4, 2, 1, 0), (8, 2, 1, 2)])
def test_every_rank_gets_as_many_validation_batches(tmp_path, dp, micro_batch, batches, filler):
    """A sharded model runs collectives in every forward: each rank evaluates as many batches, the
    real samples across ranks are the one-rank validation set in order, and the batches that make
    up a short rank's count carry only ignored labels."""
    lines = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400)]
    (tmp_path / "a.txt").write_text("".join(lines))
    prepared = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n', val=0.5))

    def data(rank: int, size: int) -> TrainData:
        return TrainData(prepared, [1.0], seq_len=16, seed=0, global_batch=24, micro_batch=micro_batch,
                         dp_rank=rank, dp_size=size)

    n_batches = 3                          # 3 x micro_batch samples in all, fewer than some dp
    alone = [row for tokens, labels in data(0, 1).val_batches(n_batches) for row in zip(tokens, labels)]
    assert len(alone) == n_batches * micro_batch and all((labels != -100).any() for _, labels in alone)
    per_rank = [data(r, dp).val_batches(n_batches) for r in range(dp)]
    assert [len(b) for b in per_rank] == [batches] * dp
    real, ignored = [], []
    for rank_batches in per_rank:
        for tokens, labels in rank_batches:
            for row in zip(tokens, labels):
                (real if (row[1] != -100).any() else ignored).append(row)
    assert [(t.tolist(), l.tolist()) for t, l in real] == [(t.tolist(), l.tolist()) for t, l in alone]
    assert len(ignored) == filler
