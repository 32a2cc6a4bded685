"""The built-in llama.cpp backend, the eval worker and its metrics.

The metrics are checked against hand-computed cases (numpy only). The backend's mechanics
(plugin, refusals, scoring against llama-cpp-python's own logits) run on a tiny random model;
generation, chat, a runner and the eval worker run on the real Gemma 3 270M: about a minute
on 2 slow cores, most of it the eval (marked slow), where a 16-bit base is scored beside each
variant.

Texts in tests/data start with a '#' line naming their source and licence; it is not part of
the text (:func:`qmgr.eval.read_text` drops it, and so does the eval worker). The eval text is
tests/data/eval.txt when there is one, else eval-small.txt (the Declaration of Independence).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ggufmake import find_gemma_gguf, make_tiny_gguf
from testmodel import cache_dir, gemma_f16

from qmgr.builtin import llama_backend
from qmgr.eval import metrics, read_text
from qmgr.plugin.backend import GenParams, LoadOptions, Refusal, Scores, log_softmax

DATA = Path(__file__).parent / "data"
EVAL_TEXT = DATA / "eval.txt" if (DATA / "eval.txt").exists() else DATA / "eval-small.txt"
PROMPT = "The capital of France is"
CHUNK = 256  # scoring chunk of the Gemma eval: 3 chunks, 381 scored tokens


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "QMGR_PLUGINS": ""}  # keep whatever is installed out of the tests


def request_worker(module: str, lines: list[dict[str, Any]],
                   timeout: float = 240) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run([sys.executable, "-m", module], input="".join(
        json.dumps(line) + "\n" for line in lines), capture_output=True, text=True,
        env=subprocess_env(), timeout=timeout)
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert answers, done.stderr
    return done.returncode, answers


# -- the metrics (hand-computed cases) -------------------------------------------------------


def test_log_softmax_rows_are_log_probabilities() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]], dtype=np.float32)
    logp = log_softmax(logits)
    assert logp.dtype == np.float32
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-6)
    z = math.log(math.e + math.e**2 + math.e**3)
    np.testing.assert_allclose(logp[0], [1 - z, 2 - z, 3 - z], rtol=1e-6)
    np.testing.assert_allclose(logp[1, :2], math.log(0.5), rtol=1e-6)  # no overflow


def test_kl_divergence_of_identical_distributions_is_zero() -> None:
    logp = log_softmax(np.random.default_rng(0).normal(size=(40, 1000)))
    assert np.array_equal(metrics.kl_divergence(logp, logp.copy()), np.zeros(40))


def test_kl_divergence_of_two_tokens_is_the_closed_form() -> None:
    p, q = np.log([[0.25, 0.75]]), np.log([[0.5, 0.5]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert metrics.kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)
    assert metrics.kl_divergence(q, p)[0] == pytest.approx(
        0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-12)  # not symmetric


def test_kl_divergence_where_a_probability_is_zero() -> None:
    with np.errstate(divide="ignore"):
        p, q = np.log([[1.0, 0.0]]), np.log([[0.5, 0.5]])
        assert metrics.kl_divergence(p, q)[0] == pytest.approx(math.log(2))  # 0 log 0 = 0
        assert metrics.kl_divergence(q, p)[0] == math.inf  # the variant rules out a token
    with pytest.raises(ValueError, match="shapes"):
        metrics.kl_divergence(np.zeros((1, 3)), np.zeros((1, 4)))


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    logp = log_softmax(np.zeros((5, 7), dtype=np.float32))
    targets = [0, 3, 6, 2, 1]
    nll = -float(logp[np.arange(5), targets].sum())
    assert metrics.perplexity(nll, 5) == pytest.approx(7, rel=1e-6)
    with pytest.raises(ValueError):
        metrics.perplexity(0.0, 0)


def test_comparison_adds_up_pieces() -> None:
    base_rows = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    var_rows = np.log(np.array([[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]]))
    c = metrics.Comparison()
    # Two pieces: positions 0-1, then 2; the actual next tokens are 0, 0, 1.
    c.add(Scores([math.log(0.5), math.log(0.9)], [0, 0], base_rows[:2]),
          Scores([math.log(0.5), math.log(0.6)], [0, 0], var_rows[:2]))
    c.add(Scores([math.log(0.8)], [1], base_rows[2:]), Scores([math.log(0.3)], [0], var_rows[2:]))
    r = c.result()
    assert r["tokens"] == 3
    assert r["base_ppl"] == pytest.approx((0.5 * 0.9 * 0.8) ** (-1 / 3))
    assert r["ppl"] == pytest.approx((0.5 * 0.6 * 0.3) ** (-1 / 3))
    assert r["delta_ppl"] == pytest.approx(r["ppl"] - r["base_ppl"])
    assert r["top_agreement"] == pytest.approx(2 / 3)
    kl = [0.0, 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4),
          0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3)]
    assert r["kld"] == pytest.approx(sum(kl) / 3)
    assert r["kld_p99"] == pytest.approx(np.percentile(kl, 99))


def test_read_text_drops_the_source_line(tmp_path: Path) -> None:
    assert read_text(EVAL_TEXT).startswith("IN CONGRESS") or EVAL_TEXT.name == "eval.txt"
    (tmp_path / "t.txt").write_text("# Source: me. Public domain.\nline one\n# not a header\n")
    assert read_text(tmp_path / "t.txt") == "line one\n# not a header\n"
    (tmp_path / "u.txt").write_text("no header\n")
    assert read_text(tmp_path / "u.txt") == "no header\n"


# -- the backend on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (the qmgr[llama] extra) is not installed")


@pytest.fixture(scope="module")
def tiny(llama_cpp: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_vocab=512)


def test_registered_as_a_plugin(llama_cpp: Any) -> None:
    from conftest import registered_by

    [backend] = registered_by(llama_backend, "register_backends")
    assert backend.name == "llama.cpp"
    assert backend.version == llama_cpp.__version__


def test_a_builtin_plugin() -> None:
    """Runners and eval workers find it by name among the plugins the daemon loads."""
    from qmgr.plugins import DEFAULT_PLUGINS

    assert "qmgr.builtin.llama_backend" in DEFAULT_PLUGINS


def test_the_daemon_side_loads_no_native_code() -> None:
    """Registering and asking can_run (no GPU) imports nothing of llama_cpp; without the
    package, can_run says how to install it."""
    code = ("import sys; from qmgr.builtin.llama_backend import LlamaCppBackend as B; "
            "b = B(); print(repr(b.can_run({}, [{'kind': 'cpu'}]))); "
            "assert 'llama_cpp' not in sys.modules; "
            "sys.modules['llama_cpp'] = None; print(b.can_run({}, []))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    expected = "None" if importlib.util.find_spec("llama_cpp") else repr(
        llama_backend.NOT_INSTALLED)
    assert lines == [expected, "llama-cpp-python is not installed: pip install 'qmgr[llama]'"]


def test_can_run_on_a_gpu_only_with_a_gpu_build(llama_cpp: Any) -> None:
    gpu = {"kind": "cuda", "index": 0, "name": "H100", "memory_total": None,
           "memory_free": None}
    answer = llama_backend.LlamaCppBackend().can_run({}, [{"kind": "cpu"}, gpu])
    if llama_cpp.llama_supports_gpu_offload():
        assert answer is None
    else:
        assert answer is not None and "cannot offload to cuda" in answer


def test_a_quantized_kv_cache_turns_flash_attention_on(
        tmp_path: Path, llama_cpp: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Heads of 32: a whole Q8_0 block.
    wide = make_tiny_gguf(tmp_path / "wide.gguf", n_embd=128, n_vocab=512)
    backend = llama_backend.LlamaCppBackend()
    with caplog.at_level(logging.WARNING, logger="qmgr.builtin.llama_backend"):
        session = backend.load(wide, LoadOptions(n_ctx=128, kv_type="q8_0"))
    try:
        assert "needs flash attention" in caplog.text
        assert "".join(p.text for p in session.generate("w300", GenParams(max_tokens=4)))
    finally:
        session.close()
    with pytest.raises(ValueError, match="unknown KV cache type 'q3'"):
        backend.load(wide, LoadOptions(kv_type="q3"))


def test_a_file_llama_cpp_cannot_load_is_named(tmp_path: Path, llama_cpp: Any) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="llama.cpp could not load .*bad.gguf"):
        llama_backend.LlamaCppBackend().load(bad, LoadOptions(n_ctx=64))


def test_chat_uses_the_template_in_the_gguf(tmp_path: Path, tiny: Path) -> None:
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    path = make_tiny_gguf(tmp_path / "chatty.gguf", n_vocab=512,
                          extra_kv={"tokenizer.chat_template": template})
    backend = llama_backend.LlamaCppBackend()
    session = backend.load(path, LoadOptions(n_ctx=128))
    try:
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "w300?"}]
        assert session.chat_format() == "file"
        assert session.render_chat(messages) == \
            "<s>[system] Be brief.\n[user] w300?\n[assistant] "
        pieces = list(session.chat(messages, GenParams(max_tokens=3)))
        assert pieces[-1].done
    finally:
        session.close()
    session = backend.load(tiny, LoadOptions(n_ctx=128))  # no template, and a llama
    try:
        with pytest.raises(Refusal, match="no chat template: .* architecture \\(llama\\)") as e:
            session.render_chat(messages)
        assert e.value.code == "no_chat_template"
        with pytest.raises(Refusal):
            session.chat_format()
    finally:
        session.close()


def test_score_chunks_like_the_perplexity_tool(tiny: Path, llama_cpp: Any) -> None:
    """score() against llama-cpp-python's own logits_all evaluation of each chunk: BOS first,
    positions n_ctx/2 .. n_ctx-2 scored, pieces of at most SCORE_ROWS positions."""
    n_ctx = 160  # 79 scored per chunk: two pieces each (64 + 15)
    session = llama_backend.LlamaCppBackend().load(tiny, LoadOptions(n_ctx=n_ctx))
    try:
        tokens = session.tokenize(read_text(EVAL_TEXT))[:3 * n_ctx]  # 3 chunks, + a rest
        pieces = list(session.score(tokens, n_ctx, want_distributions=True))
        assert [len(p.logprobs) for p in pieces] == [64, 15] * 3
        assert all(p.distributions.shape == (len(p.logprobs), 512) for p in pieces)
        # The session generates afterwards as if nothing happened.
        assert "".join(p.text for p in session.generate("w300", GenParams(max_tokens=3)))
    finally:
        session.close()

    ref = llama_cpp.Llama(str(tiny), n_ctx=n_ctx, logits_all=True, verbose=False)
    try:
        text = [ref.token_bos(), *tokens]
        logprobs, top = [], []
        for c in range(len(text) // n_ctx):
            chunk = [ref.token_bos(), *text[c * n_ctx + 1:(c + 1) * n_ctx]]
            ref.reset()
            ref.eval(chunk)
            logits = ref.scores[n_ctx // 2:n_ctx - 1]
            logp = log_softmax(logits)
            logprobs += logp[np.arange(len(logp)), chunk[n_ctx // 2 + 1:]].tolist()
            top += logits.argmax(axis=1).tolist()
    finally:
        ref.close()
    np.testing.assert_allclose([x for p in pieces for x in p.logprobs], logprobs, atol=1e-4)
    assert [t for p in pieces for t in p.top] == top


def test_eval_worker_base_against_itself(tiny: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("# Source: test. Public domain.\n" + read_text(EVAL_TEXT))
    request = {"backend": "llama.cpp", "text": str(text), "n_ctx": 128, "max_tokens": 400,
               "base": {"ref": "tiny:F16", "path": str(tiny)},
               "variants": [{"ref": "tiny:again", "path": str(tiny)}]}
    rc, answers = request_worker("qmgr.eval.worker", [request])
    assert rc == 0, answers[-1]
    result = answers[-1]["result"]
    [again] = result["variants"]
    assert again["kld"] == 0.0 and again["kld_p99"] == 0.0
    assert again["top_agreement"] == 1.0 and again["delta_ppl"] == 0.0
    assert again["ppl"] == result["base"]["ppl"] > 1
    assert result["tokens"] == again["tokens"] == 3 * 63 and result["chunks"] == 3
    assert result["text_tokens"] == 400
    import hashlib

    assert result["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    fractions = [a["progress"] for a in answers if "progress" in a]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    rc, answers = request_worker("qmgr.eval.worker", [{**request, "variants": []}])
    assert rc == 0, answers[-1]
    alone = answers[-1]["result"]
    assert alone["base"] == result["base"] and alone["tokens"] == result["tokens"]
    assert alone["variants"] == []


def test_eval_worker_refuses_what_it_cannot_compare(tiny: Path, tmp_path: Path) -> None:
    other = make_tiny_gguf(tmp_path / "other.gguf", n_vocab=1024)  # same tokens, and more
    text = tmp_path / "text.txt"
    text.write_text(read_text(EVAL_TEXT))
    request = {"backend": "llama.cpp", "text": str(text), "n_ctx": 64,
               "base": {"ref": "tiny:F16", "path": str(tiny)},
               "variants": [{"ref": "other:F16", "path": str(other)}]}
    rc, answers = request_worker("qmgr.eval.worker", [request])
    assert rc == 1
    assert answers[-1]["error"] == {"code": "tokenizer_mismatch", "message": (
        "other:F16 has a vocabulary of 1024 tokens and tiny:F16 of 512: they are not "
        "variants of one model")}

    rc, answers = request_worker("qmgr.eval.worker", [{**request, "max_tokens": 10}])
    assert rc == 1 and answers[-1]["error"]["code"] == "text_too_short"

    rc, answers = request_worker("qmgr.eval.worker", [{**request, "backend": "vllm"}])
    assert rc == 1 and answers[-1]["error"]["code"] == "no_backend"


# -- Gemma 3 270M ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(llama_cpp: Any) -> Path:
    return find_gemma_gguf()


@pytest.fixture(scope="module")
def session(gemma: Path) -> Iterator[Any]:
    s = llama_backend.LlamaCppBackend().load(gemma, LoadOptions(n_ctx=512, seed=7))
    yield s
    s.close()


def test_greedy_generation_is_llama_cpp_s(gemma: Path, session: Any, llama_cpp: Any) -> None:
    pieces = list(session.generate(PROMPT, GenParams(max_tokens=16, temperature=0.0)))
    assert len([p for p in pieces if p.text]) > 1  # streamed
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])

    direct = llama_cpp.Llama(str(gemma), n_ctx=512, seed=7, n_threads=llama_backend.cpu_count(),
                             verbose=False)
    try:
        expected = direct.create_completion(PROMPT, max_tokens=16, temperature=0)
    finally:
        direct.close()
    assert "".join(p.text for p in pieces) == expected["choices"][0]["text"]
    stats = pieces[-1].stats
    assert stats["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert stats["tokens"] == expected["usage"]["completion_tokens"] == 16
    assert stats["prompt_s"] > 0 and stats["eval_s"] > 0 and stats["tokens_per_s"] > 0
    print(f"\ngeneration: {stats['tokens_per_s']:.1f} tokens/s, prompt {stats['prompt_s']:.3f} s")


def test_a_repeated_prompt_is_served_from_the_cache(session: Any) -> None:
    prompt = read_text(EVAL_TEXT)[:400]
    first = list(session.generate(prompt, GenParams(max_tokens=2)))[-1].stats
    again = list(session.generate(prompt, GenParams(max_tokens=2)))[-1].stats
    assert first["prompt_cached"] <= 1  # at most the BOS of the previous, other, prompt
    assert again["prompt_tokens"] == first["prompt_tokens"] > 50
    assert again["prompt_cached"] == again["prompt_tokens"] - 1  # the last one is evaluated


def test_chat_in_gemma_s_format(session: Any) -> None:
    """This Gemma file carries no chat template: llama.cpp's built-in Gemma one is used."""
    assert "tokenizer.chat_template" not in session.llm.metadata
    assert session.chat_format() == "llama.cpp:gemma"
    messages = [{"role": "user", "content": "Name one colour of the rainbow."}]
    prompt = session.render_chat(messages)
    assert prompt == ("<start_of_turn>user\nName one colour of the rainbow.<end_of_turn>\n"
                      "<start_of_turn>model\n")
    pieces = list(session.chat(messages, GenParams(max_tokens=12)))
    answer = "".join(p.text for p in pieces)
    assert answer.strip() and "<end_of_turn>" not in answer
    tokens = session.llm.tokenize(prompt.encode(), add_bos=True, special=True)
    assert tokens[:2] == [session.llm.token_bos(), 105]  # <bos><start_of_turn>, one token each
    assert pieces[-1].stats["prompt_tokens"] == len(tokens)


