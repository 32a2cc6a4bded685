"""What a runtime backend plugin implements (registered with ``register_backends``).

A backend loads a GGUF file with a placement and serves one session::

    class MyBackend:
        name = "my-engine"
        version = "1.0"

        def can_run(self, facts: dict, devices: list) -> str | None:
            return None                      # or why not ("no GPU build", "arch unknown")

        def load(self, path: Path, options: LoadOptions) -> Session: ...

    class Session:
        def generate(self, prompt: str, params: GenParams) -> Iterator[Piece]: ...
        def chat(self, messages: list[dict], params: GenParams,
                 tools: list[dict] | None = None) -> Iterator[Piece]: ...
        def chat_format(self) -> str: ...    # "file": the chat template in the GGUF
        def embed(self, texts: list[str], truncate: bool) -> Embeddings: ...  # optional
        def score(self, tokens: list[int], n_ctx: int,
                  want_distributions: bool = False) -> Iterator[Scores]: ...
        def tokenize(self, text: str) -> list[int]: ...
        def close(self) -> None: ...

Sessions run in a runner process of qmgr's (``python -m qmgr.run.runner``), one per loaded
model, never in the daemon: a native engine that crashes takes its runner down, not the
catalog. The placement in ``LoadOptions`` comes from the fit estimator. The runner closes the
iterator of a generation that its client stopped reading (``qmgr chat``'s Ctrl-C): the
backend stops before its next token.

A backend raises :class:`Refusal` for what it cannot do with a model (chat with a model that
has no chat format): its code and message reach the user as they are.

Optional parts: ``chat`` takes ``tools`` (OpenAI's function tools, ``[{"type": "function",
"function": {"name", "description", "parameters"}}]``) when the backend can show them to the
model, and renders messages with ``tool_calls`` and ``role: "tool"`` results; qmgr reads the
calls back out of the generated text (:mod:`qmgr.serve.tools`). ``embed`` makes one
L2-normalised vector per text (``/api/embed``, ``/v1/embeddings``). A backend without them
is refused with ``no_tools`` / ``no_embeddings``. ``GenParams.format`` asks for JSON output
(``"json"``) or output that matches a JSON schema (a dict): the backend constrains
sampling to it, or refuses with ``bad_format``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from qmgr.errors import QmgrError
from qmgr.fit.hardware import Device


@dataclasses.dataclass
class LoadOptions:
    n_ctx: int = 4096
    n_gpu_layers: int = 0  # layers offloaded to GPUs (llama.cpp's -ngl); -1 all
    threads: int | None = None
    kv_type: str = "f16"
    flash_attn: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, the same answer every time
    top_p: float = 0.95
    top_k: int = 40
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    min_p: float | None = None  # None: the backend's default
    repeat_penalty: float | None = None
    # Structured output: "json" (any JSON value... an object), or a JSON schema (a dict).
    format: str | dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenParams:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


@dataclasses.dataclass
class Piece:
    """A piece of generated text, and the timing when generation ends."""

    text: str
    done: bool = False
    stats: dict[str, Any] | None = None  # prompt_tokens, tokens, prompt_s, eval_s


@dataclasses.dataclass
class Embeddings:
    """What ``Session.embed`` gives: one L2-normalised vector per text, and the tokens read."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclasses.dataclass
class Scores:
    """Per-token results of scoring a text (for ``qmgr eval``)."""

    logprobs: list[float]  # log p(actual next token), for each scored position
    top: list[int]  # the most likely token at each scored position
    # Full log-distributions, only when asked for (KL divergence needs them); float32 rows.
    distributions: Any = None


def log_softmax(logits: Any) -> Any:
    """Rows of logits -> float32 log-probabilities (the normaliser summed in float64): what
    ``Scores.distributions`` holds."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (shifted - log_z).astype(np.float32)


class Refusal(QmgrError):
    """What a backend will not do with this model, and why: a stable ``code`` and a message a
    person can act on (any other exception reaches the user as ``backend_failed``, its type
    first)."""

    def __init__(self, message: str, code: str):
        super().__init__(message, code=code)


class Session(Protocol):
    def generate(self, prompt: str, params: GenParams) -> Iterator[Piece]: ...

    def chat(self, messages: list[dict[str, Any]], params: GenParams) -> Iterator[Piece]:
        """A reply to ``messages``. A backend that can show tools to the model takes a third
        argument, ``tools`` (OpenAI's function tools), and is only given it when there are
        some."""
        ...

    def chat_format(self) -> str:
        """Which chat format ``chat`` renders messages in, shown to the user: ``"file"`` for
        the chat template stored in the model's file, else the backend's name for the one it
        uses instead; raises :class:`Refusal` (code ``no_chat_template``) when the model has
        none, rather than guessing one."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def score(self, tokens: list[int], n_ctx: int,
              want_distributions: bool = False) -> Iterator[Scores]:
        """Next-token scores of ``tokens`` (no BOS), chunked as llama.cpp's perplexity tool
        does: chunks of ``n_ctx`` starting with BOS, the second half of each scored; yields
        pieces of at most 64 positions so full distributions never pile up."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A runtime backend. Registered with the ``register_backends`` hook."""

    @property
    def name(self) -> str:
        """Unique: what ``qmgr run --backend`` names, recorded with each measurement."""
        ...

    @property
    def version(self) -> str: ...

    def can_run(self, facts: dict[str, Any], devices: list[Device]) -> str | None:
        """None if it can run a model with these facts (``ModelFacts.to_dict()``: architecture,
        file type, tensor types...) on these devices; else why not, for the user. Cheap: no
        model is loaded. qmgr runs a model with the first backend that has no objection."""
        ...

    def load(self, path: Path, options: LoadOptions) -> Session: ...
