"""The layering rules of the source tree, checked on the imports (parsed with `ast`, function-local ones too):

    model/           the network; imports nothing distributed, nothing from jobs/ and from pipeline/ only
                     pipeline.features (the batch keys: plain constants), so importing it loads no pyarrow
    pipeline/features.py  the names the data path and the model share
    pipeline/data/   the data path; imports neither model/ nor pipeline.train
    pipeline/train/  the training path (may import both)
    serving/         inference: loads checkpoints through model/ and pipeline/; imports nothing of jobs/
    jobs/            launchers: training only through the command line (the jobs/cli/ package); models
                     through serving/
Neither model/ nor pipeline/ imports serving/ or jobs/, and the `fuxi` argparse parser is built in
exactly one package (jobs/cli/).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "pipeline", "serving", "jobs")
DISTRIBUTED = (
    "torch.distributed",
    "torchrec.distributed",
    "pipeline.train.parallelize",
    "pipeline.train.builder",
    "pipeline.train.distributed",
)
# what jobs/ (other than the CLI) may import from the layers below (and all of serving/)
JOBS_MAY_IMPORT = (
    "pipeline.train.config",
    "pipeline.train.presets",
    "pipeline.train.tracking",
    "pipeline.data.schema",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in the file, at any depth; `from X import Y`
    yields X and X.Y (Y may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(folders: tuple[str, ...], bad) -> list[str]:
    out = []
    for path in sources(*folders):
        for line, name in imports(path):
            if bad(name):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


def test_the_sources_are_where_the_rules_look() -> None:
    assert (
        len(sources("model")) >= 5
        and len(sources("pipeline/data")) >= 10
        and len(sources("pipeline/train")) >= 8
        and len(sources("serving")) >= 6
        and len(sources("jobs/cli")) >= 5
    )
    assert sorted(p.name for p in (ROOT / "pipeline").glob("*.py")) == ["__init__.py", "features.py"], (
        "pipeline/ holds data/, train/ and the shared feature names"
    )


def test_data_path_imports_neither_model_nor_training() -> None:
    assert violations(("pipeline/data",), lambda n: under(n, "model") or under(n, "pipeline.train")) == []


# all that model/ may import from pipeline/ (`from pipeline.features import X` also yields "pipeline")
MODEL_MAY_IMPORT = ("pipeline", "pipeline.features")


def test_model_imports_nothing_distributed_and_only_the_feature_names_from_pipeline() -> None:
    def bad(name: str) -> bool:
        if any(under(name, d) for d in DISTRIBUTED):
            return True
        return (
            under(name, "pipeline") and name not in MODEL_MAY_IMPORT and not under(name, MODEL_MAY_IMPORT[1])
        )

    assert violations(("model",), bad) == []
    assert violations(("model",), lambda n: under(n, "jobs") or under(n, "serving")) == []


def test_importing_the_model_loads_no_data_path() -> None:
    """Every model module, imported in a fresh interpreter, loads neither pyarrow nor any of pipeline/ but
    the feature names (what the import rules above promise, including what their imports import)."""
    modules = [module_name(p) for p in sources("model")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'pipeline', 'jobs')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert len(modules) >= 5
    assert out.stdout.strip().splitlines()[-1] == str(sorted(MODEL_MAY_IMPORT))


def test_the_config_tree_imports_no_other_training_module() -> None:
    """pipeline/train/config.py is the bottom of the training path: presets and recipes import it, never
    the other way round (no import circle)."""
    path = ROOT / "pipeline" / "train" / "config.py"
    assert [n for _, n in imports(path) if under(n, "pipeline.train")] == []


MAX_MODEL_FILE_LINES = 500  # a model file a reader can hold in mind; split by role beyond it


def test_no_model_file_is_over_the_line_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources("model")
        if (n := len(p.read_text().splitlines())) > MAX_MODEL_FILE_LINES
    }
    assert long == {}, f"over {MAX_MODEL_FILE_LINES} lines: {long}"


def test_training_and_data_import_neither_serving_nor_jobs() -> None:
    assert violations(("pipeline",), lambda n: under(n, "jobs") or under(n, "serving")) == []


def test_serving_does_not_import_jobs() -> None:
    assert violations(("serving",), lambda n: under(n, "jobs")) == []


def test_jobs_call_training_only_through_the_cli_and_models_through_serving() -> None:
    def bad(name: str) -> bool:
        if under(name, "model"):
            return True
        return (
            under(name, "pipeline")
            and name not in ("pipeline", "pipeline.train", "pipeline.data")
            and not any(under(name, ok) for ok in JOBS_MAY_IMPORT)
        )

    paths = [p for p in sources("jobs") if (ROOT / "jobs" / "cli") not in p.parents]
    out = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in paths
        for line, name in imports(p)
        if bad(name)
    ]
    assert out == []


def _builds_a_parser(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("add_subparsers", "add_parser")
        ):
            return True
        if isinstance(node, ast.Call) and any(
            k.arg == "prog" and isinstance(k.value, ast.Constant) and k.value.value == "fuxi"
            for k in node.keywords
        ):
            return True
    return False


def test_one_package_builds_the_fuxi_parser() -> None:
    builders = [
        str(p.relative_to(ROOT)) for p in sources(*PACKAGES, "benchmarks", "scripts") if _builds_a_parser(p)
    ]
    groups = ["data", "jobs", "serving", "train"]
    assert builders == ["jobs/cli/__init__.py"] + [f"jobs/cli/{g}.py" for g in groups]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fuxi"] == "jobs.cli:main"


@pytest.mark.parametrize("path", ["pipeline/cli.py", "pipeline/train.py", "pipeline/data.py"])
def test_old_modules_are_gone(path: str) -> None:
    assert not (ROOT / path).exists()


def test_no_stale_module_paths_in_commands() -> None:
    """Module paths in subprocess commands, TorchX components and docs follow the layout."""
    stale = ("-m pipeline.cli", '"pipeline.cli"', "pipeline.cli:", "from pipeline.cli", "python -m pipeline ")
    # inference moved from jobs/ and pipeline/train/ to serving/
    stale += ("pipeline.train.loading", "pipeline/train/loading", "jobs.serving", "jobs/serving.py")
    stale += tuple(f"jobs{sep}{m}" for sep in "./" for m in ("recommend", "item_index", "export", "registry"))
    skip = {"runs", "data", "mlruns", "__pycache__", "build", "dist"}
    hits = []
    for folder, dirs, names in os.walk(ROOT):
        top = Path(folder) == ROOT
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d != "__pycache__"
            and not d.endswith(".egg-info")  # written by the editable install, from the README
            and not (top and d in skip)
        ]
        for name in names:
            path = Path(folder) / name
            if (
                path.suffix in {".py", ".md", ".sh", ".toml", ".yaml", ""}
                and path != Path(__file__).resolve()
            ):
                text = path.read_text(errors="ignore")
                hits += [f"{path.relative_to(ROOT)}: {s}" for s in stale if s in text]
    assert hits == []
