import os
from pathlib import Path

import pytest

# Tests share 2 cores with each other's subprocesses: keep torch's thread pools small.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def write_spec(tmp_path):
    """Write TOML text to a file in tmp_path and return its path."""
    def write(text: str, name: str = "spec.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
