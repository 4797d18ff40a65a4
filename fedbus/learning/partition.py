"""Splitting a data set among clients, and building a federation's data.

A partition maps client i to an array of example indices; every index of the
training split goes to exactly one client. All randomness comes from numpy
Generators seeded through `fedbus.learning.seeds.derive_seed`, so the same
topology seed gives the same split on every host.

Kinds (``data.partition`` in the topology):

* ``iid``: a random permutation cut into near-equal parts.
* ``dirichlet`` (``alpha``, ``min_samples``): for each class, client shares
  are drawn from Dirichlet(alpha, ..., alpha) and the class's examples are cut
  accordingly; small alpha means skewed label mixes. Plain Dirichlet can leave
  a client with almost nothing, so the whole draw is repeated (from the same
  stream, hence still reproducible) until every client has at least
  ``min_samples`` examples, up to 100 times; if that still fails (tiny data,
  many clients, tiny alpha) the remaining gap is closed by moving random
  examples from the currently largest clients, which changes label skew as
  little as possible.
* ``shards`` (``shards_per_client``, default 2): examples sorted by label, cut
  into ``clients * shards_per_client`` shards, shards dealt out at random
  (McMahan et al.'s pathological non-IID split).
* ``natural``: the data set's own split; Synthetic has one device per client.

The test split is held out *before* partitioning: stratified by label for
digits and npz, and for Synthetic the union of each device's held-out part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset, load_digits, load_npz, synthetic_devices
from fedbus.learning.seeds import derive_seed

__all__ = [
    "PARTITIONS",
    "FederationData",
    "build_federation_data",
    "load_node_data",
    "partition_indices",
    "split_dirichlet",
    "split_iid",
    "split_shards",
    "split_test",
]

Indices = npt.NDArray[np.intp]

PARTITIONS = ("dirichlet", "iid", "natural", "shards")
_MAX_REDRAWS = 100


def split_test(
    y: npt.NDArray[np.int64],
    test_fraction: float,
    rng: np.random.Generator,
    *,
    stratify: bool = True,
) -> tuple[Indices, Indices]:
    """Indices of the training and the test part, both sorted.

    Stratified: each class gives ``round(test_fraction * class_count)`` of its
    examples to the test part, so rare classes are neither lost nor
    over-represented there.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"must be in [0, 1), got {test_fraction}", path="data.test_fraction")
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    test_parts = []
    for group in groups:
        k = round(test_fraction * len(group))
        test_parts.append(rng.permutation(group)[:k])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.intp)
    mask = np.ones(len(y), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test.astype(np.intp)


def split_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[Indices]:
    """A random permutation of ``range(n)`` cut into ``num_clients`` near-equal parts."""
    _check_enough(n, num_clients, 1)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]


def split_dirichlet(
    y: npt.NDArray[np.int64],
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_samples: int = 10,
) -> list[Indices]:
    """Label-skewed split: per class, client shares ~ Dirichlet(alpha).

    See the module docstring for how ``min_samples`` is guaranteed.
    """
    if alpha <= 0:
        raise ConfigError(f"must be > 0, got {alpha}", path="data.partition.alpha")
    _check_enough(len(y), num_clients, max(min_samples, 1))
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    parts: list[list[Indices]] = []
    for _ in range(_MAX_REDRAWS):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.intp)
            for client, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[client].append(chunk)
        if min(sum(len(c) for c in p) for p in parts) >= min_samples:
            break
    clients = [np.concatenate(p) for p in parts]
    return [np.sort(c) for c in _top_up(clients, min_samples, rng)]


def _top_up(clients: list[Indices], min_samples: int, rng: np.random.Generator) -> list[Indices]:
    """Move random examples from the largest clients until all have ``min_samples``."""
    clients = [rng.permutation(c) for c in clients]
    while True:
        sizes = np.array([len(c) for c in clients])
        short = int(np.argmin(sizes))
        need = min_samples - int(sizes[short])
        if need <= 0:
            return clients
        donor = int(np.argmax(sizes))
        give = min(need, int(sizes[donor]) - min_samples)  # > 0: feasibility was checked
        clients[short] = np.concatenate([clients[short], clients[donor][:give]])
        clients[donor] = clients[donor][give:]


