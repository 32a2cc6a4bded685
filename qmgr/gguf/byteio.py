"""Byte sources: where the header reader gets its bytes from.

The reader only ever asks for ``read_at(offset, size)`` and the total ``size``, so the same code
can read a local file, an in-memory buffer, or (later) a remote file through HTTP Range requests.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol

from qmgr.errors import GGUFError


class ByteReader(Protocol):
    """Random access to the bytes of one file of known size."""

    @property
    def size(self) -> int:
        """Total size of the file in bytes."""
        ...

    def read_at(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes starting at ``offset`` (fewer only at end of file)."""
        ...


class FileReader:
    """A local file, read with positioned reads (no shared file position, no read-ahead)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # O_NONBLOCK so that a FIFO given by mistake cannot hang the open; no effect on files.
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
        self._fd = os.open(path, flags)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{os.fspath(path)!r} is not a regular file")
            self._size = st.st_size
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytesReader:
    """An in-memory file, for tests and for headers already fetched."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]
