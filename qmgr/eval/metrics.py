"""The arithmetic of ``qmgr eval`` (numpy only; no model in sight).

Conventions, as llama.cpp's perplexity tool (``--kl-divergence``) has them:

- perplexity is ``exp`` of the mean negative log-likelihood of the scored tokens;
- KL divergence is ``KL(base || variant) = sum_i p_base(i) * (log p_base(i) - log p_var(i))``
  per scored position, in nats, averaged over positions; computed in float64 from float32
  log-softmax rows;
- top-token agreement is the fraction (0..1) of positions whose most likely token is the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Rows per float64 step of kl_divergence: 16 x 262k vocabulary x 8 bytes = 32 MiB a temporary.
KL_ROWS = 16


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Per row ``KL(p || q)`` in nats (float64), from log-probability rows of equal shape.
    Where ``p`` is 0 the term is 0, whatever ``q``."""
    logp = np.atleast_2d(logp)
    logq = np.atleast_2d(logq)
    if logp.shape != logq.shape:
        raise ValueError(f"distributions of different shapes: {logp.shape} and {logq.shape}")
    out = np.empty(len(logp), dtype=np.float64)
    for r in range(0, len(logp), KL_ROWS):
        lp = logp[r:r + KL_ROWS].astype(np.float64)
        lq = logq[r:r + KL_ROWS].astype(np.float64)
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):  # -inf - -inf where p is 0: masked below
            terms = np.where(p > 0, p * (lp - lq), 0.0)
        out[r:r + KL_ROWS] = terms.sum(axis=1)
    return out


def perplexity(nll_sum: float, count: int) -> float:
    """``exp(mean negative log-likelihood)``; ``count`` scored tokens."""
    if count <= 0:
        raise ValueError("no scored tokens")
    return math.exp(nll_sum / count)


class Comparison:
    """What one variant's scores add up to against the base's, piece by piece: feed it the
    two models' :class:`~qmgr.plugin.backend.Scores` of the same positions."""

    def __init__(self) -> None:
        self.count = 0
        self.base_nll = 0.0
        self.variant_nll = 0.0
        self.agree = 0
        self.klds: list[np.ndarray] = []

    def add(self, base: Any, variant: Any) -> None:
        if len(base.logprobs) != len(variant.logprobs):
            raise ValueError(f"{len(base.logprobs)} scored positions against "
                             f"{len(variant.logprobs)}")
        self.count += len(base.logprobs)
        self.base_nll -= math.fsum(base.logprobs)
        self.variant_nll -= math.fsum(variant.logprobs)
        self.agree += int(np.count_nonzero(np.asarray(base.top) == np.asarray(variant.top)))
        if base.distributions is not None and variant.distributions is not None:
            self.klds.append(kl_divergence(base.distributions, variant.distributions))

    def result(self) -> dict[str, Any]:
        """``ppl`` (the variant's), ``base_ppl``, ``delta_ppl`` (variant minus base), ``kld``
        (mean), ``kld_p99``, ``top_agreement`` (0..1), ``tokens`` (scored positions)."""
        ppl = perplexity(self.variant_nll, self.count)
        base_ppl = perplexity(self.base_nll, self.count)
        out: dict[str, Any] = {
            "ppl": ppl, "base_ppl": base_ppl, "delta_ppl": ppl - base_ppl,
            "top_agreement": self.agree / self.count, "tokens": self.count,
        }
        if self.klds:
            klds = np.concatenate(self.klds)
            out["kld"] = float(klds.mean())
            out["kld_p99"] = float(np.percentile(klds, 99))
        return out
