"""`llmc chat`'s prompt fits the budget and keeps every message's template markers: the oldest turns
go first, and a last message too long on its own keeps the end of its content (said on stderr)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmc.compiler.errors import UserError
from llmc.runtime.data.chat import ChatTemplate
from llmc.runtime.infer.cli import _chat_prompt

WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture
def tok():
    """One token per word: w0..w99 are ids 0..99, then the role names, then ChatML's markers."""
    vocab = {w: i for i, w in enumerate(WORDS + ["user", "assistant", "[UNK]"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return t


def ids(tok, *words):
    return [tok.token_to_id(w) for w in words]


def prompt(tok, messages, budget):
    template = ChatTemplate("chatml")   # the project's default: <|im_start|>{{ role }}\n{{ content }}<|im_end|>\n
    return _chat_prompt(messages, template, tok, budget)


def user(words):
    return {"role": "user", "content": " ".join(words)}


def framed(tok, words):
    """What the model must see for one user message of `words`: its header, the words, its end marker,
    then the assistant's header."""
    return (ids(tok, "<|im_start|>", "user") + ids(tok, *words) + ids(tok, "<|im_end|>")
            + ids(tok, "<|im_start|>", "assistant"))


def test_a_conversation_that_fits_is_whole_and_says_nothing(tok, capsys):
    messages = [user(WORDS[:3]), {"role": "assistant", "content": "w3"}, user(WORDS[4:6])]
    expected = (ids(tok, "<|im_start|>", "user", "w0", "w1", "w2", "<|im_end|>", "<|im_start|>", "assistant", "w3",
                    "<|im_end|>") + framed(tok, WORDS[4:6]))
    assert prompt(tok, messages, 100) == expected
    assert capsys.readouterr().err == ""


def test_oldest_turns_go_first_and_the_last_message_stays_whole(tok, capsys):
    messages = [user(WORDS[:30]), {"role": "assistant", "content": " ".join(WORDS[30:60])}, user(WORDS[60:70])]
    out = prompt(tok, messages, 20)
    assert out == framed(tok, WORDS[60:70])     # 2 + 10 + 1 + 2 = 15 tokens
    assert capsys.readouterr().err == ""


def test_a_message_longer_than_the_budget_keeps_its_end_and_the_template(tok, capsys):
    messages = [user(WORDS[:10]), {"role": "assistant", "content": "w10"}, user(WORDS[50:100])]
    out = prompt(tok, messages, 20)
    # 20 tokens: 2 header + 15 words + 1 end marker + 2 assistant header; the last 15 of the 50 words
    assert out == framed(tok, WORDS[85:100]) and len(out) == 20
    assert out[:2] == ids(tok, "<|im_start|>", "user")   # the header ids[-budget:] used to cut off
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: your message (50 tokens) is longer than the 20-token prompt the context leaves; "
                   "the model sees only its last 15 tokens"]


def test_a_budget_smaller_than_the_templates_markers_is_a_user_error(tok):
    with pytest.raises(UserError, match="markers alone take 5 tokens"):
        prompt(tok, [user(WORDS[:10])], 5)


def test_a_prompt_begins_with_the_tokenizers_bos_cut_or_not(tok, capsys):
    """A tokenizer whose template puts <s> before a text (Llama's) begins every prompt with it, the
    one whose long last message keeps only its end too (the BOS counts against the budget)."""
    from tokenizers import processors
    tok.add_special_tokens(["<s>"])
    bos = ids(tok, "<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos[0])])
    assert prompt(tok, [user(WORDS[:3])], 100) == bos + framed(tok, WORDS[:3])
    out = prompt(tok, [user(WORDS[:50])], 20)
    assert out == bos + framed(tok, WORDS[36:50]) and len(out) == 20  # 1 + 2 + 14 + 1 + 2
    assert "the model sees only its last 14 tokens" in capsys.readouterr().err
