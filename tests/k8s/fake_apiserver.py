"""FakeApiServer: a real HTTP server on 127.0.0.1 that replays scripted Kubernetes API responses.

It is a test fake, not a Kubernetes: no storage, no controllers. Each (method, path) has a script of
replies, served in order (the last one repeats). The official ``kubernetes`` client is pointed at it,
so the launcher's real request building, serialisation, error mapping (ApiException) and log
streaming are exercised over HTTP. Every request is recorded for assertions; a request with no script
gets a 404 Status and lands in ``unexpected``. A list reply is filtered by the request's equality-based
``labelSelector``, as the API server does.

The JSON in ``responses/`` is in the API server's wire format (Status objects, PodList, PyTorchJob
status as the Training Operator v1.9 writes it: condition types/reasons/messages, replicaStatuses;
TrainJob status as Trainer v2.3 writes it: its Created condition, the JobSet's Completed/Failed
condition copied as Complete/Failed, jobsStatus; the pods of a TrainJob with JobSet's and the Job
controller's labels). No cluster is reachable from our machines, so these were written from those
formats rather than captured; ``{job}`` / ``{namespace}`` are filled in per test.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client

RESPONSES = Path(__file__).parent / "responses"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int
    body: Any  # dict/list → JSON, str → text/plain
    headers: dict[str, str] = field(default_factory=dict)


Responder = Reply | Callable[[Request], Reply]


def recorded(name: str, **fill: str) -> Any:
    """A response from ``responses/`` with ``{job}``-style fields filled in."""
    text = (RESPONSES / name).read_text()
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text) if name.endswith(".json") else text


def job_object(body: dict[str, Any], status: str | None, **extra_metadata: Any) -> dict[str, Any]:
    """The object (PyTorchJob, TrainJob, runtime) as the API server returns it: the submitted body plus server
    metadata and the controller's recorded status (``status`` = a file stem in responses/, None before the
    controller acts)."""
    job = copy.deepcopy(body)
    meta = job["metadata"]
    meta.update(
        uid="3c1d7a52-9b1e-4f0c-a8de-52a41f0b6c11",
        resourceVersion="48213",
        generation=1,
        creationTimestamp="2026-11-20T10:00:00Z",
        **extra_metadata,
    )
    if status:
        job["status"] = recorded(f"{status}.json", job=meta["name"], namespace=meta["namespace"])
    return job


def log_reply(text: str) -> Callable[[Request], Reply]:
    """A pod log endpoint: honours ``tailLines`` like the kubelet does."""

    def reply(req: Request) -> Reply:
        lines = text.splitlines(keepends=True)
        if "tailLines" in req.query:
            lines = lines[-int(req.query["tailLines"]) :]
        return Reply(200, "".join(lines))

    return reply


class FakeApiServer:
    def __init__(self) -> None:
        self.scripts: dict[tuple[str, str], list[Responder]] = {}
        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def script(self, method: str, path: str, *replies: Responder) -> None:
        self.scripts[(method, path)] = list(replies)

    def calls(self, method: str, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (r.method, r.path) == (method, path)]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def api_client(self) -> client.ApiClient:
        conf = client.Configuration()
        conf.host = self.url
        return client.ApiClient(conf)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _respond(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            script = self.scripts.get((req.method, req.path))
            if not script:
                self.unexpected.append(req)
                return Reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
            responder = script.pop(0) if len(script) > 1 else script[0]
        reply = responder(req) if callable(responder) else responder
        selector = req.query.get("labelSelector")
        if selector and isinstance(reply.body, dict) and "items" in reply.body:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            items = [i for i in reply.body["items"] if wanted.items() <= (i["metadata"].get("labels") or {}).items()]
            reply = Reply(reply.status, {**reply.body, "items": items}, reply.headers)
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                is_json = "json" in (self.headers.get("Content-Type") or "application/json")
                body = (json.loads(raw) if is_json else raw) if raw else None  # multipart uploads stay bytes
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                reply = fake._respond(Request(self.command, url.path, query, body))
                if isinstance(reply.body, str):
                    data, ctype = reply.body.encode(), "text/plain"
                else:
                    data, ctype = json.dumps(reply.body).encode(), "application/json"
                self.send_response(reply.status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        return Handler
