"""The key behind fingerprints of masked values.

Masked values are kept only as HMAC-SHA256 fingerprints, so an investigator can ask "did this
leaked key pass through, when, by whom?" without skillgate storing the key. Every service that
computes or compares fingerprints must use the same key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from skillgate.config import CommonSettings


def load_fingerprint_key(settings: CommonSettings | None = None) -> bytes:
    """``SKILLGATE_FINGERPRINT_KEY`` if set, else a key generated once under the data directory.

    The generated file is created atomically with mode 0600, so services started together on
    one machine (the local stack) agree on it.
    """
    settings = settings or CommonSettings()
    if settings.fingerprint_key is not None:
        value = settings.fingerprint_key.get_secret_value()
        if not value:
            raise ValueError("SKILLGATE_FINGERPRINT_KEY is empty")
        return value.encode()
    path = Path(settings.data_dir) / "fingerprint.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole to a private temp file, then linked into place: a concurrent reader sees
        # either no file or the complete key, and only the first writer's key wins.
        tmp = path.with_name(f".fingerprint.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty")
    return key.encode()
