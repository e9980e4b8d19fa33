"""`gemmaq compose --gpus N`: N GPU workers, one device each, on top of a base file that has none;
and the HA override (docker-compose.ha.yml): a Redis replica and three sentinels."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from core import redis_target
from gemmaq.cli import app
from gemmaq.compose import ComposeError, gpu_services

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
SECRETS = dict.fromkeys(
    ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "GRAFANA_PASSWORD", "FLOWER_PASSWORD"), "test"
)


def _gpu_devices(services: dict[str, Any]) -> dict[str, list[str]]:
    """Each service that reserves a device: its device ids."""
    found = {}
    for name, service in services.items():
        reservations = (service or {}).get("deploy", {}).get("resources", {}).get("reservations", {})
        ids = [i for device in reservations.get("devices", []) for i in device.get("device_ids", [])]
        if ids:
            found[name] = ids
    return found


def _compose(tmp_path: Path, gpus: int) -> Path:
    out = tmp_path / f"gpus{gpus}.yml"
    args = ["compose", "--gpus", str(gpus), "--file", str(BASE), "--output", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert f"wrote {out}" in done.output
    return out


def test_the_base_file_starts_no_gpu_worker() -> None:
    base = yaml.safe_load(BASE.read_text())
    assert _gpu_devices(base["services"]) == {}
    assert "worker-cpu" in base["services"]  # the CPU worker (profile "cpu") stays


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_one_worker_per_gpu(tmp_path: Path, gpus: int) -> None:
    override = yaml.safe_load(_compose(tmp_path, gpus).read_text())
    assert _gpu_devices(override["services"]) == {f"worker-gpu{i}": [str(i)] for i in range(gpus)}
    names = set()
    for service in override["services"].values():
        command = service["command"]
        assert command[:2] == ["gemmaq", "worker"]
        # The container sees only its reserved device, as device 0.
        assert command[command.index("--gpu") + 1] == "0"
        names.add(command[command.index("--name") + 1])
        assert service["build"]["target"] == "worker"
        # Complete on its own (anchors do not cross files), secrets still required.
        assert "${POSTGRES_PASSWORD:?" in service["environment"]["GEMMAQ_DATABASE_URL"]
    assert names == {f"gpu{i}@worker" for i in range(gpus)}


def test_a_base_file_without_the_template_is_refused() -> None:
    with pytest.raises(ComposeError, match="x-worker-gpu"):
        gpu_services({"services": {}}, 2)
    with pytest.raises(ComposeError, match="at least 1"):
        gpu_services(yaml.safe_load(BASE.read_text()), 0)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_docker_compose_accepts_the_override(tmp_path: Path, gpus: int) -> None:
    override = _compose(tmp_path, gpus)
    files = ["-f", str(BASE), "-f", str(override)]
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | SECRETS
    check = subprocess.run(
        ["docker-compose", *files, "config", "-q"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    merged = subprocess.run(["docker-compose", *files, "config"], env=env, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    devices = _gpu_devices(yaml.safe_load(merged.stdout)["services"])
    assert sorted(i for ids in devices.values() for i in ids) == sorted(str(i) for i in range(gpus))
    # Still refused without a secret.
    env.pop("POSTGRES_PASSWORD")
    refused = subprocess.run(
        ["docker-compose", *files, "config", "-q"], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_the_ha_override_points_every_gemmaq_service_at_the_sentinels() -> None:
    files = ["-f", str(BASE), "-f", str(ROOT / "docker-compose.ha.yml")]
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | SECRETS
    merged = subprocess.run(["docker-compose", *files, "config"], env=env, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    ours = {name: s["environment"]["GEMMAQ_REDIS_URL"] for name, s in services.items()
            if "GEMMAQ_REDIS_URL" in s.get("environment", {})}  # fmt: skip
    assert set(ours) == {"migrate", "api", "reconciler", "worker-cpu", "flower"}
    for url in ours.values():
        target = redis_target.parse(url)
        assert target.sentinels == (("sentinel-1", 26379), ("sentinel-2", 26379), ("sentinel-3", 26379))
        assert (target.service, target.password) == ("gemmaq", "test")
    for name in ("api", "worker-cpu"):
        assert "sentinel-1" in services[name]["depends_on"]
