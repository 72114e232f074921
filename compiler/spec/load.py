"""Loading a spec: TOML -> `extends` chain -> `--set` overrides -> validated `Spec`.

Every key remembers where it was written (file and line, or which `--set`), so that each problem
pydantic finds is reported as `FILE:LINE: key.path: message`, all at once.
"""

import difflib
import functools
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, TypeAdapter, ValidationError

from .base import Invalid, Table, failures
from .errors import Problem, SpecError
from .locate import Key, key_lines, nearest_line
from .spec import Spec

# Keys holding file paths: relative values are resolved against the file that wrote them.
_PATH_KEYS = [("data", "tokenizer", "path"), ("train", "init_from")]


@dataclass(frozen=True)
class Origin:
    file: str
    line: int | None
    via: str = ""  # "" = the spec itself; "extends: FILE" or "--set" otherwise


# --------------------------------------------------------------------------- reading files

def _read_toml(path: Path, display: str) -> tuple[dict, dict[Key, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(display, None, "", "file not found")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(display, None, "", "a folder, not a spec (a .toml file)")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([Problem(display, None, "", f"cannot read the file ({e})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # Python 3.11's tomllib puts the position only in the message: "... (at line 3, column 11)".
        where = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(where.group(1)) if where else None
        raise SpecError([Problem(display, line, "", f"invalid TOML: {e}")]) from None
    return data, key_lines(text)


def _bundled_specs() -> Path:
    return Path(str(resources.files("llmc.specs")))


def _resolve_extends(base: Path, name: str) -> Path:
    candidate = (base.parent / name).resolve()
    if candidate.exists():
        return candidate
    bundled = _bundled_specs() / name  # presets ship with llmc, so copied specs still find them
    return bundled if bundled.exists() else candidate


def _merge(into: dict, new: dict) -> dict:
    out = dict(into)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(data, prefix: Key = ()) -> list[Key]:
    keys = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            keys += _flatten(v, prefix + (k,))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data):
            keys += _flatten(v, prefix + (i,))
    return keys


def _load_chain(path: Path, root: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[Key, Origin]]:
    """The document at `path` merged over everything it extends, with the origin of every key."""
    display = _display(path)
    data, lines = _read_toml(path, display)
    via = "" if path == root else f"extends: {display}"
    merged: dict = {}
    origins: dict[Key, Origin] = {}
    parents = data.pop("extends", None)
    if parents is not None:
        if isinstance(parents, str):
            parents = [parents]
        if not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
            raise SpecError([Problem(display, lines.get(("extends",)), "extends",
                                     f"expected a path or a list of paths, found {parents!r}")])
        for name in parents:
            parent = _resolve_extends(path, name)
            if parent in seen + (path,):
                raise SpecError([Problem(display, lines.get(("extends",)), "extends",
                                         f"circular extends: {name} is already being loaded")])
            if not parent.exists():
                raise SpecError([Problem(display, lines.get(("extends",)), "extends",
                                         f"file not found (expected {name} relative to {display} "
                                         f"or among llmc's bundled presets)")])
            pdata, porigins = _load_chain(parent, root, seen + (path,))
            merged = _merge(merged, pdata)
            origins.update(porigins)
    for key in _flatten(data):
        origins[key] = Origin(display, nearest_line(lines, key), via)
    _resolve_paths(data, path.parent)
    return _merge(merged, data), origins


def _resolve_paths(data: dict, base: Path) -> None:
    for key in _PATH_KEYS:
        parent = data
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(key[-1]), str):
            parent[key[-1]] = _absolute(parent[key[-1]], base)
    sources = data.get("data", {}).get("sources") if isinstance(data.get("data"), dict) else None
    if isinstance(sources, list):
        for source in sources:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = _absolute(source["path"], base)


def _absolute(value: str, base: Path) -> str:
    if not value or value.startswith("builtin:") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- --set overrides

def parse_override(text: str) -> tuple[Key, object]:
    """`train.seq_len=8192` -> (("train", "seq_len"), 8192). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise SpecError([Problem("--set", None, "", f"expected KEY=VALUE, found {text!r}")])
    key, raw = text.split("=", 1)
    parts = tuple(p.strip() for p in key.strip().split("."))
    if not all(parts):
        raise SpecError([Problem("--set", None, key, f"expected a dotted key such as train.seq_len, found {key!r}")])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def _apply_override(data: dict, key: Key, value) -> None:
    node = data
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key[-1]] = value


# --------------------------------------------------------------------------- validation

def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> Spec:
    """Load and validate a spec file; raise SpecError listing every problem."""
    path = Path(path).resolve()
    data, origins = _load_chain(path, path, ())
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
        for sub in [key] + [key + k for k in _flatten(value)]:
            origins[sub] = Origin("--set", None)
    _resolve_paths(data, Path.cwd())  # a path given by --set is relative to the working directory
    return validate(data, origins, _display(path))


def validate(data: dict, origins: dict[Key, Origin], display: str) -> Spec:
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
    else:
        advice = failures(Spec._advice, {name: getattr(spec, name) for name in Spec.model_fields})
        spec._warnings = [_problem(tuple(key.split(".")), message, origins, display) for key, message in advice]
        return spec
    _, mistakes = _unchecked(Spec, data, [err["loc"] for err in errors])
    raise SpecError(_problems(errors, mistakes, origins, display)) from None


def _unchecked(table: type[Table], raw, locs: list[tuple],
               at: Key = ()) -> tuple[Table | None, list[tuple[Key, str]]]:
    """A table with errors, as far as it validated, and the cross-field mistakes pydantic did not
    look for. `locs` are its error locations, relative to it.

    pydantic runs a table's checks only when all its fields validate; here they run over the
    fields that did (each validated on its own, or its default), a failed sub-table taking part
    as a `Table.partial` of its own good fields, built the same way. A check reading a field that
    failed meets `Unvalidated` and is skipped (see `failures`). Returns None for the table when
    there is nothing to build: it is missing, or not a TOML table at all.
    """
    if not isinstance(raw, dict):
        return None, []
    mistakes: list[tuple[Key, str]] = []
    fields = {}
    for name, field in table.model_fields.items():
        inner = [loc[1:] for loc in locs if loc[:1] == (name,)]
        sub = _unwrap(field.annotation)
        if not inner:
            fields[name] = (_adapter(field.annotation).validate_python(raw[name]) if name in raw
                            else field.get_default(call_default_factory=True))
        elif isinstance(sub, type) and issubclass(sub, Table):
            part, found = _unchecked(sub, raw.get(name), inner, at + (name,))
            mistakes += found
            if part is not None:
                fields[name] = part
    # Errors only at the table itself (loc ()) are its own checks': every field validated, pydantic
    # ran them and reports them. Any other error skipped them, so they run here: once either way.
    if any(loc != () for loc in locs):
        mistakes += [(at + tuple(key.split(".")), message) for key, message in failures(table._checks, fields)]
    return table.partial(fields), mistakes


@functools.cache
def _adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


def _problems(errors: list[dict], mistakes: list[tuple[Key, str]], origins: dict[Key, Origin],
              display: str) -> list[Problem]:
    """pydantic's errors (grouped by key) and the cross-field mistakes (each its own), located."""
    grouped: dict[Key, list[dict]] = {}
    mistakes = list(mistakes)
    for err in errors:
        loc = _key_path(err["loc"])
        exc = (err.get("ctx") or {}).get("error")
        if isinstance(exc, Invalid):
            mistakes += [(loc + tuple(key.split(".")), message) for key, message in exc.problems]
        else:
            grouped.setdefault(loc, []).append(err)
    problems = [_problem(loc, _message(loc, errs), origins, display) for loc, errs in grouped.items()]
    problems += [_problem(loc, message, origins, display) for loc, message in mistakes]
    return sorted(problems, key=lambda p: (p.file != display, p.line or 0, p.key))


def _problem(loc: Key, message: str, origins: dict[Key, Origin], display: str) -> Problem:
    origin = _origin(origins, loc)
    if origin is None:
        return Problem(display, None, _dotted(loc), message)
    return Problem(origin.file, origin.line, _dotted(loc), message, origin.via)


def _key_path(loc: tuple) -> Key:
    """pydantic's loc without union-member tags: follow it along the spec's structure."""
    path: list = []
    node: typing.Any = Spec
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                if isinstance(part, str) and part.isidentifier():
                    path.append(part)  # an unknown key: keep it so the report names it
                break
            path.append(part)
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is list and isinstance(part, int):
            path.append(part)
            node = typing.get_args(node)[0]
        elif typing.get_origin(node) is dict and isinstance(part, str):
            path.append(part)
            node = typing.get_args(node)[1]
        else:
            break
    return tuple(path)


def _unwrap(annotation):
    """`X | None` -> X where one model or container is inside a union."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        structured = [a for a in args if (isinstance(a, type) and issubclass(a, BaseModel))
                      or typing.get_origin(a) in (list, dict)]
        if len(structured) == 1:
            return structured[0]
    return annotation


def _model_at(loc: Key):
    node: typing.Any = Spec
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) in (list, dict):
            node = typing.get_args(node)[-1]
        else:
            return None
    node = _unwrap(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _origin(origins: dict[Key, Origin], loc: Key) -> Origin | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return None


def _dotted(loc: Key) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
          "str": "a string", "dict": "a table", "model": "a table", "list": "an array", "tuple": "an array"}


def _found(value) -> str:
    toml_type = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return f"{value!r} ({toml_type.get(type(value), type(value).__name__)})"


def _message(loc: Key, errs: list[dict]) -> str:
    first = errs[0]
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f" (expected one of: {', '.join(names)})"
        return f"unknown key{hint}"
    if kind == "missing":
        model = _model_at(loc[:-1])
        field = model.model_fields.get(loc[-1]) if model else None
        what = f": {field.description}" if field and field.description else ""
        sub = _unwrap(field.annotation) if field else None
        if isinstance(sub, type) and issubclass(sub, Table):
            return f"required table [{_dotted(loc)}] is missing (expected a table{what})"
        return f"required key is missing (expected a value{what})"
    if kind in ("value_error", "assertion_error"):
        return str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
    expected = []
    for err in errs:
        t, ctx = err["type"], err.get("ctx") or {}
        if t == "literal_error":
            expected.append(f"one of {ctx.get('expected')}")
        elif t.endswith("_type") or t.endswith("_parsing"):
            base = t.rsplit("_", 1)[0]
            expected.append(_KINDS.get(base, base))
        elif t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[t]
            expected.append(f"a value {op} {next(iter(ctx.values()))}")
        elif t in ("too_short", "too_long", "string_too_short", "string_too_long"):
            expected.append(err["msg"].replace("should", "to").lower())
        else:
            expected.append(err["msg"])
    return f"expected {' or '.join(dict.fromkeys(expected))}, found {_found(first.get('input'))}"
