"""Receiver flow control through mosquitto: many senders, a bounded number streaming at once.

The receiver's transport is wrapped in a recording `faults.FaultyTransport`,
whose log holds, in the order the receiver saw them, every chunk it received
and every credit it sent. From that log the test checks the two flow-control
invariants causally, with no timing: a chunk of index i >= 1 arrives only
after a credit above i for its transfer was sent, and at most
``max_concurrent_transfers`` transfers hold a slot at any point.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from faults import Fault, FaultyTransport, LogEntry, chunk_matching, decoded

from fedbus import topics
from fedbus.broker import ManagedBroker
from fedbus.flow import TransferLimits
from fedbus.messages import Chunk, Credit, ModelUpdate, Tensor
from fedbus.transport.messenger import Incoming, Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration]

WAIT_S = 30.0
SENDERS = 30
RECEIVER_LIMITS = TransferLimits(
    max_concurrent_transfers=4,
    window=2,
    request_gap_s=5.0,  # no re-requests: every chunk below is sent exactly once
    transfer_timeout_s=30.0,
    credit_timeout_s=30.0,
)
SENDER_LIMITS = TransferLimits(request_gap_s=5.0, credit_timeout_s=30.0)


def check_flow_control(log: list[LogEntry], *, max_concurrent: int) -> tuple[int, int]:
    """Replay the receiver's log; return (peak of transfers holding a slot, "held" credits).

    A transfer holds a slot from its first real credit (upto > 1; upto == 1
    means "queued, hold") until the receiver has every one of its chunks.
    """
    granted: dict[str, int] = {}
    have: dict[str, set[int]] = {}
    streaming: set[str] = set()
    finished: set[str] = set()
    told_to_wait: set[str] = set()
    peak = 0
    for entry in log:
        msg = entry.message
        if entry.direction == "publish" and isinstance(msg, Credit):
            if msg.upto == 1:
                told_to_wait.add(msg.xfer)
            elif msg.xfer not in finished:
                streaming.add(msg.xfer)
                peak = max(peak, len(streaming))
            granted[msg.xfer] = max(granted.get(msg.xfer, 0), msg.upto)
        elif entry.direction == "receive" and isinstance(msg, Chunk):
            if msg.index >= 1:
                assert msg.index < granted.get(msg.xfer, 1), (
                    f"chunk {msg.index} of {msg.xfer} arrived before a credit allowed it"
                )
            got = have.setdefault(msg.xfer, set())
            got.add(msg.index)
            if len(got) == msg.count:
                streaming.discard(msg.xfer)
                finished.add(msg.xfer)
        assert len(streaming) <= max_concurrent, f"{len(streaming)} transfers streaming at once"
    held = len(told_to_wait)
    return peak, held


@pytest.mark.timeout(60)
async def test_thirty_senders_are_admitted_a_few_at_a_time(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: 30 senders with a ~256 KB update each, in 64 KiB chunks; a
    # receiver letting 4 transfers stream at once, 2 chunks ahead each.
    run = f"r-{unique_prefix}"
    config = mosquitto.client_config(max_payload_bytes=65536)
    server_id = f"{unique_prefix}-server"
    ids = [f"{unique_prefix}-c{i:02d}" for i in range(SENDERS)]
    expected: dict[str, bytes] = {}
    updates: dict[str, ModelUpdate] = {}
    for i, node in enumerate(ids):
        arr = np.random.default_rng(i).standard_normal(64_000, dtype=np.float32)
        updates[node] = ModelUpdate(run=run, sender=node, weights={"w": Tensor.from_array(arr)})
        expected[node] = arr.tobytes()

    offered: set[str] = set()  # senders whose chunk 0 the broker acknowledged
    all_offered = asyncio.Event()

    def on_published(topic: str, payload: bytes) -> None:
        message = decoded(payload)
        if isinstance(message, Chunk) and message.index == 0:
            offered.add(message.sender)
            if len(offered) == SENDERS:
                all_offered.set()

    async with contextlib.AsyncExitStack() as stack:
        senders: dict[str, Messenger] = {}
        for node in ids:
            t = await stack.enter_async_context(MqttTransport(config, node))
            senders[node] = await stack.enter_async_context(
                Messenger(
                    FaultyTransport(t, on_published=on_published),
                    node_id=node,
                    run=run,
                    prefix=unique_prefix,
                    limits=SENDER_LIMITS,
                )
            )
        inner = await stack.enter_async_context(MqttTransport(config, server_id))
        recorder = FaultyTransport(inner, record=True)
        # Subscribed before anyone sends, but not yet reading: every first chunk
        # queues up, so the receiver meets all 30 transfers at once.
        await inner.subscribe(topics.inbox_filter(run, server_id, prefix=unique_prefix))

        # Execute
        sends = asyncio.gather(*(senders[n].send(server_id, updates[n]) for n in ids))
        try:
            async with asyncio.timeout(WAIT_S):
                await all_offered.wait()
                server = await stack.enter_async_context(
                    Messenger(
                        recorder,
                        node_id=server_id,
                        run=run,
                        prefix=unique_prefix,
                        limits=RECEIVER_LIMITS,
                    )
                )
                got: list[Incoming] = []
                async for item in server.messages():
                    got.append(item)
                    if len(got) == SENDERS:
                        break
                await sends
        finally:
            sends.cancel()
            await asyncio.gather(sends, return_exceptions=True)

    # Assert: everything arrived bit-exact ...
    assert sorted(item.topic.sender for item in got) == ids
    for item in got:
        assert isinstance(item.message, ModelUpdate)
        assert bytes(item.message.weights["w"].data) == expected[item.topic.sender]
    chunks_each = {m.stats.chunks_sent for m in senders.values()}
    assert min(chunks_each) >= 4  # each update really was a multi-chunk transfer
    assert server.stats.transfers_completed == SENDERS
    assert not server.stats.dropped
    # ... while credits bounded what streamed: never more than 4 transfers at
    # once, no chunk ahead of its credit, and some transfers were told to wait.
    peak, held = check_flow_control(recorder.log, max_concurrent=4)
    assert 1 <= peak <= 4
    assert held >= 1
    assert server.stats.credits_sent >= SENDERS


@pytest.mark.timeout(30)
async def test_a_sender_told_to_hold_waits_for_its_turn(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: the receiver streams one transfer at a time. A's transfer stalls
    # (its chunk 2 is lost four times, each loss noticed after the 0.3 s request
    # gap); B arrives meanwhile, is queued and told to hold. B's credit deadline
    # (0.8 s) is shorter than its turn takes, but the receiver repeats the hold
    # every request gap, so B waits instead of giving up.
    run = f"r-{unique_prefix}"
    config = mosquitto.client_config(max_payload_bytes=65536)
    server_id, a_id, b_id = (f"{unique_prefix}-{n}" for n in ("server", "a", "b"))
    receiver_limits = TransferLimits(
        max_concurrent_transfers=1, window=2, request_gap_s=0.3, transfer_timeout_s=30.0
    )
    a_stalled = asyncio.Event()

    def on_published(topic: str, payload: bytes) -> None:
        message = decoded(payload)
        if isinstance(message, Chunk) and message.index == 3:  # A sent all it may
            a_stalled.set()

    arrays = [np.random.default_rng(s).standard_normal(100_000, dtype=np.float32) for s in (1, 2)]
    msg_a, msg_b = (
        ModelUpdate(run=run, sender=node, weights={"w": Tensor.from_array(arr)})
        for node, arr in zip((a_id, b_id), arrays, strict=True)
    )
    lose_2 = Fault("drop", chunk_matching(index=2, form="to", prefix=unique_prefix), times=4)
    async with contextlib.AsyncExitStack() as stack:
        ts = await stack.enter_async_context(MqttTransport(config, server_id))
        server = await stack.enter_async_context(
            Messenger(ts, node_id=server_id, run=run, prefix=unique_prefix, limits=receiver_limits)
        )
        ta = await stack.enter_async_context(MqttTransport(config, a_id))
        a = await stack.enter_async_context(
            Messenger(
                FaultyTransport(ta, publish=[lose_2], on_published=on_published),
                node_id=a_id,
                run=run,
                prefix=unique_prefix,
            )
        )
        tb = await stack.enter_async_context(MqttTransport(config, b_id))
        b = await stack.enter_async_context(
            Messenger(
                tb,
                node_id=b_id,
                run=run,
                prefix=unique_prefix,
                limits=TransferLimits(credit_timeout_s=0.8, request_gap_s=2.0),
            )
        )
        # Execute
        sending_a = asyncio.create_task(a.send(server_id, msg_a))
        try:
            async with asyncio.timeout(WAIT_S):
                await a_stalled.wait()
                await b.send(server_id, msg_b)
                await sending_a
                got = []
                async for item in server.messages():
                    got.append(item)
                    if len(got) == 2:
                        break
        finally:
            sending_a.cancel()
            await asyncio.gather(sending_a, return_exceptions=True)

    # Assert: both arrived, A first (B's turn came when A's slot was freed).
    assert [item.topic.sender for item in got] == [a_id, b_id]
    assert [item.message for item in got] == [msg_a, msg_b]
