"""SFT: a hand-written conversation through the chat template; the loss only on assistant tokens."""

import json

import numpy as np
import pytest

from llmc.compiler.spec import load_spec
from llmc.runtime.data.chat import ChatTemplate, render_chat
from llmc.runtime.data.dataset import PackedWindows
from llmc.runtime.data.prepare import load_manifest, prepare
from llmc.runtime.data.shards import TokenShard
from llmc.runtime.data.sources import DataError
from llmc.runtime.data.tokenizer import train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is 2+2? And 3+3? 4. 6, of course. You are terse."] * 5, 300)


def test_mask_covers_exactly_the_assistant_replies_and_their_end_marker(tok):
    ids, mask = render_chat(CONVERSATION, tok, ChatTemplate("chatml"))
    assert len(ids) == len(mask)
    full = tok.decode(ids, skip_special_tokens=False)
    assert full == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                    "<|im_start|>assistant\n6, of course.<|im_end|>\n")
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == "4.<|im_end|>\n6, of course.<|im_end|>\n"
    # the trained tokens form two contiguous runs (one per assistant turn)
    runs = np.flatnonzero(np.diff(np.asarray([0] + mask + [0])))
    assert len(runs) == 4


def test_custom_jinja_template(tok):
    template = ChatTemplate("[{{ role | upper }}] {{ content }}\n")
    ids, mask = render_chat(CONVERSATION[1:3], tok, template)
    assert tok.decode(ids) == "[USER] What is 2+2?\n[ASSISTANT] 4.\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4.\n"
    with pytest.raises(DataError, match="exactly once"):
        ChatTemplate("{{ role }}").parts("user")


def test_a_template_that_trims_the_content_trains_on_the_trimmed_content(tok):
    """`{{ content | trim }}` (Llama 3's templates trim): the whitespace around a content is neither
    in the text nor in the tokens, and the mask still covers exactly the reply and its footer."""
    conversation = [{"role": "user", "content": "  What is 2+2?\n"}, {"role": "assistant", "content": "\n4. \n\n"}]
    template = ChatTemplate("[{{ role }}] {{ content | trim }}\n")
    assert template.render_text(conversation) == "[user] What is 2+2?\n[assistant] 4.\n"
    ids, mask = render_chat(conversation, tok, template)
    assert tok.decode(ids) == "[user] What is 2+2?\n[assistant] 4.\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4.\n"
    untrimmed = ChatTemplate("[{{ role }}] {{ content }}\n")  # (the control)
    assert untrimmed.render_text(conversation) == "[user]   What is 2+2?\n\n[assistant] \n4. \n\n\n"


def test_sft_shards_give_labels_only_on_assistant_tokens(tmp_path):
    conversations = [CONVERSATION, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    (tmp_path / "spec.toml").write_text(f"""
[model]
vocab_size = 300
d_model = 32
n_layers = 1
n_heads = 2
ffn_hidden = 64
max_seq_len = 256
[train]
objective = "sft"
seq_len = 256
global_batch_size = 1
max_steps = 1
[data]
val_fraction = 0.0
cache_dir = "{tmp_path / 'cache'}"
sources = [{{ path = "chat.jsonl", format = "jsonl" }}]
""")
    out = prepare(load_spec(tmp_path / "spec.toml"))
    manifest = load_manifest(out)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    shard = TokenShard(out / manifest["sources"][0]["train"]["name"], manifest["dtype"])
    windows = PackedWindows(shard, 256, manifest["special"]["pad"])
    assert len(windows) == 1  # both conversations fit one packed window, padded at the end
    inputs, labels = windows[0]
    targets = labels[labels != -100].tolist()
    assert tok.decode(targets, skip_special_tokens=False) == \
        "4.<|im_end|>\n6, of course.<|im_end|>\nhello<|im_end|>\n"
    # a label is the next input token wherever it counts
    kept = np.flatnonzero(labels != -100)
    assert (labels[kept[:-1]] == inputs[kept[:-1] + 1]).all()
    assert labels[-1] == -100  # padding never counts


def test_sft_record_errors(tmp_path):
    from llmc.runtime.data.sources import BadRecords, iter_documents
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: conversation has no assistant message"):
        list(iter_documents(str(path), "jsonl", "messages", "**/*", sft=True, bad=BadRecords("error")))
    bad = BadRecords("skip")
    assert list(iter_documents(str(path), "jsonl", "messages", "**/*", sft=True, bad=bad)) == []
    assert bad.total == 2


def test_a_conversation_begins_as_its_tokenizer_begins_a_text():
    """A Llama-style tokenizer (its template puts <s> before a text) begins each conversation with
    its BOS, untrained, as transformers' Llama chat templates do; llmc's own begins with the first
    header (above)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "user", "assistant", ":", "hi", "hello"])}
    llama_like = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    llama_like.pre_tokenizer = pre_tokenizers.Whitespace()
    llama_like.add_special_tokens(["<unk>", "<s>"])
    llama_like.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = render_chat(conversation, llama_like, ChatTemplate("{{ role }}: {{ content }}\n"))
    assert ids == [1, 2, 4, 5, 3, 4, 6] and mask == [0, 0, 0, 0, 0, 0, 1]
