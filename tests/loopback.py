"""Helpers for tests that start servers on this machine's loopback interface."""

import socket


def free_port() -> int:
    """A loopback port nobody listens on (bound and released: the OS will not reuse it soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
