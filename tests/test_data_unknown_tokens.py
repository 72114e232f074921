"""A given tokenizer that writes its unknown token for a source's text: prepare warns above 1% of the
tokens (one stderr line naming the fraction, the source and the likely cause) and refuses a source
that is all unknown tokens (a one-line error, no traceback, no prepared folder left)."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmc.compiler.cli import main as llmc
from llmc.runtime.data.prepare import load_manifest, prepare
from llmc.runtime.data.sources import DataError
from llmc.runtime.data.tokenizer import train_tokenizer, unknown_token
from test_data_prepare import make_spec

VOCAB = {"alpha": 0, "beta": 1, "gamma": 2, "[UNK]": 3}


def word_spec(tmp_path, words: list[str]):
    """A one-document text source of `words` and a WordLevel tokenizer of VOCAB: one token per word,
    [UNK] (id 3) for every word not in VOCAB."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text(" ".join(words) + "\n")
    return make_spec(tmp_path, '[[data.sources]]\npath = "a.txt"\n', val=0.0,
                     extra=f'[data.tokenizer]\npath = "{tmp_path / "tok.json"}"\n')


def test_unknown_token_is_read_from_the_models_config():
    assert unknown_token(Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))) == ("[UNK]", 3)
    assert unknown_token(Tokenizer(models.Unigram([("a", -1.0), ("<unk>", 0.0)], unk_id=1))) == ("<unk>", 1)
    assert unknown_token(train_tokenizer(["alpha beta gamma"] * 20, 300)) is None  # byte-level: no unknown


def test_text_the_tokenizer_knows_prepares_without_a_warning(tmp_path, capsys):
    out = prepare(word_spec(tmp_path, ["alpha", "beta", "gamma"] * 30))
    assert load_manifest(out)["sources"][0]["train"]["tokens"] == 91   # 90 words + end of text
    assert "warning" not in capsys.readouterr().err


def test_one_unknown_in_a_hundred_is_within_the_tolerance(tmp_path, capsys):
    prepare(word_spec(tmp_path, ["alpha"] * 99 + ["delta"]))
    assert "warning" not in capsys.readouterr().err


def test_more_than_one_percent_unknown_warns_once_with_fraction_source_and_cause(tmp_path, capsys):
    # 9 known words and 1 unknown: 1 of 10 tokens, 10.0%
    prepare(word_spec(tmp_path, ["alpha", "beta", "gamma"] * 3 + ["épsilon"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"warning: {tmp_path / 'a.txt'}: 1 of its 10 tokens (10.0%) are the tokenizer's "
                           "unknown token '[UNK]' (id 3)")
    assert str(tmp_path / "tok.json") in line and "wrong one for this text" in line


def test_a_source_of_only_unknown_tokens_is_refused_in_one_line(tmp_path, capsys):
    spec = word_spec(tmp_path, ["der", "Tokenizer", "kennt", "kein", "Wort"])
    with pytest.raises(DataError, match=r"a\.txt: every token of it \(5 tokens\) is the tokenizer's unknown token"):
        prepare(spec)
    assert llmc(["data", "prepare", str(tmp_path / "spec.toml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: {tmp_path / 'a.txt'}: every token of it (5 tokens) is the tokenizer's unknown token '[UNK]' "
        f"(id 3): the tokenizer ({tmp_path / 'tok.json'}) is not one for this text"]
    assert not list((tmp_path / "cache").iterdir()), "a refused prepare left a folder behind"


def test_sft_conversations_are_counted_too(tmp_path, capsys):
    """Every token a conversation writes is counted: ChatML's <|im_start|>/<|im_end|> are known (added)
    tokens, the role names and the four words of content are not (Whitespace drops the newlines)."""
    spec = word_spec(tmp_path, ["alpha"])
    tok = Tokenizer.from_file(str(tmp_path / "tok.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tok.json"))
    conversation = [{"role": "user", "content": "wer bist du"}, {"role": "assistant", "content": "niemand"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "c.jsonl"\nformat = "jsonl"\n', objective="sft", val=0.0,
                     extra=f'[data.tokenizer]\npath = "{tmp_path / "tok.json"}"\n')
    prepare(spec)
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'c.jsonl'}: 6 of its 10 tokens (60.0%) are the tokenizer's unknown token" in err
