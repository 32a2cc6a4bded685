"""qmgr serving Ollama's API, spoken to with Ollama's own Python client (the ``ollama``
package, in the test extra) and with plain HTTP for the listener's rules.

A real daemon with ``--listen 127.0.0.1:PORT``; a tiny random llama model for completions and
the real Gemma 3 270M (the test model) for chat, both through llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from conftest import QMGR, Env
from ggufmake import find_gemma_gguf, make_tiny_gguf
from test_pull import repo  # noqa: F401 (the mirror's repository: hf.co/test/tiny)

pytest.importorskip("llama_cpp", reason="generation needs the llama extra (qmgr[llama])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(qenv: Env, tmp_path: Path) -> Iterator[tuple[Env, str]]:
    port = free_port()
    qenv.start("--listen", f"127.0.0.1:{port}")
    qenv.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")))
    yield qenv, f"http://127.0.0.1:{port}"


def test_the_ollama_client_lists_shows_and_generates(served: tuple[Env, str]) -> None:
    env, url = served
    client = ollama.Client(host=url)
    assert httpx.get(url + "/").text == "Ollama is running"
    assert httpx.head(url + "/").status_code == 200
    names = [m.model for m in client.list().models]
    assert names == ["tiny:F16"]
    [listed] = client.list().models
    assert listed.details is not None and listed.details.format == "gguf"
    assert listed.details.family == "llama" and listed.digest and listed.size
    shown = client.show("tiny")  # the bare name: its default variant
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.details is not None and shown.details.quantization_level == "F16"
    assert shown.template == "" and shown.capabilities == ["completion"]  # no template

    answer = client.generate(model="tiny:F16", prompt="hello",
                             options={"num_predict": 4, "seed": 0})
    assert answer.done and isinstance(answer.response, str)
    assert answer.eval_count is not None and 1 <= answer.eval_count <= 4
    assert isinstance(answer.total_duration, int) and answer.total_duration > 0
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0
    # Streamed by default: pieces, then the final chunk with the counts.
    chunks = list(client.generate(model="tiny:latest", prompt="hello", stream=True,
                                  options={"num_predict": 4, "seed": 0}))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert "".join(c.response for c in chunks) == answer.response  # greedy: the same text
    [loaded] = client.ps().models
    assert loaded.model == "tiny:F16" and loaded.context_length and loaded.size_vram == 0

    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nothing-here", prompt="hi")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nothing-here")
    assert e.value.status_code == 404


def test_chat_with_the_real_model(served: tuple[Env, str]) -> None:
    env, url = served
    env.qmgr("import", "--copy", str(find_gemma_gguf()))
    gemma = next(m.model for m in ollama.Client(host=url).list().models
                 if m.model and m.model.startswith("gemma"))
    client = ollama.Client(host=url)
    messages = [{"role": "user", "content": "Say hello in one word."}]
    whole = client.chat(model=gemma, messages=messages, options={"num_predict": 8})
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    parts = list(client.chat(model=gemma, messages=messages, stream=True,
                             options={"num_predict": 8}))
    assert parts[-1].done and "".join(p.message.content or "" for p in parts) == \
        whole.message.content
    # A model whose file has no chat template is refused, not guessed at.
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny:F16", messages=messages, stream=False)
    assert "chat template" in e.value.error


def test_the_listener_refuses_other_hosts_on_loopback(served: tuple[Env, str]) -> None:
    _env, url = served
    port = url.rsplit(":", 1)[1]
    # A page on evil.example that rebinds its name to 127.0.0.1 sends its own Host.
    r = httpx.get(url + "/api/tags", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and "not allowed" in r.json()["error"]
    assert httpx.get(url + "/api/tags", headers={"Host": f"localhost:{port}"}).status_code == 200
    # qmgr's own API is not here: its paths mean nothing on this listener.
    assert httpx.get(url + "/v1/status").status_code == 404


def test_an_api_key_is_required_when_configured(qenv: Env, tmp_path: Path) -> None:
    Path(qenv.env["QMGR_CONFIG"]).write_text('api_key = "sesame"\n')
    port = free_port()
    qenv.start("--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    r = httpx.get(url + "/api/tags")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.get(url + "/").status_code == 200  # the health check stays open
    client = ollama.Client(host=url, headers={"Authorization": "Bearer sesame"})
    assert client.list().models == []


def test_off_loopback_without_a_key_the_daemon_does_not_start(qenv: Env) -> None:
    r = subprocess.run([*qenv.qmgrd, "--listen", f"0.0.0.0:{free_port()}"], env=qenv.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "needs an api_key in the configuration file" in r.stdout + r.stderr + \
        qenv.daemon_log()


def test_qmgr_serve_runs_the_daemon_with_the_listener(qenv: Env) -> None:
    port = free_port()
    proc = subprocess.Popen([QMGR, "serve", "--listen", f"127.0.0.1:{port}"], env=qenv.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qenv.proc = proc  # stopped (SIGTERM) by the fixture
    qenv.log = open(qenv.root / "serve.log", "ab")  # noqa: SIM115 (closed by stop())
    qenv.wait_ready()
    deadline = 50
    for _ in range(deadline):
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/api/version").json()["version"]
            break
        except httpx.TransportError:
            import time

            time.sleep(0.1)
    else:
        raise AssertionError("the API listener did not come up")
    assert qenv.stop() == 0


def test_keep_alive_load_unload_copy_and_delete(served: tuple[Env, str]) -> None:
    env, url = served
    client = ollama.Client(host=url)
    # An empty request loads the model and keeps it as asked (-1: until stopped).
    loaded = client.generate(model="tiny:F16", prompt="", keep_alive=-1)
    assert loaded.done and loaded.done_reason == "load"
    [model] = client.ps().models
    assert model.expires_at is not None and model.expires_at.year > 2030
    # keep_alive 0 unloads it, with or without an answer first.
    assert client.generate(model="tiny:F16", prompt="", keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    client.generate(model="tiny:F16", prompt="hi", keep_alive=0, options={"num_predict": 1})
    assert client.ps().models == []
    client.generate(model="tiny:F16", prompt="hi", keep_alive="10m", options={"num_predict": 1})
    [model] = client.ps().models
    assert model.expires_at is not None  # some 10 minutes ahead
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny:F16", prompt="hi", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error

    # copy: a new name (an alias), listed and usable; delete: the variant itself.
    client.copy("tiny:F16", "mine")
    assert {m.model for m in client.list().models} == {"tiny:F16", "mine:latest"}
    shown = client.show("mine")
    assert shown.details is not None and shown.details.quantization_level == "F16"
    client.delete("tiny:F16")
    assert [m.model for m in client.list().models] == []
    assert env.json("list") == []
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny:F16")
    assert e.value.status_code == 404


def test_pull_through_the_ollama_client(qenv: Env, mirror: Any) -> None:
    qenv.env.update(QMGR_HF_ENDPOINT=mirror.url, QMGR_HW="ram=16GiB")
    port = free_port()
    qenv.start("--listen", f"127.0.0.1:{port}")
    client = ollama.Client(host=f"http://127.0.0.1:{port}")
    # Streamed: Ollama's statuses, driven by qmgr's verified pull job.
    statuses = [p.status for p in client.pull("hf.co/test/tiny:Q8_0", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    sizes = [(p.completed, p.total) for p in client.pull("hf.co/test/tiny:Q8_0", stream=True)
             if p.total]
    assert all(done <= total for done, total in sizes)
    # No quant named: the variant `qmgr pull --fit` chooses (the best that fits: F16 here).
    assert client.pull("hf.co/test/tiny").status == "success"
    names = {m.model for m in client.list().models}
    assert names == {"tiny:Q8_0", "tiny:F16"}, names
    assert {v["sha256"] for v in qenv.json("list")} == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (mirror.root / "test" / "tiny")
        .glob("*.gguf")}
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("hf.co/test/nothing:Q8_0")
    assert e.value.status_code in (404, 502), e.value


def loaded_totals(env: Env) -> dict[str, int]:
    """Loaded model -> the bytes its placement holds, by qmgr's estimate (`qmgr ps`)."""
    return {r["ref"]: sum(d["total"] for d in r["placement"]["devices"])
            for r in env.json("ps")}


