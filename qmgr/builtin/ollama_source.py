"""Built-in source: the Ollama registry (OCI distribution v2).

``GET /v2/{namespace}/{model}/manifests/{tag}`` gives the layers; the layer of media type
``application/vnd.ollama.image.model`` is the GGUF file, fetched by digest from
``/v2/{namespace}/{model}/blobs/{digest}`` with ``Range``. The config blob names the quant type.
A vision model's ``application/vnd.ollama.image.projector`` layer is its projector, pulled with
it; the template, params, system and license layers are text qmgr does not need (the GGUF
header has the chat template). https by default; ``--insecure`` allows plain http for a
registry on the local network.
"""

from __future__ import annotations

from collections.abc import Callable

from qmgr import hookimpl
from qmgr.plugin import (
    SHA256_RE,
    FetchContext,
    QmgrError,
    Reference,
    RemoteFile,
    RemoteVariant,
    Source,
    get_json,
    model_name_from,
)

MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


def _digest(ref: Reference, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("sha256:") \
            or not SHA256_RE.match(value[len("sha256:"):]):
        raise QmgrError(f"{ref.canonical}: the registry's digest {str(value)[:80]!r} is not "
                        "sha256:<64 hex digits>", code="bad_digest")
    return value[len("sha256:"):]


class OllamaSource:
    name = "ollama"
    kinds = ("ollama",)

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        scheme = "http" if ctx.insecure else "https"
        base = f"{scheme}://{ref.host}/v2/{ref.name}"
        manifest, _ = get_json(ctx.client, f"{base}/manifests/{ref.quant}",
                               {"Accept": MANIFEST_TYPES}, insecure=ctx.insecure,
                               limit=1 << 20)
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            raise QmgrError(f"{ref.canonical}: the manifest has no layers", code="bad_registry")
        models = [x for x in layers if isinstance(x, dict) and x.get("mediaType") == MODEL_LAYER]
        if len(models) != 1:
            raise QmgrError(f"{ref.canonical}: expected one model layer, found {len(models)}",
                            code="bad_registry")
        sha = _digest(ref, models[0].get("digest"))
        size = models[0].get("size")
        if not isinstance(size, int) or size <= 0:
            raise QmgrError(f"{ref.canonical}: bad layer size {size!r}", code="bad_registry")
        quant = None
        config = manifest.get("config")
        if isinstance(config, dict) and config.get("digest"):
            config_sha = _digest(ref, config["digest"])
            info, _ = get_json(ctx.client, f"{base}/blobs/sha256:{config_sha}",
                               insecure=ctx.insecure, limit=1 << 20)
            if isinstance(info, dict) and isinstance(info.get("file_type"), str):
                quant = info["file_type"].upper()
        model = ref.name.split("/", 1)[1]
        name = model_name_from(model if ref.quant == "latest" else f"{model}-{ref.quant}")
        file = RemoteFile(f"{model}-{ref.quant}.gguf", f"{base}/blobs/sha256:{sha}", size, sha)
        attachments = []
        projectors = [x for x in layers if isinstance(x, dict)
                      and x.get("mediaType") == PROJECTOR_LAYER]
        if projectors:
            p_sha = _digest(ref, projectors[0].get("digest"))
            p_size = projectors[0].get("size")
            if not isinstance(p_size, int) or p_size <= 0:
                raise QmgrError(f"{ref.canonical}: bad projector layer size {p_size!r}",
                                code="bad_registry")
            attachments.append(("projector", RemoteFile(
                f"{model}-{ref.quant}-mmproj.gguf", f"{base}/blobs/sha256:{p_sha}", p_size,
                p_sha)))
        return [RemoteVariant(quant, [file], ref.canonical, name, attachments)]


@hookimpl
def register_sources(register: Callable[[Source], None]) -> None:
    register(OllamaSource())
