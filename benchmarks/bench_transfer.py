"""Transfer speed through Mosquitto: fedbus (Messenger over MqttTransport) beside raw paho.

Issue 2's targets, each measured against a raw paho-mqtt reference moving the
same bytes through the same broker in the same run (`_paho_ref`):

* ``fanout``: one 4 MiB model (1M float32) broadcast to 100 subscribers, then
  100 updates of 4 MiB collected by the server; clients spread over 2 worker
  processes, server in this process. fedbus chunks both (default
  max_payload_bytes 1,000,000); the reference sends whole 4 MiB messages.
  Target: fedbus within 1.3x of the reference's time.
* ``stream``: one 40 MiB model (10M float32) from one node to another in
  another process. The reference publishes the same bytes in 1 MiB messages.
  Target: fedbus at least 0.8x the reference's throughput.

Runs alternate (reference, fedbus, reference, ...) so drift hits both alike;
tables show medians and the median of same-round ratios. Times run from the
first publish (fedbus: before encoding) to the last delivery, on
``time.monotonic``, which all processes share on Linux. One mosquitto
(`fedbus.broker.ManagedBroker`) serves the whole run::

    .venv/bin/python benchmarks/bench_transfer.py                 # both cases, 5 rounds
    .venv/bin/python benchmarks/bench_transfer.py --quick         # 10 clients, 3 rounds
    .venv/bin/python benchmarks/bench_transfer.py --case stream --runs 7
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fedbus_side as ours
import _paho_ref as ref

from fedbus.broker import ManagedBroker
from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES, BrokerConfig

WORKER_PROCS = 2
MiB = 1 << 20


def _ms(s: float) -> str:
    return f"{s * 1e3:,.0f}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(_med(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


# -- fan-out / fan-in ------------------------------------------------------------------


def ref_fanout(config: BrokerConfig, clients: int, params: int) -> dict[str, float]:
    r = ref.fan_out_in(
        config.host, config.port, clients=clients, payload_bytes=params * 4, procs=WORKER_PROCS
    )
    return {"total": r["total"], "broadcast": r["broadcast"]}


def ours_fanout(config: BrokerConfig, clients: int, params: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, control, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    ids = [f"client-{i}" for i in range(clients)]
    procs = [
        ours.spawn(ours.fan_worker, config, ids[p::WORKER_PROCS], params, ready, control, results)
        for p in range(WORKER_PROCS)
    ]
    try:
        with ours.timed_codec() as timer:
            srv = asyncio.run(ours.fan_server(config, clients, params, ready, WORKER_PROCS))
        for _ in procs:
            control.put("stop")
        workers = [ours._get(results, ours.DEADLINE_S) for _ in procs]
    finally:
        ours.reap(procs)
    t0 = srv["t0"]
    times: dict[str, tuple[float, float, float]] = {}
    client_codec: dict[str, list[float]] = {"model_encode": [], "model_decode": []}
    chunk_s = 0.0
    for w in workers:
        times.update(w["clients"])
        for k in client_codec:
            client_codec[k] += w["codec"][k]
        chunk_s += w["codec"]["chunk_encode_s"] + w["codec"]["chunk_decode_s"]
    if len(times) != clients:
        raise RuntimeError(f"only {len(times)} of {clients} clients finished")
    if srv["dropped"]:
        print(f"  (fedbus run: dropped {srv['dropped']}, resent {srv['chunks_resent']} chunks)")
    recv = [t[0] for t in times.values()]
    send_s = [t[2] - t[1] for t in times.values()]
    return {
        "total": max(srv["got"]) - t0,
        "broadcast": max(recv) - t0,
        # server, fan-out
        "srv_encode": sum(timer.model_encode),
        "srv_published": srv["published"] - t0,
        "cli_decode": _med(client_codec["model_decode"]),
        # clients, fan-in
        "cli_encode": _med(client_codec["model_encode"]),
        "cli_send": _med(send_s),
        "first_update": min(srv["got"]) - t0,
        "srv_decode": sum(timer.model_decode),
        "srv_chunk_codec": timer.chunk_encode_s + timer.chunk_decode_s,
        "cli_chunk_codec": chunk_s,
    }


def run_fanout(config: BrokerConfig, clients: int, params: int, runs: int) -> None:
    rs: list[dict[str, float]] = []
    os_: list[dict[str, float]] = []
    for i in range(runs):
        gc.collect()
        rs.append(ref_fanout(config, clients, params))
        gc.collect()
        os_.append(ours_fanout(config, clients, params))
        print(
            f"  round {i + 1}/{runs}: paho {rs[-1]['total']:.2f} s, fedbus {os_[-1]['total']:.2f} s",
            flush=True,
        )
    mb = params * 4 / MiB
    print(
        f"\nfan-out/in: {mb:.0f} MiB model to {clients} clients + {clients} updates of {mb:.0f} MiB, "
        f"{WORKER_PROCS} client processes, median (min-max) of {runs} interleaved runs, seconds"
    )
    print("| phase | raw paho | fedbus | fedbus / paho |")
    print("|---|---|---|---|")
    for key, name in (
        ("broadcast", "broadcast (to last client)"),
        ("total", "round (to last update)"),
    ):
        ratio = _med([o[key] / r[key] for o, r in zip(os_, rs, strict=True)])
        sec: Callable[[float], str] = lambda s: f"{s:.2f}"  # noqa: E731
        print(
            f"| {name} | {_spread([r[key] for r in rs], sec)} "
            f"| {_spread([o[key] for o in os_], sec)} | {ratio:.2f} |"
        )
    print("\nfedbus stages (median over runs, ms; 'at' = since the server started encoding)")
    print("| stage | ms |")
    print("|---|---|")
    rows = (
        ("server: encode ModelBroadcast", "srv_encode"),
        ("server: broadcast() returned (all chunks PUBACKed) at", "srv_published"),
        ("clients: last client had the decoded model at", "broadcast"),
        ("clients: decode of the reassembled model, per client", "cli_decode"),
        ("clients: encode ModelUpdate, per client", "cli_encode"),
        ("clients: send() duration (credit waits included), per client", "cli_send"),
        ("server: first update delivered at", "first_update"),
        ("server: last update delivered at", "total"),
        ("server: decode of 100 reassembled updates, total", "srv_decode"),
        ("server: chunk encode+decode, total", "srv_chunk_codec"),
        ("clients: chunk encode+decode, all clients together", "cli_chunk_codec"),
    )
    for name, key in rows:
        print(f"| {name.replace('100', str(clients))} | {_ms(_med([o[key] for o in os_]))} |")


# -- single stream ---------------------------------------------------------------------


def ref_stream(config: BrokerConfig, params: int) -> float:
    return ref.stream(config.host, config.port, total_bytes=params * 4, chunk_bytes=MiB)


def ours_stream(config: BrokerConfig, params: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    proc = ours.spawn(ours.stream_sink, config, params, ready, results)
    try:
        with ours.timed_codec() as timer:
            src = asyncio.run(ours.stream_source(config, params, ready))
        sink = ours._get(results, ours.DEADLINE_S)
    finally:
        ours.reap([proc])
    t0 = src["t0"]
    return {
        "total": sink["t_recv"] - t0,
        "encode": sum(timer.model_encode),
        "sent": src["sent"] - t0,
        "chunk_encode": timer.chunk_encode_s,
        "chunk_decode": sink["codec"]["chunk_decode_s"],
        "decode": sum(sink["codec"]["model_decode"]),
    }


def run_stream(config: BrokerConfig, params: int, runs: int) -> None:
    rs: list[float] = []
    os_: list[dict[str, float]] = []
    nbytes = params * 4
    for i in range(runs):
        gc.collect()
        rs.append(ref_stream(config, params))
        gc.collect()
        os_.append(ours_stream(config, params))
        print(
            f"  round {i + 1}/{runs}: paho {nbytes / rs[-1] / 1e6:.0f} MB/s, "
            f"fedbus {nbytes / os_[-1]['total'] / 1e6:.0f} MB/s",
            flush=True,
        )
    mbps: Callable[[float], str] = lambda v: f"{v:.0f}"  # noqa: E731
    ref_tp = [nbytes / t / 1e6 for t in rs]
    our_tp = [nbytes / o["total"] / 1e6 for o in os_]
    ratio = _med([o / r for o, r in zip(our_tp, ref_tp, strict=True)])
    print(
        f"\nsingle stream: {nbytes / 1e6:.0f} MB ({nbytes // 4:,} float32), one sender -> one receiver in another process, "
        f"median (min-max) of {runs} interleaved runs"
    )
    print("| | raw paho (1 MiB messages) | fedbus (chunked ModelUpdate) | fedbus / paho |")
    print("|---|---|---|---|")
    print(f"| MB/s | {_spread(ref_tp, mbps)} | {_spread(our_tp, mbps)} | {ratio:.2f} |")
    sec: Callable[[float], str] = lambda s: f"{s:.3f}"  # noqa: E731
    print(f"| seconds | {_spread(rs, sec)} | {_spread([o['total'] for o in os_], sec)} | |")
    print("\nfedbus stages (median over runs, ms; 'at' = since the sender started encoding)")
    print("| stage | ms |")
    print("|---|---|")
    for name, key in (
        ("sender: encode ModelUpdate", "encode"),
        ("sender: chunk encodes, total", "chunk_encode"),
        ("sender: send() returned (all chunks PUBACKed) at", "sent"),
        ("receiver: chunk decodes, total", "chunk_decode"),
        ("receiver: decode of the reassembled update", "decode"),
        ("receiver: update delivered at", "total"),
    ):
        print(f"| {name} | {_ms(_med([o[key] for o in os_]))} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("fanout", "stream", "all"), default="all")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="10 clients, 3 rounds: a smoke run")
    parser.add_argument("--clients", type=int, default=None, help="fan-out/in clients (100)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    clients = args.clients or (10 if args.quick else 100)
    started = time.monotonic()
    with ManagedBroker(kind="mosquitto") as broker:
        config = broker.client_config(max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES)
        print(
            f"mosquitto at {broker.url} (fedbus's generated config); "
            f"fedbus max_payload_bytes {config.max_payload_bytes:,}"
        )
        if args.case in ("fanout", "all"):
            run_fanout(config, clients, 1_000_000, runs)
        if args.case in ("stream", "all"):
            print()
            run_stream(config, 10_000_000, runs)
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
