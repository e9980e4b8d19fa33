"""A loop an API process runs for its whole life, beside the requests: the lifespan (api/app.py)
starts it and stops it."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import ClassVar


class Background(abc.ABC):
    """`start` runs `_run` as a task named `task_name`; `stop` cancels it and waits for it."""

    task_name: ClassVar[str]
    _task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def _run(self) -> None: ...

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
