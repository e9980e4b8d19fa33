"""Hostile connections: huge bodies without a key, chunked bodies past the limit, a user who
opens hundreds of streams, and a stream whose key is revoked while it is open."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from core.settings import Settings
from gemmaq.admin import revoke_key
from gemmaq.embedded import free_port
from tests.helpers.procs import cpu_seconds
from tests.helpers.stack import Stack, wait_healthy

pytestmark = pytest.mark.stack

MIB = 1024 * 1024


def _connect(stack: Stack) -> socket.socket:
    url = urlsplit(stack.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1]), head


def _send_in_background(sock: socket.socket, chunk: bytes, count: int) -> None:
    def send() -> None:
        try:
            for _ in range(count):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: what the test wants

    threading.Thread(target=send, daemon=True).start()


def test_an_unauthenticated_64_mib_body_is_401_before_it_is_read(stack: Stack) -> None:
    api = stack.processes[0].pid
    before = cpu_seconds(api)
    sock = _connect(stack)
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * MIB)
    )
    sock.sendall(head + b'{"input": {"prompt": "')
    _send_in_background(sock, b"x" * MIB, 64)
    status, _ = _status(sock)
    sock.close()
    spent = cpu_seconds(api) - before
    assert status == 401
    assert spent < 0.05, f"the API spent {spent * 1000:.0f} ms of CPU on an unauthenticated body"


def test_a_chunked_body_over_the_limit_is_413(stack: Stack, key: str) -> None:
    sock = _connect(stack)
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % key.encode()
    )
    sock.sendall(head)
    _send_in_background(sock, b"%x\r\n%s\r\n" % (MIB, b" " * MIB), 70)
    status, head = _status(sock)
    sock.close()
    assert status == 413, head


def test_streams_past_the_cap_are_429_and_harm_no_one_else(stack: Stack) -> None:
    greedy, other = stack.new_key("greedy"), stack.new_key("bystander")
    held = httpx.post(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {greedy}"},
                      json={"variant": "echo-held", "input": {"prompt": "wait"}}).json()["id"]  # fmt: skip
    info = redis.Redis.from_url(stack.redis_url)
    clients_before = int(info.info("clients")["connected_clients"])

    async def scenario() -> tuple[list[int], int, dict[str, Any]]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(
                base_url=stack.url, timeout=60, limits=limits, headers={"Authorization": f"Bearer {greedy}"}
            ) as g,  # fmt: skip
            httpx.AsyncClient(
                base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {other}"}
            ) as o,
        ):
            events_url = f"/v1/jobs/{held}/events"
            opened = await asyncio.gather(
                *(g.send(g.build_request("GET", events_url), stream=True) for _ in range(200))
            )
            statuses = [r.status_code for r in opened]
            assert all(r.headers.get("retry-after") for r in opened if r.status_code == 429)
            clients_during = int(info.info("clients")["connected_clients"])
            # The bystander: a job that runs, followed on a stream to its end.
            job = (await o.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "hello"}})).json()[
                "id"
            ]
            events = []
            async with o.stream("GET", f"/v1/jobs/{job}/events") as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        events.append(line.split(":", 1)[1].strip())
            final = (await o.get(f"/v1/jobs/{job}")).json()
            for r in opened:
                await r.aclose()
            return statuses, clients_during, {"events": events, "status": final["status"]}

    statuses, clients_during, bystander = asyncio.run(scenario())
    cap, pool = Settings().max_streams_per_user, Settings().redis_max_connections  # the stack's defaults
    assert statuses.count(200) == cap and statuses.count(429) == 200 - cap, sorted(set(statuses))
    assert bystander["status"] == "succeeded" and "done" in bystander["events"], bystander
    assert clients_during - clients_before <= pool, (clients_before, clients_during)
    # Closed streams give their places back.
    deadline = time.monotonic() + 15
    with stack.client(greedy) as c:
        while True:
            with c.stream("GET", f"/v1/jobs/{held}/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed streams' places were not given back"
            time.sleep(0.5)
        c.post(f"/v1/jobs/{held}/cancel")


def test_a_stream_ends_within_30_s_of_its_key_being_revoked(stack: Stack) -> None:
    key = stack.new_key("revoked")
    with stack.client(key) as c:
        held = c.post("/v1/jobs", json={"variant": "echo-held", "input": {"prompt": "wait"}}).json()["id"]
        with c.stream("GET", f"/v1/jobs/{held}/events", timeout=60) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(lines)
            asyncio.run(revoke_key(stack.settings(), key[:10]))
            revoked = time.monotonic()
            events = [line for line in lines if line.startswith("event:")]
            ended = time.monotonic() - revoked
    assert ended < 30, f"the stream went on {ended:.0f} s after its key was revoked"
    assert events[-1] == "event: error"
    stack.sql("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = %s", held)


def test_the_api_exits_within_10_s_of_sigterm_with_streams_open(stack: Stack, key: str) -> None:
    port = free_port()
    api = stack.gemmaq("api", "--port", str(port), log="api-sigterm.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, api)
    headers = {"Authorization": f"Bearer {key}"}
    held = httpx.post(
        f"{url}/v1/jobs", headers=headers, json={"variant": "echo-held", "input": {"prompt": "w"}}
    )
    job_id = held.json()["id"]
    with (
        httpx.Client(base_url=url, headers=headers, timeout=60) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/events") as s,
    ):
        assert s.status_code == 200

        def hold() -> None:
            with contextlib.suppress(httpx.HTTPError):
                c.get(f"/v1/jobs/{job_id}", params={"wait": 60})

        waiting = threading.Thread(target=hold, daemon=True)
        waiting.start()
        time.sleep(1)
        api.send_signal(signal.SIGTERM)
        began = time.monotonic()
        api.wait(timeout=20)
        took = time.monotonic() - began
    stack.processes.remove(api)
    assert took < 10, f"the API took {took:.1f} s to exit after SIGTERM"
    httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers=headers)
