"""qmgr's Ollama API against llama-cpp-python called directly: same variant, same settings
(context 4096, greedy, the same prompt), same run, interleaved.

Run: python bench/bench_serve.py [--runs 3] [--tokens 128]
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
The physical bound is llama.cpp itself: the direct call is the fastest this machine generates.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, seed=0,
                                       stream=True):
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first = first or now
            last = now
            n += 1
    del llm
    return loaded, first - sent, (n - 1) / (last - first), n


def served(client: object, model: str, tokens: int) -> tuple[float, float, int, float]:
    """(time to first token s, tokens/s, tokens, load s) through the Ollama API."""
    sent = time.perf_counter()
    first = last = 0.0
    n = 0
    load = 0.0
    for part in client.generate(model=model, prompt=PROMPT, stream=True,  # type: ignore[attr-defined]
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
    try:
        while subprocess.run([str(BIN / "qmgr"), "status"], env=env,
                             capture_output=True).returncode:
            time.sleep(0.1)
        subprocess.run([str(BIN / "qmgr"), "import", "--name", "bench", str(model)], env=env,
                       check=True, capture_output=True)
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        for _ in range(args.runs):
            subprocess.run([str(BIN / "qmgr"), "stop"], env=env, check=True,
                           capture_output=True)
            rows["q_load"].append(served(client, "bench", 4)[3])  # a cold load
            ttft, tps, n, _load = served(client, "bench", args.tokens)  # loaded
            rows["q_ttft"].append(ttft)
            rows["q_tps"].append(tps)
            d_load, d_ttft, d_tps, n2 = direct(str(model), args.tokens)
            rows["d_load"].append(d_load)
            rows["d_ttft"].append(d_ttft)
            rows["d_tps"].append(d_tps)
            assert n == n2, (n, n2)
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


if __name__ == "__main__":
    main()
