"""`create_app()`: settings → engines and services on app.state → routers → error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api.admission import Releases
from api.auth import Authenticator
from api.batch_runner import BatchRunner
from api.cancels import Cancels
from api.errors import install_error_handlers
from api.fleet import FleetView
from api.holds import Holds
from api.middleware import BodyLimit, KeyFirst, RateLimitHeaders, TextOnly
from api.routers import (
    adapters,
    admin,
    audio,
    batches,
    chat,
    completions,
    files,
    health,
    jobs,
    metrics,
    models,
    moderations,
    responses,
    usage,
    webhooks,
)
from api.submission import Submitter
from api.waiting import DoneListener
from core import __version__, moderation, redis_target
from core.broker import REDIS_CONNECT_TIMEOUT_S, REDIS_TIMEOUT_S, make_celery, redis_client
from core.quotas import AsyncQuotas
from core.settings import Settings, get_settings
from core.variants import load_variants
from db.session import async_engine, make_async_sessionmaker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    moderation.policy_for(None, settings)  # a policy file that cannot be used: stop here
    engine = async_engine(settings.db_url)
    app.state.sessionmaker = make_async_sessionmaker(engine)
    # Same pool; for reads and single-statement writes: no BEGIN, COMMIT or ROLLBACK round trips.
    app.state.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    # Give up fast: one immediate retry (a pooled connection gone stale when Redis restarted
    # reconnects), no backoff, so with Redis down a request is answered 503 in well under a second.
    # A bounded pool: past `redis_max_connections` a command waits for a connection (up to the
    # socket timeout, then 503) rather than open one more; api/holds.py keeps streams, which
    # hold theirs while they block, to half of it.
    app.state.redis = redis_target.async_client(
        settings.broker_url,
        max_connections=settings.redis_max_connections,
        timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )
    app.state.quotas = AsyncQuotas(app.state.redis, settings)
    app.state.auth = Authenticator(app.state.sessionmaker, app.state.redis, app.state.quotas, settings)
    app.state.fleet = FleetView(app.state.redis, settings)
    app.state.done = DoneListener(app.state.redis, settings)
    app.state.done.start()
    app.state.broker = make_celery(settings, name="gemmaq-api")
    sync_redis = redis_client(settings)  # for the ends of jobs cancelled here (db/endings.py, sync)
    app.state.cancels = Cancels(redis=app.state.redis, sync_redis=sync_redis, settings=settings)
    releases = Releases(app.state.quotas)
    releases.start()  # gives back, once Redis answers again, what admission could not release
    app.state.submitter = Submitter(
        quota=app.state.quotas, maker=app.state.sessionmaker, autocommit=app.state.autocommit,
        broker=app.state.broker, redis=app.state.redis, fleet=app.state.fleet, settings=settings,
        variants=app.state.variants, cancels=app.state.cancels, releases=releases,
    )  # fmt: skip
    runner = BatchRunner(submitter=app.state.submitter, cancels=app.state.cancels,
                         maker=app.state.sessionmaker, settings=settings)  # fmt: skip
    runner.start()  # moves batches along (api/batch_runner.py)
    try:
        yield
    finally:
        await runner.stop()
        await releases.stop()
        await app.state.done.stop()
        await app.state.redis.aclose()
        await app.state.redis.connection_pool.disconnect()  # aclose leaves a pool it was given open
        sync_redis.close()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="gemmaq",
        version=__version__,
        description="Asynchronous inference jobs for Google's Gemma models.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.variants = load_variants(settings.variants_file)
    app.state.holds = Holds(settings)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for router in (
        jobs.router, chat.router, completions.router, responses.router, audio.router, moderations.router,
        files.router, batches.router, models.router, usage.router, webhooks.router, adapters.router,
        admin.router,
    ):  # fmt: skip
        app.include_router(router, prefix="/v1")
    install_error_handlers(app)
    app.add_middleware(TextOnly)
    app.add_middleware(RateLimitHeaders)
    form = 1024 * 1024  # room for a multipart body's other fields
    uploads = {
        "/v1/files": settings.files_max_bytes + form,
        "/v1/adapters": settings.adapters_max_bytes + form,
    }
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, uploads=uploads)
    app.add_middleware(KeyFirst)  # outermost of these: no body is read for a caller without a key
    return app
