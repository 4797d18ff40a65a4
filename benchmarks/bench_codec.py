"""Codec speed: encode + decode of float32 model states against a plain memcpy.

Issue 2's target: fedbus.codec's round trip (encode, then decode to numpy
views) within 2x of a plain memcpy of the same bytes (``arr.tobytes()`` then
``np.frombuffer``). msgpack-python with ``bin`` fields is printed for context.

Every method runs once per repetition, interleaved, and the table shows
medians, so that drifting clock speed or memory pressure hits all alike::

    .venv/bin/python benchmarks/bench_codec.py            # 1M, 10M, 10M in 20 tensors
    .venv/bin/python benchmarks/bench_codec.py --quick    # 1M and 1M in 20 tensors
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from fedbus import codec
from fedbus.messages import ModelUpdate, tensors_from_arrays, tensors_to_arrays

State = dict[str, np.ndarray[Any, Any]]


def make_state(params: int, tensors: int) -> State:
    rng = np.random.default_rng(0)
    sizes = [params // tensors] * tensors
    sizes[-1] += params - sum(sizes)
    return {f"layer{i}.weight": rng.random(n, dtype=np.float32) for i, n in enumerate(sizes)}


def fedbus_encode(state: State) -> bytes:
    msg = ModelUpdate(
        run="bench", round=1, sender="client-0", id="m", weights=tensors_from_arrays(state)
    )
    return codec.encode(msg)


def fedbus_decode(payload: bytes) -> State:
    msg = codec.decode(payload)
    assert isinstance(msg, ModelUpdate)
    return tensors_to_arrays(msg.weights)


def memcpy_encode(state: State) -> list[bytes]:
    return [arr.tobytes() for arr in state.values()]


def memcpy_decode(blobs: list[bytes]) -> list[np.ndarray[Any, Any]]:
    return [np.frombuffer(b, dtype=np.float32) for b in blobs]


def msgpack_encode(state: State) -> bytes:
    weights = {
        name: {"dtype": "float32", "shape": list(arr.shape), "data": memoryview(arr)}
        for name, arr in state.items()
    }
    return msgpack.packb({"kind": "update", "v": 1, "weights": weights})


def msgpack_decode(payload: bytes) -> State:
    plain = msgpack.unpackb(payload, raw=False)
    return {
        name: np.frombuffer(t["data"], dtype="<f4").reshape(t["shape"])
        for name, t in plain["weights"].items()
    }


METHODS: dict[str, tuple[Callable[[State], Any], Callable[[Any], Any]]] = {
    "fedbus": (fedbus_encode, fedbus_decode),
    "memcpy": (memcpy_encode, memcpy_decode),
    "msgpack": (msgpack_encode, msgpack_decode),
}


def measure(state: State, runs: int) -> dict[str, tuple[float, float]]:
    """Median (encode ms, decode ms) per method, over interleaved runs."""
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for _ in range(runs):
        for name, (enc, dec) in METHODS.items():
            gc.collect()
            t0 = time.perf_counter()
            blob = enc(state)
            t1 = time.perf_counter()
            out = dec(blob)
            t2 = time.perf_counter()
            times[name].append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
            del blob, out
    return {
        name: (statistics.median(e for e, _ in ts), statistics.median(d for _, d in ts))
        for name, ts in times.items()
    }


def check(state: State) -> None:
    """The round trip must give back the same arrays (a benchmark of a wrong codec is moot)."""
    out = fedbus_decode(fedbus_encode(state))
    assert list(out) == list(state)
    assert all(np.array_equal(out[k], v) for k, v in state.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters only")
    parser.add_argument("--runs", type=int, default=7, help="repetitions (median; default 7)")
    args = parser.parse_args(argv)
    cases = [(1_000_000, 1), (1_000_000, 20)]
    if not args.quick:
        cases += [(10_000_000, 1), (10_000_000, 20)]
    print(f"codec round trip of float32 states, median of {args.runs} interleaved runs (ms)")
    header = (
        "| params | tensors | MB | encode | decode | round trip | memcpy | ratio rt/memcpy "
        "| msgpack-python rt |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for params, ntensors in cases:
        state = make_state(params, ntensors)
        check(state)
        res = measure(state, args.runs)
        enc, dec = res["fedbus"]
        mem = sum(res["memcpy"])
        mp = sum(res["msgpack"])
        mb = params * 4 / 1e6
        print(
            f"| {params:,} | {ntensors} | {mb:.0f} | {enc:.2f} | {dec:.3f} | {enc + dec:.2f} "
            f"| {mem:.2f} | {(enc + dec) / mem:.2f} | {mp:.2f} |"
        )


if __name__ == "__main__":
    main()
