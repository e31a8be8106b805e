"""Content-addressed blob store for uploads: a directory every worker can read.

Uploads are streamed to a temporary file while their SHA-256 is computed and
their size checked, then renamed into place (``ab/abcdef….bin``), so a blob
is either whole or absent, and the same file uploaded twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 1 << 20


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a blob id: {digest!r}")
        return self.root / digest[:2] / f"{digest}.bin"

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> tuple[str, int]:
        """Store a stream of bytes; returns (sha256 hex, size). Raises :class:`BlobTooLarge` past ``limit``."""
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
            os.replace(tmp, final)
            return digest, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
