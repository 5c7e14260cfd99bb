"""The MovieLens downloader against a loopback HTTP server (no outside network)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import zipfile

import pytest

from pipeline.data.download import download_movielens
from pipeline.data.readers import read_interactions


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_download_extracts_ratings_file(tmp_path, no_proxy):
    served = tmp_path / "served"
    served.mkdir()
    content = "1::1193::5::978300760\n1::661::3::978302109\n"
    with zipfile.ZipFile(served / "ml-1m.zip", "w") as zf:
        zf.writestr("ml-1m/ratings.dat", content)
        zf.writestr("ml-1m/README", "readme")
    _QuietHandler.requests = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dest = tmp_path / "raw"
        path = download_movielens("ml-1m", dest, base_url=base, progress=False)
        assert path == dest / "ml-1m" / "ratings.dat"
        assert path.read_text() == content
        assert (dest / "ml-1m" / "README").read_text() == "readme"
        assert not (dest / "ml-1m.zip.part").exists()
        assert download_movielens("ml-1m", dest, base_url=base, progress=False) == path  # already there
        assert _QuietHandler.requests == ["/ml-1m.zip"]
        with pytest.raises(RuntimeError, match=r"answered HTTP 404.*fuxi data prepare"):
            download_movielens("ml-20m", dest, base_url=base, progress=False)
        assert not (dest / "ml-20m.zip.part").exists()
    finally:
        server.shutdown()
        server.server_close()
    events, _ = read_interactions(path)
    assert events.to_pylist() == [
        {"user_id": 1, "item_id": 1193, "timestamp": 978300760, "rating": 5.0},
        {"user_id": 1, "item_id": 661, "timestamp": 978302109, "rating": 3.0},
    ]


def test_download_unreachable_host_says_how_to_do_it_by_hand(tmp_path, no_proxy):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(RuntimeError) as err:
        download_movielens(
            "ml-100k", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5, progress=False
        )
    msg = str(err.value)
    assert f"could not reach 127.0.0.1:{port}" in msg
    assert f"download http://127.0.0.1:{port}/ml-100k.zip by hand" in msg
    assert "ml-100k/u.data" in msg and "fuxi data prepare" in msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown MovieLens dataset 'ml-10m'"):
        download_movielens("ml-10m", tmp_path)
