"""Who is calling: the peer's uid, gid and pid from the Unix socket (SO_PEERCRED).

uvicorn puts the peer's address in the ASGI scope's ``client``; a Unix socket has none, so this
protocol puts ``("uid=U,gid=G", pid)`` there instead, read once per connection from the kernel.
:func:`qmgr.work.access.caller` reads it back for the handlers.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PeerCredProtocol(H11Protocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            pid, uid, gid = _CREDS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            )
            self.client = (f"uid={uid},gid={gid}", pid)
