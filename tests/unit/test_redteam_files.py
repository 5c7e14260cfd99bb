"""Red-team corpus, files: crafted model folders, checkpoint folders, pointers, item indexes, vocabularies,
train.json, copies and nightly dates against what serving loads (serving/trust.py, docs/RELIABILITY.md).

One row = one crafted input and its exact outcome: refused with one line (the full message is matched,
paths included), nothing executed (payloads create a marker file when run: it never appears), nothing
written outside the case's scratch folder. The genuine artifacts (tests/helpers/redteam.py) are built
once per module and copied per case; the genuine rows at the end show the checks accept them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.train.checkpoint import UnsafeCheckpointError
from serving.trust import TrustError
from storage.errors import ConfinementError, StorageError
from tests.helpers.redteam import (
    NUM_ITEMS,
    RAW_IDS,
    copy_tree,
    files_under,
    genuine_checkpoint,
    genuine_model_folder,
    payload_pickle,
    write_vocab,
)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("genuine")
    ckpt = genuine_checkpoint(base / "root")
    model = genuine_model_folder(ckpt, base / "model")
    return {"root": base / "root", "ckpt": ckpt, "model": model}


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message, repr(message)
    return message


def expect(message: str, pattern: str, **paths: Path) -> None:
    """`pattern` with {name} replaced by the escaped path must match the whole message."""
    regex = pattern
    for name, path in paths.items():
        regex = regex.replace("{" + name + "}", re.escape(str(path)))
    assert re.fullmatch(regex, message), f"\n{message}\n!~ {regex}"


# ---------------------------------------------------------------------------------------------------
# model folders: refused in one line before anything is imported from them


def _mlmodel(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        doc = yaml.safe_load((model / "MLmodel").read_text())
        edit(doc)
        (model / "MLmodel").write_text(yaml.safe_dump(doc))

    return mutate


def _pyfunc(**keys: object) -> Callable[[Path, Path], None]:
    return _mlmodel(lambda d: d["flavors"]["python_function"].update(keys))


def _code_dir(model: Path, marker: Path) -> None:
    """A code/ folder that would shadow the installed package (MLflow puts it first on sys.path)."""
    pkg = model / "code" / "serving"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pyfunc.py").write_text(f"open({str(marker)!r}, 'w')\n")


def _code_flavour(model: Path, marker: Path) -> None:
    _code_dir(model, marker)
    _pyfunc(code="code")(model, marker)


def _pickle_model(model: Path, marker: Path) -> None:
    (model / "python_model.pkl").write_bytes(payload_pickle(marker))

    def edit(doc: dict) -> None:  # what `mlflow.pyfunc.log_model(python_model=...)` writes
        flavour = doc["flavors"]["python_function"]
        flavour.pop("data")
        flavour.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
        flavour.update(cloudpickle_version="3.0")

    _mlmodel(edit)(model, marker)


def _code_path(model: Path, marker: Path) -> None:
    (model / "model.py").write_text(f"open({str(marker)!r}, 'w')\n")
    _mlmodel(lambda d: d.update(model_code_path="model.py"))(model, marker)


def _pyfunc_code_path(model: Path, marker: Path) -> None:
    _pyfunc(model_code_path="model.py")(model, marker)


def _yaml_tag(model: Path, marker: Path) -> None:
    (model / "MLmodel").write_text(f"flavors: !!python/object/apply:builtins.open [{str(marker)!r}, 'w']\n")


def _link(name: str, target: str | Path) -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        (model / name).unlink(missing_ok=True)
        (model / name).symlink_to(target)

    return mutate


def _write(name: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        path = model / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return mutate


def _in_ckpt(name: str, data: bytes | str = b"") -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        (ckpt,) = (model / "data").iterdir()
        path = ckpt / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return mutate


def _ckpt_link(name: str) -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        (ckpt,) = (model / "data").iterdir()
        secret = model.parent / "secret.json"
        secret.write_text("{}")
        (ckpt / name).unlink()
        (ckpt / name).symlink_to(secret)

    return mutate


def _fifo(name: str) -> Callable[[Path, Path], None]:
    def mutate(model: Path, marker: Path) -> None:
        (ckpt,) = (model / "data").iterdir()
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)  # reading it would block: it is refused unread

    return mutate


def _ckpt_elsewhere(model: Path, marker: Path) -> None:
    """data/<checkpoint> a link to a (genuine) checkpoint folder outside the model folder."""
    (ckpt,) = (model / "data").iterdir()
    shutil.move(ckpt, model.parent / "elsewhere")
    ckpt.symlink_to(model.parent / "elsewhere")


def _second_data(model: Path, marker: Path) -> None:
    (ckpt,) = (model / "data").iterdir()
    shutil.copytree(ckpt, model / "data" / "other")


MLMODEL = r"{model}/MLmodel: "
MODEL_CASES = [
    (
        "pickle-python-model",
        _pickle_model,
        MLMODEL + r"python_function\.cloudpickle_version is set; only "
        r"serving\.pyfunc with a data folder is served",
    ),
    (
        "stray-pickle",
        _write("python_model.pkl", b"x"),
        r"{model}/python_model\.pkl: unexpected file in a model folder",
    ),
    (
        "code-flavour",
        _code_flavour,
        MLMODEL + r"python_function\.code is set; code is never loaded from a model folder",
    ),
    ("code-dir-shadow", _code_dir, r"{model}/code: unexpected folder in a model folder"),
    (
        "model-code-path",
        _code_path,
        MLMODEL + r"unexpected key 'model_code_path'; refusing to load this model",
    ),
    (
        "pyfunc-code-path",
        _pyfunc_code_path,
        MLMODEL + r"python_function\.model_code_path is set; only serving\.pyfunc "
        r"with a data folder is served",
    ),
    (
        "artifacts",
        _pyfunc(artifacts={"a": "x"}),
        MLMODEL + r"python_function\.artifacts is set; only serving\.pyfunc "
        r"with a data folder is served",
    ),
    (
        "model-config",
        _pyfunc(model_config={"a": 1}),
        MLMODEL + r"python_function\.model_config is set; only "
        r"serving\.pyfunc with a data folder is served",
    ),
    (
        "other-flavour",
        _mlmodel(lambda d: d["flavors"].update(pytorch={"model_data": "data"})),
        MLMODEL + r"flavour 'pytorch'; only python_function \(serving\.pyfunc\) is served",
    ),
    ("no-pyfunc", _mlmodel(lambda d: d.update(flavors={})), MLMODEL + r"no python_function flavour"),
    ("loader-os", _pyfunc(loader_module="os"), MLMODEL + r"loader_module 'os', expected serving\.pyfunc"),
    (
        "loader-mlflow-model",
        _pyfunc(loader_module="mlflow.pyfunc.model"),
        MLMODEL + r"loader_module 'mlflow\.pyfunc\.model', expected serving\.pyfunc",
    ),
    (
        "data-dotdot",
        _pyfunc(data="data/../../etc"),
        MLMODEL + r"data 'data/\.\./\.\./etc', expected data/<checkpoint folder name>",
    ),
    ("data-absolute", _pyfunc(data="/etc"), MLMODEL + r"data '/etc', expected data/<checkpoint folder name>"),
    (
        "data-list",
        _pyfunc(data=["data"]),
        MLMODEL + r"data \"\['data'\]\", expected data/<checkpoint folder name>",
    ),
    (
        "yaml-python-tag",
        _yaml_tag,
        MLMODEL + r"not YAML \(could not determine a constructor for the tag "
        r"'tag:yaml\.org,2002:python/object/apply:builtins\.open'.*\)",
    ),
    ("yaml-broken", _write("MLmodel", "flavors: [\n"), MLMODEL + r"not YAML \(.*\)"),
    ("yaml-list", _write("MLmodel", "- 1\n"), MLMODEL + r"expected a mapping with flavors"),
    ("mlmodel-huge", _write("MLmodel", "a: " + "x" * 70_000), MLMODEL + r"70003 bytes, at most 65536"),
    ("mlmodel-link", _link("MLmodel", "/etc/hostname"), r"{model}: no MLmodel file; not a model folder"),
    (
        "sitecustomize",
        _write("sitecustomize.py", "import os"),
        r"{model}/sitecustomize\.py: unexpected file in a model folder",
    ),
    (
        "requirements-link",
        _link("requirements.txt", "/etc/hostname"),
        r"{model}/requirements\.txt: a link; a model "
        r"folder holds only plain files",
    ),
    (
        "checkpoint-link-outside",
        _ckpt_elsewhere,
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+: a link; a model folder holds only plain files",
    ),
    ("second-data", _second_data, r"{model}/data: expected only gen-[0-9TZ]+-[0-9a-f]+/, found \[.*\]"),
    (
        "ckpt-python-file",
        _in_ckpt("evil.py", "import os"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/evil\.py: unexpected file "
        r"in a checkpoint folder \(expected \.metadata, \*\.distcp, train\.json, vocab\.parquet, "
        r"item_index\.faiss, item_index\.json\)",
    ),
    (
        "ckpt-pickle",
        _in_ckpt("extra.pkl", b"\x80\x04."),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/extra\.pkl: unexpected file in "
        r"a checkpoint folder \(.*\)",
    ),
    (
        "ckpt-subfolder",
        _in_ckpt("code/x.py", "x"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/code: unexpected folder in a "
        r"checkpoint folder \(.*\)",
    ),
    (
        "ckpt-odd-shard",
        _in_ckpt("evil.distcp", b"x"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/evil\.distcp: unexpected file in "
        r"a checkpoint folder \(.*\)",
    ),
    (
        "ckpt-train-json-link",
        _ckpt_link("train.json"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/train\.json: a link; a "
        r"checkpoint folder holds only plain files",
    ),
    (  # a crafted name's newline and terminal escapes are written escaped: the message stays one line
        "file-name-newline",
        _write("evil\nfuxi: ok", "x"),
        r"{model}/evil\\nfuxi: ok: unexpected file in a model folder",
    ),
    ("file-name-escape", _write("a\x1b[2Jb", "x"), r"{model}/a\\x1b\[2Jb: unexpected file in a model folder"),
    (
        "ckpt-file-name-newline",
        _in_ckpt("x\ny", "x"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/x\\ny: unexpected file in a checkpoint folder \(.*\)",
    ),
    (
        "ckpt-fifo",
        _fifo("item_index.json"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/item_index\.json: not a plain file",
    ),
    (
        "ckpt-vocab-link",
        _ckpt_link("vocab.parquet"),
        r"{model}/data/gen-[0-9TZ]+-[0-9a-f]+/vocab\.parquet: a link; a "
        r"checkpoint folder holds only plain files",
    ),
]


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_folder_refused(genuine: dict, tmp_path: Path, mutate: Callable, pattern: str) -> None:
    from serving.recommend import resolve_model

    model = copy_tree(genuine["model"], tmp_path / "model")
    marker = tmp_path / "marker"
    mutate(model, marker)
    before = files_under(tmp_path)
    with pytest.raises(TrustError) as err:
        resolve_model(str(model))  # what fuxi serve / recommend / index / export resolve a --model with
    expect(one_line(err.value), pattern, model=model)
    assert not marker.exists() and files_under(tmp_path) == before


def test_stock_mlflow_runs_a_crafted_model_ours_refuses_it(genuine: dict, tmp_path: Path) -> None:
    """The hazard is real: `mlflow.pyfunc.load_model` unpickles python_model.pkl (the marker appears)."""
    import subprocess
    import sys

    model = copy_tree(genuine["model"], tmp_path / "model")
    marker = tmp_path / "marker"
    _pickle_model(model, marker)
    code = f"import mlflow.pyfunc\ntry: mlflow.pyfunc.load_model({str(model)!r})\nexcept Exception: pass"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------
# checkpoint folders and pointers given as --model


def _root_case(mutate: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    return mutate


def _final_outside(root: Path, ckpt: Path) -> None:
    outside = root.parent / "elsewhere"
    shutil.copytree(ckpt, outside)
    (root / "final").unlink()
    (root / "final").symlink_to(outside)


def _latest(name: str) -> Callable[[Path, Path], None]:
    def mutate(root: Path, ckpt: Path) -> None:
        (root / "final").unlink()
        (root / "latest").write_text(name)

    return mutate


def _metadata_outside(root: Path, ckpt: Path) -> None:
    import pickle

    from pipeline.train.checkpoint import read_dcp_metadata

    metadata = read_dcp_metadata(ckpt)
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret.distcp"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def _metadata_payload(root: Path, ckpt: Path) -> None:
    marker = root.parent / "marker"
    (ckpt / ".metadata").write_bytes(payload_pickle(marker))


def _metadata_link(root: Path, ckpt: Path) -> None:
    (root.parent / "meta").write_bytes((ckpt / ".metadata").read_bytes())
    (ckpt / ".metadata").unlink()
    (ckpt / ".metadata").symlink_to(root.parent / "meta")


def _no_metadata(root: Path, ckpt: Path) -> None:
    (ckpt / ".metadata").unlink()


def _no_shard(root: Path, ckpt: Path) -> None:
    for shard in ckpt.glob("*.distcp"):
        shard.unlink()


POINTER_CASES = [
    (
        "final-outside-root",  # the checkpointer refuses the pointer before serving sees a folder
        _final_outside,
        UnsafeCheckpointError,
        r"{root}: pointer = 'final' is a link that leads outside \(.*/elsewhere\); names must stay inside it",
    ),
    (
        "latest-absolute",
        _latest("/etc"),
        ValueError,
        r"{root}/latest: names '/etc'; `latest` may only name a step-N checkpoint in its root",
    ),
    (
        "latest-dotdot",
        _latest("../other/step-000004"),
        ValueError,
        r"{root}/latest: names '\.\./other/step-000004'; `latest` may only name a step-N checkpoint in "
        r"its root",
    ),
    (
        "latest-final",
        _latest("final"),
        ValueError,
        r"{root}/latest: names 'final'; `latest` may only name a step-N checkpoint in its root",
    ),
    (
        "metadata-escapes",
        _metadata_outside,
        ValueError,
        r"{ckpt}/\.metadata: storage entry '\.\./\.\./secret\.distcp' is not a \.distcp file in the folder",
    ),
    (
        "metadata-payload",
        _metadata_payload,
        ValueError,
        r"{ckpt}/\.metadata: refusing to load (builtins|io)\.open: DCP metadata may name only checkpoint "
        r"metadata classes \(this file was not written by torch\.distributed\.checkpoint\)",
    ),
    (
        "metadata-link",  # the storage layer refuses a name that leaves the folder
        _metadata_link,
        ConfinementError,
        r"{ckpt}: checkpoint = '\.metadata' is a link that leads outside \(.*/meta\); "
        r"names must stay inside it",
    ),
    ("no-shard", _no_shard, TrustError, r"{ckpt}: no \*\.distcp shard; not a complete checkpoint"),
    (
        "latest-nul",
        _latest("step-000004\x00"),
        ValueError,
        r"{root}/latest: names 'step-000004\\x00'; `latest` may only name a step-N checkpoint in its root",
    ),
    (
        "latest-newline-dotdot",
        _latest("step-000004\n../x"),
        ValueError,
        r"{root}/latest: names 'step-000004\\n\.\./x'; `latest` may only name a step-N checkpoint in its "
        r"root",
    ),
    (
        "latest-2M-digits",
        _latest("step-" + "0" * 2_000_000 + "4"),
        StorageError,
        r"{root}/latest: larger than 65,536 bytes; refused unread",
    ),
    (
        "latest-arabic-digit",
        _latest("step-\u0664"),
        ValueError,
        r"{root}/latest: names 'step-\u0664'; `latest` may only name a step-N checkpoint in its root",
    ),
    (
        "latest-fifo",
        lambda root, ckpt: ((root / "final").unlink(), os.mkfifo(root / "latest")),
        FileNotFoundError,
        r"{root} is neither a checkpoint nor a folder with a complete checkpoint",
    ),
    (
        "final-link-loop",
        lambda root, ckpt: ((root / "final").unlink(), (root / "final").symlink_to("final")),
        FileNotFoundError,
        r"{root} is neither a checkpoint nor a folder with a complete checkpoint",
    ),
    (
        "final-not-a-pointer",
        lambda root, ckpt: ((root / "final").unlink(), (root / "final").write_text(ckpt.name)),
        ValueError,
        r"{root}/final: not a pointer object \(Expecting value: line 1 column 1 \(char 0\)\)",
    ),
]


@pytest.mark.parametrize(
    "mutate, error, pattern", [c[1:] for c in POINTER_CASES], ids=[c[0] for c in POINTER_CASES]
)
def test_checkpoint_pointer_refused(
    genuine: dict, tmp_path: Path, mutate: Callable, error: type, pattern: str
) -> None:
    from serving.loading import load_checkpoint_model

    root = copy_tree(genuine["root"], tmp_path / "root")
    ckpt = root / genuine["ckpt"].name
    mutate(root, ckpt)
    before = files_under(tmp_path)
    with pytest.raises(error) as err:
        load_checkpoint_model(root if "metadata" not in pattern and "shard" not in pattern else ckpt)
    expect(one_line(err.value), pattern, root=root, ckpt=ckpt, real=root.resolve())
    assert not (tmp_path / "marker").exists() and files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# item indexes


def _index(ckpt: Path, items: np.ndarray, kind: str = "hnsw", metric: str = "ip", **meta: object) -> None:
    import faiss

    from serving.item_index import build_index, write_index

    if metric == "l2":
        index = faiss.IndexHNSWFlat(items.shape[1], 8)
        index.add(np.ascontiguousarray(items, dtype=np.float32))
    else:
        index = build_index(items, kind, m=8, ef_construction=40, nlist=4)
    write_index(index, ckpt, {"kind": kind, "rows": items.shape[0], "dim": items.shape[1], **meta})


def _set_meta(**meta: object) -> Callable[[Path, np.ndarray], None]:
    def mutate(ckpt: Path, items: np.ndarray) -> None:
        doc = json.loads((ckpt / "item_index.json").read_text())
        doc.update(meta)
        (ckpt / "item_index.json").write_text(json.dumps(doc))

    return mutate


def _bad_graph(ckpt: Path, items: np.ndarray) -> None:
    import faiss

    index = faiss.read_index(str(ckpt / "item_index.faiss"))
    neighbors = faiss.vector_to_array(index.hnsw.neighbors)
    neighbors[5] = 10**6  # a neighbour id far past the rows: faiss would read out of bounds
    faiss.copy_array_to_vector(neighbors, index.hnsw.neighbors)
    faiss.write_index(index, str(ckpt / "item_index.faiss"))


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path, np.ndarray], None]:
    def mutate(ckpt: Path, items: np.ndarray) -> None:
        path = ckpt / "item_index.faiss"
        path.write_bytes(edit(path.read_bytes()))

    return mutate


def _flat_index(ckpt: Path, items: np.ndarray) -> None:
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    faiss.write_index(index, str(ckpt / "item_index.faiss"))


def _unlink(name: str) -> Callable[[Path, np.ndarray], None]:
    return lambda ckpt, items: (ckpt / name).unlink()


def _index_link(ckpt: Path, items: np.ndarray) -> None:
    (ckpt.parent / "idx").write_bytes((ckpt / "item_index.faiss").read_bytes())
    (ckpt / "item_index.faiss").unlink()
    (ckpt / "item_index.faiss").symlink_to(ckpt.parent / "idx")


rng = np.random.default_rng(0)
IDX = r"{ckpt}/item_index\.faiss: "
META = r"{ckpt}/item_index\.json: "
INDEX_CASES = [
    (
        "dim-differs",
        lambda c, x: _index(c, x[:, :8]),
        META + r"an index of 201 rows x 8, the item table is 201 x 16",
    ),
    (
        "rows-differ",
        lambda c, x: _index(c, x[:150]),
        META + r"an index of 150 rows x 16, the item table is 201 x 16",
    ),
    (
        "meta-lies-dim",
        lambda c, x: (_index(c, x[:, :8]), _set_meta(dim=16)(c, x)),
        IDX + r"holds 201 rows x 8, item_index\.json says 201 x 16",
    ),
    (
        "meta-lies-rows",
        lambda c, x: (_index(c, x[:150]), _set_meta(rows=201)(c, x)),
        IDX + r"holds 150 rows x 16, item_index\.json says 201 x 16",
    ),
    (
        "other-vectors",
        lambda c, x: _index(c, rng.standard_normal(x.shape).astype(np.float32)),
        IDX + r"its vectors are not the item table's rows \(max difference [0-9.e+-]+\)",
    ),
    (
        "nan-vectors",
        lambda c, x: _index(c, np.full(x.shape, np.nan, np.float32)),
        IDX + r"its vectors are not the item table's rows \(max difference inf\)",
    ),
    ("l2-metric", lambda c, x: _index(c, x, metric="l2"), IDX + r"is not an inner-product index"),
    (
        "graph-out-of-range",
        _bad_graph,
        IDX + r"not a readable faiss index \('id >= -1 && id < \(int\)ntotal' failed: "
        r"HNSW neighbors\[5\] = 1000000 out of range \[-1, 201\)\)",
    ),
    ("truncated", _bytes(lambda b: b[: len(b) // 2]), IDX + r"not a readable faiss index \(.*read error.*\)"),
    (
        "garbage-after-header",
        _bytes(lambda b: b[:4] + bytes(rng.integers(0, 256, 5000, dtype=np.uint8))),
        IDX + r"not a readable faiss index \(.*\)",
    ),
    ("flat-kind", _flat_index, IDX + r"header b'IxFI' is not a faiss hnsw index \(b'IHNf'\)"),
    (
        "ivf-says-hnsw",
        lambda c, x: (_index(c, x, "ivf"), _set_meta(kind="hnsw")(c, x)),
        IDX + r"header b'IwFl' is not a faiss hnsw index \(b'IHNf'\)",
    ),
    ("kind-pq", _set_meta(kind="pq"), META + r"kind 'pq', expected one of hnsw, ivf"),
    ("rows-string", _set_meta(rows="201"), META + r"rows '201', expected a positive integer"),
    ("dim-bool", _set_meta(dim=True), META + r"dim 'True', expected a positive integer"),
    (
        "meta-missing",
        _unlink("item_index.json"),
        META + r"missing or not a plain file \(an index needs item_index\.faiss and item_index\.json\)",
    ),
    (
        "meta-not-json",
        lambda c, x: (c / "item_index.json").write_text("{kind: hnsw"),
        META + r"not valid JSON \(JSONDecodeError: .*\)",
    ),
    (
        "meta-nan",
        lambda c, x: (c / "item_index.json").write_text('{"kind": "hnsw", "rows": NaN}'),
        META + r"not valid JSON \(ValueError: NaN is not JSON\)",
    ),
    (
        "meta-20MiB",
        lambda c, x: (c / "item_index.json").write_text(
            '{"kind": "hnsw", "pad": "' + "x" * (20 << 20) + '"}'
        ),
        META + r"209715\d\d bytes, at most 65536",
    ),
    (
        "meta-duplicate-key",
        lambda c, x: (c / "item_index.json").write_text('{"kind": "hnsw", "rows": 201, "dim": 16, "dim": 8}'),
        META + r"not valid JSON \(ValueError: duplicate key 'dim'\)",
    ),
    ("rows-2^40", _set_meta(rows=2**40), META + r"rows '1099511627776', expected a positive integer"),
    ("dim-negative", _set_meta(dim=-16), META + r"dim '-16', expected a positive integer"),
    ("kind-nul", _set_meta(kind="hnsw\x00"), META + r"kind 'hnsw\\x00', expected one of hnsw, ivf"),
    ("meta-list", lambda c, x: (c / "item_index.json").write_text("[1]"), META + r"expected a JSON object"),
    (
        "index-link",
        _index_link,
        IDX + r"missing or not a plain file \(an index needs item_index\.faiss and "
        r"item_index\.json\)",
    ),
]


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_item_index_refused(genuine: dict, tmp_path: Path, mutate: Callable, pattern: str) -> None:
    from serving.item_index import read_index
    from serving.loading import load_checkpoint_model

    ckpt = copy_tree(genuine["ckpt"], tmp_path / "ckpt")
    items = load_checkpoint_model(ckpt).item_vectors()
    mutate(ckpt, items.numpy())
    with pytest.raises(TrustError) as err:
        read_index(ckpt, items)
    expect(one_line(err.value), pattern, ckpt=ckpt)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_genuine_index_is_accepted(genuine: dict, tmp_path: Path, kind: str) -> None:
    from serving.item_index import index_top_k, read_index
    from serving.loading import load_checkpoint_model

    ckpt = copy_tree(genuine["ckpt"], tmp_path / "ckpt")
    items = load_checkpoint_model(ckpt).item_vectors()
    _index(ckpt, items.numpy(), kind)
    index, meta = read_index(ckpt, items)
    assert (index.ntotal, index.d, meta["kind"]) == (NUM_ITEMS, 16, kind)
    scores, rows = index_top_k(index, items[1:3], [[1], [2]], 5)
    assert rows.shape == (2, 5) and 0 not in rows and np.isfinite(scores).all()


# ---------------------------------------------------------------------------------------------------
# vocabularies


VOC = r"{file}: "
VOCAB_CASES = [
    (
        "duplicate-raw-id",
        lambda f: write_vocab(f, [*RAW_IDS[:-1], RAW_IDS[0]]),
        VOC + r"raw id 1001 appears more than once",
    ),
    (
        "fewer-rows",
        lambda f: write_vocab(f, RAW_IDS[:150]),
        VOC + r"150 item rows, the model's table has 200 \(plus padding row 0\)",
    ),
    (
        "more-rows",
        lambda f: write_vocab(f, list(range(1001, 1301))),
        VOC + r"300 item rows, the model's table has 200 \(plus padding row 0\)",
    ),
    (
        "row-gap",
        lambda f: write_vocab(f, RAW_IDS, [*range(1, 100), *range(101, 202)]),
        VOC + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)",
    ),
    (
        "rows-from-0",
        lambda f: write_vocab(f, RAW_IDS, list(range(0, 200))),
        VOC + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)",
    ),
    (
        "rows-reversed",
        lambda f: write_vocab(f, RAW_IDS, list(range(200, 0, -1))),
        VOC + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)",
    ),
    (
        "pending-first",
        lambda f: write_vocab(f, RAW_IDS, [None, *range(1, 200)]),
        VOC + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)",
    ),
    (
        "not-parquet",
        lambda f: f.write_text("raw_id,row\n1,1\n"),
        VOC + r"not a readable vocabulary Parquet file \(.*\)",
    ),
    (
        "missing-column",
        lambda f: __import__("pyarrow.parquet").parquet.write_table(
            __import__("pyarrow").table({"raw_id": RAW_IDS}), f
        ),
        VOC
        + r"not a vocabulary file, missing column\(s\) \['row', 'first_day', 'first_timestamp', 'count'\]",
    ),
    ("float-ids", lambda f: _float_vocab(f), VOC + r"type double, expected integers or strings"),
    (
        "link",
        lambda f: f.symlink_to("/etc/hostname"),
        VOC + r"a link; a checkpoint folder holds only plain files",
    ),
]


def _float_vocab(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_vocab(path, RAW_IDS)
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "raw_id", pa.array([float(x) for x in RAW_IDS])), path)


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in VOCAB_CASES], ids=[c[0] for c in VOCAB_CASES])
def test_vocabulary_refused(genuine: dict, tmp_path: Path, mutate: Callable, pattern: str) -> None:
    from serving.loading import load_checkpoint_model

    ckpt = copy_tree(genuine["ckpt"], tmp_path / "ckpt")
    file = ckpt / "vocab.parquet"
    file.unlink()
    mutate(file)
    with pytest.raises(TrustError) as err:
        load_checkpoint_model(ckpt)
    expect(one_line(err.value), pattern, file=file)


# ---------------------------------------------------------------------------------------------------
# train.json: size, strict JSON, the config validated and compared with the shards before allocation


def _meta_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(ckpt: Path) -> None:
        doc = json.loads((ckpt / "train.json").read_text())
        edit(doc)
        (ckpt / "train.json").write_text(json.dumps(doc))

    return mutate


def _model(**fields: object) -> Callable[[Path], None]:
    return _meta_edit(lambda d: d["config"]["model"].update(fields))


def _trainer(**fields: object) -> Callable[[Path], None]:
    return _meta_edit(lambda d: d["trainer"].update(fields))


def _huge_metadata(ckpt: Path) -> None:
    """.metadata and config both claim a 2^40-row table: the shards cannot hold it."""
    import pickle

    import torch

    from pipeline.train.checkpoint import read_dcp_metadata

    metadata = read_dcp_metadata(ckpt)
    for key, md in metadata.state_dict_metadata.items():
        if "item_table" in key:
            md.size = torch.Size([2**40, md.size[1]])
            md.chunks[0].sizes = torch.Size([2**40, md.size[1]])
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _model(num_items=2**40)(ckpt)


def _nan_weights(ckpt: Path) -> None:
    import warnings

    import torch

    from model.recommender import build_model
    from tests.helpers.redteam import save_checkpoint, tiny_config

    cfg = tiny_config()
    model = build_model(cfg.model, device="cpu")
    state = model.state_dict()
    key = next(k for k in state if "position" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = save_checkpoint(ckpt.parent / "nanroot", cfg, state)
    for f in folder.iterdir():
        shutil.copyfile(f, ckpt / f.name)


TJ = r"{ckpt}/train\.json: "
TRAIN_JSON_CASES = [
    (
        "table-2^40",
        _model(num_items=2**40),
        r"{ckpt}: model\.item_embedding\..*weight has shape \(201, 16\) in "
        r"\.metadata, \(1099511627776, 16\) by train\.json's config",
    ),
    (
        "metadata-and-config-2^40",
        _huge_metadata,
        r"{ckpt}: the model's tensors take \d+ bytes, its shards hold \d+",
    ),
    (
        "dim-differs",
        _model(embedding_dim=32, dqk=32, dv=32),
        r"{ckpt}: model\..* has shape \(\d+(, \d+)*\) in \.metadata, \(\d+(, \d+)*\) by train\.json's config",
    ),
    ("dim-zero", _model(embedding_dim=0), TJ + r"config: model\.embedding_dim must be >= 1 \(got 0\)"),
    ("dim-string", _model(embedding_dim="sixteen"), TJ + r"config: model\.embedding_dim .*"),
    ("unknown-field", _meta_edit(lambda d: d["config"].update(evil=1)), TJ + r"config\.evil: unknown field"),
    (
        "model-not-object",
        _meta_edit(lambda d: d["config"].update(model=[1, 2])),
        TJ + r"config\.model: expected an object",
    ),
    (
        "loss-unknown-field",
        _meta_edit(lambda d: d["config"]["loss"].update(evil=1)),
        TJ + r"config\.loss\.evil: unknown field",
    ),
    ("no-config", _meta_edit(lambda d: d.pop("config")), TJ + r"no training config \(key 'config'\)"),
    (
        "config-string",
        _meta_edit(lambda d: d.update(config="tiny")),
        TJ + r"no training config \(key 'config'\)",
    ),
    ("top-level-list", lambda c: (c / "train.json").write_text("[1]"), TJ + r"expected a JSON object"),
    (
        "not-json",
        lambda c: (c / "train.json").write_text("{config:"),
        TJ + r"not valid JSON \(JSONDecodeError: .*\)",
    ),
    (
        "deep-nesting",
        lambda c: (c / "train.json").write_text("[" * 200_000 + "]" * 200_000),
        TJ + r"not valid JSON \(RecursionError: .*\)",
    ),
    (
        "5000-digits",
        lambda c: (c / "train.json").write_text('{"config": ' + "9" * 5000 + "}"),
        TJ + r"not valid JSON \(ValueError: Exceeds the limit \(4300 digits\).*\)",
    ),
    (
        "duplicate-key",
        lambda c: (c / "train.json").write_text('{"config": {}, "config": {}}'),
        TJ + r"not valid JSON \(ValueError: duplicate key 'config'\)",
    ),
    (
        "over-16MiB",
        lambda c: (c / "train.json").write_text('{"pad": "' + "x" * (16 * 2**20) + '"}'),
        TJ + r"1677722\d bytes, at most 16777216",
    ),
    (
        "not-utf8",
        lambda c: (c / "train.json").write_bytes(b'{"config": "\xff"}'),
        TJ + r"not valid JSON \(UnicodeDecodeError: .*\)",
    ),
    (
        "trainer-step-negative",
        _trainer(step=-1),
        TJ + r"trainer\.step: expected an integer in 0\.\.2\^53 \(got -1\)",
    ),
    (
        "trainer-epoch-float",
        _trainer(epoch=1.5),
        TJ + r"trainer\.epoch: expected an integer in 0\.\.2\^53 \(got 1\.5\)",
    ),
    (
        "trainer-step-huge",
        _trainer(step=2**60),
        TJ + r"trainer\.step: expected an integer in 0\.\.2\^53 \(got \d+\)",
    ),
    (
        "trainer-metric-string",
        _trainer(best_metric="high"),
        TJ + r"trainer\.best_metric: expected a finite number \(got 'high'\)",
    ),
    (
        "trainer-loss-infinite",
        lambda c: _set_raw(c, "epoch_loss_sum", "Infinity"),
        TJ + r"trainer\.epoch_loss_sum: expected a finite number \(got inf\)",
    ),
    ("trainer-history-string", _trainer(history="x"), TJ + r"trainer\.history: expected a list of objects"),
    ("trainer-not-object", _meta_edit(lambda d: d.update(trainer=[1])), TJ + r"trainer: expected an object"),
    ("nan-weights", _nan_weights, r"{ckpt}: model\..*position.* holds non-finite values"),
]


def _set_raw(ckpt: Path, key: str, literal: str) -> None:
    doc = json.loads((ckpt / "train.json").read_text())
    doc["trainer"][key] = "@@"
    (ckpt / "train.json").write_text(json.dumps(doc).replace('"@@"', literal))


@pytest.mark.parametrize(
    "mutate, pattern", [c[1:] for c in TRAIN_JSON_CASES], ids=[c[0] for c in TRAIN_JSON_CASES]
)
def test_train_json_refused(genuine: dict, tmp_path: Path, mutate: Callable, pattern: str) -> None:
    import resource

    from serving.loading import load_checkpoint_model

    ckpt = copy_tree(genuine["ckpt"], tmp_path / "ckpt")
    mutate(ckpt)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TrustError) as err:
        load_checkpoint_model(ckpt)
    expect(one_line(err.value), pattern, ckpt=ckpt)
    # nothing near the table's claimed size was allocated (peak RSS grew < 512 MiB; 2^40 x 16 fp32 = 64 TiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024


# ---------------------------------------------------------------------------------------------------
# copies never follow links (fuxi register stages the checkpoint with copy_checkpoint)


def _plant_link(name: str, target: str) -> Callable[[Path], None]:
    def mutate(ckpt: Path) -> None:
        (ckpt / name).unlink(missing_ok=True)
        (ckpt / name).symlink_to(target)

    return mutate


COPY_CASES = [
    (
        "train-json-to-etc",
        _plant_link("train.json", "/etc/passwd"),
        r"{ckpt}/train\.json: a link; a checkpoint folder "
        r"holds only plain files",
    ),
    (
        "vocab-to-secret",
        _plant_link("vocab.parquet", "../secret"),
        r"{ckpt}/vocab\.parquet: a link; a checkpoint "
        r"folder holds only plain files",
    ),
    (
        "shard-link",
        _plant_link("__1_0.distcp", "/dev/zero"),
        r"{ckpt}/__1_0\.distcp: a link; a checkpoint folder holds "
        r"only plain files",
    ),
    (
        "folder-link",
        _plant_link("item_index.json", "/etc"),
        r"{ckpt}/item_index\.json: a link; a checkpoint folder "
        r"holds only plain files",
    ),
    (
        "extra-file",
        lambda c: (c / "notes.txt").write_text("x"),
        r"{ckpt}/notes\.txt: unexpected file in a checkpoint "
        r"folder \(.*\)",
    ),
]


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in COPY_CASES], ids=[c[0] for c in COPY_CASES])
def test_copy_never_follows_links(genuine: dict, tmp_path: Path, mutate: Callable, pattern: str) -> None:
    from serving.trust import copy_checkpoint

    ckpt = copy_tree(genuine["ckpt"], tmp_path / "ckpt")
    mutate(ckpt)
    with pytest.raises(TrustError) as err:
        copy_checkpoint(ckpt, tmp_path / "staged")
    expect(one_line(err.value), pattern, ckpt=ckpt)
    assert not (tmp_path / "staged").exists()


def test_genuine_artifacts_are_accepted(genuine: dict, tmp_path: Path) -> None:
    from serving.loading import load_checkpoint_model
    from serving.recommend import resolve_model
    from serving.trust import copy_checkpoint

    assert resolve_model(str(genuine["model"])).checkpoint.name == genuine["ckpt"].name
    assert resolve_model(str(genuine["root"])).checkpoint.resolve() == genuine["ckpt"]
    staged = copy_checkpoint(genuine["ckpt"], tmp_path / "staged")
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in genuine["ckpt"].iterdir())
    loaded = load_checkpoint_model(genuine["model"])
    ids, scores, ignored = loaded.top_k([RAW_IDS[:-2]], k=10)  # 198 of 200 items seen: 2 remain
    assert sorted(ids[0]) == RAW_IDS[-2:] and np.isfinite(scores[0]).all() and ignored == [0]


# ---------------------------------------------------------------------------------------------------
# nightly dates: strictly YYYY-MM-DD, refused before anything is written


NIGHTLY_DATES = [
    ("20240103", r"--date '20240103': expected a date written YYYY-MM-DD"),
    ("2024-W01-3", r"--date '2024-W01-3': expected a date written YYYY-MM-DD"),
    ("2024-01-03T00:00", r"--date '2024-01-03T00:00': expected a date written YYYY-MM-DD"),
    ("2024-01-03 ", r"--date '2024-01-03 ': expected a date written YYYY-MM-DD"),
    ("../2024-01-03", r"--date '\.\./2024-01-03': expected a date written YYYY-MM-DD"),
    ("2024-01-03/../../x", r"--date '2024-01-03/\.\./\.\./x': expected a date written YYYY-MM-DD"),
    ("2024-02-30", r"--date '2024-02-30': not a calendar date"),
    ("2024-13-01", r"--date '2024-13-01': not a calendar date"),
    ("0000-01-01", r"--date '0000-01-01': not a calendar date"),
    ("２０２４-01-03", r"--date '２０２４-01-03': expected a date written YYYY-MM-DD"),
    ("2024-1-3", r"--date '2024-1-3': expected a date written YYYY-MM-DD"),
    ("", r"--date '': expected a date written YYYY-MM-DD"),
    ("+2024-01-03", r"--date '\+2024-01-03': expected a date written YYYY-MM-DD"),
    ("2024-01-03\n", r"--date '2024-01-03\\n': expected a date written YYYY-MM-DD"),
    ("2024-01-03\x00", r"--date '2024-01-03\\x00': expected a date written YYYY-MM-DD"),
    (
        "\u0662\u0660\u0662\u0664-01-03",
        r"--date '\u0662\u0660\u0662\u0664-01-03': expected a date written YYYY-MM-DD",
    ),
    ("2024\u201001\u201003", r"--date '2024\u201001\u201003': expected a date written YYYY-MM-DD"),
    (" 2024-01-03", r"--date ' 2024-01-03': expected a date written YYYY-MM-DD"),
    ("2024-01-03/", r"--date '2024-01-03/': expected a date written YYYY-MM-DD"),
    ("2024-00-10", r"--date '2024-00-10': not a calendar date"),
    ("2024-01-00", r"--date '2024-01-00': not a calendar date"),
    ("2023-02-29", r"--date '2023-02-29': not a calendar date"),
]


@pytest.mark.parametrize("date, pattern", NIGHTLY_DATES, ids=[ascii(d[0]) for d in NIGHTLY_DATES])
def test_nightly_date_refused(tmp_path: Path, capsys: pytest.CaptureFixture, date: str, pattern: str) -> None:
    from jobs.cli import main

    work = tmp_path / "work"
    assert main(["nightly", "--date", date, "--workdir", str(work)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch("fuxi: error: " + pattern, lines[0]), lines
    assert files_under(tmp_path) == set()  # no state, lock or run folder for it


def test_nightly_accepts_a_strict_date() -> None:
    import storage
    from jobs.nightly import NightlyConfig

    assert storage.name_of(NightlyConfig(date="2024-01-03").day_dir) == "2024-01-03"


# ---------------------------------------------------------------------------------------------------
# CLI values: refused in one line before a model is loaded or a file written


PLAIN = "expected a plain name (letters, digits, . _ -)"
SERVE = ["serve", "--model", "{model}"]
RECOMMEND = [
    "recommend",
    "--model",
    "{model}",
    "--sequences",
    "{tmp}/seq.parquet",
    "--out",
    "{tmp}/out.parquet",
]
CLI_CASES = [
    *[
        (name, [*SERVE, flag, value], f"{flag} must be an integer in 1..2^31 (got {value})")
        for name, flag, value in [
            ("max-k-zero", "--max-k", "0"),
            ("max-k-2^40", "--max-k", str(2**40)),
            ("max-history-negative", "--max-history", "-1"),
            ("max-users-zero", "--max-users", "0"),
        ]
    ],
    (
        "max-body-tiny",
        [*SERVE, "--max-body-bytes", "100"],
        "--max-body-bytes must be an integer in 1024..2^31 (got 100)",
    ),
    *[  # the value named as read: a float
        (
            f"body-timeout-{name}",
            [*SERVE, "--body-timeout", value],
            f"--body-timeout must be a number of seconds in (0, 3600] (got {read})",
        )
        for name, value, read in [("zero", "0", "0.0"), ("nan", "nan", "nan"), ("inf", "inf", "inf")]
    ],
    *[
        (
            f"host-{name}-no-token",
            [*SERVE, "--host", host],
            f"--host {host} is not a loopback address: set FUXI_SERVE_TOKEN or --token-file (a bearer token "
            "every client must send) to serve beyond this machine",
        )
        for name, host in [
            ("any", "0.0.0.0"),
            ("ipv6-any", "::"),
            ("name", "example.com"),
            ("zero", "0"),  # 0.0.0.0 to the resolver
            ("bracketed-any", "[::]"),
            ("mapped-any", "::ffff:0.0.0.0"),
            ("decimal", "2130706433"),
            ("trailing-dot", "localhost."),
        ]
    ],
    (
        "short-token",
        [*SERVE, "--host", "0.0.0.0", "--token-file", "{tmp}/short"],
        "the bearer token must be at least 16 printable characters, no spaces",
    ),
    (
        "token-file-missing",
        [*SERVE, "--token-file", "{tmp}/none"],
        "--token-file {tmp}/none: not a file of at most 4096 bytes",
    ),
    ("port-zero", [*SERVE, "--port", "0"], "--port must be in 1..65535 (got 0)"),
    ("port-70000", [*SERVE, "--port", "70000"], "--port must be in 1..65535 (got 70000)"),
    (
        "model-name-dotdot",
        ["serve", "--model", "models:/../etc@champion"],
        f"models:/../etc@champion: model name '../etc': {PLAIN}",
    ),
    (
        "alias-dotdot",
        ["serve", "--model", "models:/fuxi@../../x"],
        f"models:/fuxi@../../x: alias '../../x': {PLAIN}",
    ),
    ("alias-empty", ["index", "--model", "models:/fuxi@"], f"models:/fuxi@: alias '': {PLAIN}"),
    (
        "name-space",
        ["export", "--model", "models:/a b@c", "--out", "{tmp}/x"],
        f"models:/a b@c: model name 'a b': {PLAIN}",
    ),
    *[
        (
            name,
            ["serve", "--model", uri],
            f"{uri}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS",
        )
        for name, uri in [
            ("version-dotdot", "models:/fuxi/../../1"),
            ("version-missing", "models:/fuxi"),
            ("version-unicode-digits", "models:/fuxi/١"),
        ]
    ],
    (
        "run-id-dotdot",
        ["recommend", "--model", "runs:/../../etc", "--sequences", "x", "--out", "{tmp}/o"],
        f"runs:/../../etc: run id '../../etc': {PLAIN}",
    ),
    *[
        (
            name,
            ["serve", "--model", uri],
            f"{uri}: expected models:/..., runs:/..., a checkpoint on s3:// or a local folder",
        )
        for name, uri in [("file-uri", "file:///etc"), ("http-uri", "http://host/model")]
    ],
    ("recommend-k-zero", [*RECOMMEND, "--k", "0"], "--k 0: expected 1..100000"),
    ("recommend-k-huge", [*RECOMMEND, "--k", str(10**9)], "--k 1000000000: expected 1..100000"),
    (
        "recommend-workers-zero",
        [*RECOMMEND, "--workers", "0"],
        "--workers 0 / --batch-size 256: expected 1..1024 / 1..1000000",
    ),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_value_refused(
    genuine: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv: list[str],
    message: str,
) -> None:
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUXI_SERVE_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    (tmp_path / "short").write_text("abc\n")
    before = files_under(tmp_path)
    fill = {"{model}": str(genuine["model"]), "{tmp}": str(tmp_path)}
    args = [a.replace("{model}", fill["{model}"]).replace("{tmp}", fill["{tmp}"]) for a in argv]
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["fuxi: error: " + message.replace("{tmp}", str(tmp_path))]
    assert files_under(tmp_path) == before  # no cache, database, output or state
