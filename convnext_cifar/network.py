"""Network addresses: whether one answers, asked with a short timeout before a library would
spend a minute in its own retries (the model hub, an MLflow tracking server), and the
credentials a URI may carry, which are shown masked and never recorded."""

from __future__ import annotations

import socket
import threading
from urllib.parse import unquote, urlsplit


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


def credentials(uri: str) -> tuple[str, str, str]:
    """(the URI without its user and password, the user, the password); '' for what it lacks.
    `http://alice:S3CRET@host:5000/` -> (`http://host:5000/`, `alice`, `S3CRET`)."""
    clean, user, password = _parts(uri)
    return clean, unquote(user), unquote(password)


def masked(uri: str) -> str:
    """The URI as it may be shown: a password replaced by ***."""
    clean, user, password = _parts(uri)
    if not password:
        return uri
    scheme, _, rest = clean.partition("://")
    return f"{scheme}://{user}:***@{rest}"


def _parts(uri: str) -> tuple[str, str, str]:
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return uri, "", ""
    userinfo, _, host = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{host}{slash}{path}", user, password
