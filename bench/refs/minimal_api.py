"""The least an async job API can do: validate the body, insert one row, enqueue one message.

BENCH_DATABASE_URL=postgresql://… BENCH_REDIS_URL=redis://… uvicorn bench.refs.minimal_api:app
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.concurrency import run_in_threadpool

DATABASE_URL = os.environ["BENCH_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
broker = Celery("minimal", broker=os.environ["BENCH_REDIS_URL"])
broker.conf.update(task_serializer="json", broker_transport_options={"global_keyprefix": "minimal:"})
COLUMNS = "id text PRIMARY KEY, body jsonb, created_at timestamptz DEFAULT now()"
engine = create_async_engine(DATABASE_URL, pool_size=20, max_overflow=20)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE IF NOT EXISTS minimal_jobs ({COLUMNS})"))
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


class Job(BaseModel):
    prompt: str = Field(min_length=1, max_length=32_000)
    max_new_tokens: int = Field(16, ge=1, le=512)


@app.post("/jobs", status_code=202)
async def submit(job: Job) -> dict[str, str]:
    job_id = uuid.uuid4().hex
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO minimal_jobs (id, body) VALUES (:id, CAST(:body AS jsonb))"),
            {"id": job_id, "body": job.model_dump_json()},
        )
    await run_in_threadpool(broker.send_task, "minimal.run", args=[job_id], queue="minimal")
    return {"id": job_id}
