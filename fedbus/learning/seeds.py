r"""Seed derivation shared by the framework and the reference loop.

A federation run has one base seed (the topology's ``seed``). Every random
stream in it (data generation, test split, partition, initial weights, each
client's local shuffling in each round) gets its own seed derived from the base
seed and a few labels. The derivation must be identical in every process and on
every host, so it is a stable hash (BLAKE2b), never Python's ``hash()``, which
is salted per process for strings.

The exact rule, which any reimplementation must follow bit for bit::

    derive_seed(*parts) = int.from_bytes(
        blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest(),
        "big",
    ) >> 1                                  # 63 bits: fits int64, numpy and torch

    fit_seed(base, round, client_id) = derive_seed(base, "fit", round, client_id)
    init_seed(base)                  = derive_seed(base, "init")

``FitConfig.seed`` of client ``client-3`` in round 5 of a run with seed 0 is
``fit_seed(0, 5, "client-3")``; the global model starts from
``trainer.initial_weights(init_seed(0))``.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed", "fit_seed", "init_seed"]

_SEPARATOR = "\x1f"  # ASCII unit separator: cannot appear in a node id or a number


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed determined only by ``parts``, the same in every process.

    Args:
        *parts: labels and numbers naming the random stream, e.g.
            ``(base_seed, "fit", round, client_id)``. Only ints and strings, so
            that ``str`` gives the same text everywhere.

    Returns:
        A non-negative int below 2**63, usable by numpy's ``default_rng``,
        ``random.Random`` and ``torch.manual_seed`` alike.

    Raises:
        TypeError: a part is neither int nor str (a float's text could differ
            between producers, and silently different seeds are hard to debug).
    """
    for part in parts:
        if not isinstance(part, int | str) or isinstance(part, bool):
            raise TypeError(f"seed parts must be int or str, got {type(part).__name__}")
    text = _SEPARATOR.join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def fit_seed(base_seed: int, round_num: int, client_id: str) -> int:
    """The `FitConfig.seed` of ``client_id``'s local training in ``round_num``."""
    return derive_seed(base_seed, "fit", round_num, client_id)


def init_seed(base_seed: int) -> int:
    """The seed the global model's initial weights are drawn with."""
    return derive_seed(base_seed, "init")
