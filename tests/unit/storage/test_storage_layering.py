"""storage/ sits below every other package: the data path, the trainer and serving import it, so it
imports none of them (checked on the parsed imports, function-local ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

STORAGE = Path(__file__).resolve().parents[3] / "storage"
FORBIDDEN = ("model", "pipeline", "jobs", "serving")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_storage_imports_no_project_layer_above_it() -> None:
    files = sorted(STORAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "uri.py", "fs.py", "commit.py", "errors.py", "dcp.py"}
    bad = {f"{f.name}: {name}" for f in files for name in _imports(f) if name.split(".")[0] in FORBIDDEN}
    assert not bad, sorted(bad)