def test_models_stay_loaded_while_they_fit_and_the_least_recent_goes_first(
        qenv: Env, tmp_path: Path) -> None:
    for name in ("alpha", "beta"):
        qenv.env["QMGR_HW"] = "ram=16GiB"
        make_tiny_gguf(tmp_path / f"{name}-F16.gguf", name=name, ftype="F16")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    qenv.start("--listen", f"127.0.0.1:{port}")
    for name in ("alpha", "beta"):
        qenv.qmgr("import", str(tmp_path / f"{name}-F16.gguf"))
    client = ollama.Client(host=url)
    options = {"num_predict": 1, "num_ctx": 256}
    for name in ("alpha:F16", "beta:F16"):
        client.generate(model=name, prompt="hi", options=options)
    one = loaded_totals(qenv)
    assert set(one) == {"alpha:F16", "beta:F16"}  # 16 GiB: both stay
    need = max(one.values())
    assert qenv.stop() == 0

    # Room for one of them (placement keeps 10% headroom): loading the second unloads the
    # one used longest ago, by the same estimate.
    qenv.env["QMGR_HW"] = f"ram={int(1.5 * need / 0.9)}"
    qenv.start("--listen", f"127.0.0.1:{port}")
    client.generate(model="alpha:F16", prompt="hi", options=options)
    client.generate(model="beta:F16", prompt="hi", options=options)
    assert set(loaded_totals(qenv)) == {"beta:F16"}
    client.generate(model="alpha:F16", prompt="hi", options=options)
    assert set(loaded_totals(qenv)) == {"alpha:F16"}
    assert qenv.stop() == 0

    # A model that cannot fit even alone is refused, with the estimate.
    qenv.env["QMGR_HW"] = f"ram={need // 2}"
    qenv.start("--listen", f"127.0.0.1:{port}")
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="alpha:F16", prompt="hi", options=options)
    assert e.value.status_code == 507 and "GiB" in e.value.error and "does not fit" in \
        e.value.error
    assert qenv.stop() == 0

    # QMGR_MAX_LOADED caps the count whatever the memory.
    qenv.env.update(QMGR_HW="ram=16GiB", QMGR_MAX_LOADED="1")
    qenv.start("--listen", f"127.0.0.1:{port}")
    client.generate(model="alpha:F16", prompt="hi", options=options)
    client.generate(model="beta:F16", prompt="hi", options=options)
    assert set(loaded_totals(qenv)) == {"beta:F16"}


