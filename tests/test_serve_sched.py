"""The API listener's scheduling, seen from the clients of issue #18: several clients at once
on one model, a bounded queue answered 503 with ``Retry-After``, two models that do not fit
together taking turns, a client that leaves stopping its generation, a runner that dies being
replaced, and ``/api/pull`` from the Hub's replay.

A real daemon with ``--listen 127.0.0.1:PORT``, tiny random llama models run by llama.cpp,
spoken to with Ollama's and OpenAI's own Python clients and with httpx; qmgr's own ``/v1/ps``
on the Unix socket says what the runners did.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import openai
import pytest
from conftest import Env
from gguf import GGUFReader, GGUFValueType, TokenType
from ggufmake import make_tiny_gguf
from test_serve import free_port, loaded_totals

pytest.importorskip("llama_cpp", reason="generation needs the llama extra (qmgr[llama])")

T = TypeVar("T")

TINY = "tiny:F16"
# A model trained for 4096 tokens (the context it loads with when a request names none, as
# OpenAI's cannot) that never stops by itself (make_endless_gguf): a generation of
# LONG_PREDICT tokens keeps its runner busy for as long as a test needs; the test lets go of
# it (a disconnect) long before its end.
LONG = "long:F16"
LONG_PREDICT = 4000
GREEDY = {"seed": 0, "temperature": 0}
SHORT = {"num_predict": 4, **GREEDY}


def make_endless_gguf(path: Path) -> Path:
    """``make_tiny_gguf``'s model, trained for 4096 tokens, that streams text as it goes and
    never ends an answer by itself, so a long generation lasts until its limit or a cancel.

    - Its byte tokens above 0x7F are word pieces instead: a random model's bytes seldom form
      UTF-8, and llama-cpp-python holds a stream's text back until they do (the whole answer,
      at the end, for the plain tiny model). ``▁`` is a token, so a prompt needs no byte
      above 0x7F.
    - The output row of ``</s>`` is zeroed: its logit, 0, stays below the largest of 255
      random ones, so a greedy answer never picks it.
    """
    n_vocab = 256
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i - 3:02X}>" if i - 3 < 0x80 else f"\u2581w{i}"
                                         for i in range(3, n_vocab)]
    tokens[3 + 0x80] = "\u2581"
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [
        TokenType.BYTE if i - 3 < 0x80 else TokenType.NORMAL for i in range(3, n_vocab)]
    scores = [0.0, 0.0, 0.0] + [-float(i) for i in range(3, n_vocab)]
    writer_log = logging.getLogger("gguf.gguf_writer")
    level = writer_log.level
    writer_log.setLevel(logging.ERROR)  # it warns that the vocabulary is replaced: on purpose
    try:
        make_tiny_gguf(path, name="long", ctx=4096, n_vocab=n_vocab, extra_kv={
            "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
            "tokenizer.ggml.token_type": ([int(t) for t in types], GGUFValueType.ARRAY,
                                          GGUFValueType.INT32),
            "tokenizer.ggml.scores": (scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)})
    finally:
        writer_log.setLevel(level)
    reader = GGUFReader(path, "r+")
    [output] = [t for t in reader.tensors if t.name == "output.weight"]
    output.data[2] = 0  # </s>'s row (the file is mapped: this writes it)
    del reader
    return path


def serve(env: Env, tmp_path: Path, **knobs: str) -> str:
    """Start the daemon with the listener (``knobs`` in its environment), TINY and LONG
    imported; the listener's URL."""
    env.env.update(knobs)
    port = free_port()
    env.start("--listen", f"127.0.0.1:{port}")
    env.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf")))
    env.qmgr("import", str(make_endless_gguf(tmp_path / "long-F16.gguf")))
    return f"http://127.0.0.1:{port}"


def runners(env: Env) -> list[dict[str, Any]]:
    """qmgr's own ``GET /v1/ps`` on the Unix socket: each runner's pid, busy flag, and its
    last request's final line (``last``)."""
    transport = httpx.HTTPTransport(uds=str(env.socket))
    with httpx.Client(transport=transport, base_url="http://qmgrd", timeout=60) as http:
        r = http.get("/v1/ps")
        assert r.status_code == 200, r.text
        out: list[dict[str, Any]] = r.json()
        return out


def runner_of(env: Env, ref: str) -> dict[str, Any]:
    [runner] = [r for r in runners(env) if r["ref"] == ref]
    return runner