def split_shards(
    y: npt.NDArray[np.int64],
    num_clients: int,
    rng: np.random.Generator,
    *,
    shards_per_client: int = 2,
) -> list[Indices]:
    """Sort by label, cut into ``num_clients * shards_per_client`` shards, deal them out."""
    if shards_per_client < 1:
        raise ConfigError(
            f"must be >= 1, got {shards_per_client}", path="data.partition.shards_per_client"
        )
    num_shards = num_clients * shards_per_client
    _check_enough(len(y), num_shards, 1)
    order = rng.permutation(len(y))  # random order within each label
    order = order[np.argsort(y[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def _check_enough(n: int, num_clients: int, per_client: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients}")
    if n < num_clients * per_client:
        raise ConfigError(
            f"{n} training examples cannot give {num_clients} clients {per_client} each",
            path="data.partition",
        )


def partition_indices(
    kind: str,
    y: npt.NDArray[np.int64],
    num_clients: int,
    params: Mapping[str, Any],
    rng: np.random.Generator,
) -> list[Indices]:
    """Dispatch to a split by name (``iid``, ``dirichlet``, ``shards``).

    Raises:
        ConfigError: unknown kind or parameter, or a bad value; ``natural`` is
            not an index split and is refused here.
    """
    if kind == "iid":
        _known(params, (), "data.partition")
        return split_iid(len(y), num_clients, rng)
    if kind == "dirichlet":
        _known(params, ("alpha", "min_samples"), "data.partition")
        alpha = _num(params, "alpha", 0.5, float, "data.partition")
        min_samples = _num(params, "min_samples", 10, int, "data.partition")
        return split_dirichlet(y, num_clients, rng, alpha=alpha, min_samples=min_samples)
    if kind == "shards":
        _known(params, ("shards_per_client",), "data.partition")
        spc = _num(params, "shards_per_client", 2, int, "data.partition")
        return split_shards(y, num_clients, rng, shards_per_client=spc)
    if kind == "natural":
        raise ConfigError(
            "natural partition needs a data set with its own split (synthetic)",
            path="data.partition.kind",
        )
    raise ConfigError(
        f"unknown partition {kind!r}; expected one of {PARTITIONS}", path="data.partition.kind"
    )


def _known(params: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}", path=path)


def _num(params: Mapping[str, Any], key: str, default: Any, kind: type, path: str) -> Any:
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ConfigError(
            f"must be a{'n integer' if kind is int else ' number'}, got {value!r}",
            path=f"{path}.{key}",
        )
    return kind(value)


@dataclass(frozen=True, slots=True)
class FederationData:
    """Every client's training data and the central test set of one run."""

    train: dict[str, Dataset]
    test: Dataset
    num_classes: int
    num_features: int


def build_federation_data(
    dataset: str,
    params: Mapping[str, Any],
    partition: str,
    partition_params: Mapping[str, Any],
    client_ids: Sequence[str],
    *,
    test_fraction: float,
    seed: int,
) -> FederationData:
    """Load or generate a data set, hold out the test split, partition the rest.

    Args:
        dataset: ``digits``, ``synthetic`` or ``npz``.
        params: the data set's parameters: none for digits; ``alpha``,
            ``beta`` (default 0) and optional ``samples_per_client`` for
            synthetic; ``path`` and optional ``num_classes`` for npz.
        partition: ``iid``, ``dirichlet``, ``shards`` or ``natural``.
        partition_params: that partition's parameters (module docstring).
        client_ids: the data-holding nodes; client i gets part i (Synthetic
            device i).
        test_fraction: share held out for central evaluation, in [0, 1).
        seed: the run's seed; data, split and partition streams derive from it.

    Raises:
        ConfigError: an unknown name or key, a bad value, an unreadable file.
    """
    ids = list(client_ids)
    if not ids:
        raise ConfigError("need at least one data-holding client", path="nodes.clients")
    if len(set(ids)) != len(ids):
        raise ConfigError("client ids must be unique", path="nodes.clients")
    split_rng = np.random.default_rng(derive_seed(seed, "test-split"))
    if dataset == "synthetic":
        _known(params, ("alpha", "beta", "samples_per_client"), "data.synthetic")
        spc = params.get("samples_per_client")
        devices = synthetic_devices(
            len(ids),
            alpha=_num(params, "alpha", 0.0, float, "data.synthetic"),
            beta=_num(params, "beta", 0.0, float, "data.synthetic"),
            seed=derive_seed(seed, "synthetic"),
            samples_per_client=None
            if spc is None
            else _num(params, "samples_per_client", 0, int, "data.synthetic"),
        )
        trains, tests = [], []
        for device in devices:
            tr, te = split_test(device.data.y, test_fraction, split_rng, stratify=False)
            trains.append(device.data.subset(tr))
            tests.append(device.data.subset(te))
        test = Dataset.concat(tests, num_classes=10, num_features=60)
        if partition == "natural":
            _known(partition_params, (), "data.partition")
            return FederationData(dict(zip(ids, trains, strict=True)), test, 10, 60)
        pool = Dataset.concat(trains, num_classes=10, num_features=60)
    elif dataset in ("digits", "npz"):
        if dataset == "digits":
            _known(params, (), "data.digits")
            full = load_digits()
        else:
            _known(params, ("path", "num_classes"), "data.npz")
            if not isinstance(params.get("path"), str | os.PathLike):
                raise ConfigError("a file path is required", path="data.npz.path")
            nc = params.get("num_classes")
            full = load_npz(
                params["path"],
                num_classes=None if nc is None else _num(params, "num_classes", 0, int, "data.npz"),
            )
        tr, te = split_test(full.y, test_fraction, split_rng)
        pool, test = full.subset(tr), full.subset(te)
    else:
        raise ConfigError(
            f"unknown data set {dataset!r}; expected digits, synthetic or npz", path="data.dataset"
        )
    rng = np.random.default_rng(derive_seed(seed, "partition"))
    parts = partition_indices(partition, pool.y, len(ids), partition_params, rng)
    train = {cid: pool.subset(idx) for cid, idx in zip(ids, parts, strict=True)}
    return FederationData(train, test, pool.num_classes, pool.num_features)


def load_node_data(
    path: str | os.PathLike[str], *, num_classes: int, num_features: int | None = None
) -> Dataset:
    """A node's own data file (``fedbus node --data FILE``) as its `Dataset`.

    Args:
        path: an ``.npz`` file with arrays ``x`` and ``y``.
        num_classes: the federation's label space (the model's output width).
        num_features: the model's input width, checked when given.

    Raises:
        ConfigError: unreadable file, missing array, or data that does not fit
            the federation's model; the message names the file.
    """
    data = load_npz(path, num_classes=num_classes)
    if num_features is not None and data.num_features != num_features:
        raise ConfigError(
            f"{os.fspath(path)}: examples have {data.num_features} features, the model expects {num_features}"
        )
    return data
