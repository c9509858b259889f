"""Hub ids fail fast when the Hub does not answer, and load from the cache offline.

A local server stands in for the Hub and counts what it is asked: serving files (the routes huggingface_hub
uses to download), answering 503 to everything (the Hub down), or closing every connection unanswered (a
broken network). huggingface_hub on its own asks six times over ~24 s when a file is not cached; a load asks
once, then uses the cache or raises a :class:`SourceError` naming the id, the endpoint and the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save

import diffadapt as da

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
FILE = "adapter.safetensors"
MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def blob() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({f"{MODULE}.lora_down.weight": torch.randn(4, 32, generator=g),
                 f"{MODULE}.lora_up.weight": torch.randn(32, 4, generator=g), f"{MODULE}.alpha": torch.tensor(2.0)})


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos, self.mode, self.requests = repos, "up", []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def asked(self) -> list[str]:
        """The requests about repos (huggingface_hub also fetches its own registry once a process)."""
        return [r for r in self.requests if "/user/" in r]


ROUTE = re.compile(r"^/(?:api/models/(?P<info>user/[^/]+)(?:/revision/main)?|api/models/(?P<tree>user/[^/]+)/tree/"
                   r"[0-9a-f]{40}|(?P<repo>user/[^/]+)/resolve/[^/]+/(?P<file>.+))$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        if self.server.mode == "reset":  # a broken network: the connection closes with no answer
            self.server.requests.append(f"reset {self.rfile.readline(1000).decode(errors='replace').strip()}")
            self.close_connection = True
            return
        super().handle_one_request()

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, *, body: bool):
        path = self.path.split("?")[0]
        self.server.requests.append(f"{self.command} {path}")
        if self.server.mode == "down":
            return self._send(503, b"down")
        m = ROUTE.match(path)
        repo = m and self.server.repos.get(m["info"] or m["tree"] or m["repo"])
        if repo is None:
            return self._send(404, b"", body=body, headers={"X-Error-Code": "RepoNotFound"})
        if m["info"]:
            info = {"id": m["info"], "sha": COMMIT, "siblings": [{"rfilename": f} for f in repo]}
            return self._send(200, json.dumps(info).encode(), body=body)
        if m["tree"]:
            tree = [{"type": "file", "path": f, "size": len(b), "oid": sha(b)[:40],
                     "lfs": {"oid": sha(b), "size": len(b), "pointerSize": 134}} for f, b in repo.items()]
            return self._send(200, json.dumps(tree).encode(), body=body)
        if m["file"] not in repo:
            return self._send(404, b"", body=body, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = repo[m["file"]]
        return self._send(200, data, body=body, headers={"X-Repo-Commit": COMMIT, "ETag": f'"{sha(data)}"'})

    def _send(self, status: int, data: bytes, *, body: bool = True, headers: dict | None = None):
        self.send_response(status)
        self.close_connection = True  # one request a connection: each sees the mode set when it was made
        for k, v in {"Content-Length": str(len(data)), "Connection": "close", **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PEFT_Q = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def repos(blob):
    peft = save({f"{PEFT_Q}.lora_A.weight": torch.ones(4, 32), f"{PEFT_Q}.lora_B.weight": torch.ones(32, 4)})
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}).encode()
    return {"user/ink": {FILE: blob, "README.md": b"# ink"},
            "user/two": {"a.safetensors": blob, "b.safetensors": blob},
            "user/peft": {"adapter_config.json": config, "adapter_model.safetensors": peft, "README.md": b"#",
                          "model.safetensors": b"the base model: never fetched", "unet/model.safetensors": b"x",
                          "styles/ink/adapter.safetensors": blob, "styles/ink/preview.safetensors": blob,
                          "styles/film/pytorch_lora_weights.safetensors": blob}}


@pytest.fixture(scope="module")
def server(repos):
    hub = FakeHub(repos)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def use_hub(monkeypatch, tmp_path, *, endpoint: str, offline: bool = False, cached: bytes | None = None) -> str:
    """Point huggingface_hub (which reads its settings at import) at ``endpoint`` and a fresh cache."""
    cache = tmp_path / "hub"
    if cached is not None:
        repo = cache / "models--user--ink"
        (repo / "snapshots" / COMMIT).mkdir(parents=True)
        (repo / "snapshots" / COMMIT / FILE).write_bytes(cached)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HUB_CACHE": str(cache),
                        "HF_HUB_OFFLINE": offline, "HF_HUB_ETAG_TIMEOUT": 5}.items():
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    return str(cache)


CASES = {  # id: (server mode, offline, cached, source, error match or None (loads), what the server is asked)
    "down-file": ("down", False, False, f"user/ink/{FILE}", "not answering \\(HTTP 503\\)", 1),
    "down-repo": ("down", False, False, "user/ink", "not answering \\(HTTP 503\\)", 1),
    "reset-file": ("reset", False, False, f"user/ink/{FILE}", "cannot be reached", 1),
    "down-file-cached": ("down", False, True, f"user/ink/{FILE}", None, 1),
    "reset-repo-cached": ("reset", False, True, "user/ink", None, 1),
    "offline-file-cached": ("up", True, True, f"user/ink/{FILE}", None, 0),
    "offline-repo-cached": ("up", True, True, "user/ink", None, 0),
    "offline-file": ("up", True, False, f"user/ink/{FILE}", "HF_HUB_OFFLINE is set", 0),
    "no-such-repo": ("up", False, False, "user/other", "no such repository on the Hub", 1),
    "no-such-file": ("up", False, False, "user/ink/missing.safetensors",
                     "no file or folder 'missing.safetensors' \\(it holds: README.md, adapter.safetensors\\)", 1),
    "repo-of-two": ("up", False, False, "user/two", "2 adapter files \\(a.safetensors, b.safetensors\\); "
                    "name one, e.g. user/two/a.safetensors", 1),
}


@pytest.mark.parametrize("case", CASES)
def test_hub_is_asked_once(server, blob, monkeypatch, tmp_path, case):
    mode, offline, cached, source, error, asked = CASES[case]
    cache = use_hub(monkeypatch, tmp_path, endpoint=server.url, offline=offline, cached=blob if cached else None)
    server.mode, server.requests = mode, []
    if error is None:
        info = da.inspect(source)
        assert (info.modules, info.methods, info.ranks) == (1, {"lora": 1}, {4: 1})
    else:
        with pytest.raises(da.SourceError, match=error) as e:
            da.inspect(source)
        assert source in str(e.value)
        if mode != "up":  # unreachable: the message says where it looked
            assert cache in str(e.value) and server.url in str(e.value)
    assert len(server.asked()) == asked, server.requests


@pytest.mark.parametrize("source", [f"user/ink/{FILE}", "user/ink"])
def test_download_then_offline(server, blob, monkeypatch, tmp_path, source):
    """A reachable Hub downloads into the cache as huggingface_hub does; the cache then serves offline."""
    use_hub(monkeypatch, tmp_path, endpoint=server.url)
    server.mode, server.requests = "up", []
    first = da.inspect(source)
    assert first.source == source
    assert server.asked()[0] == "GET /api/models/user/ink" and any(r.startswith("GET /user/ink/resolve/")
                                                                   for r in server.asked())
    use_hub(monkeypatch, tmp_path, endpoint=server.url, offline=True)
    server.requests = []
    assert da.inspect(source).modules == first.modules == 1 and server.asked() == []


def test_closed_port_fails_fast(monkeypatch, tmp_path):
    """Nothing listening: one refused connection, no retries (the bound only guards against a hang)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use_hub(monkeypatch, tmp_path, endpoint=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(da.SourceError, match="cannot be reached"):
        da.inspect(f"user/ink/{FILE}")
    assert time.monotonic() - start < 10


PICKED = {  # source: the files fetched (None: refused before any download, with this message)
    "user/peft": ["adapter_config.json", "adapter_model.safetensors"],  # not the base weights beside them
    "user/peft/styles/film": ["styles/film/pytorch_lora_weights.safetensors"],  # a folder of the repo
    "user/peft/styles/ink": "2 adapter files \\(adapter.safetensors, preview.safetensors\\)",
}


@pytest.mark.parametrize("source", PICKED)
def test_repo_files_are_chosen_before_downloading(server, monkeypatch, tmp_path, source):
    """What a repo (or a folder of it) holds is read from its listing: only the adapter's files are fetched,
    as a local folder would be read; the snapshot then serves offline."""
    use_hub(monkeypatch, tmp_path, endpoint=server.url)
    server.mode, server.requests = "up", []
    expected = PICKED[source]
    if isinstance(expected, str):
        with pytest.raises(da.SourceError, match=expected):
            da.inspect(source)
        assert server.asked() == ["GET /api/models/user/peft"]
        return
    info = da.inspect(source)
    assert info.modules == 1
    fetched = sorted(r.split("/resolve/")[1].split("/", 1)[1] for r in server.asked() if r.startswith("GET /user/"))
    assert fetched == expected
    use_hub(monkeypatch, tmp_path, endpoint=server.url, offline=True)
    server.requests = []
    assert da.inspect(source).modules == 1 and server.asked() == []


def test_a_local_folder_is_not_a_hub_user(server, monkeypatch, tmp_path):
    """'loras/ink.safetensors' missing beside a loras/ folder is a typo: reported as such, the Hub not asked."""
    use_hub(monkeypatch, tmp_path, endpoint=server.url)
    (tmp_path / "user").mkdir()
    monkeypatch.chdir(tmp_path)
    server.mode, server.requests = "up", []
    with pytest.raises(da.SourceError, match="no such file or directory \\(not looked up on the Hub: ./user is a "):
        da.inspect(f"user/ink/{FILE}")
    assert server.asked() == []
