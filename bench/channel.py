"""The shell ↔ engine channel, by measurement: candidate transports between two processes.

    .venv/bin/python bench/channel.py [--rounds 2000] [--media-mb 4]

Each candidate runs an echo peer in a child process, and the parent sends it messages like the
ones the worker's shell and engine exchange (workers/shared/messages.py):
- small: a `Submit` of a short text request (a job id, a prompt, its params), echoed back:
  round trips per second and the median round trip;
- media: a request carrying a decoded clip of `--media-mb` MiB of float32 audio, echoed back:
  MiB/s each way.

Candidates: `multiprocessing.connection` over a Unix socket pair (pickle, what the worker uses),
`multiprocessing.Queue` (pickle plus a feeder thread), and ZeroMQ PAIR over IPC with msgpack
(vLLM's choice between its API server and EngineCore) when pyzmq and msgpack are installed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.schemas import GenerationParams  # noqa: E402
from workers.shared.base import Request  # noqa: E402
from workers.shared.messages import Submit  # noqa: E402


def small_message(i: int) -> Submit:
    params = GenerationParams(max_new_tokens=64, temperature=0.7, seed=7)
    return Submit(i, "gemma-3-270m", Request(job_id=f"job_{i:024d}", messages=None, prompt="Explain queues.",
                                             params=params))  # fmt: skip


def media_message(mb: int) -> Submit:
    clip = np.random.default_rng(0).standard_normal(mb * 2**18).astype(np.float32)  # mb MiB
    message = small_message(0)
    message.request.messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]
    return message


# ---- peers (child processes): echo every message back --------------------------------------


def _pipe_peer(fd: int) -> None:
    conn = Connection(socket.socket(fileno=fd).detach())
    while (message := conn.recv()) is not None:
        conn.send(message)


def _queue_peer(inbox: Any, outbox: Any) -> None:
    while (message := inbox.get()) is not None:
        outbox.put(message)


def _zmq_peer(address: str) -> None:
    import msgpack
    import zmq

    sock = zmq.Context().socket(zmq.PAIR)
    sock.connect(address)
    while (raw := sock.recv(copy=False)).bytes != b"stop":
        sock.send(msgpack.packb(msgpack.unpackb(raw.buffer, raw=False), use_bin_type=True), copy=False)


# ---- candidates: (send, receive, close) ---------------------------------------------------


Link = tuple[Callable[[Any], None], Callable[[], Any], Callable[[], None]]


def pipe_link() -> Link:
    ours, theirs = socket.socketpair()
    peer = mp.get_context("fork").Process(target=_pipe_peer, args=(theirs.fileno(),))
    peer.start()
    theirs.close()
    conn = Connection(ours.detach())

    def close() -> None:
        conn.send(None)
        peer.join()

    return conn.send, conn.recv, close


def queue_link() -> Link:
    ctx = mp.get_context("fork")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=_queue_peer, args=(inbox, outbox))
    peer.start()

    def close() -> None:
        inbox.put(None)
        peer.join()

    return inbox.put, outbox.get, close


def zmq_link() -> Link | None:
    try:
        import msgpack
        import zmq
    except ImportError:
        return None
    address = f"ipc://{tempfile.mkdtemp()}/engine.sock"
    sock = zmq.Context().socket(zmq.PAIR)
    sock.bind(address)
    peer = mp.get_context("fork").Process(target=_zmq_peer, args=(address,))
    peer.start()

    def send(message: Submit) -> None:
        # msgpack takes no dataclasses nor arrays: the fields, and the array's bytes, by hand.
        request = message.request
        parts = []
        for m in request.messages or []:
            for p in m["content"]:
                parts.append(p["audio"].tobytes() if "audio" in p else p)
        body = {"rid": message.rid, "variant": message.variant, "job_id": request.job_id,
                "prompt": request.prompt, "params": request.params.model_dump(), "media": parts}  # fmt: skip
        sock.send(msgpack.packb(body, use_bin_type=True), copy=False)

    def receive() -> Any:
        body = msgpack.unpackb(sock.recv(copy=False).buffer, raw=False)
        media = [np.frombuffer(p, dtype=np.float32) for p in body["media"] if isinstance(p, bytes)]
        return body, media

    def close() -> None:
        sock.send(b"stop")
        peer.join()

    return send, receive, close


def measure(link: Link, rounds: int, media: Submit) -> tuple[float, float, float]:
    send, receive, close = link
    try:
        for i in range(100):  # warm-up
            send(small_message(i))
            receive()
        times = []
        started = time.perf_counter()
        for i in range(rounds):
            t = time.perf_counter()
            send(small_message(i))
            receive()
            times.append(time.perf_counter() - t)
        per_s = rounds / (time.perf_counter() - started)
        size = media.request.messages[0]["content"][0]["audio"].nbytes / 2**20  # type: ignore[index]
        started = time.perf_counter()
        for _ in range(20):
            send(media)
            receive()
        mb_s = 2 * 20 * size / (time.perf_counter() - started)
        return per_s, statistics.median(times) * 1e6, mb_s
    finally:
        close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--media-mb", type=int, default=4)
    args = parser.parse_args()
    media = media_message(args.media_mb)
    size = len(pickle.dumps(small_message(0)))
    print(f"small message: {size} bytes pickled; media: {args.media_mb} MiB clip")
    print(f"{'transport':<44} {'round trips/s':>14} {'median µs':>10} {'media MiB/s':>12}")
    candidates: list[tuple[str, Callable[[], Link | None]]] = [
        ("multiprocessing Connection, socket pair", pipe_link),
        ("multiprocessing Queue", queue_link),
        ("ZeroMQ PAIR over ipc, msgpack", zmq_link),
    ]
    for name, make in candidates:
        link = make()
        if link is None:
            print(f"{name:<44} {'(pyzmq and msgpack not installed)':>38}")
            continue
        per_s, median_us, mb_s = measure(link, args.rounds, media)
        print(f"{name:<44} {per_s:>14.0f} {median_us:>10.1f} {mb_s:>12.0f}")


if __name__ == "__main__":
    main()
