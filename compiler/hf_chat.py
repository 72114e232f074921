"""A Hugging Face chat template -> llmc's per-message chat template, and back.

A HF model folder keeps its chat template in tokenizer_config.json (`chat_template`: a jinja2
string, or a list of named ones) or in chat_template.jinja: one template that renders a whole
conversation. llmc's template renders ONE message from `role` and `content`
(runtime/data/chat.py), which is what SFT needs to mask the loss by message.

`per_message_template` derives the one from the other by rendering a probe conversation (system,
user, assistant, user, assistant, with placeholder contents) one message longer at a time. It
holds for a template that renders each message on its own: every rendering extends the one
before it, the two user (and the two assistant) messages render alike, and the generation prompt
is the assistant's header. A template that does more (a reasoning block in the last assistant
turn only, ...) is reported, and the import keeps ChatML. What a per-message template cannot do is
reported too, and left out: a default system message for a conversation without one, a system
role for a template without it (a system message then renders as a user's). The BOS token is
rendered as nothing: llmc begins every text with the tokenizer's own prefix
(runtime/data/tokenizer.text_prefix). A template that trims the contents (Llama 3's `| trim`) is
seen by a probe with whitespace around them, and llmc's then says `{{ content | trim }}`.

`conversation_template` writes the opposite direction for `llmc export hf`.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .spec.data import CHATML, PADDED, chat_template_source, trims_content

_PROBE = {role: f"\x00{role.upper()}{i}\x00" for role, i in (("system", 0), ("user", 1), ("assistant", 2))}
_ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The conversation template cannot be written as one template per message (the reason)."""


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens):
    here the body is rendered as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (a sandbox: hub templates are code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


def _tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json of a HF folder ({} when it has none or one that is not a JSON object:
    the tokenizer itself is read from tokenizer.json, this file only adds the chat template)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def read_hf_chat_template(folder: Path) -> str | None:
    """The conversation template of a HF model folder (chat_template.jinja, else tokenizer_config.json's
    `chat_template`, the one named "default" when there are several); None when it has none."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token(config_value) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken's dict."""
    if isinstance(config_value, dict):
        return str(config_value.get("content", ""))
    return config_value if isinstance(config_value, str) else ""


def per_message_template(hf_template: str, eos_token: str = "") -> tuple[str, str | None]:
    """(llmc's per-message template, a jinja2 string or "chatml", that renders a conversation as
    `hf_template` does; what it leaves out, or None). ChatTemplateError says why there is none."""
    env = _environment()
    try:
        compiled = env.from_string(hf_template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"it is not valid jinja2 here ({e.message}, line {e.lineno})") from None

    def render(messages, generation_prompt=False) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=generation_prompt, bos_token="",
                                   eos_token=eos_token, tools=None, documents=None)
        except Exception as e:  # a hub template is untrusted code: whatever it raises, it is not imported
            raise ChatTemplateError(f"rendering a probe conversation failed ({e})") from None

    probe = [{"role": r, "content": _PROBE[r]} for r in ("system", "user", "assistant", "user", "assistant")]
    try:
        parts = _message_parts(render, probe)
    except ChatTemplateError as with_system:  # e.g. Mistral's: user and assistant only
        try:
            probe = probe[1:]
            parts = _message_parts(render, probe)
        except ChatTemplateError:
            raise with_system from None
    question = [probe[-2]]
    header, footer = parts["user"]
    alone, block = render(question), header + _PROBE["user"] + footer
    left_out = [] if "system" in parts else ["it has no system role: a system message renders as a user's"]
    if alone != block:
        if not alone.endswith(block):
            raise ChatTemplateError("a conversation without a system message renders differently")
        left_out.append(f"the system message it adds to a conversation without one is not added "
                        f"({alone.removesuffix(block)!r})")
    if render(question, generation_prompt=True) != alone + parts["assistant"][0]:
        raise ChatTemplateError("its generation prompt is not the header of an assistant message")
    trims = _trims(render, probe)
    if trims is None:
        trims = False
        left_out.append("it trims the whitespace around the content of some messages only (llmc's keeps it)")
    return _write(parts, trims), "; ".join(left_out) or None


def _trims(render, probe: list[dict]) -> bool | None:
    """Whether the template trims the whitespace around every content (True), none (False), or
    some only (None): the probe rendered with whitespace around its contents."""
    plain = render(probe)
    padded = render([dict(m, content=PADDED.format(m["content"])) for m in probe])
    if padded == plain:
        return True
    for placeholder in _PROBE.values():
        plain = plain.replace(placeholder, PADDED.format(placeholder))
    return False if padded == plain else None


