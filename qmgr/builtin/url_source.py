"""Built-in source: a plain ``https://.../FILE.gguf`` URL, with an optional ``--sha256``.

Without a digest the bytes are checked against the size the server announces and the sha256
is computed while they arrive; with one, a mismatch deletes them.
"""

from __future__ import annotations

from qmgr import hookimpl
from qmgr.fetch.remote import (
    RemoteFile,
    RemoteVariant,
    model_name_from,
    quant_from_name,
    strip_quant_suffix,
)
from qmgr.fetch.source import FetchContext
from qmgr.refs import Reference
from qmgr.store import check_digest


class URLSource:
    name = "url"
    kinds = ("url",)

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        assert ref.url is not None
        sha = check_digest(ctx.sha256.lower()) if ctx.sha256 else None
        file_name = ref.url.rsplit("/", 1)[-1]
        model = model_name_from(strip_quant_suffix(file_name.removesuffix(".gguf")))
        return [RemoteVariant(quant_from_name(file_name),
                              [RemoteFile(file_name, ref.url, None, sha)], ref.url, model)]


@hookimpl
def register_sources(register):
    register(URLSource())
