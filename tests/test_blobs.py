"""Uploads are stored whole or not at all, by content, within their size limit."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from app.core.blobs import BlobStore, BlobTooLarge


async def chunks(*parts: bytes):
    for part in parts:
        yield part


def test_stream_is_stored_by_content_hash_once(tmp_path):
    store = BlobStore(tmp_path)
    digest, size = asyncio.run(store.put_stream(chunks(b"abc", b"def"), limit=100))
    assert digest == hashlib.sha256(b"abcdef").hexdigest() and size == 6
    assert store.path(digest).read_bytes() == b"abcdef"
    again, _ = asyncio.run(store.put_stream(chunks(b"abcdef"), limit=100))
    assert again == digest
    assert len(list(tmp_path.rglob("*.bin"))) == 1


def test_too_large_stream_leaves_nothing_behind(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        asyncio.run(store.put_stream(chunks(b"x" * 60, b"y" * 60), limit=100))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_blob_ids_cannot_escape_the_store(tmp_path):
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path("../../etc/passwd")