def test_langchain_chat_ollama_invokes_the_real_model(served: tuple[Env, str]) -> None:
    from langchain_ollama import ChatOllama

    env, url = served
    env.qmgr("import", "--copy", str(find_gemma_gguf()))
    [gemma] = [m["ref"] for m in env.json("list") if m["model"].startswith("gemma")]
    chat = ChatOllama(model=gemma, base_url=url, num_predict=8, temperature=0)
    answer = chat.invoke("Say hello in one word.")
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.response_metadata.get("done_reason") in ("stop", "length")
    # The same words as Ollama's own client gets for the same request.
    direct = ollama.Client(host=url).chat(
        model=gemma, messages=[{"role": "user", "content": "Say hello in one word."}],
        options={"num_predict": 8, "temperature": 0})
    assert answer.content == direct.message.content


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
# An earlier call and its result, in Ollama's shapes: the model is shown how it calls.
SHOWN_A_CALL = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]},
    {"role": "tool", "content": "12 degrees, cloudy", "tool_name": "get_weather"},
    {"role": "assistant", "content": "It is 12 degrees and cloudy in Berlin."},
    {"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


def gemma_of(env: Env, url: str) -> str:
    env.qmgr("import", "--copy", str(find_gemma_gguf()))
    return next(m.model for m in ollama.Client(host=url).list().models
                if m.model and m.model.startswith("gemma"))


def test_tools_structured_output_and_think_through_the_ollama_client(
        served: tuple[Env, str]) -> None:
    env, url = served
    gemma = gemma_of(env, url)
    client = ollama.Client(host=url)
    answer = client.chat(model=gemma, messages=SHOWN_A_CALL, tools=WEATHER,
                         options={"num_predict": 40})
    [call] = answer.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert dict(call.function.arguments) == {"city": "Paris"}  # an object, not JSON text
    assert answer.message.content == ""
    # Streamed: the call comes whole, in one chunk, before the final one.
    chunks = list(client.chat(model=gemma, messages=SHOWN_A_CALL, tools=WEATHER, stream=True,
                              options={"num_predict": 40}))
    assert chunks[-1].done
    streamed = [c for chunk in chunks for c in (chunk.message.tool_calls or [])]
    assert [c.function.name for c in streamed] == ["get_weather"]

    # A JSON schema holds the sampler to it: the answer parses and has the fields' types.
    shaped = client.chat(model=gemma, format=PERSON, options={"num_predict": 60},
                         messages=[{"role": "user", "content": "Ann is 30. Give her as JSON."}])
    person = json.loads(shaped.message.content or "")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    # "json": any JSON object; without it the same prompt is prose.
    prompt = "List three colours."
    free = client.generate(model=gemma, prompt=prompt, options={"num_predict": 12})
    held = client.generate(model=gemma, prompt=prompt, format="json",
                           options={"num_predict": 12})
    assert held.response.lstrip().startswith("{") and not free.response.lstrip().startswith("{")

    # A model whose template has no thinking part is refused think, as Ollama does.
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=gemma, messages=SHOWN_A_CALL[-1:], think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    # (Ollama's client would not send a format it does not know: plain HTTP does.)
    bad = httpx.post(f"{url}/api/chat", json={"model": gemma, "format": "yaml",
                                              "messages": SHOWN_A_CALL[-1:]})
    assert bad.status_code == 400 and "format" in bad.json()["error"]


def test_embeddings_through_the_ollama_client(served: tuple[Env, str]) -> None:
    env, url = served
    gemma = gemma_of(env, url)
    client = ollama.Client(host=url)
    texts = ["The cat sat on the mat.", "A kitten rests on a rug.",
             "Quarterly tax filing deadlines"]
    got = client.embed(model=gemma, input=texts)
    vectors = [list(v) for v in got.embeddings]
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1
    norms = [sum(x * x for x in v) ** 0.5 for v in vectors]
    assert all(abs(n - 1) < 1e-4 for n in norms)  # L2-normalised

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])  # meaning, not noise
    assert got.prompt_eval_count and got.prompt_eval_count >= 3
    # One input at a time gives the same vector as in a batch; the older endpoint too.
    [alone] = client.embed(model=gemma, input=texts[0]).embeddings
    assert max(abs(x - y) for x, y in zip(alone, vectors[0], strict=True)) < 1e-4
    legacy = client.embeddings(model=gemma, prompt=texts[0]).embedding
    assert max(abs(x - y) for x, y in zip(legacy, vectors[0], strict=True)) < 1e-4
    # Generation still works after embedding from the same loaded model.
    assert client.generate(model=gemma, prompt="Hello", options={"num_predict": 4}).response
    # Longer than the model takes at once: cut by default, refused with truncate off.
    long = "word " * 2000
    assert len(client.embed(model=gemma, input=long).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=gemma, input=long, truncate=False)
    assert e.value.status_code == 400 and "truncate" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nothing-here", input="hi")
    assert e.value.status_code == 404
