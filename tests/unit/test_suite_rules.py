"""The suite's own layout (tests/README.md): every test module sits in a tier, and test modules share code
through tests/conftest.py and tests/helpers/ only, never by importing another test module or benchmarks/."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration")
SHARED = ("tests.conftest", "tests.helpers")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def allowed(name: str) -> bool:
    top = name.split(".")[0]
    if top == "benchmarks":
        return False
    return top != "tests" or any(name == s or name.startswith(s + ".") for s in SHARED)


def test_every_test_module_is_in_a_tier() -> None:
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) >= 20
    assert [str(p.relative_to(TESTS)) for p in modules if p.relative_to(TESTS).parts[0] not in TIERS] == []
    assert all(list((TESTS / tier).glob("test_*.py")) for tier in TIERS)


def test_tests_import_neither_benchmarks_nor_each_other() -> None:
    bad = [
        f"{path.relative_to(TESTS)}:{line} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, name in imported(path)
        if not allowed(name)
    ]
    assert bad == []


def test_the_rule_tells_shared_code_from_test_modules(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "from tests.integration.test_parallelize import measure\n"
        "import benchmarks.chaos_drill\n"
        "from tests.helpers.distributed import torchrun\n"
        "from tests.conftest import make_seq\n"
    )
    assert [(name, allowed(name)) for _, name in imported(probe)] == [
        ("tests.integration.test_parallelize", False),
        ("benchmarks.chaos_drill", False),
        ("tests.helpers.distributed", True),
        ("tests.conftest", True),
    ]
