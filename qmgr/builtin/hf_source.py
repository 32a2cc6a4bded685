"""Built-in source: Hugging Face (and anything speaking its API, such as ``qmgr mirror``).

Lists a repository revision with ``/api/models/{repo}/tree/{rev}?recursive=true`` (sizes and
LFS sha256 digests, following ``Link: rel="next"`` pages) and downloads through
``/{repo}/resolve/{rev}/{path}`` with ``Range``. The endpoint comes from ``QMGR_HF_ENDPOINT``,
else ``HF_ENDPOINT``, else https://huggingface.co; a token for gated repositories from
``HF_TOKEN`` (sent to the endpoint only, never logged).
"""

from __future__ import annotations

from urllib.parse import quote, urljoin, urlsplit

from qmgr import hookimpl
from qmgr.errors import QmgrError
from qmgr.fetch.http import get_json, next_link
from qmgr.fetch.remote import (
    RemoteFile,
    RemoteVariant,
    group_gguf_files,
    model_name_from,
    quant_from_name,
)
from qmgr.fetch.source import FetchContext
from qmgr.refs import Reference, check_relative_path
from qmgr.store import SHA256_RE

DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_PAGES = 50


class HuggingFaceSource:
    name = "huggingface"
    kinds = ("hf",)

    def endpoint(self, ctx: FetchContext) -> str:
        return (ctx.env.get("QMGR_HF_ENDPOINT") or ctx.env.get("HF_ENDPOINT")
                or DEFAULT_ENDPOINT).rstrip("/")

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        endpoint = self.endpoint(ctx)
        # The endpoint is the user's own choice (a mirror on the LAN may be plain http).
        insecure = ctx.insecure or endpoint.startswith("http://")
        headers = {}
        if ctx.env.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {ctx.env['HF_TOKEN']}"
        revision = "main"
        url: str | None = f"{endpoint}/api/models/{ref.name}/tree/{revision}?recursive=true"
        files: list[RemoteFile] = []
        pages = 0
        while url and pages < MAX_PAGES:
            entries, response_headers = get_json(ctx.client, url, headers, insecure=insecure)
            if not isinstance(entries, list):
                raise QmgrError(f"{ref.name}: the tree listing is not a list", code="bad_registry")
            for e in entries:
                if not isinstance(e, dict) or e.get("type") != "file":
                    continue
                files.append(self._file(ref, endpoint, revision, e, headers))
            link = next_link(response_headers)
            url = urljoin(url, link) if link else None
            if url and urlsplit(url).netloc != urlsplit(endpoint).netloc:
                # A page elsewhere gets no token (the same rule as redirects).
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            pages += 1
        out = []
        model = model_name_from(ref.name.split("/", 1)[1])
        for _stem, group in sorted(group_gguf_files(files).items()):
            if ref.file and group[0].name != ref.file:
                continue
            quant = quant_from_name(group[0].name)
            source_ref = (f"hf://{ref.name}/{group[0].name}" if ref.file or quant is None
                          else f"hf.co/{ref.name}:{quant}")
            out.append(RemoteVariant(quant, group, source_ref, model))
        if ref.file and not out:
            raise QmgrError(f"hf://{ref.name} has no GGUF file {ref.file!r}", code="not_found",
                            http_status=404)
        return out

    def _file(self, ref: Reference, endpoint: str, revision: str, e: dict,
              headers: dict[str, str]) -> RemoteFile:
        path = e.get("path")
        if not isinstance(path, str):
            raise QmgrError(f"{ref.name}: a listed file has no path", code="bad_registry")
        # A registry's file names end up in URLs and logs: the same rules as user input.
        check_relative_path(ref.raw, path)
        size = e.get("size")
        lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else {}
        sha = lfs.get("oid") if lfs else None
        if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha)):
            raise QmgrError(f"{ref.name}/{path}: the registry's digest {str(sha)[:80]!r} is not "
                            "a sha256", code="bad_digest")
        if lfs and isinstance(lfs.get("size"), int):
            size = lfs["size"]
        if not isinstance(size, int) or size < 0:
            raise QmgrError(f"{ref.name}/{path}: bad size {size!r}", code="bad_registry")
        url = f"{endpoint}/{ref.name}/resolve/{revision}/{quote(path)}"
        return RemoteFile(path, url, size, sha, headers, allow_http=endpoint.startswith("http://"))


@hookimpl
def register_sources(register):
    register(HuggingFaceSource())
