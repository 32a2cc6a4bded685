"""Built-in source: a plain ``https://.../FILE.gguf`` URL, with an optional ``--sha256``.

Without a digest the bytes are checked against the size the server announces and the sha256
is computed while they arrive; with one, a mismatch deletes them.
"""

from __future__ import annotations

from collections.abc import Callable

from qmgr import hookimpl
from qmgr.plugin import (
    FetchContext,
    FetchError,
    QmgrError,
    Reference,
    RemoteFile,
    RemoteVariant,
    Source,
    check_digest,
    model_name_from,
    quant_from_name,
    redact,
    request,
    strip_quant_suffix,
)


class URLSource:
    name = "url"
    kinds = ("url",)

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        assert ref.url is not None
        sha = check_digest(ctx.sha256.lower()) if ctx.sha256 else None
        size = self._size(ref.url, ctx)
        file_name = ref.name + ".gguf"  # from the parsed path: no query string or fragment
        model = model_name_from(strip_quant_suffix(file_name.removesuffix(".gguf")))
        # The catalog keeps the URL without its query string: signed CDN URLs carry tokens.
        return [RemoteVariant(quant_from_name(file_name),
                              [RemoteFile(file_name, ref.url, size, sha)], redact(ref.url),
                              model)]

    @staticmethod
    def _size(url: str, ctx: FetchContext) -> int | None:
        """The size the server announces (HEAD), so progress and the free-space check know it;
        None when it does not say (the download then asks again)."""
        try:
            with request(ctx.client, "HEAD", url, insecure=ctx.insecure) as r:
                if r.status_code >= 400:
                    raise QmgrError(f"{redact(url)}: HTTP {r.status_code}",
                                    code="not_found" if r.status_code == 404 else "fetch_failed")
                value = r.headers.get("x-linked-size") or r.headers.get("content-length")
                return int(value) if value and value.isdigit() else None
        except FetchError:
            return None


@hookimpl
def register_sources(register: Callable[[Source], None]) -> None:
    register(URLSource())
