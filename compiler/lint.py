"""`llmc lint` and `llmc schema`: check specs for CI and editors."""

import json
import sys
from pathlib import Path

from .errors import UserError
from .spec import Problem, Spec, SpecError, load_spec

SCHEMA_ID = "https://llmc.dev/schema/spec-v1.json"


def spec_schema() -> dict:
    """The JSON Schema of a spec, generated from the pydantic models (every field described)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "llmc spec"
    return schema


def find_specs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.toml") if ".llmc" not in p.parts)
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{raw}: no such file or folder")
    if not found:
        raise UserError(f"no .toml specs under {' '.join(paths)}")
    return found


def lint(paths: list[str], overrides: list[str] = ()) -> tuple[list[Path], list[Problem], list[Problem]]:
    """(the specs found, their problems, the warnings of those that loaded)."""
    specs = find_specs(paths)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    for path in specs:
        if _is_preset(path):
            continue
        try:
            warnings += load_spec(path, overrides).warnings
        except SpecError as e:
            problems += e.problems
    return specs, problems, warnings


def _is_preset(path: Path) -> bool:
    """Presets are fragments that specs extend; they are checked through the specs that use them."""
    return "presets" in path.parts


def main(args) -> int:
    """Problems fail (exit 1); warnings are said and do not."""
    specs, problems, warnings = lint(args.paths, args.overrides)
    if args.format == "json":
        print(json.dumps({"specs": [str(p) for p in specs], "problems": [p.to_dict() for p in problems],
                          "warnings": [w.to_dict() for w in warnings]}, indent=2))
    elif args.format == "github":
        for level, found in (("error", problems), ("warning", warnings)):
            for p in found:
                line = f",line={p.line}" if p.line else ""
                message = f"{p.key}: {p.message}" if p.key else p.message
                print(f"::{level} file={p.file}{line},title=llmc lint::{_escape(message)}")
    else:
        for p in problems:
            print(p)
        for w in warnings:
            print(f"warning: {w}")
        checked = sum(not _is_preset(p) for p in specs)
        print(f"{checked} spec{'s' if checked != 1 else ''} checked, "
              f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
              + (f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""), file=sys.stderr)
    return 1 if problems else 0


def _escape(text: str) -> str:
    # GitHub workflow-command escaping of a message.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def schema_main(args) -> int:
    text = json.dumps(spec_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
