"""Tool calls read out of generated text, thinking split from an answer, the schema that forces
a call: the shapes real models write (Llama 3.1's bare JSON, Hermes/Qwen's <tool_call> tags,
Mistral's [TOOL_CALLS], a fenced block), and texts that only look like calls."""

from __future__ import annotations

import json

import pytest

from qmgr.errors import QmgrError
from qmgr.serve.tools import call_schema, check_format, check_tools, split_thinking, tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '  {"name": "get_weather", "parameters": {"city": "Paris"}}\n',  # Llama 3.1's key
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as text
    '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
    # A small model writes on after its call: the call counts, the rest is dropped.
    '{"name": "get_weather", "arguments": {"city": "Paris"}}iatrics\nuser\n',
])
def test_a_call_is_read_in_the_shapes_models_write(text: str) -> None:
    assert tool_calls(text, TOOLS) == [PARIS]


def test_several_calls_in_order() -> None:
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert tool_calls(text, TOOLS) == [{"name": "add", "arguments": {"a": 1}}, PARIS]
    two = '{"name": "add", "arguments": {}}\n' + json.dumps(PARIS)
    assert [c["name"] for c in tool_calls(two, TOOLS)] == ["add", "get_weather"]


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    'Sure! {"name": "get_weather", "arguments": {"city": "Paris"}}',  # prose first: an answer
    '{"name": "delete_everything", "arguments": {}}',  # a tool that was not offered
    '{"name": "get_weather", "arguments": ["Paris"]}',  # arguments not an object
    '{"name": "get_weather", "arguments": "not json"}',
    '{"city": "Paris"}',
    "",
])
def test_what_is_not_a_call_of_an_offered_tool_is_text(text: str) -> None:
    assert tool_calls(text, TOOLS) == []


def test_without_tools_nothing_is_a_call() -> None:
    assert tool_calls(json.dumps(PARIS), None) == []


def test_thinking_is_split_from_the_answer() -> None:
    assert split_thinking("<think>\nhmm, 2+2\n</think>\n\n4") == ("hmm, 2+2", "4")
    assert split_thinking("the template opened it</think>4") == ("the template opened it", "4")
    assert split_thinking("just 4") == ("", "just 4")


def test_the_schema_that_forces_a_call() -> None:
    one = call_schema(TOOLS, "get_weather")
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == TOOLS[0]["function"]["parameters"]
    both = call_schema(TOOLS)
    assert [s["properties"]["name"]["const"] for s in both["anyOf"]] == ["get_weather", "add"]
    with pytest.raises(QmgrError) as e:
        call_schema(TOOLS, "nope")
    assert e.value.code == "bad_request"


def test_fields_are_checked() -> None:
    assert check_tools([]) is None and check_tools(TOOLS) == TOOLS
    for bad in ({"name": "x"}, [{"type": "function"}], [{"function": {"name": 3}}]):
        with pytest.raises(QmgrError):
            check_tools(bad)
    assert check_format("") is None and check_format("json") == "json"
    assert check_format({"type": "object"}) == {"type": "object"}
    with pytest.raises(QmgrError):
        check_format("yaml")
