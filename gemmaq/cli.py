"""The `gemmaq` command (typer). Heavy imports happen inside commands, after the environment is set."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from core.logging import configure_logging
from core.settings import Settings, get_settings
from gemmaq.models import models_app, require_worker_extra

if TYPE_CHECKING:
    from core.schemas import QuotaUpdate

app = typer.Typer(
    help="gemmaq: asynchronous inference jobs for Gemma models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage users and their API keys.", no_args_is_help=True)
keys_app = typer.Typer(help="Create and revoke API keys.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


# SIGTERM: open streams and waits get this long to finish, then the API exits anyway.
API_GRACE_S = 5


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision (alembic upgrade head)."""
    from migrations import upgrade_head

    upgrade_head(_settings().db_url)
    typer.echo("database is at the newest revision")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Serve the HTTP API (one uvicorn process), and take a turn at the reconciler's duties."""
    import threading

    import uvicorn

    from api.app import create_app
    from workers.reconciler import Duties

    settings = _settings()
    stop = threading.Event()
    duties = Duties(settings, f"api@{socket.gethostname()}").start(stop)
    try:
        uvicorn.run(
            create_app(settings),
            host=host or settings.api_host,
            port=port or settings.api_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=API_GRACE_S,
        )
    finally:
        stop.set()
        duties.join(timeout=2)


@app.command()
def worker(
    variants: Annotated[str, typer.Option(help="comma-separated variant names")] = "",
    gpu: Annotated[int | None, typer.Option(help="pin to this GPU (sets CUDA_VISIBLE_DEVICES)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (ignored with --gpu)")] = "auto",
    name: Annotated[str | None, typer.Option(help="worker name; default <device>@<host>")] = None,
    memory_mb: Annotated[
        int | None,
        typer.Option(min=1, help="memory for warm variants (MiB); default GEMMAQ_WORKER_MEMORY_MB or auto"),
    ] = None,
    preload: Annotated[
        str | None, typer.Option(help="variants to load at start (default: all that fit); others on demand")
    ] = None,
) -> None:
    """Run a worker: pin its device, keep its variants warm within a memory budget, batch their jobs."""
    if "torch" in sys.modules:  # pinning only works before torch sees the devices
        raise typer.BadParameter("torch was imported before the device was pinned")
    require_worker_extra()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        device = "cuda:0"
    elif device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    settings = _settings()
    from workers.app import run_worker  # the engine process resolves "auto" and "cuda"

    names = _names(variants or settings.default_variant)
    if memory_mb is not None:
        settings = settings.model_copy(update={"worker_memory_mb": memory_mb})
    run_worker(
        settings, names, device=device, name=name, preload=None if preload is None else _names(preload)
    )


def _names(csv: str) -> list[str]:
    return [v.strip() for v in csv.split(",") if v.strip()]


@app.command()
def reconciler() -> None:
    """Run the reconciler: requeue jobs of dead workers, resend lost messages, expire, free slots."""
    from workers.reconciler import run_reconciler

    run_reconciler(_settings())


@app.command()
def healthy(
    max_age: Annotated[float, typer.Option(help="seconds the health file may go untouched")] = 30.0,
) -> None:
    """Exit 0 while this container's worker or reconciler keeps touching GEMMAQ_HEALTH_FILE."""
    from core.liveness import age_s

    path = get_settings().health_file
    if path is None:
        typer.echo("GEMMAQ_HEALTH_FILE is not set", err=True)
        raise typer.Exit(2)
    age = age_s(path)
    if age is None or age > max_age:
        state = "was never touched" if age is None else f"is {age:.0f} s old"
        typer.echo(f"unhealthy: {path} {state}", err=True)
        raise typer.Exit(1)


@app.command()
def dev(
    variants: Annotated[str | None, typer.Option(help="variants for the worker")] = None,
    port: Annotated[int | None, typer.Option(help="API port (default 8000, or a free one)")] = None,
) -> None:
    """The one command: servers (embedded unless GEMMAQ_* URLs are set), schema, a dev key, API, worker
    and reconciler."""
    from gemmaq.dev import choose_log_format, run_dev

    require_worker_extra()
    choose_log_format()
    run_dev(_settings(), variants=variants, port=port)


