"""A loopback socket that answers one Kafka request with a prepared body, for unit tests of
the code that speaks the Kafka protocol itself (``infra.kafka``)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def answering_once(body: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """``(port, requests seen)``: the first connection's request is recorded and answered
    with its correlation id followed by ``body``."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            (size,) = struct.unpack(">i", conn.recv(4))
            request = conn.recv(size)
            seen.append(request)
            answer = request[4:8] + body
            conn.sendall(struct.pack(">i", len(answer)) + answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        server.close()
        thread.join(timeout=2)
