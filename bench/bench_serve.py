"""qmgr's Ollama API against llama-cpp-python called directly: same variant, same settings
(context 4096, greedy, the same prompt), same run, interleaved.

Run: python bench/bench_serve.py [--runs 3] [--tokens 128] [--concurrency 4]
Figures, each with its baseline and the ratio:
- generation tokens/s streamed through `/api/generate` (Ollama's client, `stream=True`; the
  prompt as it is, no template, as `create_completion`), timed from the first piece to the
  last as the caller receives them, against `create_completion(stream=True)` in this process.
  Target: ratio >= 0.95.
- time to first token with the model loaded: the request sent to the first piece received,
  against the same for the direct call; the difference is what the API adds (the socket, the
  daemon, the runner process, JSON). Target: <= 15 ms added (median).
- cold load: `load_duration` of the first request (the runner process starting and llama.cpp
  loading the file) against constructing `Llama()` directly. Target: ratio <= 1.1.
- `qmgr serve` start to the first answer of `/api/tags`, against `python3 -c pass`.
- concurrent clients (`--concurrency N`, default 4; 0 leaves it out): N threads, each with
  its own Ollama client, stream the same generation from `/api/generate` at once; aggregate
  tokens/s is the `eval_count` of all N over the wall time from the first send to the last
  final chunk, against 1 client alone, the model loaded, in the same run; and each client's
  time from its send to its final chunk (p50), 1 against N. Target: ratio > 1.5 where the
  backend batches. Today qmgr serves the requests to one model one at a time (one runner,
  and llama-cpp-python's `Llama` has one sequence), so the ratio is about 1.0 and the p50
  about (N + 1) / 2 times 1 client's. The bound is llama.cpp decoding the N sequences in one
  batch: a step over N sequences reads the weights once, so on a machine where decoding is
  bound by memory bandwidth it costs little more than a step over one.
For the others the physical bound is llama.cpp itself: the direct call is the fastest this
machine generates.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from benchenv import qmgr_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CTX = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def direct(path: str, tokens: int) -> tuple[float, float, float, int]:
    """(load s, time to first token s, tokens/s, tokens) with llama-cpp-python in-process."""
    import llama_cpp

    cores = os.cpu_count() or 1  # the settings qmgr's backend uses
    start = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=CTX, n_threads=cores, n_threads_batch=cores,
                          verbose=False)
    loaded = time.perf_counter() - start
    sent = time.perf_counter()
    first = last = 0.0
    n = 0
    # With stream=True it is an iterator of chunks (its annotation also allows the whole answer).
    chunks = cast(Iterator[dict[str, Any]], llm.create_completion(
        PROMPT, max_tokens=tokens, temperature=0, seed=0, stream=True))
    for chunk in chunks:
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first = first or now
            last = now
            n += 1
    del llm
    return loaded, first - sent, (n - 1) / (last - first), n


def served(client: object, model: str, tokens: int, prompt: str = PROMPT
           ) -> tuple[float, float, int, float]:
    """(time to first token s, tokens/s, tokens, load s) through the Ollama API."""
    sent = time.perf_counter()
    first = last = 0.0
    n = 0
    load = 0.0
    for part in client.generate(model=model, prompt=prompt, stream=True,  # type: ignore[attr-defined]
                                options={"num_predict": tokens, "num_ctx": CTX,
                                         "temperature": 0, "seed": 0}):
        now = time.perf_counter()
        if part.response:
            first = first or now
            last = now
            n += 1
        if part.done:
            load = (part.load_duration or 0) / 1e9
    return first - sent, (n - 1) / (last - first), n, load


def concurrent(host: str, model: str, tokens: int, clients: int) -> tuple[float, int,
                                                                        list[float]]:
    """(seconds from the first send to the last final chunk, eval tokens of all, each client's
    seconds from its send to its final chunk) with ``clients`` clients generating at once."""
    import ollama

    together = threading.Barrier(clients)

    def one(_: int) -> tuple[float, float, int]:
        client = ollama.Client(host=host)
        together.wait()
        sent = time.perf_counter()
        for part in client.generate(model=model, prompt=PROMPT, stream=True,
                                    options={"num_predict": tokens, "num_ctx": CTX,
                                             "temperature": 0, "seed": 0}):
            if part.done:
                return sent, time.perf_counter(), part.eval_count or 0
        raise AssertionError("the stream ended without its final chunk")

    with ThreadPoolExecutor(clients) as pool:
        spans = list(pool.map(one, range(clients)))
    wall = max(done for _, done, _ in spans) - min(sent for sent, _, _ in spans)
    return wall, sum(n for _, _, n in spans), [done - sent for sent, done, _ in spans]


def startup(env: dict[str, str], port: int) -> float:
    """Seconds from starting `qmgr serve` to the first answer of /api/tags."""
    import httpx

    start = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "qmgr"), "serve", "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/tags").status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    import argparse

    import ollama
    from ggufmake import find_gemma_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="clients at once against 1 (default 4; 0 leaves it out)")
    args = parser.parse_args()
    model = find_gemma_gguf()
    root = Path(tempfile.mkdtemp(prefix="qms-", dir="/tmp"))
    env = qmgr_env(root, QMGR_NO_AUTOSTART="1")
    port = free_port()
    subprocess.run([str(BIN / "qmgrd"), "--version"], env=env, check=True,
                   capture_output=True)
    starts = [startup(env, port) for _ in range(args.runs)]
    pys = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        pys.append(time.perf_counter() - t)
    daemon = subprocess.Popen([str(BIN / "qmgrd"), "--listen", f"127.0.0.1:{port}"], env=env,
                              stderr=subprocess.DEVNULL)
    rows: dict[str, list[float]] = {k: [] for k in ("q_ttft", "q_tps", "d_ttft", "d_tps",
                                                     "q_load", "d_load")}
    together: dict[str, list[float]] = {k: [] for k in ("one_tps", "many_tps", "one_done",
                                                         "many_done")}
    try:
        while subprocess.run([str(BIN / "qmgr"), "status"], env=env,
                             capture_output=True).returncode:
            time.sleep(0.1)
        subprocess.run([str(BIN / "qmgr"), "import", "--name", "bench", str(model)], env=env,
                       check=True, capture_output=True)
        host = f"http://127.0.0.1:{port}"
        client = ollama.Client(host=host)
        for _ in range(args.runs):
            subprocess.run([str(BIN / "qmgr"), "stop"], env=env, check=True,
                           capture_output=True)
            # A cold load, with another prompt: the timed request below then finds nothing of
            # its prompt in the cache, as the direct call does not.
            rows["q_load"].append(served(client, "bench", 4, "Hello")[3])
            ttft, tps, n, _load = served(client, "bench", args.tokens)  # loaded
            rows["q_ttft"].append(ttft)
            rows["q_tps"].append(tps)
            # The daemon starts its next warm runner once idle for 2 s: let it, so that its
            # imports do not slow the direct call down.
            time.sleep(3)
            d_load, d_ttft, d_tps, n2 = direct(str(model), args.tokens)
            rows["d_load"].append(d_load)
            rows["d_ttft"].append(d_ttft)
            rows["d_tps"].append(d_tps)
            assert n == n2, (n, n2)
            if args.concurrency:  # the model is loaded: the last request left it so
                wall, alone, latencies = concurrent(host, "bench", args.tokens, 1)
                together["one_tps"].append(alone / wall)
                together["one_done"].extend(latencies)
                wall, total, latencies = concurrent(host, "bench", args.tokens,
                                                    args.concurrency)
                assert total == args.concurrency * alone, (total, alone)  # the same lengths
                together["many_tps"].append(total / wall)
                together["many_done"].extend(latencies)
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{model.name}, {args.tokens} tokens, context {CTX}, {args.runs} runs each "
          "(interleaved)")
    ratio = med["q_tps"] / med["d_tps"]
    print(f"generation: direct {med['d_tps']:6.1f} tokens/s, /api/generate {med['q_tps']:6.1f} "
          f"tokens/s, ratio {ratio:.3f}   target >= 0.95 -> {'MET' if ratio >= 0.95 else 'MISSED'}")
    added = (med["q_ttft"] - med["d_ttft"]) * 1000
    print(f"first token (loaded): direct {med['d_ttft'] * 1000:.1f} ms, /api/generate "
          f"{med['q_ttft'] * 1000:.1f} ms, added {added:+.1f} ms   target <= 15 ms -> "
          f"{'MET' if added <= 15 else 'MISSED'}")
    load = med["q_load"] / med["d_load"]
    print(f"cold load: Llama() {med['d_load']:.2f} s, first request's load_duration "
          f"{med['q_load']:.2f} s, ratio {load:.2f}   target <= 1.1 -> "
          f"{'MET' if load <= 1.1 else 'MISSED'}")
    start, py = statistics.median(starts), statistics.median(pys)
    print(f"qmgr serve to the first /api/tags answer: {start:.2f} s (python3 -c pass: "
          f"{py:.3f} s, x{start / py:.0f})")
    if args.concurrency:
        n = args.concurrency
        con = {k: statistics.median(v) for k, v in together.items()}
        scale = con["many_tps"] / con["one_tps"]
        print(f"{n} clients at once: 1 client {con['one_tps']:6.1f} tokens/s, {n} clients "
              f"{con['many_tps']:6.1f} tokens/s in all, ratio {scale:.2f}   target > 1.5 where "
              f"the backend batches -> {'MET' if scale > 1.5 else 'MISSED'} (one runner serves "
              "one request at a time: about 1.0 expected)")
        print(f"time to the final chunk, p50: 1 client {con['one_done']:.2f} s, {n} clients "
              f"{con['many_done']:.2f} s (x{con['many_done'] / con['one_done']:.2f}; served one "
              f"after another: x{(n + 1) / 2:.1f})")


if __name__ == "__main__":
    main()
