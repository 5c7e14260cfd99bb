"""Download and unpack MovieLens from GroupLens.

`download_movielens(name, dest_dir)` fetches `<base_url>/<name>.zip` (urllib, tqdm progress bar), unpacks it
under dest_dir and returns the ratings file: ml-1m/ratings.dat, ml-20m/ratings.csv or ml-100k/u.data. Nothing
is fetched when that file already exists; a complete zip already in dest_dir is unpacked without fetching it
again. The zip is written to `<name>.zip.part` and renamed only when complete, so an interrupted download
never passes for a finished one. A host that cannot be reached (offline machine, firewall, DNS) is a
RuntimeError that says how to do the step by hand.

`dest_dir` may be a URI (`s3://bucket/raw`): a download is local by nature, so the zip is fetched and unpacked
in a local temporary folder and the unpacked data set (`<dest>/<name>/...`, not the zip) is uploaded with
`storage.copy_tree`; the returned ratings file is then a URI. Nothing is fetched when it is already there.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

import storage
from storage.fs import require_bucket

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
RATINGS_FILES = {
    "ml-1m": "ml-1m/ratings.dat",
    "ml-20m": "ml-20m/ratings.csv",
    "ml-100k": "ml-100k/u.data",
}
_CHUNK = 1 << 20


def _manual_steps(name: str, url: str, dest: Path | str) -> str:
    return (
        f"download {url} by hand on a machine with internet access, unzip it (into {dest} or anywhere), "
        f"and pass its ratings file ({RATINGS_FILES[name]}) to "
        "`fuxi data prepare --input <path> --out <sequences.parquet>`"
    )


def download_movielens(
    name: str,
    dest_dir: str | os.PathLike[str],
    base_url: str = DEFAULT_BASE_URL,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path | str:
    """Download + unpack a MovieLens dataset; returns its ratings file: a Path, or a URI when `dest_dir` is
    one (module docstring)."""
    if name not in RATINGS_FILES:
        raise ValueError(f"unknown MovieLens dataset {name!r}; expected one of {sorted(RATINGS_FILES)}")
    uri = os.fspath(dest_dir)
    if not storage.is_local(uri):
        return _download_to_store(name, uri, base_url, timeout, progress)
    dest = Path(uri) if "://" not in uri else Path(storage.parse(uri).path)  # a path, or file:///abs
    return _download(name, dest, base_url, timeout, progress)


def _download_to_store(name: str, dest: str, base_url: str, timeout: float, progress: bool) -> str:
    """Fetch and unpack into a local temporary folder, then upload the unpacked data set under `dest`."""
    ratings = storage.join(dest, RATINGS_FILES[name], field="ratings file")
    if storage.is_file(ratings):
        return ratings
    require_bucket(dest)  # a wrong bucket fails before the download, not after it
    with tempfile.TemporaryDirectory(prefix="fuxi-download-") as tmp:
        _download(name, Path(tmp), base_url, timeout, progress, shown_dest=storage.display(dest))
        storage.copy_tree(storage.join(tmp, name), storage.join(dest, name))
    return ratings


def _download(
    name: str,
    dest: Path,
    base_url: str,
    timeout: float,
    progress: bool,
    shown_dest: str | None = None,
) -> Path:
    """Download + unpack into a local folder; `shown_dest` is the folder the user named (for messages)."""
    ratings = dest / RATINGS_FILES[name]
    if ratings.is_file():
        return ratings
    dest.mkdir(parents=True, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{name}.zip"
    zip_path = dest / f"{name}.zip"
    if not (zip_path.is_file() and zipfile.is_zipfile(zip_path)):
        _fetch(name, url, zip_path, shown_dest or dest, timeout, progress)
    _extract(zip_path, dest, name, url)
    if not ratings.is_file():
        raise RuntimeError(
            f"{zip_path} unpacked, but it holds no {RATINGS_FILES[name]}; is {url} the MovieLens {name} zip? "
            f"Delete {zip_path} to download again."
        )
    return ratings


def _fetch(name: str, url: str, zip_path: Path, dest: Path | str, timeout: float, progress: bool) -> None:
    host = urllib.parse.urlsplit(url).netloc or url
    part = zip_path.with_name(zip_path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"{name}.zip", disable=not progress
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise RuntimeError(
                f"download of {url} stopped early ({part.stat().st_size:,} of {total:,} bytes); "
                "try again, or " + _manual_steps(name, url, dest)
            )
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"{host} answered HTTP {exc.code} ({exc.reason}) for {url}; check base_url, or "
            + _manual_steps(name, url, dest)
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise RuntimeError(
            f"could not reach {host} to download {url} ({reason}). This machine may be offline; "
            + _manual_steps(name, url, dest)
        ) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(zip_path)


def _extract(zip_path: Path, dest: Path, name: str, url: str) -> None:
    root = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.infolist():
                target = (dest / member.filename).resolve()
                if target != root and root not in target.parents:
                    raise RuntimeError(f"{zip_path}: refusing to unpack {member.filename!r} outside {dest}")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise RuntimeError(
            f"{zip_path} is not a valid zip ({exc}); delete it and download again, or "
            + _manual_steps(name, url, dest)
        ) from exc


__all__ = ["download_movielens", "RATINGS_FILES", "DEFAULT_BASE_URL"]
