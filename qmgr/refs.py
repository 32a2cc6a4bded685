"""Model references: what users type after ``qmgr pull``.

- ``NAME[:QUANT]``: an alias (the user's own, else the built-in table) for one of the below;
- ``hf.co/OWNER/REPO[:QUANT]`` (also ``huggingface.co/...``) and ``hf://OWNER/REPO[/FILE]``;
- ``ollama://[HOST/]NAMESPACE/MODEL[:TAG]`` (host ``registry.ollama.ai``, namespace ``library``
  and tag ``latest`` by default);
- ``https://HOST/.../FILE.gguf``.

References come from users and from registries, and parts of them end up in file names and
URLs, so parsing is strict: no ``..``, no absolute paths, no NUL or control characters, and
bounded lengths. A bad reference is a clear error, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from qmgr.errors import QmgrError

MAX_REF = 512
COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
QUANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}(?::|$)){_LABEL}(?:\.{_LABEL})*(:\d{{1,5}})?$")
# C0 and C1 control characters and DEL: they would corrupt logs and terminals.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
DEFAULT_OLLAMA_HOST = "registry.ollama.ai"

# Short names for popular model families: each points at a public GGUF repository that offers
# the usual quant ladder (Q2_K ... Q8_0, mostly with IQ quants too).
BUILTIN_ALIASES: dict[str, str] = {
    "llama3": "hf.co/bartowski/Meta-Llama-3-8B-Instruct-GGUF",
    "llama3.1": "hf.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
    "llama3.2": "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF",
    "llama3.2-1b": "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF",
    "qwen2.5": "hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF",
    "qwen2.5-coder": "hf.co/bartowski/Qwen2.5-Coder-7B-Instruct-GGUF",
    "qwen3": "hf.co/unsloth/Qwen3-8B-GGUF",
    "gemma3": "hf.co/unsloth/gemma-3-4b-it-GGUF",
    "gemma3-270m": "hf.co/unsloth/gemma-3-270m-it-GGUF",
    "mistral": "hf.co/bartowski/Mistral-7B-Instruct-v0.3-GGUF",
    "phi3": "hf.co/bartowski/Phi-3.5-mini-instruct-GGUF",
    "phi4": "hf.co/bartowski/phi-4-GGUF",
    "deepseek-r1": "hf.co/bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF",
    "deepseek-r1-llama": "hf.co/bartowski/DeepSeek-R1-Distill-Llama-8B-GGUF",
}


class BadReference(QmgrError):
    code = "bad_ref"


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``kind`` is ``alias``, ``hf``, ``ollama``, ``url``, or the scheme
    of a reference a source plugin owns (``s3`` for ``s3://bucket/model:Q4_K_M``)."""

    kind: str
    raw: str
    name: str = ""  # alias name, or OWNER/REPO, or NAMESPACE/MODEL
    quant: str | None = None  # wanted quant type / tag
    file: str | None = None  # hf:// with an explicit file path
    host: str | None = None  # ollama host
    url: str | None = None

    @property
    def canonical(self) -> str:
        if self.kind == "hf":
            if self.file:
                return f"hf://{self.name}/{self.file}"
            return f"hf.co/{self.name}" + (f":{self.quant}" if self.quant else "")
        if self.kind == "ollama":
            return f"ollama://{self.host}/{self.name}:{self.quant}"
        if self.kind == "url":
            return self.url or self.raw
        if self.kind != "alias":
            return f"{self.kind}://{self.name}" + (f":{self.quant}" if self.quant else "")
        return self.name + (f":{self.quant}" if self.quant else "")


