"""An OpenAI-compatible chat endpoint on 127.0.0.1 for the judges' tests (a helper module, not a test module).

A test server says what to answer (`reply(body)`: the assistant's text, or an HTTP status to fail with); this
serves it on a free loopback port, counts requests, and stops serving past `limit`, so a looping client cannot
run forever."""

from __future__ import annotations

import abc
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer(abc.ABC):
    """POST /v1/chat/completions on 127.0.0.1; subclasses implement `reply`."""

    def __init__(self, limit: int = 200):
        self.requests = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    number = outer.requests
                    outer.auth.append(self.headers.get("Authorization"))
                answer = 429 if number > limit else 404 if self.path != "/v1/chat/completions" else \
                    outer.reply(body, number)
                if isinstance(answer, int):
                    self.send_response(answer)
                    self.end_headers()
                    self.wfile.write(b"refused")
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    @abc.abstractmethod
    def reply(self, body: dict, number: int) -> str | int:
        """The assistant's answer to request `number` (1-based), or an HTTP status to fail it with."""

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
