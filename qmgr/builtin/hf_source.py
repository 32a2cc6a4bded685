"""Built-in source: Hugging Face (and anything speaking its API, such as ``qmgr mirror``).

Lists a repository revision with ``/api/models/{repo}/tree/{rev}?recursive=true`` (sizes and
LFS sha256 digests, following ``Link: rel="next"`` pages) and downloads through
``/{repo}/resolve/{rev}/{path}`` with ``Range`` (the Hub answers with a redirect to its CDN,
which gets no token). The endpoint comes from ``QMGR_HF_ENDPOINT``, else ``HF_ENDPOINT``, else
https://huggingface.co; a token for gated repositories from ``HF_TOKEN`` (sent to the endpoint
only, never logged).

A real repository holds much besides the quants: ``.gitattributes``, ``README.md``, Ollama's
``params`` and ``template``, images, importance matrices, vision projectors (``mmproj-*.gguf``)
and folders of shards. Only GGUF model files make variants; a projector is attached to every
variant (pulled with it, as Ollama does); everything else is listed as an extra and never
fetched. Entries are checked one by one, so one odd entry never takes the others down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from qmgr import hookimpl
from qmgr.plugin import (
    SHA256_RE,
    FetchContext,
    Listing,
    NotFound,
    QmgrError,
    Reference,
    RemoteFile,
    RemoteVariant,
    Skipped,
    Source,
    file_kind,
    get_json,
    group_gguf_files,
    knob,
    model_name_from,
    next_link,
    preferred_projector,
    quant_from_name,
    registry_path_problem,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_PAGES = 50
MAX_ENTRIES = 100_000


def hub_endpoint(env: dict[str, str]) -> str:
    return (knob("QMGR_HF_ENDPOINT", env) or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
            ).rstrip("/")


class HuggingFaceSource:
    name = "huggingface"
    kinds = ("hf",)

    def endpoint(self, ctx: FetchContext) -> str:
        return hub_endpoint(ctx.env)

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        return self.listing(ref, ctx).variants

    def listing(self, ref: Reference, ctx: FetchContext) -> Listing:
        endpoint = self.endpoint(ctx)
        # The endpoint is the user's own choice (a mirror on the LAN may be plain http); that
        # allows plain http there, not at another host it redirects to.
        http_origin = endpoint.startswith("http://")
        headers = {}
        if ctx.env.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {ctx.env['HF_TOKEN']}"
        revision = "main"
        url: str | None = f"{endpoint}/api/models/{ref.name}/tree/{revision}?recursive=true"
        entries: list[Any] = []
        pages = 0
        while url and pages < MAX_PAGES and len(entries) < MAX_ENTRIES:
            at_endpoint = urlsplit(url).netloc == urlsplit(endpoint).netloc
            page, response_headers = get_json(ctx.client, url, headers, insecure=ctx.insecure,
                                              http_origin=http_origin and at_endpoint)
            if not isinstance(page, list):
                raise QmgrError(f"{ref.name}: the tree listing is not a list", code="bad_registry")
            entries += page
            link = next_link(response_headers)
            url = urljoin(url, link) if link else None
            if url and urlsplit(url).netloc != urlsplit(endpoint).netloc:
                # A page elsewhere gets no token (the same rule as redirects).
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            pages += 1
        return self._classify(ref, endpoint, revision, entries[:MAX_ENTRIES], headers)

    def _classify(self, ref: Reference, endpoint: str, revision: str, entries: list[Any],
                  headers: dict[str, str]) -> Listing:
        models: list[RemoteFile] = []
        listing = Listing([])
        for e in entries:
            if not isinstance(e, dict):
                listing.skipped.append(Skipped(str(e)[:80], "not an entry object"))
                continue
            if e.get("type") != "file":  # folders ("directory") are structure, not content
                continue
            path = e.get("path")
            if not isinstance(path, str):
                listing.skipped.append(Skipped(repr(path)[:80], "a file without a path"))
                continue
            shown = path if len(path) <= 200 else path[:197] + "..."
            problem = registry_path_problem(path)
            if problem is not None:
                listing.skipped.append(Skipped(ascii(shown)[1:-1], f"refused: {problem}",
                                               refused=True, quant=quant_from_name(shown)))
                continue
            kind = file_kind(path)
            try:
                f = self._file(ref, endpoint, revision, path, e, headers)
            except QmgrError as err:
                refused = err.code == "bad_digest"
                listing.skipped.append(Skipped(
                    shown, ("refused: " if refused else "") + err.message, refused=refused,
                    quant=quant_from_name(path) if kind == "model" else None))
                continue
            if kind == "model":
                models.append(f)
            elif kind == "projector":
                listing.projectors.append(f)
            else:
                listing.extras.append(f)
        model = model_name_from(ref.name.split("/", 1)[1])
        projector = preferred_projector(listing.projectors)
        attachments = [("projector", projector)] if projector else []
        grouped = group_gguf_files(models)
        in_sets = {f.name for group in grouped.values() for f in group}
        for f in models:
            if f.name not in in_sets:
                listing.skipped.append(Skipped(f.name, "a shard of an incomplete set"))
        for _stem, group in sorted(grouped.items()):
            if ref.file and group[0].name != ref.file:
                continue
            # The file's own name, else its folder's (``Q8_0/model-00001-of-00002.gguf``).
            quant = quant_from_name(group[0].name) or quant_from_name(
                group[0].name.rpartition("/")[0])
            source_ref = (f"hf://{ref.name}/{group[0].name}" if ref.file or quant is None
                          else f"hf.co/{ref.name}:{quant}")
            listing.variants.append(RemoteVariant(quant, group, source_ref, model,
                                                  list(attachments)))
        if ref.file and not listing.variants:
            left_out = next((s for s in listing.skipped if s.name == ref.file), None)
            why = f": {left_out.why}" if left_out else ""
            raise NotFound(f"hf://{ref.name} has no usable GGUF file {ref.file!r}{why}")
        return listing

    def _file(self, ref: Reference, endpoint: str, revision: str, path: str, e: dict,
              headers: dict[str, str]) -> RemoteFile:
        size = e.get("size")
        lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else {}
        sha = lfs.get("oid") if lfs else None
        if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha)):
            raise QmgrError(f"{ref.name}/{path}: the registry's digest {ascii(sha)[:80]} is not "
                            "a sha256", code="bad_digest")
        if lfs and isinstance(lfs.get("size"), int):
            size = lfs["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise QmgrError(f"{ref.name}/{path}: bad size {ascii(size)[:40]}",
                            code="bad_registry")
        url = f"{endpoint}/{ref.name}/resolve/{revision}/{quote(path)}"
        return RemoteFile(path, url, size, sha, headers, allow_http=endpoint.startswith("http://"))


@hookimpl
def register_sources(register: Callable[[Source], None]) -> None:
    register(HuggingFaceSource())
