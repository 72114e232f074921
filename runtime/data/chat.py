"""The SFT chat template: a conversation -> token ids and a loss mask (1 = the model learns this token).

A template renders ONE message from `role` and `content` (jinja2). The default, ChatML, is
`<|im_start|>{{ role }}\\n{{ content }}<|im_end|>\\n`. Each message is rendered with a placeholder
content to find where the content starts: the header before it is never trained; for assistant
messages the content and everything after it (the `<|im_end|>` that teaches the model to stop) are.
System, user and tool messages contribute no loss at all. A template may trim the content
(`{{ content | trim }}`, as Llama 3's do): the whitespace around it is then neither rendered nor
tokenized.
"""

import jinja2
from tokenizers import Tokenizer

from ...compiler.spec.data import chat_template_source, trims_content
from .sources import DataError
from .tokenizer import text_prefix

_PLACEHOLDER = "\x00CONTENT\x00"


class ChatTemplate:
    """A per-message jinja2 template, split once into header/footer around the content."""

    def __init__(self, template: str = "chatml"):
        source = chat_template_source(template)
        try:
            self._template = jinja2.Environment(keep_trailing_newline=True).from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"data.tokenizer.chat_template: invalid jinja2 ({e.message}, line {e.lineno})") from None
        self._parts: dict[str, tuple[str, str]] = {}
        self._trims: dict[str, bool] = {}

    def parts(self, role: str) -> tuple[str, str]:
        """(header, footer) of a message of this role."""
        if role not in self._parts:
            rendered = self._template.render(role=role, content=_PLACEHOLDER)
            if rendered.count(_PLACEHOLDER) != 1:
                raise DataError("data.tokenizer.chat_template must use {{ content }} exactly once")
            header, footer = rendered.split(_PLACEHOLDER)
            self._parts[role] = (header, footer)
            self._trims[role] = trims_content(self._template, role, _PLACEHOLDER)
        return self._parts[role]

    def content(self, message: dict) -> str:
        """The message's content as the template renders it: trimmed, where it says `| trim`."""
        self.parts(message["role"])
        return message["content"].strip() if self._trims[message["role"]] else message["content"]

    def render_text(self, messages: list[dict]) -> str:
        """The conversation as one string (for people and for generation prompts)."""
        return "".join(h + self.content(m) + f for m in messages for h, f in [self.parts(m["role"])])


def render_chat(messages: list[dict], tok: Tokenizer, template: ChatTemplate, prefix: list[int] | None = None,
                generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the loss mask (1 on assistant content and its footer). The
    conversation begins as the tokenizer begins a text (`prefix`, by default text_prefix(tok):
    Llama's BOS; nothing for llmc's own), untrained; `generation_prompt` ends it with the
    assistant's header, as a prompt for a reply.

    The text before a reply (the messages and the assistant's header) is tokenized as one string,
    and each reply (its content and footer) as another: inference tokenizes a prompt whole and
    generates the reply after it, so training sees the tokens inference does (a marker that ends
    in a space, as Mistral's `[INST] `, joins the word after it)."""
    runs: list[list] = []  # [text, learned]: the spans tokenized as one string each

    def add(text: str, learned: int) -> None:
        if runs and runs[-1][1] == learned:
            runs[-1][0] += text
        elif text:
            runs.append([text, learned])

    for m in messages:
        header, footer = template.parts(m["role"])
        if m["role"] == "assistant":
            add(header, 0)
            add(template.content(m) + footer, 1)
        else:
            add(header + template.content(m) + footer, 0)
    if generation_prompt:
        add(template.parts("assistant")[0], 0)
    ids = list(text_prefix(tok) if prefix is None else prefix)
    mask = [0] * len(ids)
    for text, learned in runs:
        piece = tok.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [learned] * len(piece)
    return ids, mask
