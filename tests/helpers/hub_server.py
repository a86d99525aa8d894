"""A small stand-in for the Hugging Face Hub, so that tests can push models and load them back by repo id offline.

It is a real HTTP server (in a thread, on 127.0.0.1) that implements the few endpoints huggingface_hub 2.4 calls for
`create_repo`, `upload_folder` / `create_commit` / `push_to_hub`, `repo_info` / `model_info` (revision resolution),
`list_repo_tree`, `hf_hub_download` and `snapshot_download`, for model repos only:

| method and path | used by |
|---|---|
| `POST /api/repos/create` | `create_repo` |
| `POST /api/validate-yaml` | `create_commit` when the commit holds a `README.md` |
| `POST /api/models/{repo_id}/preupload/{revision}` | `create_commit`: answers "regular" for every file, so contents travel base64-encoded inside the commit (no LFS or Xet upload) |
| `POST /api/models/{repo_id}/commit/{revision}` | `create_commit`: the NDJSON payload (`header`, `file`, `deletedFile`, `deletedFolder` lines) |
| `GET /api/models/{repo_id}[/revision/{revision}]` | `repo_info` / `model_info`: the commit `sha` a revision resolves to, and the file list (`siblings`) |
| `GET /api/models/{repo_id}/tree/{revision}[/{path}]` | `list_repo_tree` / `list_repo_files`, `snapshot_download` |
| `HEAD` and `GET /{repo_id}/resolve/{revision}/{path}` | `hf_hub_download`: `X-Repo-Commit`, `ETag` (the git blob id), `Content-Length` |

Errors carry the Hub's `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which
huggingface_hub turns into its typed exceptions. Writes need `Authorization: Bearer <token>` with the server's token;
private repos are invisible (401 `RepoNotFound`) without it. Repo ids must have a namespace (`org/name`); revisions are
`main` or a commit id (no other branches, tags or pull requests).

Usage::

    with HubServer(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}  # for a subprocess: huggingface_hub reads them at import
        ...
        hub.files("org/name")  # {path: bytes} at main
        hub.requests           # [(method, path), ...] every request, in order
        hub.unserved           # the requests no endpoint here matched (answered 404): should stay empty
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


DEFAULT_BRANCH = "main"
INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), "resolve"),
]


def git_blob_id(content: bytes) -> str:
    """The id git (and the Hub) gives a file's content; huggingface_hub compares it to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)  # the history of main, oldest first

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        if revision == DEFAULT_BRANCH:
            return self.head
        return next((commit for commit in self.commits if commit.oid == revision), None)


