"""Evaluating quants: the metrics (:mod:`qmgr.eval.metrics`) and the worker process
(``python -m qmgr.eval.worker``) that compares a model's variants against its base."""

from __future__ import annotations

from pathlib import Path


def read_text(path: str | Path) -> str:
    """An evaluation text. A first line starting with '#' is its source and licence (qmgr's
    own texts and tests/data/*.txt carry one) and is not part of the text."""
    text = Path(path).read_text(encoding="utf-8")
    if text.startswith("#"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return text