def redact_url(url: str) -> str:
    """A URL fit for logs, error messages and the catalog: no query string (signed CDN URLs
    carry tokens), no credentials."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rsplit('@', 1)[-1]}{u.path}"


def _bad(ref: str, why: str) -> BadReference:
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    return BadReference(f"bad reference {shown!r}: {why}")


def _component(ref: str, value: str, what: str) -> str:
    if value in (".", "..") or not COMPONENT_RE.match(value):
        raise _bad(ref, f"{what} {value!r} must be letters, digits, '.', '_' or '-' "
                        "(at most 96, not starting with a symbol)")
    return value


def _quant(ref: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not QUANT_RE.match(value):
        raise _bad(ref, f"tag {value!r} must be letters, digits, '.', '_' or '-'")
    return value


def check_relative_path(ref: str, path: str) -> str:
    """A file path inside a repository: relative, no ``..``, no empty parts."""
    if path.startswith("/") or "\\" in path:
        raise _bad(ref, f"file path {path!r} must be relative")
    parts = path.split("/")
    if len(parts) > 8:
        raise _bad(ref, "file path is nested too deep")
    for p in parts:
        if p in ("", ".", ".."):
            raise _bad(ref, f"file path {path!r} contains {p or 'an empty part'!r}")
        _component(ref, p, "file name part")
    return path


MAX_REGISTRY_PATH = 1024


def registry_path_problem(path: str) -> str | None:
    """Why a file path from a registry's listing cannot be used, or None.

    Looser than what a user may type (a repository holds ``images/Screenshot (1).png`` and
    ``README.md``), strict where it matters: the path ends up in URLs and on terminals, so no
    way out of the repository and no control characters."""
    if not path or len(path) > MAX_REGISTRY_PATH:
        return "the path is empty or too long"
    if CONTROL_RE.search(path):
        return "the path contains control characters"
    if path.startswith("/") or "\\" in path:
        return "the path is not relative"
    parts = path.split("/")
    if len(parts) > 16:
        return "the path is nested too deep"
    if any(p in ("", ".", "..") for p in parts):
        return "the path contains '..', '.' or an empty part"
    return None


def parse(ref: str) -> Reference:
    if not ref:
        raise _bad(ref, "it is empty")
    if len(ref) > MAX_REF:
        raise _bad(ref, f"longer than {MAX_REF} characters")
    if CONTROL_RE.search(ref):
        raise _bad(ref, "it contains control characters")
    if "\\" in ref:
        raise _bad(ref, "it contains a backslash")
    if ref.startswith(("https://", "http://")):
        return _parse_url(ref)
    if ref.startswith("hf://"):
        rest = ref[len("hf://"):]
        parts = rest.split("/")
        if len(parts) < 2:
            raise _bad(ref, "expected hf://OWNER/REPO[/FILE]")
        owner, repo = _component(ref, parts[0], "owner"), _component(ref, parts[1], "repo")
        file = check_relative_path(ref, "/".join(parts[2:])) if len(parts) > 2 else None
        return Reference("hf", ref, f"{owner}/{repo}", file=file)
    for prefix in ("hf.co/", "huggingface.co/"):
        if ref.startswith(prefix):
            rest, _, quant = ref[len(prefix):].partition(":")
            parts = rest.split("/")
            if len(parts) != 2:
                raise _bad(ref, "expected hf.co/OWNER/REPO[:QUANT]")
            owner, repo = _component(ref, parts[0], "owner"), _component(ref, parts[1], "repo")
            return Reference("hf", ref, f"{owner}/{repo}", quant=_quant(ref, quant or None))
    if ref.startswith("ollama://"):
        return _parse_ollama(ref)
    if "://" in ref:
        return _parse_scheme(ref)
    name, _, quant = ref.partition(":")
    if name.startswith(("/", ".", "~")):
        raise _bad(ref, "a path is not a reference (use `qmgr import PATH` for a local file)")
    if "/" in name:
        raise _bad(ref, "a name has no '/' (for a Hugging Face repository write hf.co/OWNER/REPO)")
    return Reference("alias", ref, _component(ref, name, "name").lower(),
                     quant=_quant(ref, quant or None))


SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
# Kinds of qmgr's own references, never a plugin's scheme (``url://x`` is no URL reference).
RESERVED_KINDS = frozenset({"alias", "hf", "ollama", "url", "http", "https", "file"})


def _parse_scheme(ref: str) -> Reference:
    """``SCHEME://PATH[:QUANT]`` for a source plugin's own scheme: each part of the path a
    safe name. Whether a source owns the scheme is the puller's question (``no_source``
    names those installed); a source may parse its references more strictly itself."""
    scheme, _, rest = ref.partition("://")
    if not SCHEME_RE.match(scheme) or scheme in RESERVED_KINDS:
        raise _bad(ref, "unknown scheme (use hf.co/, hf://, ollama:// or https://)")
    path, _, quant = rest.partition(":")
    parts = path.split("/")
    for part in parts:
        _component(ref, part, "path part")
    return Reference(scheme, ref, "/".join(parts), quant=_quant(ref, quant or None))


def _parse_ollama(ref: str) -> Reference:
    rest = ref[len("ollama://"):]
    path, _, tag = rest.partition(":")
    # A tag can't contain '/', so a ':' before the last '/' belongs to host:port.
    if "/" in tag:
        host_port, _, after = rest.partition("/")
        path, _, tag = after.partition(":")
        parts = [host_port, *path.split("/")]
    else:
        parts = path.split("/")
    host = DEFAULT_OLLAMA_HOST
    if len(parts) >= 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host = parts.pop(0)
        if not HOST_RE.match(host):
            raise _bad(ref, f"bad host {host!r}")
    if len(parts) == 1:
        parts = ["library", parts[0]]
    if len(parts) != 2:
        raise _bad(ref, "expected ollama://[HOST/]NAMESPACE/MODEL[:TAG]")
    ns, model = _component(ref, parts[0], "namespace"), _component(ref, parts[1], "model")
    return Reference("ollama", ref, f"{ns}/{model}".lower(), quant=_quant(ref, tag or "latest"),
                     host=host.lower())


def _parse_url(ref: str) -> Reference:
    if not ref.isascii() or any(c.isspace() for c in ref):
        raise _bad(ref, "a URL must be ASCII without spaces (percent-encode the rest)")
    u = urlsplit(ref)
    if not u.hostname or not HOST_RE.match(u.netloc.rsplit("@", 1)[-1]):
        raise _bad(ref, "the URL has no valid host")
    if u.username or u.password:
        raise _bad(ref, "credentials in URLs are not accepted (they would end up in logs)")
    name = u.path.rsplit("/", 1)[-1]
    if not name.endswith(".gguf"):
        raise _bad(ref, "the URL must name a .gguf file")
    _component(ref, name, "file name")
    if ".." in u.path.split("/"):
        raise _bad(ref, "the URL path contains '..'")
    return Reference("url", ref, name.removesuffix(".gguf"), url=ref)
