"""Fault injection for the fault-tolerance tests: `GEMMAQ_FAULTS='["api.after_commit"]'` makes
the process SIGKILL itself at that point, exactly as a crash there would. Empty in a deployment."""

from __future__ import annotations

import os
import signal

import structlog

from core.settings import Settings

log = structlog.get_logger(__name__)

# Points the code passes through; a test names them in GEMMAQ_FAULTS.
API_AFTER_COMMIT = "api.after_commit"  # the job row is committed, its message not yet sent
# The engine process takes a request whose prompt holds POISON: it dies, as a request that
# crashes the model (an OOM, a CUDA error) would make it.
ENGINE_POISON = "engine.poison"
POISON = "GEMMAQ-FAULT-POISON"
# The engine dies once it has reported progress on a request whose prompt holds POISON_LATE: a
# request that crashes the model mid-reply, after some of its tokens were generated.
ENGINE_POISON_LATE = "engine.poison_late"
POISON_LATE = "GEMMAQ-FAULT-LATE"


def crash_here(settings: Settings, point: str) -> None:
    if point in settings.faults:
        log.warning("fault.injected", point=point)
        os.kill(os.getpid(), signal.SIGKILL)