@app.command()
def compose(
    gpus: Annotated[int, typer.Option(min=1, help="GPUs on this host: one worker each")],
    file: Annotated[Path, typer.Option(help="the base compose file")] = Path("docker-compose.yml"),
    output: Annotated[
        Path | None,
        typer.Option(help="the override to write (default: docker-compose.gpus.yml beside --file)"),
    ] = None,
) -> None:
    """Write a Compose override that starts one worker per GPU, each pinned to its device; then
    `docker compose -f docker-compose.yml -f docker-compose.gpus.yml up -d`."""
    from gemmaq.compose import DEFAULT_OUTPUT, ComposeError, write_override

    target = output or file.with_name(DEFAULT_OUTPUT)
    try:
        names = write_override(file, gpus, target)
    except (ComposeError, OSError) as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {target}: {', '.join(names)}")
    typer.echo(f"start them with: docker compose -f {file} -f {target} up -d")


RpmOpt = Annotated[int | None, typer.Option("--requests-per-minute", help="requests per minute")]
TpdOpt = Annotated[int | None, typer.Option("--tokens-per-day", help="input + output tokens per day")]
ConcOpt = Annotated[int | None, typer.Option("--max-concurrent-jobs", help="queued + running jobs")]


def _quota(rpm: int | None, tpd: int | None, conc: int | None, **more: object) -> QuotaUpdate:
    from core.schemas import QuotaUpdate

    given = {"requests_per_minute": rpm, "tokens_per_day": tpd, "max_concurrent_jobs": conc, **more}
    return QuotaUpdate.model_validate({k: v for k, v in given.items() if v is not None})


@users_app.command("create")
def users_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="give the user the admin role")] = False,
    requests_per_minute: RpmOpt = None,
    tokens_per_day: TpdOpt = None,
    max_concurrent_jobs: ConcOpt = None,
) -> None:
    """Create a user and print a new API key (the last line of output; it is shown only once)."""
    from gemmaq.admin import create_user_with_key

    quota = _quota(requests_per_minute, tokens_per_day, max_concurrent_jobs)
    key = asyncio.run(create_user_with_key(_settings(), name, admin=admin, quota=quota))
    typer.echo(f"created user {name}{' (admin)' if admin else ''}; API key:")
    typer.echo(key)


@users_app.command("list")
def users_list() -> None:
    """Users, their roles, quotas and active key prefixes."""
    from gemmaq.admin import list_users

    for user in asyncio.run(list_users(_settings())):
        q = user.quota
        limits = (
            f"rpm={q.requests_per_minute} tokens/day={q.tokens_per_day} concurrent={q.max_concurrent_jobs} "
            f"variants={','.join(q.allowed_variants) if q.allowed_variants else 'all'}"
            if q
            else "no quota"
        )
        role = "admin" if user.is_admin else "user"
        typer.echo(f"{user.name}\t{user.id}\t{role}\t{limits}\tkeys={','.join(user.active_keys) or '-'}")


@users_app.command("set-quota")
def users_set_quota(
    name: str,
    requests_per_minute: RpmOpt = None,
    tokens_per_day: TpdOpt = None,
    max_concurrent_jobs: ConcOpt = None,
    max_input_bytes: Annotated[int | None, typer.Option("--max-input-bytes")] = None,
    max_storage_bytes: Annotated[int | None, typer.Option("--max-storage-bytes")] = None,
    max_files: Annotated[int | None, typer.Option("--max-files")] = None,
    max_priority: Annotated[
        int | None, typer.Option("--max-priority", help="0-9: the highest priority among other users' jobs")
    ] = None,
    allowed_variants: Annotated[
        str | None, typer.Option("--allowed-variants", help="comma-separated, or all")
    ] = None,
    moderation_policy: Annotated[
        str | None,
        typer.Option(
            "--moderation-policy",
            help="a policy TOML file (core/moderation.toml's shape) in place of the deployment's, or default",
        ),
    ] = None,
) -> None:
    """Change a user's quota; it applies to their next request, no restart needed."""
    from core import moderation
    from gemmaq.admin import set_quota

    more: dict[str, object] = {
        "max_input_bytes": max_input_bytes,
        "max_storage_bytes": max_storage_bytes,
        "max_files": max_files,
        "max_priority": max_priority,
    }
    if allowed_variants is not None:
        more["allowed_variants"] = None if allowed_variants == "all" else allowed_variants.split(",")
    if moderation_policy not in (None, "default"):
        try:
            more["moderation_policy"] = moderation.read_file(Path(moderation_policy)).model_dump()
        except moderation.PolicyError as exc:
            raise SystemExit(f"--moderation-policy: {exc}") from None
    changes = _quota(requests_per_minute, tokens_per_day, max_concurrent_jobs, **more)
    resets = {
        "allowed_variants": allowed_variants == "all",
        "moderation_policy": moderation_policy == "default",
    }
    for field, reset in resets.items():
        if reset:  # back to every variant / to the deployment's policy
            changes = changes.model_copy(update={field: None})
            changes.model_fields_set.add(field)
    user = asyncio.run(set_quota(_settings(), name, changes))
    typer.echo(f"{user.name}: {user.quota.model_dump_json() if user.quota else 'no quota'}")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="the user")]) -> None:
    """A new API key for a user (printed last, shown only once)."""
    from gemmaq.admin import create_key

    key = asyncio.run(create_key(_settings(), name))
    typer.echo(f"new API key for {name}:")
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="the key's visible prefix (its first 10 characters)")],
) -> None:
    """Revoke a key: the next request made with it is a 401."""
    from gemmaq.admin import revoke_key

    count = asyncio.run(revoke_key(_settings(), prefix[:10]))
    if not count:
        raise typer.BadParameter(f"no active key with prefix {prefix[:10]!r}")
    typer.echo(f"revoked {count} key(s) with prefix {prefix[:10]}")