def _message_parts(render, probe: list[dict]) -> dict[str, tuple[str, str]]:
    """{role: (header, footer)} from the renderings of the probe's first 1, 2, ... messages."""
    parts: dict[str, tuple[str, str]] = {}
    before = ""
    for n in range(1, len(probe) + 1):
        text = render(probe[:n])
        if not text.startswith(before):
            raise ChatTemplateError(f"adding message {n} ({probe[n - 1]['role']}) changes how the ones before "
                                    "it render")
        block, before = text[len(before):], text
        role = probe[n - 1]["role"]
        if block.count(_PROBE[role]) != 1 or any(p in block for r, p in _PROBE.items() if r != role):
            raise ChatTemplateError(f"a {role} message does not render its content once, in its own place")
        header, footer = block.split(_PROBE[role])
        if parts.setdefault(role, (header, footer)) != (header, footer):
            raise ChatTemplateError(f"two {role} messages render differently: it depends on more than the message")
    return parts


def _write(parts: dict[str, tuple[str, str]], trims: bool) -> str:
    """The per-message template of these (header, footer)s: "chatml", one line with `{{ role }}` where
    the headers differ by the role's name only, else one branch per role (the user's for any other
    role, such as tool; the user's for system when the template has no system role); its content
    `| trim`med when `trims`."""
    field = "content | trim" if trims else "content"
    parts = {r: parts.get(r, parts["user"]) for r in _ROLES}
    by_role = {r: (h.replace(r, "\x00ROLE\x00", 1), f) for r, (h, f) in parts.items()}
    same_shape = len(set(by_role.values())) == 1 and "\x00ROLE\x00" in by_role["user"][0]
    plain = not any(c in h + f for h, f in parts.values() for c in "{}%#")
    if same_shape and plain:
        header, footer = by_role["user"]
        template = header.replace("\x00ROLE\x00", "{{ role }}") + "{{ " + field + " }}" + footer
        return "chatml" if template == CHATML else template

    def branch(role: str) -> str:
        header, footer = parts[role]
        fields = {_PROBE["user"]: f"({field})" if trims else field}
        return "{{ " + _expression(header + _PROBE["user"] + footer, fields) + " }}"

    return (f"{{% if role == 'system' %}}{branch('system')}{{% elif role == 'assistant' %}}{branch('assistant')}"
            f"{{% else %}}{branch('user')}{{% endif %}}")


def conversation_template(template: str, bos: bool = False) -> str:
    """A HF chat template (a whole conversation, `add_generation_prompt` included) that renders a
    conversation as llmc's per-message `template` renders its messages one by one; `bos`: it begins
    with the BOS token, as llmc begins a text for a tokenizer that puts one first (transformers
    tokenizes a rendered conversation without adding it)."""
    try:
        compiled = jinja2.Environment(keep_trailing_newline=True).from_string(chat_template_source(template))
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"it is not valid jinja2 ({e.message}, line {e.lineno})") from None
    role, content = "\x00ROLE\x00", _PROBE["user"]
    if any(compiled.render(role=r, content=content).count(content) != 1 for r in (*_ROLES, role)):
        raise ChatTemplateError("it does not use {{ content }} exactly once")

    def message(r: str) -> str:  # the expression of a message of role r (tool, ...: as the template says)
        field = "(message['content'] | trim)" if trims_content(compiled, r, content) else "message['content']"
        return _expression(compiled.render(role=r, content=content), {role: "message['role']", content: field})

    branches = "".join(f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{r}' %}}{{{{ {message(r)} }}}}"
                       for i, r in enumerate(_ROLES))
    other = message(role)
    header = compiled.render(role="assistant", content=content).split(content)[0]
    return (("{{ bos_token }}" if bos else "") + "{% for message in messages %}" + branches + "{% else %}{{ "
            + other + " }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + repr(header) + " }}{% endif %}")


def _expression(text: str, fields: dict[str, str]) -> str:
    """A jinja2 expression for `text`: its pieces as string literals (Python's, which jinja2 reads alike),
    each placeholder the field it stands for."""
    terms, at = [], 0
    for m in re.finditer("|".join(map(re.escape, fields)), text):
        terms += [repr(text[at:m.start()])] if m.start() > at else []
        terms.append(fields[m.group()])
        at = m.end()
    terms += [repr(text[at:])] if at < len(text) else []
    return " ~ ".join(terms) or '""'


def chat_template_of(folder: Path | None) -> str | None:
    """llmc's template for the chat template of the HF folder: None when it has none, or one that
    is not imported (a note on stderr says why, or what the imported one leaves out)."""
    hf_template = read_hf_chat_template(folder) if folder is not None else None
    if hf_template is None:
        return None
    try:
        template, left_out = per_message_template(hf_template, _token(_tokenizer_config(folder).get("eos_token")))
    except ChatTemplateError as e:
        print(f"note: the chat template of {folder} is not imported: {e}; SFT and chat use ChatML "
              "(data.tokenizer.chat_template)", file=sys.stderr)
        return None
    if left_out:
        print(f"note: the chat template of {folder}: {left_out}", file=sys.stderr)
    return template
