"""A Hugging Face Hub of our own on 127.0.0.1, for testing downloads with the real client.

It answers the endpoints `huggingface_hub` (2.x) calls for `repo_info`,
`list_repo_tree`, `hf_hub_download` and `snapshot_download`:

- `GET /api/{models,datasets}/{repo}/revision/{rev}`: repo info, with the commit `sha`;
- `GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]`: a list of `{type, path, size, oid[, lfs]}`;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}` (datasets: `/datasets/{repo}/resolve/…`): regular files
  are served directly with `ETag` (the git blob id), `X-Repo-Commit` and `Content-Length`; LFS files
  answer `302` to a second server on another port (a stand-in for the Hub's CDN) with `X-Linked-Etag`
  (the sha256) and `X-Linked-Size`, as huggingface.co does. The client then fetches from the "CDN"
  without its `Authorization` header.

Both honour `Range: bytes=N-` (206 + `Content-Range`), so an interrupted transfer resumes.
Errors carry the `X-Error-Code` header the client maps to its exception types:
unknown repo 404 `RepoNotFound`; private repo without a valid token 401 `RepoNotFound`;
gated repo 401/403 `GatedRepo`; unknown token 401 "Invalid credentials in Authorization header";
unknown revision 404 `RevisionNotFound`; unknown file 404 `EntryNotFound`.

Uploads, as `HfApi.create_repo`, `create_branch` and `create_commit` make them (with HF_HUB_DISABLE_XET=1: the
client's LFS path; the Hub's Xet storage protocol is not served here):

- `POST /api/repos/create`: a new repo with one commit (`.gitattributes`), 409 when it exists;
- `POST /api/{models,datasets}/{repo}/branch/{branch}`: a branch from main, 409 when it exists;
- `POST /api/validate-yaml`: the model card's front matter must parse as a YAML mapping (else 400);
- `POST /api/{models,datasets}/{repo}/preupload/{rev}`: each file's upload mode (lfs or regular) and the oid of
  the file already there;
- `POST /{repo}.git/info/lfs/objects/batch`: an upload action per object not stored yet, whose `href` is a `PUT`
  on the "CDN" (sent without the Authorization header, as to S3), and a verify action back on the Hub;
- `POST /api/{models,datasets}/{repo}/commit/{rev}`: the NDJSON commit (header, `file` with base64 content,
  `lfsFile` naming an uploaded object, `deletedFile`), applied whole or refused whole: a commit naming an LFS
  object never uploaded is refused (422) and the branch does not move.

Knobs: `fail_with[repo_id] = status` answers that status for everything about a repo;
`drop_once.add(path)` cuts the connection halfway through the next full GET of that file;
`fail_file[path] = n` answers 500 to the next n GETs of that file's content;
`fail_upload[sha256] = status` answers that status to the PUT of that object's bytes (a failure mid-upload);
`fail_commit[repo_id] = status` answers that status to commits to that repo; `read_only` holds tokens that
may read but not write (403).
Every request is recorded in `requests` (method, path, Range and Authorization headers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".parquet", ".gguf")
LFS_MIN_SIZE = 10_000


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    """Tokens that accepted a gated repo's terms."""
    messages: dict[str, str] = field(default_factory=dict)
    """Commit sha → its title (commits made through the commit endpoint)."""

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        matches = [sha for sha in self.commits if len(rev) >= 7 and sha.startswith(rev)]
        return matches[0] if len(matches) == 1 else None


