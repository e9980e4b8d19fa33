"""A synchronous client for gemmaq's HTTP API (httpx): jobs (submit, wait, stream, cancel) and
batches (upload a JSONL file, run it, download its results), with progress callbacks.

    with Client("http://127.0.0.1:8000", key) as gq:
        job = gq.run({"input": {"prompt": "Hello"}, "params": {"max_new_tokens": 16}})
        for event in gq.stream(gq.submit({...})["id"]):   # status, delta, done
            ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
from httpx_sse import connect_sse

from core.schemas import BATCH_ENDED, TERMINAL_STATUSES

CHUNK = 1024 * 1024
Progress = Callable[[int], None]  # called with how much more was done (bytes, or lines)


class ApiError(httpx.HTTPStatusError):
    """A refusal in gemmaq's error shape: `status`, `code`, `message`, `details`."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "ERROR", "message": response.text[:500]}
        self.status = response.status_code
        self.code: str = error.get("code", "ERROR")
        self.message: str = error.get("message", "")
        self.details: dict[str, Any] = error.get("details") or {}
        super().__init__(
            f"{self.status} {self.code}: {self.message}", request=response.request, response=response
        )


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
            raise ApiError(response)
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
            if job["status"] in TERMINAL_STATUSES or remaining <= 0:
                return job

    def run(self, job: dict[str, Any], *, timeout: float = 300) -> dict[str, Any]:
        """Submit, wait, and return the finished job; raise JobFailed unless it succeeded."""
        done = self.wait(self.submit(job)["id"], timeout=timeout)
        if done["status"] != "succeeded":
            raise JobFailed(done)
        return done

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def stream(self, job_id: str, *, retries: int = 5) -> Iterator[dict[str, Any]]:
        """The job's events as they come — `{"event": "status"|"delta"|"done", "data": …}` — to
        the last (`done`, the whole job). A dropped connection resumes after the last event
        seen (`Last-Event-ID`), so nothing comes twice."""
        last: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise ApiError(source.response)
                    for sse in source.iter_sse():
                        if sse.id:
                            last = sse.id
                        yield {"event": sse.event, "data": sse.json(), "id": sse.id or None}
                        if sse.event == "done":
                            return
            except (httpx.TransportError, httpx.StreamError):
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(2.0, 0.2 * 2**failures))

    # ---- batches --------------------------------------------------------------------------

    def upload_batch(self, path: str | Path, *, progress: Progress | None = None) -> dict[str, Any]:
        """Upload a JSONL file of requests (purpose batch), streamed from disk."""
        with open(path, "rb") as raw:
            upload: Any = _Counting(raw, progress) if progress else raw
            files = {"file": (Path(path).name, upload, "application/jsonl")}
            return self._json(self._http.post("/v1/files", files=files, data={"purpose": "batch"}))

    def create_batch(
        self, file_id: str, *, webhook_url: str | None = None, **metadata: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        if metadata:
            body["metadata"] = metadata
        if webhook_url:
            body["webhook_url"] = webhook_url
        return self._json(self._http.post("/v1/batches", json=body))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/batches/{batch_id}"))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._http.post(f"/v1/batches/{batch_id}/cancel"))

    def wait_batch(
        self, batch_id: str, *, poll_s: float = 1.0, progress: Progress | None = None, timeout: float = 86_400
    ) -> dict[str, Any]:
        """Poll until the batch has ended; `progress` gets the lines finished since the last poll."""
        deadline, seen = time.monotonic() + timeout, 0
        while True:
            batch = self.get_batch(batch_id)
            counts = batch["request_counts"]
            done = counts["completed"] + counts["failed"]
            if progress and done > seen:
                progress(done - seen)
                seen = done
            if batch["status"] in BATCH_ENDED or time.monotonic() > deadline:
                return batch
            time.sleep(poll_s)

    def download(self, file_id: str, path: str | Path) -> Path:
        """A file's content, streamed to `path`."""
        with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            with open(path, "wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
        return Path(path)


class _Counting:
    """A binary file that reports how much of it has been read (an upload's progress)."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self.raw, self.progress = raw, progress

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.progress(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)