def eventually(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """``check()``'s first true value, asked again every 50 ms; a failure after ``timeout``
    seconds (a bound against hanging, not a claim about speed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout:.0f} s")
        time.sleep(0.05)


@contextmanager
def held(url: str, model: str = LONG) -> Iterator[Iterator[str]]:
    """A long streamed generation whose first chunk was read: its runner is busy until the
    block ends, which closes the connection mid-stream. Yields the rest of its lines."""
    body = {"model": model, "prompt": "hello", "options": {"num_predict": LONG_PREDICT,
                                                           **GREEDY}}
    with httpx.Client(timeout=120) as http, \
            http.stream("POST", f"{url}/api/generate", json=body) as r:
        assert r.status_code == 200, r.read()
        lines = (line for line in r.iter_lines() if line)
        first = json.loads(next(lines))
        assert first["done"] is False, first
        yield lines


def openai_client(url: str) -> openai.OpenAI:
    # No retries: the client retries a 503 by itself, and here the 503 is what is tested.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_clients_at_once_on_one_model_each_get_what_they_get_alone(
        qenv: Env, tmp_path: Path) -> None:
    url = serve(qenv, tmp_path)
    prompts = ["hello", "once upon a time", "the cat sat", "1 2 3 4"]
    options = {"num_predict": 8, **GREEDY}
    start = threading.Barrier(len(prompts))

    def ask(prompt: str) -> ollama.GenerateResponse:
        client = ollama.Client(host=url)
        start.wait()
        return client.generate(model=TINY, prompt=prompt, options=options)

    # At once, on a daemon that has loaded nothing yet: the model loads once for all of them.
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert all(a.done and a.eval_count for a in together)
    client = ollama.Client(host=url)
    assert [m.model for m in client.ps().models] == [TINY]
    [runner] = runners(qenv)  # one runner process
    alone = [client.generate(model=TINY, prompt=p, options=options).response for p in prompts]
    assert [a.response for a in together] == alone  # greedy: the same text
    assert [r["pid"] for r in runners(qenv)] == [runner["pid"]]  # the same runner throughout


def test_requests_beyond_the_queue_are_answered_503_with_retry_after(
        qenv: Env, tmp_path: Path) -> None:
    url = serve(qenv, tmp_path, QMGR_MAX_QUEUE="1")
    client = ollama.Client(host=url)
    client.generate(model=LONG, prompt="hi", options={"num_predict": 1})  # loaded beforehand
    short = {"model": LONG, "prompt": "hello", "options": SHORT, "stream": False}

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(url + path, json=body, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        with held(url):
            assert runner_of(qenv, LONG)["busy"]
            # One running (held) + one waiting is the queue: of two more requests, one waits
            # and the other, whichever comes second, is refused at once.
            second = pool.submit(post, "/api/generate", short)
            third = pool.submit(post, "/api/generate", short)
            done, _ = wait([second, third], timeout=60, return_when=FIRST_COMPLETED)
            assert done, "neither request was refused: the queue is not bounded"
            refused = next(iter(done))
            [queued] = {second, third} - {refused}
            r = refused.result()
            assert r.status_code == 503, (r.status_code, r.text)
            assert int(r.headers["retry-after"]) >= 1
            body = r.json()
            assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]

            # While one waits, every other request to the model is refused the same way:
            # through Ollama's client,
            with pytest.raises(ollama.ResponseError) as e:
                client.generate(model=LONG, prompt="hello", options=SHORT)
            assert e.value.status_code == 503
            # through OpenAI's (its error shape, with Retry-After too),
            with pytest.raises(openai.APIStatusError) as oe:
                openai_client(url).completions.create(model=LONG, prompt="hello", max_tokens=4)
            assert oe.value.status_code == 503
            assert int(oe.value.response.headers["retry-after"]) >= 1
            raw = post("/v1/completions", {"model": LONG, "prompt": "hello", "max_tokens": 4})
            assert raw.status_code == 503 and int(raw.headers["retry-after"]) >= 1
            error = raw.json()["error"]
            assert {"message", "type", "code"} <= set(error) and error["message"]
            assert not queued.done()  # it waits for the held generation, neither run nor refused
        # The held stream let go (its generation cancelled): the waiting request is served.
        answer = queued.result(timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["done"] is True and answer.json()["eval_count"] >= 1
    assert client.generate(model=LONG, prompt="hello", options=SHORT).done  # room again


def test_models_that_do_not_fit_together_take_turns(qenv: Env, tmp_path: Path) -> None:
    names = ("alpha:F16", "beta:F16")
    for name in names:
        make_tiny_gguf(tmp_path / f"{name.replace(':', '-')}.gguf", name=name.split(":")[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    qenv.env["QMGR_HW"] = "ram=16GiB"
    qenv.start("--listen", f"127.0.0.1:{port}")
    for name in names:
        qenv.qmgr("import", str(tmp_path / f"{name.replace(':', '-')}.gguf"))
    options = {"num_predict": 1, "num_ctx": 256}
    for name in names:
        ollama.Client(host=url).generate(model=name, prompt="hi", options=options)
    need = max(loaded_totals(qenv).values())
    assert qenv.stop() == 0

    # Room for one of them at a time (placement keeps 10% headroom), as in test_serve.
    qenv.env["QMGR_HW"] = f"ram={int(1.5 * need / 0.9)}"
    qenv.start("--listen", f"127.0.0.1:{port}")
    seen: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                seen.append({m["model"] for m in http.get(url + "/api/ps").json()["models"]})
                time.sleep(0.01)

    def ask(name: str) -> ollama.GenerateResponse:
        return ollama.Client(host=url).generate(
            model=name, prompt="hello", options={**options, "num_predict": 16, **GREEDY})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # Alternating: each model is asked for while the other is loaded and busy.
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, names[i % 2]) for i in range(6)]
            answers = [f.result(timeout=300) for f in futures]
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert all(a.done and a.eval_count for a in answers)
    assert max(len(s) for s in seen) == 1, [s for s in seen if len(s) > 1][:3]
    assert set().union(*seen) == set(names)  # both ran, in turn
    assert len(loaded_totals(qenv)) == 1


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_client_that_leaves_mid_stream_stops_its_generation(
        qenv: Env, tmp_path: Path, api: str) -> None:
    url = serve(qenv, tmp_path)
    if api == "ollama":
        path = "/api/generate"
        body: dict[str, Any] = {"model": LONG, "prompt": "hello",
                                "options": {"num_predict": LONG_PREDICT, **GREEDY}}
    else:  # the tiny models have no chat template: completions, as Server-Sent Events
        path = "/v1/completions"
        body = {"model": LONG, "prompt": "hello", "max_tokens": LONG_PREDICT, "stream": True,
                "temperature": 0, "seed": 0}
    with httpx.Client(timeout=120) as http, http.stream("POST", url + path, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = (line for line in r.iter_lines() if line)
        read = [next(lines), next(lines)]
        pid = runner_of(qenv, LONG)["pid"]
    # The block closed the connection two chunks into a long answer.
    assert all("[DONE]" not in line and '"done": true' not in line for line in read)

    def cancelled() -> dict[str, Any] | None:
        r = runner_of(qenv, LONG)
        last = r.get("last") or {}
        return r if last.get("cancelled") and not r["busy"] else None

    runner = eventually(cancelled, "the runner's last request to be cancelled")
    assert 2 <= runner["last"]["pieces"] < LONG_PREDICT
    assert runner["pid"] == pid
    # The next request on the model is served by the same runner, to its end.
    if api == "ollama":
        answer = ollama.Client(host=url).generate(model=LONG, prompt="hello", options=SHORT)
        assert answer.done and answer.eval_count and answer.eval_count <= 4
    else:
        whole = openai_client(url).completions.create(model=LONG, prompt="hello", max_tokens=4,
                                                      temperature=0, seed=0)
        assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 4
    after = runner_of(qenv, LONG)
    assert after["pid"] == pid and not (after["last"] or {}).get("cancelled")


def test_a_runner_that_dies_is_replaced(qenv: Env, tmp_path: Path) -> None:
    url = serve(qenv, tmp_path)
    client = ollama.Client(host=url)
    first = client.generate(model=TINY, prompt="hello", options=SHORT)
    pid = runner_of(qenv, TINY)["pid"]
    os.kill(pid, signal.SIGKILL)  # idle: killed between requests
    assert httpx.get(url + "/").status_code == 200 and qenv.proc and qenv.proc.poll() is None
    again = client.generate(model=TINY, prompt="hello", options=SHORT)
    assert again.done and again.response == first.response  # a new runner, the same model
    assert runner_of(qenv, TINY)["pid"] != pid

    # Killed in the middle of a streamed answer: the stream ends with an error, not a hang.
    with held(url) as lines:
        busy = runner_of(qenv, LONG)
        assert busy["busy"]
        os.kill(busy["pid"], signal.SIGKILL)
        rest = [json.loads(line) for line in lines]
    assert rest and set(rest[-1]) == {"error"}, rest[-3:]
    assert isinstance(rest[-1]["error"], str) and rest[-1]["error"]
    assert not any(m.get("done") for m in rest)
    assert qenv.proc is not None and qenv.proc.poll() is None  # the daemon lives on
    answer = client.generate(model=LONG, prompt="hello", options=SHORT)
    assert answer.done and answer.eval_count
    assert runner_of(qenv, LONG)["pid"] != busy["pid"]


def test_pull_from_the_hub_through_the_ollama_client(qenv: Env, tmp_path: Path) -> None:
    from hubreplay import BARTOWSKI, HubReplay

    with HubReplay([BARTOWSKI], tmp_path / "hub", tls=True) as hub:
        qenv.env.update(QMGR_HF_ENDPOINT=hub.url, QMGR_CA_BUNDLE=str(hub.ca_bundle),
                        QMGR_HW="ram=16GiB")
        port = free_port()
        qenv.start("--listen", f"127.0.0.1:{port}")
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        ref = f"hf.co/{BARTOWSKI}:Q4_K_M"
        statuses = [p.status for p in client.pull(ref, stream=True)]
        served = hub.repo(BARTOWSKI).files["Meta-Llama-3-8B-Instruct-Q4_K_M.gguf"]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    assert any(s and s.startswith("pulling ") and s != "pulling manifest" for s in statuses), \
        statuses
    assert "verifying sha256 digest" in statuses
    [listed] = [m for m in client.list().models if m.digest == served.sha256]
    assert listed.model and listed.model.endswith(":Q4_K_M") and listed.size == served.size
    for name in (listed.model, ref):  # its catalog name, and the reference it was pulled with
        shown = client.show(name)
        assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
        assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
