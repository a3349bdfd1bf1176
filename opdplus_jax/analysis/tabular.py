"""Tabular autoregressive policies over a tiny vocabulary, with every sequence enumerated.

A policy is a logits table [P, V] with one row per prefix c = y_<t (P = sum_{t<T} V^t prefixes),
pi(v | c) = softmax(table[c])_v. With the whole sequence space enumerated, expectations under
pi are finite sums, so estimator means, variances and the true gradients are exact.

Variable length: with `eos_id` set, EOS is absorbing. The enumerated sequences are the canonical
ones (every token after the first EOS is EOS), the response mask is 1 up to and including the
first EOS, and a sequence's probability is the product over its masked positions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Space:
    """The sequence space V^T, optionally with an absorbing EOS token."""

    vocab_size: int
    horizon: int
    eos_id: int | None = None

    def __post_init__(self):
        if self.vocab_size < 2 or self.horizon < 1:
            raise ValueError(f"need vocab_size >= 2 and horizon >= 1, got {self}")
        if self.vocab_size**self.horizon > 200_000:
            raise ValueError(f"{self} has {self.vocab_size**self.horizon} sequences; too many")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must be a token in [0, {self.vocab_size}), got {self.eos_id}")

    @functools.cached_property
    def _tables(self):
        v, t = self.vocab_size, self.horizon
        all_seqs = np.array(list(itertools.product(range(v), repeat=t)), dtype=np.int32)
        if self.eos_id is None:
            mask = np.ones_like(all_seqs, dtype=bool)
            keep = np.ones(len(all_seqs), dtype=bool)
        else:
            is_eos = all_seqs == self.eos_id
            seen_before = np.cumsum(is_eos, axis=1) - is_eos > 0  # an EOS strictly earlier
            mask = ~seen_before
            keep = np.all(~seen_before | is_eos, axis=1)  # after the first EOS only EOS
        seqs, mask = all_seqs[keep], mask[keep]
        offsets = np.cumsum([0] + [v**k for k in range(t)])  # offsets[k]: first prefix of length k
        prefix = np.zeros_like(seqs)
        code = np.zeros(len(seqs), dtype=np.int64)
        for k in range(t):
            prefix[:, k] = offsets[k] + code
            code = code * v + seqs[:, k]
        step = np.repeat(np.arange(t), [v**k for k in range(t)])
        row_of_code = np.full(v**t, -1, dtype=np.int64)
        row_of_code[code] = np.arange(len(seqs))
        return seqs, mask, prefix, step, row_of_code

    @property
    def num_prefixes(self) -> int:
        return sum(self.vocab_size**k for k in range(self.horizon))

    @property
    def sequences(self) -> np.ndarray:
        """[N, T] int32: every canonical sequence."""
        return self._tables[0]

    @property
    def mask(self) -> np.ndarray:
        """[N, T] bool: response mask (through the first EOS)."""
        return self._tables[1]

    @property
    def prefix(self) -> np.ndarray:
        """[N, T] int: row of the logits table that gives pi(. | y_<t)."""
        return self._tables[2]

    @property
    def step_of_prefix(self) -> np.ndarray:
        """[P] int: the step t (0-based) at which each prefix is a context."""
        return self._tables[3]

    def rows_of(self, sequences: np.ndarray | jax.Array) -> jax.Array:
        """Index into `sequences` of each given canonical sequence [M, T] -> [M]."""
        seqs = jnp.asarray(sequences)
        weights = self.vocab_size ** jnp.arange(self.horizon - 1, -1, -1)
        return jnp.asarray(self._tables[4])[(seqs * weights).sum(-1)]


def random_logits(key: jax.Array, space: Space, scale: float = 1.0) -> jax.Array:
    """A random policy table [P, V] with i.i.d. N(0, scale^2) logits."""
    return scale * jax.random.normal(key, (space.num_prefixes, space.vocab_size))


def full_logprobs(space: Space, logits: jax.Array) -> jax.Array:
    """log pi(. | c_t) at every position of every sequence: [N, T, V]."""
    return jax.nn.log_softmax(logits, axis=-1)[space.prefix]


def token_logprobs(space: Space, logits: jax.Array) -> jax.Array:
    """log pi(y_t | c_t) [N, T], zero at masked positions."""
    lp = jnp.take_along_axis(full_logprobs(space, logits), space.sequences[..., None], axis=-1)
    return jnp.where(space.mask, lp[..., 0], 0.0)


def sequence_logprobs(space: Space, logits: jax.Array) -> jax.Array:
    """log pi(y) [N] (the product over masked positions)."""
    return token_logprobs(space, logits).sum(-1)


def sample(space: Space, logits: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """Ancestral samples [num, T] from the policy (EOS absorbing); an independent sampler path."""
    v = space.vocab_size
    logp = jax.nn.log_softmax(logits, axis=-1)
    offsets = np.cumsum([0] + [v**k for k in range(space.horizon)])
    code = jnp.zeros((num,), jnp.int32)
    done = jnp.zeros((num,), bool)
    tokens = []
    for t, k in enumerate(jax.random.split(key, space.horizon)):
        y = jax.random.categorical(k, logp[offsets[t] + code])
        if space.eos_id is not None:
            y = jnp.where(done, space.eos_id, y)
            done = done | (y == space.eos_id)
        tokens.append(y)
        code = code * v + y
    return jnp.stack(tokens, axis=1)
