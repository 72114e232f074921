"""Reading `data.sources[]`: the files of a source, and the documents in them.

A document is what packing separates with an end-of-text token: a whole file for `text`, one
record (a line of a `jsonl` file, a row of a `csv` file) otherwise. For SFT a jsonl record holds a
conversation (`messages`: a list of {"role", "content"}).

`builtin:stdlib` is the Python standard library's own `.py` sources (the interpreter's
`sysconfig` stdlib folder), read in sorted path order so every machine with the same Python sees
the same corpus: about 13 MB of code and docstrings on CPython 3.11. Left out: site-packages, the
test suites (their files include deliberately broken encodings), and two folders of generated data
rather than code, `encodings/` (codec tables) and `pydoc_data/` (the manual's topics as one string).
`data.max_bytes` caps the bytes read per source.

Bad data (an empty file, invalid UTF-8, a line that is not JSON, a missing or mistyped field) raises
`DataError` naming the file and line, or is skipped and counted when `data.on_bad_record = "skip"`.
A missing file or folder is always an error.
"""

import csv
import io
import json
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...compiler.errors import UserError

CHAT_ROLES = ("system", "user", "assistant", "tool")
_STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                   "encodings", "pydoc_data"}


class DataError(UserError):
    """Malformed input data: the message names the file and line."""


@dataclass
class Document:
    """One document: `text` for pretraining, `messages` for SFT; `origin` is FILE:LINE."""

    origin: str
    text: str | None = None
    messages: list[dict] | None = None

    @property
    def nbytes(self) -> int:
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        return sum(len(m["content"].encode("utf-8")) for m in self.messages or [])


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    """The stdlib's `.py` files, not descending into the excluded folders: site-packages alone can
    hold tens of thousands of files (globbing everything and filtering took 0.6 s a call)."""
    files = []
    for folder, subfolders, names in os.walk(stdlib_root()):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_EXCLUDE]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(f for f in files if f.is_file())


def source_files(path: str, glob: str = "**/*") -> list[Path]:
    """The files of a source, in a deterministic order; raise DataError if there are none."""
    if path == "builtin:stdlib":
        return _stdlib_files()
    if path.startswith("builtin:"):
        raise DataError(f"{path}: unknown builtin corpus (expected builtin:stdlib)")
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob(glob) if f.is_file())
        if not files:
            raise DataError(f"{path}: no files match {glob!r} in this folder")
        return files
    raise DataError(f"{path}: file not found")


class BadRecords:
    """Raise on a bad record, or count it (per reason) when skipping."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: Counter = Counter()

    def __call__(self, where: str, what: str) -> None:
        if self.policy != "skip":
            raise DataError(f"{where}: {what}")
        self.counts[what.split(" (")[0]] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(data: bytes, name: str, bad: BadRecords) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"{name}:{_line_of(data, e.start)}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})")
        return None


def _truncate_utf8(data: bytes) -> bytes:
    """Drop a multi-byte character cut in half at the end of `data`."""
    for cut in range(0, 4):
        try:
            (data[:len(data) - cut]).decode("utf-8")
            return data[:len(data) - cut]
        except UnicodeDecodeError as e:
            if e.start < len(data) - 4:
                return data  # a real error earlier in the data: let the caller report it
    return data


def _check_messages(value, where: str, field: str, bad: BadRecords) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        bad(where, f"field {field!r} must be a non-empty list of messages (found {type(value).__name__})")
        return None
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            bad(where, f"message {i} must be an object with string 'role' and 'content' (found {m!r:.60})")
            return None
        if m["role"] not in CHAT_ROLES:
            bad(where, f"message {i} has role {m['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
            return None
    if not any(m["role"] == "assistant" for m in value):
        bad(where, "conversation has no assistant message (nothing to learn)")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_documents(file: Path, data: bytes, bad: BadRecords, builtin: bool) -> Iterator[Document]:
    if builtin:  # the stdlib is trusted: an undecodable or empty file is simply not part of the corpus
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        if text.strip():
            yield Document(origin=f"{file}:1", text=text)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad.policy != "skip":
            bad(f"{file}:{_line_of(data, e.start)}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})")
        lines = []  # skipping: keep the lines that do decode, count the others
        for number, raw in enumerate(data.split(b"\n"), 1):
            line = _decode(raw, f"{file}:{number}", bad)
            if line is not None:
                lines.append(line)
        text = "\n".join(lines)
    if text.strip():
        yield Document(origin=f"{file}:1", text=text)


def _jsonl_documents(file: Path, data: bytes, field: str, sft: bool, bad: BadRecords) -> Iterator[Document]:
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{file}:{number}"
        line = _decode(raw, where, bad)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            bad(where, f"expected a JSON object, found {type(record).__name__}")
            continue
        if field not in record:
            keys = ", ".join(sorted(record)[:8])
            bad(where, f"field {field!r} is missing (the record has: {keys})")
            continue
        if sft:
            messages = _check_messages(record[field], where, field, bad)
            if messages is not None:
                yield Document(origin=where, messages=messages)
        elif not isinstance(record[field], str):
            bad(where, f"field {field!r} must be a string (found {type(record[field]).__name__})")
        elif record[field]:
            yield Document(origin=where, text=record[field])


def _csv_documents(file: Path, data: bytes, field: str, bad: BadRecords) -> Iterator[Document]:
    text = _decode(data, str(file), BadRecords("error"))  # a CSV that does not decode cannot be parsed
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or field not in reader.fieldnames:
        found = ", ".join(reader.fieldnames or [])
        raise DataError(f"{file}:1: column {field!r} not found (the header has: {found})")
    for row in reader:
        value = row.get(field)
        if value is None:
            bad(f"{file}:{reader.line_num}", f"row has no value in column {field!r}")
        elif value:
            yield Document(origin=f"{file}:{reader.line_num}", text=value)


def iter_documents(path: str, fmt: str, field: str, glob: str, *, sft: bool, bad: BadRecords,
                   max_bytes: int | None = None) -> Iterator[Document]:
    """The documents of one source, in order, stopping after `max_bytes` bytes of text."""
    if sft and fmt != "jsonl":
        raise DataError(f"{path}: sft needs jsonl conversations (format = 'jsonl', found {fmt!r})")
    builtin = path.startswith("builtin:")
    remaining = max_bytes if max_bytes is not None else float("inf")
    for file in source_files(path, glob):
        if remaining <= 0:
            return
        try:
            with open(file, "rb") as f:
                data = f.read(max_bytes and int(remaining) if fmt == "text" else -1)
        except OSError as e:
            raise DataError(f"{file}: cannot read ({e.strerror})") from None
        if fmt == "text" and max_bytes is not None and len(data) >= remaining:
            data = _truncate_utf8(data)
        if not data.strip():
            if not builtin:
                bad(f"{file}:1", "file is empty")
            continue
        if fmt == "text":
            docs = _text_documents(file, data, bad, builtin)
        elif fmt == "jsonl":
            docs = _jsonl_documents(file, data, field, sft, bad)
        elif fmt == "csv":
            docs = _csv_documents(file, data, field, bad)
        else:
            raise DataError(f"{path}: unknown format {fmt!r} (expected text, jsonl or csv)")
        for doc in docs:
            yield doc
            remaining -= doc.nbytes
            if remaining <= 0:
                return
