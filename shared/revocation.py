"""The list of revoked client certificates: written by `flowerpot certs --revoke`, read by the
server at every join.

It lives beside the server's certificate (server/revoked.json), so it reaches the server's
container through the same read-only mount, and a revocation needs no restart. The server
re-reads it only when the file changed (one stat per join).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from shared.errors import BadInput

log = logging.getLogger("flowerpot.server")

REVOKED_FILE = "revoked.json"  # {"revoked": {"<serial, hex>": {"name": ..., "revoked": "<ISO time>"}}}


def read_revoked(path: Path) -> dict[str, dict[str, str]]:
    """Serial (lower-case hex) -> what is known about it; {} when there is no file."""
    try:
        data = json.loads(path.read_text())
        revoked = data["revoked"]
        if not isinstance(revoked, dict):
            raise TypeError
        return {str(serial).lower(): dict(info) for serial, info in revoked.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(
            f"{path} cannot be read as a revocation list ({exc.__class__.__name__}): write it again with "
            "`flowerpot certs --revoke NAME`"
        ) from None


def add_revoked(path: Path, serials: dict[str, str]) -> None:
    """Add serial -> name entries; written whole and renamed into place, so that a server never
    reads half a list."""
    revoked = read_revoked(path)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for serial, name in serials.items():
        revoked.setdefault(serial.lower(), {"name": name, "revoked": now})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"revoked": revoked}, indent=1, sort_keys=True) + "\n")
    temporary.chmod(0o644)  # no secret in it; the server's user must read it
    os.replace(temporary, path)


class RevocationList:
    """The server's view of revoked.json, re-read when its stat changes. If it becomes
    unreadable during a run every certificate is refused (fail closed) until it is fixed. If it
    disappears during a run (deleted by mistake, a volume unmounted) it is not read as "nothing
    revoked": the last list read stays in force, with a warning, until the file is back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: dict[str, dict[str, str]] = {}
        self._problem: str | None = None
        self._missing = False  # it existed, and is gone: the last list read stays in force
        self._refresh()
        if self._problem is not None:  # at start: a bad list stops the server with exit 2
            raise BadInput(self._problem)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            self._problem = f"{self.path} cannot be read ({exc.strerror})"
            return
        if stamp == self._stamp and self._problem is None:
            return
        if stamp is None and self._stamp is not None:
            if not self._missing:
                self._missing = True
                log.warning(
                    "revocation list %s disappeared: keeping the last one read (%d revoked certificate(s)) "
                    "until it is back; restore it (`flowerpot certs --revoke` writes it again)",
                    self.path, len(self._revoked),
                )  # fmt: skip
            return
        self._missing = False
        try:
            self._revoked, self._problem = (read_revoked(self.path) if stamp else {}), None
        except BadInput as exc:
            self._problem = str(exc)
            log.error("%s: refusing every client certificate until it is fixed", exc)
            return
        self._stamp = stamp
        if stamp is not None:
            log.info("revocation list %s: %d revoked certificate(s)", self.path, len(self._revoked))

    def reason(self, serial: int) -> str | None:
        """Why the certificate with this serial may not join, or None."""
        with self._lock:
            self._refresh()
            if self._problem is not None:
                return "the server cannot read its revocation list; ask its operator"
            entry = self._revoked.get(f"{serial:x}")
        if entry is None:
            return None
        return (
            f"this client's certificate (serial {serial:x}) was revoked on {entry.get('revoked', '?')}: "
            "ask the server's operator for a new one"
        )
