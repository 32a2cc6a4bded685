"""qmgr serving OpenAI's API, spoken to with OpenAI's own Python client (the ``openai``
package, in the test extra) and with plain HTTP for the stream's bytes.

The daemon and its models are test_serve's: ``--listen 127.0.0.1:PORT``, a tiny random llama
model for completions, the real Gemma 3 270M for chat.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import Env
from ggufmake import find_gemma_gguf
from test_serve import served

pytest.importorskip("llama_cpp", reason="generation needs the llama extra (qmgr[llama])")

__all__ = ["served"]  # the fixture, imported for pytest


def client_of(url: str) -> openai.OpenAI:
    # No retries: OpenAI's client retries a 409 (lock timeout, to OpenAI), and a refusal here
    # is final.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_are_listed_and_retrieved(served: tuple[Env, str]) -> None:
    _env, url = served
    client = client_of(url)
    [listed] = client.models.list().data
    assert listed.id == "tiny:F16" and listed.object == "model" and listed.owned_by == "qmgr"
    assert listed.created > 1_600_000_000
    assert client.models.retrieve("tiny:F16").id == "tiny:F16"
    assert client.models.retrieve("tiny").id == "tiny:F16"  # the default variant's name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nothing-here")
    assert e.value.code == "not_found" and "not found" in e.value.message
    body = httpx.get(f"{url}/v1/models/nothing-here").json()
    assert body == {"error": {"message": "model 'nothing-here' not found",
                              "type": "not_found_error", "param": None, "code": "not_found"}}


def test_completions_with_the_tiny_model(served: tuple[Env, str]) -> None:
    _env, url = served
    client = client_of(url)
    whole = client.completions.create(model="tiny:F16", prompt="hello", max_tokens=4, seed=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.model == "tiny:F16"
    [choice] = whole.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 4
    assert whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=4,
                                            seed=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # greedy: the same text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert not any(c.choices[0].finish_reason for c in chunks[:-1])

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nothing-here", prompt="hi", max_tokens=4)
    assert e.value.code == "not_found"
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "max_tokens": "four"})
    assert bad.status_code == 400 and bad.json()["error"] == {
        "message": "max_tokens must be an integer", "type": "invalid_request_error",
        "param": None, "code": "bad_request"}


def test_the_stream_is_server_sent_events(served: tuple[Env, str]) -> None:
    _env, url = served
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "tiny:F16", "prompt": "hello", "max_tokens": 3,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 3
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_with_the_real_model(served: tuple[Env, str]) -> None:
    env, url = served
    env.qmgr("import", "--copy", str(find_gemma_gguf()))
    client = client_of(url)
    gemma = next(m.id for m in client.models.list().data if m.id.startswith("gemma"))
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say hello in one word."}]
    whole = client.chat.completions.create(model=gemma, messages=messages, max_tokens=8,
                                           temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=gemma, messages=messages, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *pieces, last, counted = chunks
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == choice.message.content
    assert last.choices[0].finish_reason == choice.finish_reason
    assert counted.choices == [] and counted.usage == whole.usage
    # Without include_usage no chunk carries the counts.
    plain = list(client.chat.completions.create(model=gemma, messages=messages, max_tokens=2,
                                                stream=True))
    assert plain[-1].choices[0].finish_reason and not any(c.usage for c in plain)

    # Content as a list of text parts is the same text.
    parts = client.chat.completions.create(model=gemma, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Say hello "},
                                     {"type": "text", "text": "in one word."}]}])
    assert parts.choices[0].message.content == choice.message.content

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nothing-here", messages=messages)
    # A model whose file has no chat template is refused, not guessed at; streamed too, before
    # the stream starts.
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny:F16", messages=messages, stream=stream)
        assert e.value.status_code == 409 and e.value.code == "no_chat_template"
        assert "chat template" in e.value.message


def test_the_api_key_is_the_clients_bearer_token(qenv: Env) -> None:
    from pathlib import Path

    from test_serve import free_port

    Path(qenv.env["QMGR_CONFIG"]).write_text('api_key = "sesame"\n')
    port = free_port()
    qenv.start("--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    assert openai.OpenAI(base_url=f"{url}/v1", api_key="sesame").models.list().data == []
    with pytest.raises(openai.AuthenticationError):
        client_of(url).models.list()  # api_key="unused"


def test_tools_response_format_and_embeddings(served: tuple[Env, str]) -> None:
    from test_serve import PERSON, WEATHER, gemma_of

    env, url = served
    gemma = gemma_of(env, url)
    client = client_of(url)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    # tool_choice "required" holds the sampler to a call of one of the tools.
    answer = client.chat.completions.create(model=gemma, messages=ask, tools=WEATHER,
                                            tool_choice="required", max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # JSON text
    chunks = list(client.chat.completions.create(
        model=gemma, messages=ask, tools=WEATHER, stream=True, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result sent back: the model answers in text.
    back = client.chat.completions.create(model=gemma, max_tokens=20, tools=WEATHER, messages=[
        *ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}],
        tool_choice="none")
    assert back.choices[0].message.content and not back.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=gemma, messages=ask, tools=WEATHER,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})

    shaped = client.chat.completions.create(
        model=gemma, max_tokens=60, messages=[{"role": "user", "content": "Ann is 30."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    person = json.loads(shaped.choices[0].message.content or "")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)

    # OpenAI's client asks for base64 float32 by default and decodes it; floats on request.
    texts = ["The cat sat on the mat.", "Quarterly tax filing deadlines"]
    got = client.embeddings.create(model=gemma, input=texts)
    assert [d.index for d in got.data] == [0, 1] and got.model == gemma
    assert got.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=gemma, input=texts, encoding_format="float")
    for a, b in zip(got.data, floats.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
        assert abs(sum(x * x for x in a.embedding) - 1) < 1e-4
    # The same vectors as Ollama's /api/embed.
    ollama_vectors = httpx.post(f"{url}/api/embed", json={"model": gemma, "input": texts},
                                timeout=120).json()["embeddings"]
    assert max(abs(x - y) for x, y in zip(ollama_vectors[1], floats.data[1].embedding,
                                          strict=True)) < 1e-6
