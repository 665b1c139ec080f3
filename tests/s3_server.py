"""A real S3 API on 127.0.0.1 (moto's server mode) and a fault-injecting HTTP proxy in front of it.

Tests reach both through s3fs, the client users run. The credentials are fake but secret-shaped, so
tests can grep every output for them.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY = "AKIADOCEVTESTKEY0001"
SECRET_KEY = "docev-test-secret-Zq9v2LmX8rT4"
CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class MotoS3:
    """moto's ThreadedMotoServer on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.stop()


class FaultProxy:
    """Forwards HTTP to ``upstream``; every ``every``-th GET gets a 503 SlowDown or a dropped connection
    (alternately). ``faults`` counts what was injected, ``requests`` what was forwarded."""

    def __init__(self, upstream: str, every: int = 3) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every, self.lock = every, threading.Lock()
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self._gets = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._fault(self.command)
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # a HEAD reply has no body: its Content-Length is the object's size
                self.send_header("Content-Length", reply.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))  # fmt: skip
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with proxy.lock:
                    proxy.requests += 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _fault(self, method: str) -> str | None:
        if method != "GET":
            return None
        with self.lock:
            self._gets += 1
            if self._gets % self.every:
                return None
            kind = "503" if (self._gets // self.every) % 2 else "drop"
            self.faults[kind] += 1
            return kind

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def upload(fs, local_root, url: str) -> None:
    """Copy a local folder to ``url`` (s3://bucket/prefix), file by file."""
    from pathlib import Path

    root = Path(local_root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{path.relative_to(root).as_posix()}", path.read_bytes())