@dataclass
class Seen:
    server: str
    method: str
    path: str
    range: str | None
    authorization: str | None


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.url` is the value for HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.tokens: set[str] = set()
        self.fail_with: dict[str, int] = {}
        self.drop_once: set[str] = set()
        self.fail_file: dict[str, int] = {}
        self.fail_upload: dict[str, int] = {}
        self.fail_commit: dict[str, int] = {}
        self.read_only: set[str] = set()
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._hub = _Server(("127.0.0.1", 0), _Handler, self, "hub")
        self._cdn = _Server(("127.0.0.1", 0), _Handler, self, "cdn")

    # --- repos -------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes | str], *, repo_type: str = "model",
                 branch: str = "main", tags: tuple[str, ...] = (), private: bool = False,
                 gated: bool = False) -> str:
        """Create a repo (or add a commit to `branch` of an existing one); return the commit sha."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type))
        repo.private, repo.gated = private or repo.private, gated or repo.gated
        data = {path: (content.encode() if isinstance(content, str) else content) for path, content in files.items()}
        with self._lock:
            self._counter += 1
            digest = hashlib.sha1(f"{repo_type}/{repo_id}#{self._counter}".encode())
        for path in sorted(data):
            digest.update(path.encode() + b"\0" + data[path])
            if is_lfs(path, data[path]):
                self.blobs[hashlib.sha256(data[path]).hexdigest()] = data[path]
        sha = digest.hexdigest()
        repo.commits[sha] = data
        repo.refs[branch] = sha
        for tag in tags:
            repo.refs[tag] = sha
        return sha

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> HubServer:
        for server in (self._hub, self._cdn):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    # --- what the tests look at --------------------------------------------------------------------

    def seen(self, method: str | None = None, contains: str = "", server: str | None = None) -> list[Seen]:
        return [r for r in list(self.requests)
                if (method is None or r.method == method) and contains in r.path
                and (server is None or r.server == server)]

    def file_requests(self) -> list[Seen]:
        """HEAD/GET of file contents (resolve and CDN), not API calls."""
        return [r for r in list(self.requests) if "/resolve/" in r.path or r.server == "cdn"]

    @property
    def authorizations(self) -> list[str]:
        return [r.authorization for r in list(self.requests) if r.authorization]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: HubServer, role: str):
        super().__init__(address, handler)
        self.hub = hub
        self.role = role


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # --- plumbing ----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, headers: dict | None = None) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None = None, message: str = "", headers: dict | None = None) -> None:
        extra = {"X-Error-Code": code} if code else {}
        if message:
            extra["X-Error-Message"] = message
        body = json.dumps({"error": message or code or str(status)}).encode()
        self._send(status, body, {"Content-Type": "application/json", **extra, **(headers or {})})

    def _token(self) -> str | None:
        value = self.headers.get("Authorization")
        return value.split(" ", 1)[1] if value and " " in value else None

    def _record(self) -> None:
        self.server.hub.requests.append(Seen(
            self.server.role, self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))

    def do_HEAD(self) -> None:
        self._record()
        self._route()

    def do_GET(self) -> None:
        self._record()
        self._route()

    def do_POST(self) -> None:
        self._record()
        self._write_route(self._body())

    def do_PUT(self) -> None:
        self._record()
        self._write_route(self._body())

    def _body(self) -> bytes:
        """The request body, sent with a Content-Length or chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # --- routes ------------------------------------------------------------------------------

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if self.server.role == "cdn":
            if path.startswith("/blobs/") and path[7:] in self.server.hub.blobs:
                name = query.get("filename", [""])[0]
                return self._content(self.server.hub.blobs[path[7:]], {}, name)
            return self._error(404)
        if path.startswith("/api/models/") or path.startswith("/api/datasets/"):
            repo_type = "model" if path.startswith("/api/models/") else "dataset"
            rest = path.split("/", 3)[3]
            for marker, handler in (("/revision/", self._revision), ("/tree/", self._tree)):
                if marker in rest:
                    repo_id, tail = rest.split(marker, 1)
                    return handler(repo_type, repo_id, tail, query)
            if rest.count("/") == 1:  # repo_info without a revision: main
                return self._revision(repo_type, rest, "main", query)
            return self._error(404)
        repo_type = "model"
        if path.startswith("/datasets/"):
            repo_type, path = "dataset", path[len("/datasets"):]
        if "/resolve/" in path:
            repo_id, tail = path[1:].split("/resolve/", 1)
            rev, _, filename = tail.partition("/")
            return self._resolve(repo_type, repo_id, unquote(rev), unquote(filename))
        return self._error(404)

    def _access(self, repo_type: str, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
        """The repo and commit, or None after answering with the error the Hub would give."""
        hub = self.server.hub
        token = self._token()
        if token is not None and token not in hub.tokens:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo_id in hub.fail_with:
            status = hub.fail_with[repo_id]
            code = {401: "RepoNotFound", 403: "GatedRepo", 404: "RepoNotFound"}.get(status)
            self._error(status, code, f"forced {status}")
            return None
        repo = hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token is None):
            status = 401 if token is None else 404
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and token not in repo.granted:
            self._error(401 if token is None else 403, "GatedRepo",
                        f"Access to {repo_id} is restricted. You must have access to it and be authenticated.")
            return None
        sha = repo.resolve(rev) if rev is not None else repo.refs.get("main")
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, sha

    def _revision(self, repo_type: str, repo_id: str, rev: str, query: dict) -> None:
        found = self._access(repo_type, repo_id, unquote(rev))
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        self._json({
            "id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "sha": sha,
            "private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False,
            "lastModified": "2025-01-01T00:00:00.000Z", "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def _tree(self, repo_type: str, repo_id: str, tail: str, query: dict) -> None:
        rev, _, sub = tail.partition("/")
        found = self._access(repo_type, repo_id, unquote(rev))
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        sub = unquote(sub).strip("/")
        prefix = f"{sub}/" if sub else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if not recursive and "/" in rel:
                folders.add(prefix + rel.split("/", 1)[0])
                continue
            if recursive:
                parents = rel.split("/")[:-1]
                folders.update(prefix + "/".join(parents[: i + 1]) for i in range(len(parents)))
            data = files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if is_lfs(path, data):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        if sub and not entries:
            return self._error(404, "EntryNotFound", f"{sub} does not exist")
        self._json(entries)

    def _resolve(self, repo_type: str, repo_id: str, rev: str, filename: str) -> None:
        found = self._access(repo_type, repo_id, rev)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if is_lfs(filename, data):
            digest = hashlib.sha256(data).hexdigest()
            location = f"{self.server.hub.cdn_url}/blobs/{digest}?filename={quote(filename, safe='')}"
            return self._send(302, b"", {**headers, "Location": location, "ETag": f'"{digest}"',
                                         "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": len(data)})
        self._content(data, {**headers, "ETag": f'"{git_blob_id(data)}"'}, filename)

    def _content(self, data: bytes, headers: dict, name: str) -> None:
        """The file's bytes, a Range of them, or half of them and a cut connection (drop_once)."""
        total = len(data)
        headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and self.command == "GET":
            start_text, _, end_text = wanted[6:].partition("-")
            start = int(start_text)
            end = int(end_text) if end_text else total - 1
            if start >= total:
                return self._send(416, b"", {"Content-Range": f"bytes */{total}"})
            return self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{total}"})
        hub = self.server.hub
        if self.command == "GET" and hub.fail_file.get(name, 0) > 0:
            hub.fail_file[name] -= 1
            return self._error(500, None, "Internal Error")
        if self.command == "GET" and name in hub.drop_once and total > 1:
            hub.drop_once.discard(name)
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(total))
            self.end_headers()
            self.wfile.write(data[: total // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(200, data, headers, length=total)


    # --- uploads ----------------------------------------------------------------------------------

    def _write_route(self, body: bytes) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if self.server.role == "cdn":
            if self.command == "PUT" and path.startswith("/upload/"):
                return self._store(path[len("/upload/"):], body)
            return self._error(404)
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path.startswith("/api/models/") or path.startswith("/api/datasets/"):
            repo_type = "model" if path.startswith("/api/models/") else "dataset"
            rest = path.split("/", 3)[3]
            for marker, handler in (("/preupload/", self._preupload), ("/commit/", self._commit),
                                    ("/branch/", self._branch)):
                if marker in rest:
                    repo_id, tail = rest.split(marker, 1)
                    return handler(repo_type, repo_id, unquote(tail), body)
            return self._error(404)
        if ".git/info/lfs/objects/" in path:
            repo_type = "dataset" if path.startswith("/datasets/") else "model"
            prefix = path[len("/datasets"):] if repo_type == "dataset" else path
            repo_id, action = prefix[1:].split(".git/info/lfs/objects/", 1)
            return self._lfs(repo_type, repo_id, action, json.loads(body or b"{}"))
        return self._error(404)

    def _writer(self, repo_type: str, repo_id: str, rev: str | None = None) -> tuple[Repo, str] | None:
        """The repo and the commit of `rev` for a write, or None after answering as the Hub would."""
        hub = self.server.hub
        token = self._token()
        if token is None:
            self._error(401, "RepoNotFound", "Writing needs a token")
            return None
        found = self._access(repo_type, repo_id, rev)
        if found is None:
            return None
        if token in hub.read_only:
            self._error(403, None, "You don't have the rights to write to this repository")
            return None
        return found

    def _create_repo(self, payload: dict) -> None:
        hub = self.server.hub
        token = self._token()
        if token is None or token not in hub.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        if token in hub.read_only:
            return self._error(403, None, "You don't have the rights to create a repository here")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in hub.repos:
            return self._send(409, json.dumps({"error": "You already created this repo", "url": url}).encode(),
                              {"Content-Type": "application/json"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub.add_repo(repo_id, {".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                     repo_type=repo_type, private=private)
        self._json({"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        if content.startswith("---"):
            head = content[3:].split("\n---", 1)[0]
            try:
                data = yaml.safe_load(head)
            except yaml.YAMLError as err:
                return self._send(400, json.dumps({"errors": [{"message": str(err)}]}).encode(),
                                  {"Content-Type": "application/json"})
            if not isinstance(data, dict):
                return self._send(400, json.dumps({"errors": [{"message": "metadata must be a mapping"}]}).encode(),
                                  {"Content-Type": "application/json"})
        self._json({"errors": [], "warnings": []})

    def _branch(self, repo_type: str, repo_id: str, branch: str, body: bytes) -> None:
        found = self._writer(repo_type, repo_id)
        if found is None:
            return
        repo, main = found
        if branch in repo.refs:
            return self._error(409, None, f"Branch {branch} already exists")
        repo.refs[branch] = main
        self._json({})

    def _preupload(self, repo_type: str, repo_id: str, rev: str, body: bytes) -> None:
        found = self._writer(repo_type, repo_id, rev)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        answer = []
        for entry in json.loads(body)["files"]:
            path, size = entry["path"], entry["size"]
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            there = files.get(path)
            oid = None
            if there is not None:
                oid = hashlib.sha256(there).hexdigest() if is_lfs(path, there) else git_blob_id(there)
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._json({"files": answer, "commitOid": sha})

    def _lfs(self, repo_type: str, repo_id: str, action: str, payload: dict) -> None:
        found = self._writer(repo_type, repo_id)
        if found is None:
            return
        hub = self.server.hub
        if action == "verify":
            if payload.get("oid") in hub.blobs:
                return self._json({})
            return self._error(404, None, "Object not found")
        if action != "batch" or payload.get("operation") != "upload":
            return self._error(400, None, "Only uploads")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.blobs:
                prefix = "datasets/" if repo_type == "dataset" else ""
                entry["actions"] = {
                    "upload": {"href": f"{hub.cdn_url}/upload/{obj['oid']}?X-Amz-Signature=signed-url-secret"},
                    "verify": {"href": f"{hub.url}/{prefix}{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def _store(self, oid: str, body: bytes) -> None:
        """The "CDN" (S3) end of an LFS upload: the bytes must hash to the object id."""
        hub = self.server.hub
        if oid in hub.fail_upload:
            return self._error(hub.fail_upload[oid], None, "AccessDenied: upload failed")
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, "BadDigest: the content does not match the object id")
        hub.blobs[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _commit(self, repo_type: str, repo_id: str, rev: str, body: bytes) -> None:
        hub = self.server.hub
        found = self._writer(repo_type, repo_id, rev)
        if found is None:
            return
        repo, parent = found
        if repo_id in hub.fail_commit:
            return self._error(hub.fail_commit[repo_id], None, "forced commit failure")
        if rev not in repo.refs or rev in repo.commits:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev} is not a branch")
        files = dict(repo.commits[parent])
        title = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary", "")
                if value.get("parentCommit") and not parent.startswith(value["parentCommit"]):
                    return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = hub.blobs.get(value["oid"])
                if data is None:  # refused whole: the branch does not move
                    return self._error(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"].rstrip("/")
                files = {p: d for p, d in files.items() if p != path and not p.startswith(path + "/")}
            else:
                return self._error(400, None, f"Unknown commit item {key}")
        with hub._lock:
            hub._counter += 1
            digest = hashlib.sha1(f"{repo_type}/{repo_id}#{hub._counter}#{parent}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.refs[rev] = sha
        repo.messages[sha] = title
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json({"commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})


# --- what the download tests share ---------------------------------------------------------------


def blob(seed: str, size: int) -> bytes:
    """Deterministic, incompressible bytes."""
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


MODEL_V1 = {
    "config.json": '{"model_type": "llama", "version": 1}',
    "tokenizer.json": '{"version": "1.0"}',
    "README.md": "# tiny\n",
    "model.safetensors": blob("st", 30_000),
    "pytorch_model.bin": blob("bin", 30_000),
    "tf_model.h5": blob("h5", 20_000),
    "flax_model.msgpack": blob("flax", 20_000),
    "sub/extra.txt": "nested\n",
    "lineage.json": '{"not": "ours"}',
}


def model_entry(**extra) -> dict:
    return {"models": [{"name": "tiny", "source": "hub", "repo_id": "acme/tiny", "output": "out/tiny", **extra}]}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_clean_error(rc: int, err: str) -> None:
    assert rc == 1, err
    assert "Error:" in err
    assert "Traceback" not in err
