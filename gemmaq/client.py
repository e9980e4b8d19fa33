"""A small synchronous client for gemmaq's HTTP API (httpx)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class JobFailed(Exception):
    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        super().__init__(f"job {job['id']} {job['status']}: {error.get('code')}: {error.get('message')}")
        self.job = job


class Client:
    def __init__(self, url: str, key: str, *, timeout: float = 70.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise httpx.HTTPStatusError(
                f"{response.status_code}: {response.text}", request=response.request, response=response
            )
        body: dict[str, Any] = response.json()
        return body

    def submit(self, job: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self._http.post("/v1/jobs", json=job, headers=headers))

    def get(self, job_id: str, *, wait: float = 0) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/jobs/{job_id}", params={"wait": wait} if wait else None))

    def wait(self, job_id: str, *, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait=max(0, min(60, remaining)))
            if job["status"] in TERMINAL or remaining <= 0:
                return job

    def run(self, job: dict[str, Any], *, timeout: float = 300) -> dict[str, Any]:
        """Submit, wait, and return the finished job; raise JobFailed unless it succeeded."""
        done = self.wait(self.submit(job)["id"], timeout=timeout)
        if done["status"] != "succeeded":
            raise JobFailed(done)
        return done
