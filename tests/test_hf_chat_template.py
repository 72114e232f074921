"""A Hugging Face chat template imported as llmc's per-message one, and llmc's exported as a HF one.

The reference is transformers' `apply_chat_template`: a conversation that llmc renders through
the imported template is, character for character, what transformers renders through the
original (the BOS aside: llmc's tokenizer puts it first, so both are compared without it). A
template that is not one message at a time is reported, and the import keeps ChatML."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from llmc.compiler.cli import main as llmc  # noqa: E402
from llmc.compiler.hf_chat import (ChatTemplateError, conversation_template,  # noqa: E402
                                   per_message_template)
from llmc.compiler.spec import load_spec  # noqa: E402
from llmc.runtime.data.chat import ChatTemplate  # noqa: E402
from llmc.runtime.data.prepare import spec_chat_template  # noqa: E402

# Meta-Llama-3-8B-Instruct's template, as its tokenizer_config.json has it
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# Qwen2-Instruct's: ChatML, with a default system message when the conversation has none
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral-7B-Instruct-v0.1's: user and assistant only, alternating
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# DeepSeek-V3's, without its tool-call branches: the system prompt first and bare, then the turns
DEEPSEEK = ("{% set ns = namespace(system_prompt='') %}{%- for message in messages %}"
            "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}"
            "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
            "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
            "{%- if message['role'] == 'assistant' %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
            "{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")
# DeepSeek's with every content trimmed: a template of one branch per role that trims
DEEPSEEK_TRIMMED = DEEPSEEK.replace("message['content']", "message['content'] | trim")
# As Qwen3's does: the last assistant turn after the last question gets an (empty) reasoning block
REASONING = ("{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
             "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
             "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# One of quotes, backslashes and braces in its markers: they must stay text in llmc's template
QUOTES = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '{[\\'' + m['content'] + '\"]}\n' }}"
          "{% else %}{{ m['role'] + ' said \"' + m['content'] + '\" \\\\ %}\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant said \"' }}{% endif %}")
EOS = "</s>"

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": " What is 2 + 2?\nShow it.\n"},  # whitespace a template may trim (Llama 3's)
    {"role": "assistant", "content": "2 + 2 = 4.\n\n"},
    {"role": "user", "content": "And {{ 3 }} + 3? 100% sure?"},  # jinja-looking text is content, not code
    {"role": "assistant", "content": "6, \"quoted\" and \\ escaped."},
]


def hf_render(template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    from tokenizers import Tokenizer, models
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, EOS: 2}, unk_token="<unk>")),
        bos_token="<s>", eos_token=EOS)
    tokenizer.chat_template = template
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         bos_token="")


def llmc_render(template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    chat = ChatTemplate(template)
    return chat.render_text(messages) + (chat.parts("assistant")[0] if generation_prompt else "")


@pytest.mark.parametrize("hf_template, expected", [
    (LLAMA3, "<|start_header_id|>{{ role }}<|end_header_id|>\n\n{{ content | trim }}<|eot_id|>"),
    (QWEN2, "chatml"),
    (MISTRAL, None),
    (DEEPSEEK, None),
    (DEEPSEEK_TRIMMED, None),
    (QUOTES, None),
], ids=["llama3", "qwen2", "mistral", "deepseek", "deepseek-trimmed", "quotes"])
def test_an_imported_template_renders_conversations_as_transformers_does(hf_template, expected):
    template, _ = per_message_template(hf_template, EOS)
    if expected is not None:  # the readable form where the headers differ only by the role's name
        assert template == expected
    conversation = CONVERSATION[1:] if hf_template == MISTRAL else CONVERSATION
    for n in range(1, len(conversation) + 1):
        messages = conversation[:n]
        assert llmc_render(template, messages) == hf_render(hf_template, messages), n
        if messages[-1]["role"] == "user":
            assert llmc_render(template, messages, True) == hf_render(hf_template, messages, True), n


def test_what_a_per_message_template_leaves_out_is_said():
    template, left_out = per_message_template(QWEN2, EOS)
    question = [{"role": "user", "content": "Hi"}]
    default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert hf_render(QWEN2, question) == default + llmc_render(template, question)
    assert left_out == f"the system message it adds to a conversation without one is not added ({default!r})"

    template, left_out = per_message_template(MISTRAL, EOS)
    assert left_out == "it has no system role: a system message renders as a user's"
    assert llmc_render(template, [{"role": "system", "content": "Be brief."}]) == "[INST] Be brief. [/INST]"

    assert per_message_template(LLAMA3, EOS)[1] is None

    trims_replies = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
                     "{{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}{{ '\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    template, left_out = per_message_template(trims_replies, EOS)
    assert template == "{{ role }}: {{ content }}\n"
    assert left_out == "it trims the whitespace around the content of some messages only (llmc's keeps it)"


@pytest.mark.parametrize("hf_template, reason", [
    (REASONING, "adding message 4 (user) changes how the ones before it render"),
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}",
     "a system message does not render its content once, in its own place"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
     "{{ 'ASSISTANT:' }}{% endif %}", "its generation prompt is not the header of an assistant message"),
    ("{% for m in messages %}{{ m.content }}", "it is not valid jinja2 here"),
    ("{{ messages | length / 0 }}", "rendering a probe conversation failed (division by zero)"),  # any error
])
def test_a_template_that_is_not_one_message_at_a_time_is_refused_with_the_reason(hf_template, reason):
    with pytest.raises(ChatTemplateError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        per_message_template(hf_template, EOS)


@pytest.mark.parametrize("hf_template", [LLAMA3, QWEN2, DEEPSEEK, DEEPSEEK_TRIMMED, QUOTES],
                         ids=["llama3", "chatml", "deepseek", "deepseek-trimmed", "quotes"])
def test_an_exported_template_renders_in_transformers_as_llmc_does(hf_template):
    template, _ = per_message_template(hf_template, EOS)
    exported = conversation_template(template)
    tool = {"role": "tool", "content": "42"}  # a role of no branch of its own: as llmc's template renders it
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], CONVERSATION[:4] + [tool]):
        assert hf_render(exported, messages) == llmc_render(template, messages)
        assert hf_render(exported, messages, True) == llmc_render(template, messages, True)
    assert per_message_template(exported, EOS)[0] == template  # and it imports back as it was


@pytest.mark.parametrize("hf_template", [MISTRAL, QWEN2], ids=["mistral", "chatml"])
def test_the_tokens_before_each_reply_are_the_prompt_transformers_gives_at_inference(hf_template):
    """SFT trains each reply after the tokens inference feeds the model before it: transformers'
    apply_chat_template(tokenize=True, add_generation_prompt=True) of the conversation so far. With
    a byte-level BPE that merges a space into the word after it, Mistral's `[INST] ` marker joins
    the first word of the question (tokenized one piece at a time, the two would not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmc.runtime.data.chat import render_chat
    conversation = CONVERSATION[1:] if hf_template == MISTRAL else CONVERSATION
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([hf_render(hf_template, conversation)] * 50, trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    hf.chat_template = hf_template
    ids, mask = render_chat(conversation, bpe, ChatTemplate(per_message_template(hf_template, EOS)[0]))
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]  # where each reply begins
    replies = [k for k, m in enumerate(conversation) if m["role"] == "assistant"]
    assert len(starts) == len(replies) == 2
    for start, k in zip(starts, replies):
        prompt = hf.apply_chat_template(conversation[:k], tokenize=True, add_generation_prompt=True, bos_token="")
        assert ids[:start] == list(getattr(prompt, "input_ids", prompt)), k
    if hf_template == MISTRAL:  # (the case this is about: the marker's space is part of the question's first word)
        assert bpe.token_to_id("ĠAnd") in ids


def _hf_folder(path, chat_template: str):
    """A HF folder without weights: a tiny Llama's config.json, a tokenizer, its tokenizer_config.json."""
    from test_hf_config import tiny_config
    from test_hf_weights import write_tokenizer
    path.mkdir()
    tiny_config("llama").save_pretrained(path)
    write_tokenizer(path / "tokenizer.json")
    config = {"eos_token": {"content": EOS}, "chat_template": chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_import_writes_the_template_into_the_spec_or_says_why_not(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "llama3", LLAMA3)
    assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / "llama3.toml")]) == 0
    spec = load_spec(tmp_path / "llama3.toml")
    assert spec.data.tokenizer.chat_template == per_message_template(LLAMA3)[0]
    assert "chat template" not in capsys.readouterr().err

    folder = _hf_folder(tmp_path / "reasoning", REASONING)
    assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / "reasoning.toml")]) == 0
    assert spec_chat_template(load_spec(tmp_path / "reasoning.toml")) == "chatml"
    err = capsys.readouterr().err
    assert f"note: the chat template of {folder} is not imported: adding message 4 (user) changes" in err

    folder = _hf_folder(tmp_path / "qwen2", QWEN2)
    assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / "qwen2.toml")]) == 0
    assert "chat_template" not in (tmp_path / "qwen2.toml").read_text()  # chatml is the default
    assert f"note: the chat template of {folder}: the system message it adds" in capsys.readouterr().err


