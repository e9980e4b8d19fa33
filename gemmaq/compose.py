"""`gemmaq compose --gpus N`: a Compose override with one worker per GPU.

docker-compose.yml starts no GPU worker by itself; it holds one as a template (`x-worker-gpu`).
The override names N copies of it, worker-gpu0 … worker-gpu<N-1>, each reserving one device:

    gemmaq compose --gpus 4
    docker compose -f docker-compose.yml -f docker-compose.gpus.yml up -d
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = "x-worker-gpu"
DEFAULT_OUTPUT = "docker-compose.gpus.yml"


class ComposeError(Exception):
    """The base file has no usable GPU worker template."""


def gpu_services(base: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The override document for `gpus` GPUs, built from the base file's template.

    PyYAML resolves the template's anchors and merge keys, so each service is complete on its
    own (Compose does not share anchors across files). `${…}` references are kept as they are:
    Compose fills them in, and refuses a missing secret, in the override as in the base file.
    """
    if gpus < 1:
        raise ComposeError("--gpus must be at least 1")
    template: Any = base.get(TEMPLATE)
    if not _usable(template):
        raise ComposeError(
            f"the base compose file needs a `{TEMPLATE}` service template: a command with --gpu and "
            "--name, and one reserved device"
        )
    services: dict[str, Any] = {}
    for gpu in range(gpus):
        service = copy.deepcopy(template)
        args = service["command"]
        args[args.index("--name") + 1] = f"gpu{gpu}@worker"
        # The container sees only its reserved device, as device 0.
        args[args.index("--gpu") + 1] = "0"
        service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = [str(gpu)]
        services[f"worker-gpu{gpu}"] = service
    return {"services": services}


def write_override(base_file: Path, gpus: int, output: Path) -> list[str]:
    """Write the override for `gpus` GPUs next to (or wherever) `output` says; the service names."""
    base = yaml.safe_load(base_file.read_text())
    document = gpu_services(base, gpus)
    header = (
        f"# Written by `gemmaq compose --gpus {gpus}` from {base_file.name}'s `{TEMPLATE}`: one worker\n"
        f"# per GPU. Use it with: docker compose -f {base_file.name} -f {output.name} up -d\n"
    )
    output.write_text(header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    return list(document["services"])


def _usable(template: Any) -> bool:
    try:
        command = template["command"]
        devices = template["deploy"]["resources"]["reservations"]["devices"]
    except (TypeError, KeyError):
        return False
    return (
        isinstance(command, list)
        and all(flag in command[:-1] for flag in ("--gpu", "--name"))
        and isinstance(devices, list)
        and len(devices) == 1
    )