def test_a_runner_process_end_to_end(gemma: Path) -> None:
    rc, answers = request_worker("qmgr.run.runner", [
        {"backend": "llama.cpp", "path": str(gemma), "options": {"n_ctx": 256}},
        {"op": "generate", "prompt": PROMPT, "params": {"max_tokens": 6}},
        {"op": "exit"}], timeout=120)
    assert rc == 0, answers
    assert answers[0]["ready"]["backend"] == "llama.cpp"
    assert "".join(a.get("text", "") for a in answers)
    assert answers[-1]["done"]["tokens"] == 6 and answers[-1]["done"]["rss"] > 0


def test_a_runner_stops_a_generation_when_cancelled(gemma: Path) -> None:
    """A cancel read while the runner generates ends that request at its next token; one
    read between requests (it came too late) stops nothing; a chat without messages tells
    the chat format; the runner goes on serving."""
    proc = subprocess.Popen([sys.executable, "-m", "qmgr.run.runner"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdin is not None and proc.stdout is not None

    def send(line: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(line) + "\n")
        proc.stdin.flush()

    def answer() -> list[dict[str, Any]]:
        assert proc.stdout is not None
        lines = []
        while not lines or not ({"done", "error"} & set(lines[-1])):
            lines.append(json.loads(proc.stdout.readline()))
        return lines

    try:
        send({"backend": "llama.cpp", "path": str(gemma), "options": {"n_ctx": 256}})
        assert "ready" in json.loads(proc.stdout.readline())
        send({"op": "generate", "prompt": "1, 2, 3, 4,", "params": {"max_tokens": 200}})
        assert "text" in json.loads(proc.stdout.readline())  # it is generating
        send({"op": "cancel"})
        stopped = answer()
        assert stopped[-1]["done"]["cancelled"] is True
        assert stopped[-1]["done"]["pieces"] == len(stopped) < 200  # the first piece, and these
        send({"op": "cancel"})  # too late: between requests
        send({"op": "generate", "prompt": PROMPT, "params": {"max_tokens": 6}})
        assert answer()[-1]["done"]["tokens"] == 6
        send({"op": "chat", "messages": []})
        [told] = answer()  # nothing generated
        assert told["done"]["chat_format"] == "llama.cpp:gemma"
        send({"op": "exit"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_eval_worker_refuses_another_tokenizer(gemma: Path, tiny: Path) -> None:
    rc, answers = request_worker("qmgr.eval.worker", [{
        "backend": "llama.cpp", "text": str(EVAL_TEXT), "n_ctx": 64,
        "base": {"ref": "gemma:Q4_K_M", "path": str(gemma)},
        "variants": [{"ref": "tiny:F16", "path": str(tiny)}]}])
    assert rc == 1
    assert answers[-1]["error"]["code"] == "tokenizer_mismatch"
    assert answers[-1]["error"]["message"] == (
        "tiny:F16 tokenizes the text differently from gemma:Q4_K_M (from token 0 on): they "
        "are not variants of one model")


def gemma_q8_0(f16: Path) -> Path:
    """A Q8_0 of the 16-bit base, made once (llama.cpp's quantizer) into the test cache."""
    import llama_cpp

    from qmgr.builtin.llama_log import LlamaLog

    target = cache_dir() / f"{f16.stem}-Q8_0.gguf"
    if target.is_file():
        return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = llama_backend.cpu_count()
    try:
        with LlamaLog() as log:  # its per-tensor lines stay out of the test output
            rc = llama_cpp.llama_model_quantize(os.fsencode(f16), os.fsencode(tmp), params)
        assert rc == 0, log.tail()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@pytest.mark.slow
def test_eval_worker_ranks_gemma_quants(gemma: Path) -> None:
    """F16 (testmodel.gemma_f16) against a Q8_0 made from it and the Q4_K_M it was made from,
    on 3 chunks of 256 (381 scored tokens): about 40 s on 2 slow cores; then the Q4_K_M
    against itself on one chunk."""
    f16 = gemma_f16()
    q8_0 = gemma_q8_0(f16)
    request = {"backend": "llama.cpp", "text": str(EVAL_TEXT), "n_ctx": CHUNK,
               "max_tokens": 3 * CHUNK - 1,
               "base": {"ref": "gemma:F16", "path": str(f16)},
               "variants": [{"ref": "gemma:Q8_0", "path": str(q8_0)},
                            {"ref": "gemma:Q4_K_M", "path": str(gemma)}]}
    rc, answers = request_worker("qmgr.eval.worker", [request])
    assert rc == 0, answers[-1]
    result = answers[-1]["result"]
    print("\n" + "\n".join(f"{v['ref']}: PPL {v['ppl']:.3f} (base {result['base']['ppl']:.3f}), "
                           f"KLD {v['kld']:.5f} (p99 {v['kld_p99']:.4f}), same top "
                           f"{v['top_agreement']:.1%}" for v in result["variants"])
          + f"\n{result['seconds']} s")
    assert result["tokens"] == 3 * (CHUNK - 1 - CHUNK // 2)
    q8, q4 = result["variants"]
    assert all(math.isfinite(v["ppl"]) and v["ppl"] > 1 for v in result["variants"])
    assert math.isfinite(result["base"]["ppl"]) and result["base"]["ppl"] > 1
    assert q8["kld"] < q4["kld"]
    assert q8["top_agreement"] > 0.9

    # The same file twice: llama.cpp is deterministic, so this is exactly nothing.
    rc, answers = request_worker("qmgr.eval.worker", [{
        **request, "max_tokens": CHUNK - 1, "base": {"ref": "gemma:Q4_K_M", "path": str(gemma)},
        "variants": [{"ref": "gemma:Q4_K_M-again", "path": str(gemma)}]}])
    assert rc == 0, answers[-1]
    result = answers[-1]["result"]
    [again] = result["variants"]
    assert again["kld"] == 0.0 and again["top_agreement"] == 1.0
    assert again["ppl"] == result["base"]["ppl"]