class HubError(Exception):
    """An error answer: HTTP status, the Hub's X-Error-Code (if any), a message, extra headers and JSON fields."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers=None, **fields):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers, self.fields = headers or {}, fields


class HubState:
    """The repositories and the request log; every method holds the lock, since requests arrive on many threads."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unserved: list[tuple[str, str]] = []  # requests no route matched: an endpoint this server lacks
        self.lock = threading.Lock()

    def add_commit(self, repo: Repo, message: str, files: dict[str, bytes]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_id(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, files, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        repo.commits.append(commit)
        return commit


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub client expects; every answer sets Content-Length
    server: "_HubHTTPServer"

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):
        pass  # the request log is `HubState.requests`; stderr stays quiet

    # -- plumbing ------------------------------------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        with self.state.lock:
            self.state.requests.append((method, path))
        body = self._read_body()
        try:
            for route_method, pattern, handler_name in _ROUTES:
                match = pattern.fullmatch(path)
                if route_method == method and match:
                    with self.state.lock:
                        status, headers, payload = getattr(self, handler_name)(body=body, **match.groupdict())
                    break
            else:
                with self.state.lock:
                    self.state.unserved.append((method, path))
                raise HubError(404, f"This test Hub does not serve {method} {path}.")
        except HubError as error:
            status, payload = error.status, {"error": error.message, **error.fields}
            headers = {**error.headers, "X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF
                if size == 0:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _is_authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def _require_token(self) -> None:
        if not self._is_authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._is_authorized()):
            raise HubError(404 if repo is None else 401, f"Repository Not Found for {repo_id}.", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision or DEFAULT_BRANCH))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints -------------------------------------------------------------------------------------------------

    def create_repo(self, body: bytes):
        self._require_token()
        request = json.loads(body)
        if request.get("type", "model") != "model":
            raise HubError(400, "This test Hub only hosts model repos.")
        if not request.get("organization"):
            raise HubError(400, "Give the repo id with its namespace (org/name).")
        repo_id = f"{request['organization']}/{request['name']}"
        url = f"{self.base_url}/{repo_id}"
        if repo_id in self.state.repos:
            # create_repo(exist_ok=True) reads the url from this answer.
            raise HubError(409, "You already created this model repo", url=url)
        private = request.get("visibility") == "private" or bool(request.get("private"))
        repo = Repo(repo_id, private)
        self.state.add_commit(repo, "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES})
        self.state.repos[repo_id] = repo
        return 200, {}, {"url": url, "name": repo_id}

    def validate_yaml(self, body: bytes):
        content = json.loads(body)["content"]
        metadata = re.match(r"---\n(.*?)\n---", content, re.DOTALL)
        try:
            if metadata and not isinstance(yaml.safe_load(metadata.group(1)) or {}, dict):
                raise yaml.YAMLError("the metadata block is not a mapping")
        except yaml.YAMLError as error:
            return 400, {}, {"errors": [{"message": str(error)}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def preupload(self, body: bytes, repo_id: str, revision: str):
        self._require_token()
        files = self._commit(self._repo(repo_id), revision).files
        answers = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_id(files[item["path"]]) if item["path"] in files else None,
            }
            for item in json.loads(body)["files"]
        ]
        return 200, {}, {"files": answers}

    def commit(self, body: bytes, repo_id: str, revision: str):
        self._require_token()
        repo = self._repo(repo_id)
        if unquote(revision) != DEFAULT_BRANCH:
            raise HubError(400, f"This test Hub only commits to {DEFAULT_BRANCH}, not {unquote(revision)}.")
        if self.query.get("create_pr"):
            raise HubError(400, "This test Hub does not open pull requests.")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with its header line.")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.head.oid):
            raise HubError(412, "The parent commit is not the head of the branch.")
        files = dict(repo.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}.")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"This test Hub takes regular files only, not {key!r} lines.")
        commit = self.state.add_commit(repo, header.get("summary", ""), files)
        return 200, {}, {"commitUrl": f"{self.base_url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid}

    def repo_info(self, body: bytes, repo_id: str, revision: str | None = None):
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        siblings = [
            {"rfilename": path, "size": len(content), "blobId": git_blob_id(content)}
            for path, content in sorted(commit.files.items())
        ]
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "lastModified": commit.date,
            "tags": [],
            "siblings": siblings,
        }
        return 200, {}, info

    def tree(self, body: bytes, repo_id: str, revision: str, path: str | None = None):
        commit = self._commit(self._repo(repo_id), revision)
        prefix = path.strip("/") + "/" if path else ""
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        entries, folders = [], set()
        for file_path, content in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": file_path, "size": len(content), "oid": git_blob_id(content)})
        if path and not entries and not folders:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        entries += [{"type": "directory", "path": folder, "oid": git_blob_id(folder.encode())} for folder in folders]
        return 200, {}, entries

    def resolve(self, body: bytes, repo_id: str, revision: str, path: str):
        commit = self._commit(self._repo(repo_id), revision)
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", headers)
        content = commit.files[path]
        headers.update({"ETag": f'"{git_blob_id(content)}"', "Content-Type": "application/octet-stream"})
        return 200, headers, content


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)  # port 0: the OS picks a free one
        self.state = state


class HubServer:
    """Runs the test Hub in a background thread; a context manager. `url` is what HF_ENDPOINT should be."""

    def __init__(self, token: str = "hf_test_token"):
        self.state = HubState(token)
        self._server = _HubHTTPServer(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token(self) -> str:
        return self.state.token

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def unserved(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.unserved)

    def repo(self, repo_id: str) -> Repo:
        with self.state.lock:
            return self.state.repos[repo_id]

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` at the head of main."""
        with self.state.lock:
            return dict(self.state.repos[repo_id].head.files)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
