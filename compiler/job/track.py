"""A small record of submitted jobs (.llmc/jobs.jsonl in the submitting directory).

TorchX's local scheduler knows a job only inside the process that launched it, and TorchX cannot
list local jobs; this record lets `llmc status/logs/cancel/list` answer for them from another
shell (final state, log folder, the launching process). It also remembers each job's run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RECORD = Path(".llmc") / "jobs.jsonl"


def record(handle: str, **fields) -> None:
    """Append what is known about `handle` now (later lines win)."""
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    with RECORD.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"handle": handle, "time": time.time(), **fields}) + "\n")


def jobs() -> dict[str, dict]:
    """handle -> everything recorded about it, merged in order."""
    out: dict[str, dict] = {}
    if not RECORD.exists():
        return out
    for line in RECORD.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line cut short by a crash
        out.setdefault(entry["handle"], {}).update(entry)
    return out


def lookup(handle: str) -> dict:
    return jobs().get(handle, {})
