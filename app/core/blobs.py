"""Content-addressed blob store for uploads: a directory every worker can read.

Uploads are streamed to a temporary file while their SHA-256 is computed and
their size checked, then renamed into place (``ab/abcdef….bin``), so a blob
is either whole or absent, and the same file uploaded twice is stored once.

Because of that sharing, a blob is deleted only when no job refers to it and
no request of this process still holds it: :meth:`BlobStore.put_stream` pins
the blob it stores until the request lets go (:meth:`BlobStore.unpin`), so
a refused submission never deletes the bytes of an accepted one that is
still being checked. (Replicas of the API do not see each other's pins.)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

CHUNK = 1 << 20


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a blob id: {digest!r}")
        return self.root / digest[:2] / f"{digest}.bin"

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> tuple[str, int]:
        """Store a stream of bytes; returns (sha256 hex, size), the blob pinned for the caller to :meth:`unpin`.
        Raises :class:`BlobTooLarge` past ``limit``."""
        self.root.mkdir(parents=True, exist_ok=True)
        sha, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise BlobTooLarge(limit)
                    sha.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = sha.hexdigest()
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:  # pinned before it lands: a concurrent delete of the same bytes cannot take it
                self._pins[digest] += 1
            try:
                os.replace(tmp, final)
            except BaseException:
                self.unpin(digest)
                raise
            return digest, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def delete(self, digest: str, unused: Callable[[], bool] = lambda: True) -> None:
        """Delete a blob no request holds, if ``unused()`` (asked while no pin can change) says no job needs it."""
        with self._lock:
            if self._pins[digest] == 0 and unused():
                self.path(digest).unlink(missing_ok=True)