def test_a_checkpoint_import_carries_the_template_and_export_writes_it_back(tmp_path):
    """import hf DIR -o ckpt/ puts the template into the folder's plan (which `llmc chat` reads);
    export hf writes a tokenizer_config.json whose template transformers renders alike."""
    from test_hf_weights import hf_model, write_tokenizer
    folder = tmp_path / "hf"
    hf_model("llama").save_pretrained(folder)
    write_tokenizer(folder / "tokenizer.json")
    (folder / "chat_template.jinja").write_text(DEEPSEEK)  # where transformers 4.5x+ saves it
    assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / "ckpt") + "/"]) == 0
    plan = json.loads((tmp_path / "ckpt" / "plan.json").read_text())
    template = plan["spec"]["data"]["tokenizer"]["chat_template"]
    assert template == per_message_template(DEEPSEEK)[0]

    assert llmc(["export", "hf", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == \
        llmc_render(template, CONVERSATION[:2], generation_prompt=True)


def test_an_exported_template_begins_with_the_bos_a_llama_tokenizer_puts_first(tmp_path):
    """A tokenizer whose template puts <s> before a text (Llama's): llmc begins every conversation
    with it, and transformers tokenizes a rendered conversation without adding special tokens, so
    the exported template renders the BOS itself: once, first, as the imported folder's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from llmc.runtime.data.chat import render_chat
    from test_hf_weights import VOCAB, hf_model
    folder = tmp_path / "hf"
    hf_model("llama").save_pretrained(folder)
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>"]  # (Llama 3's markers are tokens)
    vocab = {f"w{i}": i for i in range(VOCAB - 4)} | {t: VOCAB - 4 + i for i, t in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB - 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": LLAMA3}))
    assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / "ckpt") + "/"]) == 0
    assert llmc(["export", "hf", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out")]) == 0
    template = per_message_template(LLAMA3)[0]
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"},
                {"role": "user", "content": "w8"}]
    for hf_folder in (folder, tmp_path / "out"):  # the original template, and llmc's exported one
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(getattr(ids, "input_ids", ids))
        assert ids == render_chat(messages, tok, ChatTemplate(template), generation_prompt=True)[0], hf_folder
        assert ids.count(VOCAB - 1) == 1 and ids[0] == VOCAB - 1
