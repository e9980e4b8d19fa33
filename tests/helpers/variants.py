"""The variants the test stacks serve: the shipped ones, plus test-only ones that no worker (or only
one test's worker) serves."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_VARIANTS = (
    "gemma-3-270m,gemma-3-270m-nf4,echo,tiny-gemma-3-vision,tiny-gemma-3n,tiny-gemma-4,whisper-base,"
    "whisper-tiny-en"
)
# A variant no session worker serves: its jobs stay queued until a test starts a worker for it.
EXTRA_VARIANTS = """
[variants.echo-late]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
description = "test-only echo variant with no worker"

[variants.echo-held]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
description = "test-only echo variant that no worker ever serves: its jobs stay queued"

[variants.echo-slow]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
max_batch_size = 4
echo_delay_ms = 1500
description = "test-only echo variant whose batches take 1.5 s: jobs are running when a worker is killed"

[variants.echo-fair]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
max_batch_size = 1
description = "test-only echo variant, one job at a time, served only by the scheduling test's worker"
"""


def shipped_variants() -> str:
    """The text of the variants file the project ships."""
    return (ROOT / "core" / "variants.toml").read_text()


def cache_test_variants(model_cache: Path) -> str:
    """Whisper tiny.en and base again under other names (their converted weights mounted by
    path; `ct2_model` only says which model it is): only the workers of
    tests/test_variant_cache.py serve them."""
    return "".join(
        f"""
[variants.cache-{name}]
family = "whisper"
size = "test"
tasks = ["audio"]
source = "hf"
path = "{model_cache / name}"
engine = "whisper"
ct2_model = "{model}"
{ability}
max_audio_seconds = 29
dtype = "float32"
memory_mb = {mb}
description = "test-only copy of {name} for the variant cache tests"
"""
        for name, model, ability, mb in (
            ("whisper-tiny-en", "tiny.en", "english_only = true", 200),
            ("whisper-base", "base", "translate = true", 300),
        )
    )
