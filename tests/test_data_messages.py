"""What prepare and train print about the data counts in the number the count takes: '1 document',
'1 bad record', never '1 documents'."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmc.compiler.cli import main as llmc
from llmc.runtime.data.prepare import prepare, summary
from llmc.runtime.data.sources import DataError
from llmc.runtime.data.wording import counted
from test_data_prepare import make_spec


def test_counted_takes_the_singular_for_one_only():
    assert counted(1, "document") == "1 document"
    assert counted(0, "document") == "0 documents"
    assert counted(2, "bad record") == "2 bad records"
    assert counted(1234, "val token") == "1,234 val tokens"


def _word_tokenizer(path) -> None:
    """Three words (and prepare adds an end-of-text token): "alpha beta gamma" is exactly 3 tokens."""
    tok = Tokenizer(models.WordLevel({"alpha": 0, "beta": 1, "gamma": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_one_document_and_one_skipped_record_are_said_in_the_singular(tmp_path, capsys):
    _word_tokenizer(tmp_path / "tok.json")
    (tmp_path / "d.jsonl").write_text('{"text": "alpha beta gamma"}\nnot json\n')
    make_spec(tmp_path, '[[data.sources]]\npath = "d.jsonl"\nformat = "jsonl"\n', val=0.0, policy="skip",
              extra=f'[data.tokenizer]\npath = "{tmp_path / "tok.json"}"\n')
    assert llmc(["data", "prepare", str(tmp_path / "spec.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 3 word tokens + the end-of-text separator; nothing held out
    assert lines[1] == f"  {tmp_path / 'd.jsonl'}: 1 document, 4 train tokens, 0 val tokens, skipped 1 bad record"


def test_a_source_of_only_one_bad_record_says_so_in_the_singular(tmp_path):
    (tmp_path / "d.jsonl").write_text("not json\n")
    spec = make_spec(tmp_path, '[[data.sources]]\npath = "d.jsonl"\nformat = "jsonl"\n', policy="skip")
    with pytest.raises(DataError, match=r"no documents with text found \(1 bad record skipped\)$"):
        prepare(spec)


def test_summary_of_many_keeps_the_plural(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "alpha beta {i}"}}\n' for i in range(10)))
    out = prepare(make_spec(tmp_path, '[[data.sources]]\npath = "d.jsonl"\nformat = "jsonl"\n', val=0.2))
    line = summary(out).splitlines()[1]
    assert ": 10 documents, " in line and " train tokens, " in line and line.endswith(" val tokens")
