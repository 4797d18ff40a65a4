"""Inference latency at batch 1 on one thread: TFLite vs torch eager vs numpy, digits MLP.

Issue 6's target: the digits MLP (64-32-10) served by TFLite (ai-edge-litert,
the template patched with the weights, one thread) at least 5x faster per
sample than torch eager (``torch.set_num_threads(1)``, ``torch.no_grad()``)
on the same input in the same run. The numpy forward pass
(``DenseNetwork.logits``) is printed for context, and so are the CNN and the
cost of a round's model update on a node (patch + new interpreter).

Each repetition times every method once over ``--calls`` single-sample
calls, interleaved, and the table shows medians, so that drifting clock
speed or load hits all alike::

    .venv/bin/python benchmarks/bench_tflite.py            # 7 repetitions x 5000 calls
    .venv/bin/python benchmarks/bench_tflite.py --quick    # 3 x 1000: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedbus.learning.data import load_digits
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.tflite import (
    Architecture,
    TfliteModel,
    compile_template,
    interpreter_class,
    patch,
)
from fedbus.learning.torch import cnn, state_to_arrays

Method = Callable[[np.ndarray[Any, Any]], Any]


def torch_mlp(weights: dict[str, np.ndarray[Any, Any]]) -> torch.nn.Module:
    """The same MLP as a torch module (Linear weights are [out, in])."""
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    state = {
        "0.weight": weights["dense0.w"].T,
        "0.bias": weights["dense0.b"],
        "2.weight": weights["dense1.w"].T,
        "2.bias": weights["dense1.b"],
    }
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return module.eval()


def per_sample_us(method: Method, xs: list[np.ndarray[Any, Any]]) -> float:
    """Mean microseconds per single-sample call over ``xs``."""
    gc.disable()
    try:
        start = time.perf_counter()
        for x in xs:
            method(x)
        return (time.perf_counter() - start) / len(xs) * 1e6
    finally:
        gc.enable()


def raw_interpreter(model: TfliteModel) -> Method:
    """set_tensor + invoke + get_tensor on the served interpreter, no wrapper."""
    interpreter = model._interpreter
    inp, out = model._input, model._output
    set_tensor, invoke, get_tensor = (
        interpreter.set_tensor,
        interpreter.invoke,
        interpreter.get_tensor,
    )

    def run(x: np.ndarray[Any, Any]) -> Any:
        set_tensor(inp, x)
        invoke()
        return get_tensor(out)

    return run


def torch_method(module: torch.nn.Module) -> Method:
    def run(x: np.ndarray[Any, Any]) -> Any:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def bench(
    methods: dict[str, Method], xs: list[np.ndarray[Any, Any]], reps: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():  # warm-up: first-call allocations, XNNPACK packing
        per_sample_us(method, xs[:100])
    for _ in range(reps):
        for name, method in methods.items():
            times[name].append(per_sample_us(method, xs))
    return {name: statistics.median(t) for name, t in times.items()}


def update_ms(
    arch: Architecture, weights: dict[str, np.ndarray[Any, Any]], reps: int
) -> tuple[float, float]:
    """Median ms of a patch alone, and of patch + new interpreter (`TfliteModel.update`)."""
    template = compile_template(arch)
    served = TfliteModel(template, weights)
    patch_t, update_t = [], []
    for _ in range(reps * 20):
        t0 = time.perf_counter()
        patch(template, weights)
        t1 = time.perf_counter()
        served.update(weights)
        t2 = time.perf_counter()
        patch_t.append((t1 - t0) * 1e3)
        update_t.append((t2 - t1) * 1e3)
    return statistics.median(patch_t), statistics.median(update_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 1000 calls")
    args = parser.parse_args()
    reps, calls = (3, 1000) if args.quick else (7, 5000)
    torch.set_num_threads(1)
    data = load_digits()
    xs = [np.array(data.x[i % len(data) : i % len(data) + 1]) for i in range(calls)]

    net = DenseNetwork(64, 10, (32,))
    weights = net.init(0)
    weights["dense0.b"] += 0.01  # nonzero biases, as after training
    params = [weights[n] for n in net.names]
    served = TfliteModel.from_weights(None, weights)  # num_threads=1
    served_int8 = TfliteModel.from_weights(None, weights, int8=True)
    module = torch_mlp(weights)
    x = np.array(data.x[:50])
    ref = net.logits(params, x)
    with torch.no_grad():
        assert np.abs(module(torch.from_numpy(x)).numpy() - ref).max() < 1e-5
    assert np.abs(served.predict(x) - ref).max() < 1e-5

    mlp = bench(
        {
            "tflite (TfliteModel.predict)": served.predict,
            "tflite (raw set/invoke/get)": raw_interpreter(served),
            "tflite int8 weights": served_int8.predict,
            "torch eager": torch_method(module),
            "numpy forward": lambda x: net.logits(params, x),
        },
        xs,
        reps,
    )
    torch.manual_seed(0)
    cnn_module = cnn((1, 8, 8), 10).eval()
    cnn_served = TfliteModel.from_weights("cnn", state_to_arrays(cnn_module))
    conv = bench(
        {"tflite": cnn_served.predict, "torch eager": torch_method(cnn_module)},
        xs[: calls // 5],
        reps,
    )

    _, runtime = interpreter_class()
    print(f"runtime: {runtime}; torch {torch.__version__}; numpy {np.__version__}; 1 thread")
    print(f"{reps} repetitions, median microseconds per sample at batch 1")
    print("\ndigits MLP 64-32-10")
    for name, us in mlp.items():
        print(f"  {name:30s} {us:8.2f}")
    ratio = mlp["torch eager"] / mlp["tflite (TfliteModel.predict)"]
    raw = mlp["torch eager"] / mlp["tflite (raw set/invoke/get)"]
    verdict = "meets" if ratio >= 5 else "MISSES"
    print(
        f"  torch eager / tflite: {ratio:.1f}x via TfliteModel.predict, {raw:.1f}x raw ({verdict} the 5x target)"
    )
    print("\ndigits CNN (DigitsCNN, 1x8x8)")
    for name, us in conv.items():
        print(f"  {name:30s} {us:8.2f}")
    print(f"  torch eager / tflite: {conv['torch eager'] / conv['tflite']:.1f}x")
    patch_ms, reload_ms = update_ms(Architecture("mlp", 64, 10, (32,)), weights, reps)
    cnn_arch = cnn_served.arch
    cnn_patch, cnn_reload = update_ms(cnn_arch, state_to_arrays(cnn_module), reps)
    print("\nround update on a node (median ms): patch alone / patch + new interpreter")
    print(f"  MLP {patch_ms:.3f} / {reload_ms:.3f}   CNN {cnn_patch:.3f} / {cnn_reload:.3f}")
    print(
        f"\nfile sizes: MLP {len(served.model_bytes)} B float32, {len(served_int8.model_bytes)} B int8"
    )


if __name__ == "__main__":
    main()
