"""Loopback ports: the one helper both the launcher (a private Ray's dashboard) and the local stack need,
kept apart so that no production module imports the stack's tooling."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; bind it soon, another process may take it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
