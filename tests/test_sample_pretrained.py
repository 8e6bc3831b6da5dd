"""Fetching the released checkpoints, against a local HTTP server on 127.0.0.1 (no outside network here)."""

from __future__ import annotations

import http.server
import io
import socket
import threading

import pytest
import torch

from ditkit.cli import main
from ditkit.runtime.errors import UserError
from ditkit.weights import pretrained

NAME = "DiT-XL-2-256x256.pt"


def tiny_checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "x_embedder.proj.weight": torch.ones(8, 4, 2, 2)}, buf)
    return buf.getvalue()


class Server:
    """Serves `files` (path → bytes); `truncate` announces more bytes than it sends. Counts requests."""

    def __init__(self, files: dict[str, bytes], truncate: bool = False):
        self.files, self.truncate, self.requests = files, truncate, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if outer.truncate else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/DiT/models/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_into_cache_then_reuse(tmp_path):
    body = tiny_checkpoint_bytes()
    with Server({f"/DiT/models/{NAME}": body}) as server:
        path = pretrained.fetch_pretrained(NAME, tmp_path, base_url=server.url, progress=False)
        assert path == tmp_path / NAME and path.read_bytes() == body
        assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
        assert pretrained.fetch_pretrained(NAME, tmp_path, base_url=server.url, progress=False) == path
        assert len(server.requests) == 1  # the second call used the cache


def test_truncated_or_wrong_download_leaves_nothing(tmp_path):
    body = tiny_checkpoint_bytes()
    with Server({f"/DiT/models/{NAME}": body}, truncate=True) as server:
        with pytest.raises(UserError, match="stopped after"):
            pretrained.fetch_pretrained(NAME, tmp_path, base_url=server.url, progress=False)
    with Server({f"/DiT/models/{NAME}": b"<html>not a checkpoint</html>"}) as server:
        with pytest.raises(UserError, match="not a zip"):
            pretrained.fetch_pretrained(NAME, tmp_path, base_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_message_names_url_and_destination(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/DiT/models"
    with pytest.raises(UserError) as exc:
        pretrained.fetch_pretrained(NAME, tmp_path, base_url=url, progress=False, timeout=5)
    message = str(exc.value)
    assert f"{url}/{NAME}" in message and str(tmp_path / NAME) in message and "\n" not in message
    # Through the CLI: one line, exit code 2.
    monkeypatch.setenv("DITKIT_PRETRAINED_URL", url)
    code = main(["sample", "--ckpt", NAME, "--cache-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ditkit sample: error: cannot download") and "\n" not in err


def test_names_and_default_address(monkeypatch):
    monkeypatch.delenv("DITKIT_PRETRAINED_URL", raising=False)
    assert pretrained.is_pretrained("DiT-XL-2-512x512.pt") and not pretrained.is_pretrained("DiT-XL-2.pt")
    assert pretrained.url_for(NAME) == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    with pytest.raises(UserError):
        pretrained.resolve_checkpoint("no-such-file.pt")