@app.command()
def submit(
    prompt: str,
    variant: Annotated[str, typer.Option()] = "gemma-3-270m",
    chat: Annotated[bool, typer.Option("--chat", help="send as a user message, not a completion")] = False,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option()] = 0.0,
    url: Annotated[str, typer.Option(envvar="GEMMAQ_URL")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="GEMMAQ_API_KEY", help="API key")] = "",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the result")] = 300,
    stream: Annotated[bool, typer.Option("--stream", help="print the reply as it is generated")] = False,
) -> None:
    """Submit a text job, wait for it, print the reply."""
    from gemmaq.client import ApiError, Client, JobFailed

    body_input = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    job_body = {
        "variant": variant,
        "task": "text",
        "input": body_input,
        "params": {"max_new_tokens": max_new_tokens, "temperature": temperature},
    }
    with Client(url, key) as client:
        try:
            if stream:
                for event in client.stream(client.submit(job_body)["id"]):
                    if event["event"] == "delta":
                        typer.echo(event["data"]["text"], nl=False)
                    elif event["event"] == "done":
                        typer.echo("")
                        if event["data"]["status"] != "succeeded":
                            raise JobFailed(event["data"])
                return
            job = client.run(job_body, timeout=timeout)
        except (JobFailed, ApiError) as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from exc
    typer.echo(job["result"]["text"])


@app.command()
def batch(
    requests: Annotated[str, typer.Argument(help="a JSONL file of /v1/chat/completions requests")],
    out: Annotated[str, typer.Option(help="where the output lines go")] = "batch_output.jsonl",
    errors: Annotated[str, typer.Option(help="where the error lines go, if any")] = "batch_errors.jsonl",
    webhook_url: Annotated[str | None, typer.Option(help="also report the batch's end here")] = None,
    url: Annotated[str, typer.Option(envvar="GEMMAQ_URL")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="GEMMAQ_API_KEY", help="API key")] = "",
) -> None:
    """Run a batch: upload the file, follow the batch with a progress bar, download its results."""

    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn

    from gemmaq.client import ApiError, Client

    size = Path(requests).stat().st_size
    with Client(url, key) as client, Progress(TextColumn("{task.description}"), BarColumn()) as bars:
        try:
            sending = bars.add_task("upload", total=size)
            bars.columns = (*bars.columns, DownloadColumn())
            file = client.upload_batch(requests, progress=lambda n: bars.advance(sending, n))
            created = client.create_batch(file["id"], webhook_url=webhook_url)
            bars.columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            running = bars.add_task(f"batch {created['id']}", total=created["request_counts"]["total"])
            ended = client.wait_batch(created["id"], progress=lambda n: bars.advance(running, n))
            for file_id, path in ((ended["output_file_id"], out), (ended["error_file_id"], errors)):
                if file_id:
                    client.download(file_id, path)
        except ApiError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from exc
    counts = ended["request_counts"]
    typer.echo(
        f"{ended['id']}: {ended['status']}; {counts['completed']} completed, {counts['failed']} failed of "
        f"{counts['total']}; output {out if ended['output_file_id'] else '(none)'}"
        + (f", errors {errors}" if ended["error_file_id"] else "")
    )
    if ended["status"] != "completed":
        raise typer.Exit(1)


def main() -> None:
    app()
