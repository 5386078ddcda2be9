"""Whether a network address answers, asked with a short timeout before a library would spend a
minute in its own retries (the model hub, an MLflow tracking server)."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit


def reachable(address: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` (DNS included)."""
    parts = urlsplit(address if "://" in address else "http://" + address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # name lookups ignore the timeout
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
