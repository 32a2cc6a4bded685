"""What the served APIs add on top of a generated text: tool calls read out of it, a model's
thinking split from its answer, and the checks of the fields that ask for them.

A model calls a tool by writing a JSON object ``{"name": ..., "arguments": {...}}`` (the
shape qmgr's tool description asks for, and what Llama 3.1 and Hermes-style templates make;
``parameters`` is taken for ``arguments``), alone, in ``<tool_call>...</tool_call>`` tags
(Qwen, Hermes), in a fenced ``json`` block, or after Mistral's ``[TOOL_CALLS]``. Only calls of
the tools the request offered count; anything else is the answer's text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qmgr.errors import QmgrError

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Ollama's and OpenAI's ``tools``: function tools, each with a name."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise QmgrError('tools must be a list of {"type": "function", "function": {"name", '
                        '"description", "parameters"}} objects', code="bad_request")
    return tools


def check_format(fmt: Any) -> str | dict[str, Any] | None:
    """Ollama's ``format`` (``"json"`` or a JSON schema): what ``GenParams.format`` takes."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt  # type: ignore[no-any-return]
    raise QmgrError(f"format {fmt!r}: \"json\" or a JSON schema (an object)", code="bad_request")


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """A JSON schema that only a call of one of ``tools`` (of ``name``, when given) matches:
    the format that forces a call (OpenAI's ``tool_choice``)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise QmgrError(f"tool_choice names {name!r}, which is not among the tools",
                        code="bad_request")
    shapes = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"]} for f in chosen]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def _candidates(text: str) -> list[str]:
    tagged = TAGGED.findall(text)
    if tagged:
        return tagged
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        return [stripped.removeprefix("[TOOL_CALLS]").strip()]
    fenced = FENCED.findall(stripped)
    if fenced and FENCED.sub("", stripped).strip() == "":
        return fenced
    return [stripped]


def _leading(text: str) -> list[Any]:
    """The JSON values ``text`` starts with, one after another (what follows the last one is
    left: a small model may write on after its call)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return values
        values.append(value)


def _call(item: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        item = item["function"]
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            return None
    if item.get("name") not in names or not isinstance(args, dict):
        return None
    return {"name": item["name"], "arguments": args}


def tool_calls(text: str, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The calls ``text`` makes of ``tools``: ``[{"name", "arguments": {...}}]`` (arguments an
    object, as Ollama sends them); empty when the text is an ordinary answer (it does not
    start with a call)."""
    if not tools:
        return []
    names = {t["function"]["name"] for t in tools}
    calls: list[dict[str, Any]] = []
    for candidate in _candidates(text):
        for value in _leading(candidate):
            for item in value if isinstance(value, list) else [value]:
                call = _call(item, names)
                if call is None:
                    return calls
                calls.append(call)
    return calls


def thinks(template: str) -> bool:
    """Whether a chat template has a thinking part (DeepSeek R1's, Qwen 3's ``<think>``)."""
    return THINK_OPEN in template or "enable_thinking" in template


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a generated text. A template that opens ``<think>`` itself
    leaves only the closing tag in the text."""
    if THINK_CLOSE not in text:
        return "", text
    head, _, answer = text.partition(THINK_CLOSE)
    return head.replace(THINK_OPEN, "", 1).strip(), answer.lstrip()
