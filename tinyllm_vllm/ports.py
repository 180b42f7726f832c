"""Ports for the servers the kit starts: vllm serve's default, a free one, and one held until the server binds it
(after sglang's ``reserve_port``): nothing else can take a held port between choosing it and the server's start."""

from __future__ import annotations

import socket

DEFAULT_PORT = 8000  # vllm serve's


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it). Racy: prefer ``reserve_port``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to ``port`` (0: one the OS picks) with SO_REUSEPORT, held until the server listens.

    vLLM's server binds its own socket with SO_REUSEADDR and SO_REUSEPORT, so it can bind the held port
    while nothing else can: no other program takes the port between choosing it and the server's start."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host if host not in ("0.0.0.0", "::", "") else "127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
