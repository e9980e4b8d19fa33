"""Hostile webhook targets: URLs the sender cannot use, a name that resolves to a public address
for the check and to loopback for the connection, and receivers that stream without end or
trickle a byte a second."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.settings import Settings
from gemmaq.embedded import free_port
from tests.helpers.procs import rss_mb
from tests.helpers.stack import Stack, wait_job
from tests.helpers.webhooks import Receiver
from workers.webhooks import Dispatcher, _Due

NOWHERE_PG = "postgresql://postgres@127.0.0.1:1/nothing"
BAD_URLS = [
    "http://[::1",
    "http://exa\tmple.com/hook",
    "http://example.com/\thook",
    "http://example.com/ hook",
    "http://example.com/hook\n",
    "ftp://example.com/hook",
    "javascript:alert(1)",
    "http://",
    "http:///no-host",
    "http://user:secret@example.com/hook",
    "http://example.com:99999/hook",
    "http://example.com:-1/hook",
    "http://[::1]/hook",
    "http://127.0.0.2/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://[::ffff:10.0.0.1]/hook",
    "http://0.0.0.0/hook",
    "http://2130706434/hook",  # 127.0.0.2, in decimal
    "http://224.0.0.1/hook",
    "https://[fe80::1%25eth0]/hook",
    "http://" + "a" * 2100 + ".com/",
]


@pytest.mark.stack
def test_urls_the_sender_could_not_use_are_422_everywhere(client: httpx.Client) -> None:
    for url in BAD_URLS:
        settings = client.put("/v1/webhooks/settings", json={"default_url": url})
        assert settings.status_code == 422, (url, settings.status_code, settings.text)
        assert settings.json()["error"]["code"] == "VALIDATION_ERROR"
        job = client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "x"}, "webhook_url": url})
        assert job.status_code == 422, (url, job.status_code, job.text)


@pytest.mark.unit
def test_a_name_that_rebinds_to_loopback_gets_no_post_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check resolves the name to a public address; a second lookup would answer loopback,
    where a receiver listens. The attempt connects to the checked address or nowhere."""
    receiver = Receiver()
    real = socket.getaddrinfo
    answers = iter(["93.184.215.14"])  # a public address first, then loopback

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            address = next(answers, "127.0.0.1")
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    dispatcher = Dispatcher(Settings(database_url=NOWHERE_PG, webhook_timeout_s=2))  # no round: no database
    url = f"http://rebind.example:{receiver.port}/"
    due = _Due("msg_rebind", "u", "job_x", None, "job.succeeded", url, 0, "{}")
    try:
        outcome = dispatcher._send(due, "{}", "whsec_" + "A" * 44)
    finally:
        receiver.close()
    assert receiver.requests == []
    assert outcome["status_code"] is None and outcome["error"]


class Hostile:
    """Raw receivers: `stream` answers 200 and a body without end; `trickle` a byte a second;
    `stall` never answers. `requests` counts the requests read."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.stopping = threading.Event()
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            self.requests += 1
            try:
                if b"POST /stall" in request:
                    self.stopping.wait()
                elif b"POST /stream" in request:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
                    while not self.stopping.is_set():
                        conn.sendall(chunk)
                else:
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                        if self.stopping.wait(1):
                            return
                        conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    h = Hostile()
    yield h
    h.close()


@pytest.mark.stack
def test_endless_and_trickling_receivers_fail_within_the_deadline(
    stack: Stack, client: httpx.Client, hostile: Hostile
) -> None:
    limit_s = Settings().webhook_timeout_s  # the stack runs with the default
    reconciler = stack.processes[1].pid  # the dispatcher runs in the reconciler process
    jobs = {}
    for path in ("/stream", "/trickle"):
        body = {
            "variant": "echo",
            "input": {"prompt": "x"},
            "webhook_url": f"http://127.0.0.1:{hostile.port}{path}",
        }
        jobs[path] = client.post("/v1/jobs", json=body).json()["id"]
    peak = 0.0
    attempts: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + limit_s + 40
    while len(attempts) < 2 and time.monotonic() < deadline:
        peak = max(peak, rss_mb(reconciler))
        for path, job_id in jobs.items():
            rows = client.get("/v1/webhooks/deliveries", params={"job_id": job_id}).json()["data"]
            if rows and rows[0]["attempts"]:
                attempts[path] = rows[0]["attempts"][0]
        time.sleep(0.2)
    assert sorted(attempts) == ["/stream", "/trickle"], attempts
    for path, attempt in attempts.items():
        assert attempt["error"], (path, attempt)
        assert attempt["ms"] <= limit_s * 1000 + 1500, (path, attempt)
    assert "64" in attempts["/stream"]["error"] or "bytes" in attempts["/stream"]["error"]
    assert peak < 200, f"the dispatcher's process grew to {peak:.0f} MB"
    for job_id in jobs.values():
        assert wait_job(client, job_id)["status"] == "succeeded"


@pytest.mark.stack
def test_a_tenants_stalling_receivers_hold_up_no_one_elses_webhooks(stack: Stack, hostile: Hostile) -> None:
    """Finding 10: tenant A's four receivers never answer, so each attempt runs to its time limit
    (10 s by default). Tenant B's webhook, for a job that ends meanwhile, is still sent at once:
    the dispatcher's rounds do not wait for A's attempts."""
    limit_s = Settings().webhook_timeout_s
    receiver = Receiver()
    try:
        with stack.client(stack.new_key("stalls")) as a, stack.client(stack.new_key("prompt")) as b:
            stall = {
                "variant": "echo",
                "input": {"prompt": "x"},
                "webhook_url": f"http://127.0.0.1:{hostile.port}/stall",
            }
            for _ in range(4):
                assert a.post("/v1/jobs", json=stall).status_code == 202
            deadline = time.monotonic() + 60
            while hostile.requests < 4 and time.monotonic() < deadline:  # A's attempts are under way
                time.sleep(0.05)
            assert hostile.requests == 4
            started = time.monotonic()
            body = {"variant": "echo", "input": {"prompt": "x"}, "webhook_url": receiver.url("/b")}
            job = wait_job(b, b.post("/v1/jobs", json=body).json()["id"])
            assert job["status"] == "succeeded"
            receiver.wait("/b", 1, timeout=limit_s + 30)
            waited = time.monotonic() - started
    finally:
        receiver.close()
    assert waited < limit_s / 2, f"B's webhook came {waited:.1f} s after its job was sent"
