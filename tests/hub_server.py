"""A minimal Hugging Face Hub on 127.0.0.1 for tests, serving the endpoints huggingface_hub 2.4 calls.

Endpoints (read from huggingface_hub 2.4's ``hf_api.py``, ``_commit_api.py`` and ``file_download.py``):

* ``POST /api/repos/create``: ``create_repo``; 409 when the repo exists.
* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``repo_info``.
* ``POST /api/validate-yaml``: checked before a commit that adds ``README.md``.
* ``POST /api/models/{repo}/preupload/{rev}``: returns ``uploadMode: regular`` for every file,
  so the file content travels base64-encoded inside the commit and no LFS or Xet transfer is used.
* ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (``header``, ``file``, ``deletedFile``).
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``hf_hub_download`` and ``get_hf_file_metadata``,
  with ``X-Repo-Commit``, ``ETag`` and ``X-Error-Code`` as the Hub sends them, and ``Range``.

Tokens: ``WRITE_TOKEN`` may read and write every repo, ``READ_TOKEN`` only read; a write without a
token, or with an unknown one, gets 401, and a write with ``READ_TOKEN`` gets 403. Private repos
return 401 ``RepoNotFound`` to reads without a valid token, as the Hub does, and repos marked
``forbidden`` return 403 to every read.

Faults for tests: ``short_body[path] = n`` sends only the first ``n`` bytes of a file on GET
while HEAD reports the full size, like a connection cut short by a proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

WRITE_TOKEN = "hf_test_write_token"
READ_TOKEN = "hf_test_read_token"

# Requests larger than this are rejected with 413, so a test bug cannot fill memory.
MAX_BODY_BYTES = 512 * 1024 * 1024


@dataclass
class Repo:
    private: bool = False
    forbidden: bool = False  # reads get 403, as for a gated repo whose access was not granted
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[tuple[str, str]] = field(default_factory=list)  # (sha, summary), newest last

    @property
    def head(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40


class HubState:
    """Repos, a request log and fault switches, shared by the handler threads under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.short_body: dict[str, int] = {}

    def add_commit(self, repo: Repo, summary: str) -> str:
        sha = hashlib.sha1(f"{len(repo.commits)}:{summary}:{sorted(repo.files)}".encode()).hexdigest()
        repo.commits.append((sha, summary))
        return sha


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    # --- helpers -------------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    def _token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[len("Bearer "):] if header.startswith("Bearer ") else None

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._json(413, {"error": "request too large"})
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head_only: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, value: object, headers: dict[str, str] | None = None, head_only: bool = False) -> None:
        body = json.dumps(value).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head_only)

    def _error(self, status: int, code: str | None, message: str, head_only: bool = False, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head_only)

    def _can_write(self) -> bool:
        token = self._token()
        if token not in (WRITE_TOKEN, READ_TOKEN):
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        if token != WRITE_TOKEN:
            self._error(403, None, "You don't have the rights to write to this repo")
            return False
        return True

    def _readable_repo(self, repo_id: str, head_only: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._token() not in (WRITE_TOKEN, READ_TOKEN)):
            self._error(401 if self._token() is None else 404, "RepoNotFound", "Repository not found", head_only)
            return None
        if repo.forbidden:
            self._error(403, None, "Access to this repo is restricted", head_only)
            return None
        return repo

    # --- dispatch ------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.state.lock:
            self.state.requests.append((method, path))
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                with self.state.lock:
                    handler(method=method, **{k: v for k, v in match.groupdict().items() if v is not None})
                return
        body = self._body() if method == "POST" else b""
        if body is not None:
            self._error(404, None, f"no test endpoint for {method} {path}", head_only=method == "HEAD")

    # --- endpoints -----------------------------------------------------------------------------

    def _create_repo(self, method: str) -> None:
        body = self._body()
        if body is None or not self._can_write():
            return
        payload = json.loads(body)
        name = payload["name"]
        repo_id = f"{payload['organization']}/{name}" if payload.get("organization") else f"user/{name}"
        if repo_id in self.state.repos:
            # The Hub's 409 body also carries the repo URL, which create_repo(exist_ok=True) returns.
            message = "You already created this model repo"
            self._json(409, {"error": message, "url": f"{self.server.url}/{repo_id}"}, {"X-Error-Message": message})
            return
        repo = Repo(private=bool(payload.get("private")))
        self.state.repos[repo_id] = repo
        self.state.add_commit(repo, "initial commit")
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, method: str) -> None:
        if self._body() is not None:
            self._json(200, {"errors": [], "warnings": []})

    def _repo_info(self, method: str, repo: str, rev: str = "main") -> None:
        found = self._readable_repo(repo)
        if found is not None:
            siblings = [{"rfilename": name} for name in sorted(found.files)]
            self._json(200, {"id": repo, "modelId": repo, "sha": found.head, "private": found.private, "siblings": siblings})

    def _preupload(self, method: str, repo: str, rev: str) -> None:
        body = self._body()
        if body is None or not self._can_write():
            return
        if repo not in self.state.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        files = json.loads(body)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})

    def _commit(self, method: str, repo: str, rev: str) -> None:
        body = self._body()
        if body is None or not self._can_write():
            return
        found = self.state.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        summary = ""
        changes: dict[str, bytes | None] = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file" and item["value"].get("encoding") == "base64":
                changes[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                changes[item["value"]["path"]] = None
            else:
                self._error(400, None, f"unsupported commit operation {item['key']!r} in the test hub")
                return
        for name, content in changes.items():
            if content is None:
                found.files.pop(name, None)
            else:
                found.files[name] = content
        sha = self.state.add_commit(found, summary)
        self._json(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True})

    def _resolve(self, method: str, repo: str, rev: str, file: str) -> None:
        head_only = method == "HEAD"
        found = self._readable_repo(repo, head_only)
        if found is None:
            return
        content = found.files.get(file)
        if content is None:
            self._error(404, "EntryNotFound", f"{file} does not exist on {rev}", head_only, {"X-Repo-Commit": found.head})
            return
        headers = {"X-Repo-Commit": found.head, "ETag": f'"{hashlib.sha256(content).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not head_only:
            match = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            start = int(match.group(1)) if match else 0
        body = content[start:]
        if not head_only and file in self.state.short_body:
            body = body[: self.state.short_body[file]]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        headers["Content-Length"] = str(len(content) if head_only else len(body))
        self._send(status, body, headers, head_only)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """The test Hub, listening on 127.0.0.1 on a free port until :meth:`stop`."""

    def __init__(self) -> None:
        self.state = HubState()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.url = self.url
        # A short poll interval makes stop() return in about 50 ms instead of the default 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="test-hub", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """Create a repo directly in the server's state (no HTTP)."""
        with self.state.lock:
            repo = self.state.repos.setdefault(repo_id, Repo(private=private))
            if not repo.commits:
                self.state.add_commit(repo, "initial commit")
            return repo

    def repo(self, repo_id: str) -> Repo:
        return self.state.repos[repo_id]


def use_test_hub(monkeypatch, url: str, home, token: str | None = WRITE_TOKEN) -> dict[str, str]:
    """Point huggingface_hub at the test Hub ``url`` with ``home`` as HF_HOME; return the env vars.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, at import, so
    the module constants are patched too. The returned variables are for subprocesses.
    """
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"tests may only talk to a loopback Hub, got {url}")
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "TIMM_GHN_HUB_REPO"):
        monkeypatch.delenv(name, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
        env["HF_TOKEN"] = token

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset({"127.0.0.1"}))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return env
