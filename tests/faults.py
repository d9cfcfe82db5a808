"""Faults the tests make happen for real, shared by the unit and the integration tests."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HungDisk:
    """A FIFO at `path` standing for a hung disk: opening it to write blocks (as on a stalled network mount) until
    `come_back` starts a reader; from then on every open for writing finds one, and what is written is kept
    (`written`). `close` stops the reader once it has read all there is, and removes the FIFO. A writer blocked in
    its open when the disk never came back stays blocked: call `come_back` before `close` wherever one may be."""

    def __init__(self, path: Path):
        self.path = Path(path)
        os.mkfifo(self.path)
        self._chunks: list[bytes] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        # opened read-write, the FIFO keeps a reader (and a writer: this one) for good, so every later open for
        # writing finds the reader and a read never meets the end of the file. A reader that opened it again after
        # each writer's end could be closing just as the next writer opened and wrote: those lines were lost, and
        # a test of the log saw an event missing now and then
        fd = os.open(self.path, os.O_RDWR)
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready:
                    self._chunks.append(os.read(fd, 1 << 16))
                elif self._stop.is_set():  # stopped, and nothing left to read
                    return
        finally:
            os.close(fd)

    def come_back(self) -> None:
        self._reader.start()

    @property
    def written(self) -> bytes:
        return b"".join(self._chunks)

    def close(self) -> None:
        self._stop.set()
        if self._reader.is_alive():
            self._reader.join(timeout=30)
        self.path.unlink(missing_ok=True)


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 (`url`) answering each POST with the next step of `script`, a list the test
    fills: ("reset",) drops the connection with a TCP reset once the request is read (as a proxy or a dying node
    does: the client's read fails); (status, content type, body) answers so. `close` stops it."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        script = self.script

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                step = script.pop(0)
                if step == ("reset",):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                status, kind, body = step
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # the reset connection's own flush fails
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Front:
    """An HTTP front of a real server (`target`, a URL) that passes every request through to it (`answer`, which a
    fault overrides). Its address is `url`; `close` stops it."""

    def __init__(self, target: str):
        import httpx

        front, self._upstream = self, httpx.Client(base_url=target.rstrip("/"), timeout=120)

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                skip = {"host", "content-length", "connection", "accept-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                status, kept, content = front.answer(self.command, self.path, headers, body)
                try:
                    self.send_response(status)
                    for key, value in kept.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:  # the client gave up waiting (a held request): nobody reads the answer
                    pass

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        got = self._upstream.request(method, path, content=body, headers=headers)
        return got.status_code, {"content-type": got.headers.get("content-type", "application/json")}, got.content

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        return self.forward(method, path, headers, body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()


class FailingServer(Front):
    """A `Front` that answers 500 to the requests `fails(method, path)` picks while `failing` is set, as a server
    failing under load does (a database locked), and passes every other request through to the real one."""

    def __init__(self, target: str, fails: Callable[[str, str], bool]):
        self.failing, self.fails = False, fails  # `fails` may be replaced while it runs
        super().__init__(target)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        if self.failing and self.fails(method, path):
            return 500, {"Content-Type": "application/json"}, b'{"detail": "database is locked"}'
        return self.forward(method, path, headers, body)


class AnswerLostServer(Front):
    """A `Front` that passes the requests `picks(method, path)` chooses on to the real server, which commits them,
    and answers the first `lost` of them 504 all the same: a proxy whose upstream answered too late for it."""

    def __init__(self, target: str, picks: Callable[[str, str], bool], lost: int = 1):
        self.picks, self.lost = picks, lost
        super().__init__(target)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        got = self.forward(method, path, headers, body)
        if self.lost and self.picks(method, path):
            self.lost -= 1
            return 504, {"Content-Type": "text/html"}, b"<html><body>504 Gateway Time-out</body></html>"
        return got


class LateServer(Front):
    """A `Front` that holds the first request `holds(method, path)` picks without passing it on or answering, so
    its client times out waiting, and hands it to the real server only when `commit_held` is called: a server that
    commits a request after its client gave up. `before(method, path)`, if set, runs ahead of every other request
    (the moment to commit the held one). The held request's answer goes to its old connection once the real
    server gave it; nobody reads it then."""

    def __init__(self, target: str, holds: Callable[[str, str], bool]):
        self.holds, self.before = holds, None
        self.held: tuple[str, str, dict[str, str], bytes] | None = None
        self._committed = threading.Event()
        self._answer: tuple[int, dict, bytes] | None = None
        super().__init__(target)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        if self.held is None and self.holds(method, path):
            self.held = (method, path, headers, body)
            self._committed.wait(timeout=600)
            return self._answer or (504, {}, b"")
        if self.before is not None:
            self.before(method, path)
        return self.forward(method, path, headers, body)

    def commit_held(self) -> bytes:
        """Pass the held request to the real server now; its answer's body (what its client never got)."""
        if self.held is None or self._committed.is_set():
            raise RuntimeError("no request is held")
        self._answer = self.forward(*self.held)
        self._committed.set()
        return self._answer[2]

    def close(self) -> None:
        self._committed.set()  # a held request still waiting ends
        super().close()


@contextmanager
def held_by_another_thread(lock: Callable[[], AbstractContextManager], timeout: float = 30.0) -> Iterator[None]:
    """`lock()` (a file lock: a retrain's, a demo's) held by another thread for the block, as a running job holds
    it: a flock is per open file, so the caller's own taking of it meets a holder."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            holding.set()
            release.wait(timeout * 2)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(timeout), "the other thread never took the lock"
        yield
    finally:
        release.set()
        holder.join()
