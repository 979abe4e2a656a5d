"""The receiver sheds slow, stalled and vanishing clients (a real uvicorn on loopback, raw sockets).

A trickled request line or body is cut off at its deadline, connections past the limit are
answered 503, and a client that disconnects mid-body costs one log line, not a traceback.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from urllib.parse import urlsplit

from falflow.emulator import RunningEmulator
from tests.support.receiver import (
    EmittedEvents,
    RunningReceiver,
    receiver_settings,
    serve_receiver,
)


@contextmanager
def _connect(receiver: RunningReceiver) -> Iterator[socket.socket]:
    url = urlsplit(receiver.url)
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=10) as s:
        yield s


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> tuple[bool, bytes]:
    """Send ``trickle`` a byte every 0.2 s until the server closes the connection or answers;
    whether that happened within ``seconds``, and what was answered."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(4096)
        except TimeoutError:
            answer = None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() < deadline, b""
        if answer is not None:
            return time.monotonic() < deadline, answer
        if time.monotonic() > deadline:
            return False, b""
    return False, b""


def test_a_trickled_request_line_is_closed_at_the_header_deadline(
    emulator: RunningEmulator, events: EmittedEvents, all_logs: list[str]
) -> None:
    settings = receiver_settings(emulator, header_timeout_seconds=1)
    with serve_receiver(settings, events.client) as receiver, _connect(receiver) as sock:
        path = urlsplit(receiver.url).path
        trickle = f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: {'a' * 200}".encode()
        closed, answer = _closed_within(sock, 4, trickle)
    assert closed
    assert answer == b""  # closed without an answer
    assert sum("request headers took over 1 s" in line for line in all_logs) == 1


def test_a_trickled_body_is_answered_408_at_the_body_deadline(
    emulator: RunningEmulator, events: EmittedEvents
) -> None:
    settings = receiver_settings(emulator, body_timeout_seconds=1)
    with serve_receiver(settings, events.client) as receiver, _connect(receiver) as sock:
        path = urlsplit(receiver.url).path
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n".encode())
        closed, answer = _closed_within(sock, 4, b"{" * 500)
    assert closed
    assert answer.startswith(b"HTTP/1.1 408")
    assert events.all() == []


def test_connections_past_the_limit_are_answered_503(
    emulator: RunningEmulator, events: EmittedEvents
) -> None:
    settings = receiver_settings(emulator, max_connections=2)
    with serve_receiver(settings, events.client) as receiver, ExitStack() as held:
        for _ in range(2):  # two clients that connected and went quiet
            held.enter_context(_connect(receiver)).sendall(b"POST / HTTP/1.1\r\n")
        time.sleep(0.2)
        assert receiver.deliver_raw(b"{}").status_code == 503
    healthy = receiver_settings(emulator)
    with serve_receiver(healthy, events.client) as receiver:
        assert receiver.deliver_raw(b"{}").status_code == 400  # let in (and refused: unsigned)


def test_a_client_gone_mid_body_costs_one_log_line(
    emulator: RunningEmulator, events: EmittedEvents, all_logs: list[str]
) -> None:
    with serve_receiver(receiver_settings(emulator), events.client) as receiver:
        path = urlsplit(receiver.url).path
        for _ in range(5):
            with _connect(receiver) as sock:
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                sock.sendall(head.encode() + b'{"partial": ')
                time.sleep(0.1)
        time.sleep(0.5)
    gone = [line for line in all_logs if "disconnected mid-body" in line]
    assert len(gone) == 5
    assert not any("Traceback" in line or "ClientDisconnect" in line for line in all_logs)
    assert events.all() == []
