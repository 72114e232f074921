"""`[data]`: where tokens come from, how they are tokenized and split."""

from typing import Literal

from pydantic import Field

from .base import Table

CHATML = "<|im_start|>{{ role }}\n{{ content }}<|im_end|>\n"  # what data.tokenizer.chat_template = "chatml" means
PADDED = " \n{}\n "  # a content with whitespace around it, which a template that trims renders bare


def chat_template_source(template: str) -> str:
    """The jinja2 source of a data.tokenizer.chat_template value ("chatml" or a template)."""
    return CHATML if template == "chatml" else template


def trims_content(template, role: str, placeholder: str) -> bool:
    """Whether a compiled (jinja2) per-message template trims the whitespace around the content of
    a message of `role` (`{{ content | trim }}`): `placeholder` renders alike with whitespace around it."""
    padded, bare = (template.render(role=role, content=c) for c in (PADDED.format(placeholder), placeholder))
    return padded == bare


class SourceSpec(Table):
    """One `[[data.sources]]` entry."""

    path: str = Field(..., min_length=1, description="File or folder (relative to the spec), or `builtin:NAME` "
                                                     "for a corpus that ships with Python (builtin:stdlib).")
    format: Literal["text", "jsonl", "csv"] = Field("text", description="File format.")
    field: str = Field("text", description="jsonl: key of the text (or of `messages` for sft); csv: column name.")
    weight: float = Field(1.0, gt=0, description="Sampling weight in the mixture (relative).")
    lang: str = Field("", description="Language tag, informational (e.g. en, zh).")
    glob: str = Field("**/*", description="For a folder: which files to read.")


class TokenizerSpec(Table):
    """`[data.tokenizer]`: train a byte-level BPE, or load a tokenizer.json."""

    path: str | None = Field(None, description="A tokenizer.json to load; absent = train.init_from's, "
                                                     "else train one on the sources.")
    vocab_size: int | None = Field(None, ge=256, description="Vocabulary of a trained tokenizer (tokens); "
                                                             "default model.vocab_size.")
    chat_template: str | None = Field(None, description="Chat template of one message, for sft and chat: chatml, "
                                                            "or a jinja2 string of role and content (`llmc import hf` "
                                                            "of a folder writes the model's own); absent = "
                                                            "train.init_from's, else chatml.")


def _some_source(sources):
    if not sources:
        yield "sources", "data.sources is empty (expected at least one source)"


class DataSpec(Table):
    """`[data]`."""

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(path="builtin:stdlib")],
                                      description="Text sources; default the Python standard library's sources.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Share of documents held out for validation.")
    max_bytes: int | None = Field(None, ge=1, description="Read at most this many bytes per source (bytes).")
    on_bad_record: Literal["error", "skip"] = Field("error", description="A malformed record stops the "
                                                                         "prepare with its file and line, or is skipped and counted.")
    cache_dir: str = Field(".llmc/data", description="Where prepared shards live (relative to the working directory).")

    _checks = (_some_source,)
