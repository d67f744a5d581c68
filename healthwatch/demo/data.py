"""A synthetic, learnable token stream for the demo trainer (no network, no files).

Each sequence is a concatenation of segments of three kinds, so that a small model has
something real to learn at several levels:

* **n-gram chain** (about half of the segments): an order-2 Markov chain whose next token,
  given the previous two, is one of 4 candidates from a fixed random sparse table, with skewed
  probabilities; candidates are drawn from a Zipf-like unigram law, so even unigram statistics
  are learnable.
* **copy**: a span copied from earlier in the same sequence (rewards induction/attention or a
  long state).
* **arithmetic progression**: ``s, s+d, s+2d, ...`` modulo the vocabulary (fully predictable
  from the previous two tokens).

Batch ``i`` depends only on ``(seed, i)``: two branches that start from the same position see
identical batches, and a resumed run sees what it would have seen without stopping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["SyntheticTokens"]

_CANDIDATES = 4
_CANDIDATE_PROBS = np.array([0.55, 0.25, 0.13, 0.07])
_MAX_TABLE = 1 << 16  # order-2 states share rows beyond this, so a large vocab stays cheap
_ARITH_STEPS = (1, 2, 3, 5, 7, -1, -2, -3)
# Stream keys: batches and the entropy sample must never draw the same random numbers.
_KEY_BATCH = 0
_KEY_SAMPLE = 1


class SyntheticTokens:
    """Deterministic synthetic token batches of shape ``[batch_size, seq_len + extra_tokens]``.

    The ``extra_tokens`` (default 3) let the main head predict t+1 over ``seq_len`` positions
    and the two MTP heads predict t+2 and t+3 without running off the end.
    Iterating yields ``batch_at(position)`` and advances ``position``.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        extra_tokens: int = 3,
    ) -> None:
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
        if seq_len < 1 or batch_size < 1 or extra_tokens < 0:
            raise ValueError("seq_len and batch_size must be positive and extra_tokens non-negative")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.extra_tokens = int(extra_tokens)
        #: Index of the batch the iterator returns next.
        self.position = 0

        rng = np.random.default_rng([self.seed, 0xC0FFEE])
        ranks = np.arange(vocab_size, dtype=np.float64)
        zipf = 1.0 / (ranks + 2.7) ** 1.1
        zipf = zipf[rng.permutation(vocab_size)]
        self._unigram_cdf = np.cumsum(zipf / zipf.sum())
        self._table_size = min(vocab_size * vocab_size, _MAX_TABLE)
        cand = np.searchsorted(self._unigram_cdf, rng.random((self._table_size, _CANDIDATES)))
        # Python lists: the generator's inner loop is per token, where list indexing beats numpy.
        self._cand: list[list[int]] = np.minimum(cand, vocab_size - 1).tolist()
        self._cand_cdf = np.cumsum(_CANDIDATE_PROBS)
        self._entropy_cache: dict[int, float] = {}

    @property
    def tokens_per_batch(self) -> int:
        """Tokens consumed per batch for loss purposes (``batch_size * seq_len``)."""
        return self.batch_size * self.seq_len

    def _row(self, rng: np.random.Generator, length: int) -> list[int]:
        """One sequence of ``length`` tokens drawn from the segment mixture."""
        v = self.vocab_size
        cand = self._cand
        table = self._table_size
        first = np.searchsorted(self._unigram_cdf, rng.random(2))
        row = [min(int(t), v - 1) for t in first]
        while len(row) < length:
            kind = rng.random()
            if kind < 0.5 or len(row) < 8:
                n = int(rng.integers(8, 33))
                picks = np.searchsorted(self._cand_cdf, rng.random(n)).tolist()
                a, b = row[-2], row[-1]
                for k in picks:
                    a, b = b, cand[(a * v + b) % table][min(k, _CANDIDATES - 1)]
                    row.append(b)
            elif kind < 0.75:
                m = int(rng.integers(4, min(16, len(row)) + 1))
                start = int(rng.integers(0, len(row) - m + 1))
                row.extend(row[start : start + m])
            else:
                n = int(rng.integers(6, 17))
                s = int(rng.integers(0, v))
                d = _ARITH_STEPS[int(rng.integers(0, len(_ARITH_STEPS)))]
                row.extend((s + i * d) % v for i in range(n))
        return row[:length]

    def batch_at(self, index: int) -> Tensor:
        """The batch at stream position ``index``: LongTensor ``[batch_size, seq_len + extra_tokens]``."""
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        rng = np.random.default_rng([self.seed, _KEY_BATCH, int(index)])
        length = self.seq_len + self.extra_tokens
        rows = [self._row(rng, length) for _ in range(self.batch_size)]
        return torch.tensor(rows, dtype=torch.long)

    def __iter__(self) -> Iterator[Tensor]:
        """The stream itself is the iterator; it resumes from ``position``."""
        return self

    def __next__(self) -> Tensor:
        """Return the batch at ``position`` and advance; the stream never ends."""
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position plus the settings that define the stream, for checkpoints."""
        return {
            "position": self.position,
            "seed": self.seed,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "extra_tokens": self.extra_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse a state from a differently configured stream.

        Silently resuming a different stream would make a branch or a rollback see other data
        than its parent, which would invalidate any comparison made on tokens.
        """
        for key in ("seed", "vocab_size", "seq_len", "batch_size", "extra_tokens"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"SyntheticTokens state has {key}={state[key]}, this stream has {getattr(self, key)}"
                )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self.position = position

    def unigram_entropy(self, num_tokens: int = 200_000) -> float:
        """Entropy in nats of the token marginal, estimated from ``num_tokens`` sampled tokens.

        A model whose loss goes below this has learned context, not just token frequencies.
        The sample comes from its own random stream, so calling this never shifts the batches.
        """
        if num_tokens not in self._entropy_cache:
            rng = np.random.default_rng([self.seed, _KEY_SAMPLE])
            counts = np.zeros(self.vocab_size, dtype=np.int64)
            # Rows as long as the training rows, so the sample has the same mix of sequence
            # starts and segment kinds as the batches.
            length = self.seq_len + self.extra_tokens
            for _ in range(max(1, -(-num_tokens // length))):
                counts += np.bincount(self._row(rng, length), minlength=self.vocab_size)
            p = counts[counts > 0] / counts.sum()
            self._entropy_cache[num_tokens] = float(-(p * np.log(p)).sum())
        return self._entropy_cache[num_tokens]

    def __repr__(self) -> str:
        """Short description with the position."""
        return (
            f"SyntheticTokens(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed}, position={self.position})"
        )
