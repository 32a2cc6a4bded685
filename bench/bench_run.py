"""Generation speed through `qmgr run` against llama-cpp-python called directly: same
variant, same settings (context 4096, greedy, 128 tokens), same run, interleaved.

Run: python bench/bench_run.py [--runs 3] [--tokens 128]
Both sides are timed the same way, from the first generated piece to the last as the caller
receives them: for qmgr that is through the daemon, the runner process and the socket.
Target: qmgr/direct at least 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import qmgr_env, start_daemon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def direct(path: str, tokens: int) -> tuple[float, int]:
    import llama_cpp

    # The settings qmgr's backend uses: all cores for generation and prompt processing.
    cores = os.cpu_count() or 1
    llm = llama_cpp.Llama(path, n_ctx=4096, n_threads=cores, n_threads_batch=cores,
                          verbose=False)
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
    return (n - 1) / (last - first), n


def through_qmgr(env: dict[str, str], tokens: int) -> tuple[float, int]:
    proc = subprocess.Popen([str(BIN / "qmgr"), "run", "bench:Q4_K_M", PROMPT, "--max-tokens",
                             str(tokens), "--json"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = last = 0.0
    n = 0
    for line in proc.stdout:
        msg = json.loads(line)
        now = time.perf_counter()
        if msg.get("text"):
            first = first or now
            last = now
            n += 1
    proc.wait()
    return (n - 1) / (last - first), n


def main() -> None:
    from ggufmake import find_gemma_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model = find_gemma_gguf()
    root = Path(tempfile.mkdtemp(prefix="qmr-", dir="/tmp"))
    env = qmgr_env(root, QMGR_NO_AUTOSTART="1")
    daemon = start_daemon(env)
    qmgr_tps, direct_tps = [], []
    try:
        subprocess.run([str(BIN / "qmgr"), "import", "--name", "bench", str(model)], env=env,
                       check=True, capture_output=True)
        through_qmgr(env, 8)  # load the runner once: the speed of generation is measured
        for _ in range(args.runs):
            t, n = through_qmgr(env, args.tokens)
            qmgr_tps.append(t)
            t, n2 = direct(str(model), args.tokens)
            direct_tps.append(t)
            assert n == n2, (n, n2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    q, d = statistics.median(qmgr_tps), statistics.median(direct_tps)
    print(f"{model.name}, {args.tokens} tokens, {args.runs} runs each (interleaved)")
    print(f"llama-cpp-python directly: {d:6.1f} tokens/s (median)")
    print(f"qmgr run:                  {q:6.1f} tokens/s (median)")
    verdict = "MET" if q / d >= 0.95 else "MISSED"
    print(f"ratio qmgr/direct: {q / d:.3f}   target >= 0.95 -> {verdict}")


if __name__ == "__main__":
    main()
