"""Where each key of a TOML document is written: key path -> line number.

tomllib gives values, not positions, so errors could not point at a line. This scanner reads the
same text line by line and records where every table header and `key = value` starts. It only
locates; parsing (and rejecting bad TOML) stays with tomllib.
"""

import re

Key = tuple  # a key path: ("model", "moe", "top_k") or ("data", "sources", 0, "path")

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_PART = rf"\s*(?:{_BARE}|{_QUOTED})\s*"
_DOTTED = rf"{_KEY_PART}(?:\.{_KEY_PART})*"
_HEADER = re.compile(rf"^\s*\[(\[)?({_DOTTED})\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})=")
_PART = re.compile(rf"{_BARE}|{_QUOTED}")


def _split(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in _PART.findall(dotted))


def key_lines(text: str) -> dict[Key, int]:
    """Map every table and key path in `text` to the 1-based line where it is defined."""
    lines: dict[Key, int] = {}
    prefix: Key = ()
    array_counts: dict[Key, int] = {}
    depth = 0          # open brackets/braces of a multi-line value
    in_string = None   # the delimiter of an open multi-line string
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        if depth > 0:
            depth += _balance(line)
            continue
        header = _HEADER.match(line)
        if header:
            path = _split(header.group(2))
            if header.group(1):  # [[array.of.tables]]
                index = array_counts.get(path, 0)
                array_counts[path] = index + 1
                lines.setdefault(path, number)
                path = path + (index,)
            prefix = path
            lines[prefix] = number
            continue
        assign = _ASSIGN.match(line)
        if assign:
            lines[prefix + _split(assign.group(1))] = number
            value = line[assign.end():]
            for delim in ('"""', "'''"):
                if value.count(delim) % 2:
                    in_string = delim
            if not in_string:
                depth = max(0, _balance(value))
    return lines


def _balance(text: str) -> int:
    text = re.sub(_QUOTED, "", text.split("#", 1)[0] if '"' not in text and "'" not in text else text)
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def nearest_line(lines: dict[Key, int], path: Key) -> int | None:
    """The line of `path`, or of its closest ancestor that is written in the file."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
