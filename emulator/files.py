"""File contents the emulator serves: uploaded bytes, generated PNGs, and synthetic videos that
are described by (size, seed) and produced chunk by chunk, so a 1 GiB output costs no memory."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Protocol

CHUNK = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An ISO-BMFF "ftyp" box, so a synthetic video at least starts like an MP4.
_FTYP = struct.pack(">I", 32) + b"ftypisom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"


class FileSource(Protocol):
    @property
    def size(self) -> int: ...

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` in chunks of at most ``CHUNK``."""
        ...


def seed_for(*parts: object) -> int:
    """A stable 63-bit seed from any values (prompt, seed, index...)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sha256_of(source: FileSource) -> str:
    digest = hashlib.sha256()
    for chunk in source.iter_range(0, source.size):
        digest.update(chunk)
    return digest.hexdigest()


class BytesSource:
    """An uploaded file, kept as sent."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        view = memoryview(self.data)
        for pos in range(start, end, CHUNK):
            yield bytes(view[pos : min(pos + CHUNK, end)])


class PngSource:
    """A real PNG (4-colour palette, noisy stripes) rendered on demand from its seed."""

    __slots__ = ("_size", "height", "seed", "width")

    def __init__(self, width: int, height: int, seed: int) -> None:
        self.width = width
        self.height = height
        self.seed = seed
        self._size: int | None = None

    @property
    def data(self) -> bytes:
        return render_png(self.width, self.height, self.seed)

    @property
    def size(self) -> int:
        if self._size is None:  # the render cache is small; listings ask for every size
            self._size = len(self.data)
        return self._size

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        return BytesSource(self.data).iter_range(start, end)


class NoiseSource:
    """``size`` pseudo-random bytes from ``seed``; any range is computed without the rest.

    Chunk ``i`` is a rotation of one random block, stamped with ``i`` so that no two chunks are
    equal: a truncated or reordered download never hashes right.
    """

    __slots__ = ("_size", "seed")

    def __init__(self, size: int, seed: int) -> None:
        self._size = size
        self.seed = seed

    @property
    def size(self) -> int:
        return self._size

    def _chunk(self, index: int) -> bytes:
        block = _noise_block(self.seed)
        offset = (index * 2654435761 + self.seed) % CHUNK
        data = struct.pack(">Q", index) + block[offset + 8 :] + block[:offset]
        if index == 0:
            data = _FTYP + data[len(_FTYP) :]
        return data[: min(CHUNK, self._size - index * CHUNK)]

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            index = pos // CHUNK
            base = index * CHUNK
            yield self._chunk(index)[pos - base : min(end, base + CHUNK) - base]
            pos = base + CHUNK


@lru_cache(maxsize=4)
def _noise_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK + 8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@lru_cache(maxsize=64)
def render_png(width: int, height: int, seed: int) -> bytes:
    """A valid PNG of ``width`` x ``height``; bands of identical rows keep zlib fast."""
    rnd = random.Random(seed)
    row_len = (width + 3) // 4  # 2 bits per pixel
    band = 32
    compressor = zlib.compressobj(6)
    parts = []
    for top in range(0, height, band):
        row = b"\x00" + rnd.randbytes(row_len)
        parts.append(compressor.compress(row * min(band, height - top)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 2, 3, 0, 0, 0)
    return b"".join(
        [
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", rnd.randbytes(12)),
            _png_chunk(b"IDAT", b"".join(parts)),
            _png_chunk(b"IEND", b""),
        ]
    )


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first 24 bytes of a PNG, or None if it is not one."""
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)
