"""Every relative path that the docs and the code comments name exists in the repo.

What counts as a named path:
- the target of a Markdown link `[text](target)` in a tracked .md file, resolved against that file's
  folder (web links, mail links and in-page anchors are not paths);
- a path in prose: in tracked .md files, in the comments and docstrings of tracked .py files, and in the
  Makefile, shell scripts, TOML and YAML files. A prose path starts with a top-level folder of the repo
  (`model/`, `docs/`, ...) or with `./` or `../`, runs while the characters can be part of a file name
  here (letters, digits, `_ . - /`), and is resolved against the repo root.
A path passes when it stays inside the repo and exists there. A path cut short by a placeholder or a glob
(`docs/quality/tune_ml100k-{fuxi,hstu}.md`, `runs/<name>`, `tests/assets/losses/*.txt`) and an output
stem (`--out docs/quality/generic` writes generic.md, generic.json, ...) pass when some tracked file's
path starts with them. Paths git ignores (`runs/`, `mlflow.db`, `benchmarks/results/`) are outputs a run
writes, not files the repo ships, and are not checked.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROSE_SUFFIXES = {".md", ".toml", ".yaml", ".yml", ".sh"}
PROSE_NAMES = {"Makefile", "run"}  # .ci/run
MD_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CUT = "{<*$"  # a path followed by one of these is a stem of a pattern
# Paths that the docs show as hostile input, not as references: the checkpoint loader refuses them.
EXAMPLES = {("docs/RELIABILITY.md", "../x"), ("docs/RELIABILITY.md", "../../secret.distcp")}


def git(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, input=stdin, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr  # check-ignore answers 1 when nothing is ignored
    return out.stdout


@functools.cache
def tracked() -> tuple[str, ...]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    return tuple(p for p in git("ls-files").splitlines() if (ROOT / p).is_file())


def python_prose(text: str) -> str:
    """The comments and docstrings of a Python file."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    parts = [t.string for t in tokens if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


@functools.cache
def named_paths() -> tuple[tuple[str, str, str, bool], ...]:
    """(file, the path as written, the path relative to the root, whether it is a stem) for every path
    that a tracked file names."""
    files = tracked()
    tops = sorted({p.split("/", 1)[0] for p in files if "/" in p}, key=len, reverse=True)
    prose = re.compile(
        rf"(?<![\w./-])((?:\.\.?/)+[\w.-][\w./-]*|(?:{'|'.join(map(re.escape, tops))})/[\w./-]*)"
    )
    found = []
    for name in files:
        path = ROOT / name
        if path.suffix == ".py":
            text = python_prose(path.read_text())
        elif path.suffix in PROSE_SUFFIXES or path.name in PROSE_NAMES:
            text = path.read_text()
        else:
            continue
        if path.suffix == ".md":
            for _, target in MD_LINK.findall(text):
                if not (re.match(r"[a-z]+:", target) or target.startswith("#")):
                    where = os.path.relpath(path.parent / target.split("#", 1)[0], ROOT)
                    found.append((name, target, where, False))
            text = MD_LINK.sub(r"\1", text)  # the targets are checked above, the link text stays prose
        for m in prose.finditer(text):
            written = m.group(1).rstrip(".")  # a full stop ending the sentence
            stem = m.end() < len(text) and text[m.end()] in CUT
            found.append((name, written, os.path.normpath(written), stem))
    return tuple(f for f in found if (f[0], f[1]) not in EXAMPLES)


def resolves(where: str, stem: bool) -> bool:
    if where.startswith(".."):
        return False  # outside the repo: not in a fresh clone
    if (ROOT / where).exists():
        return True
    prefix = where + ("" if stem else ".")  # an output stem names files like stem.json
    return any(p.startswith(prefix) for p in tracked())


def test_the_check_sees_paths_in_docs_code_and_the_makefile():
    kinds = {Path(name).suffix or Path(name).name for name, *_ in named_paths()}
    assert {".md", ".py", ".sh", "Makefile"} <= kinds, kinds
    written = {w for _, w, *_ in named_paths()}
    assert {"pipeline/data/synthetic.py", "docs/QUALITY.md"} <= written


def ignored(paths: list[str]) -> set[str]:
    """Those of the paths (inside the repo, not on disk) that git ignores; a pattern like `runs/` names
    folders, so each is asked with and without a trailing slash."""
    asked = "\n".join(p + end for p in paths if not p.startswith("..") for end in ("", "/"))
    return {p.rstrip("/") for p in git("check-ignore", "--no-index", "--stdin", stdin=asked).split()}


def test_every_named_path_exists_in_the_repo():
    unresolved = [f for f in named_paths() if not resolves(f[2], f[3])]
    outputs = ignored([where for _, _, where, _ in unresolved])
    missing = [f"{name}: {written}" for name, written, where, _ in unresolved if where not in outputs]
    assert not missing, "paths named but not in the repo:\n" + "\n".join(sorted(set(missing)))


def test_what_resolves():
    assert resolves("model/attention.py", False) and resolves("docs/quality/", False)
    assert not resolves("model/fast_ams.py", False)  # a file that is gone
    assert not resolves("../shared/docs/fuxi-reference.md", False)  # outside the repo
    assert resolves("docs/quality/generic", False)  # an output stem: generic.md, generic.json, ...
    assert not resolves("docs/quality/gener", False)  # not a stem, only a prefix
    assert resolves("docs/quality/tune_ml100k-", True)  # cut at a placeholder: tune_ml100k-{fuxi,...}
    assert ignored(["runs/demo/report.json", "benchmarks/results/x", "docs/gone.md"]) == {
        "runs/demo/report.json",
        "benchmarks/results/x",
    }
