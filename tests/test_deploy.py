"""The compose deployment as users run it: images built with the network off, every service up
in containers, jobs through the API port published on 127.0.0.1, crashes and restarts inside the
containers, Prometheus scraping, then `down -v`.

The tests run in file order on one deployment; each leaves it up and healthy for the next.
Without a Docker engine a local run skips them, saying why; `.ci/run` installs and starts one and
sets GEMMAQ_DEPLOY_REQUIRED=1, so CI never skips them.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from core.schemas import TERMINAL_STATUSES
from tests.helpers.compose import HA_FILE, ROOT, Compose, build_images, docker_missing, run
from tests.helpers.jobs import submit, text_job
from tests.helpers.stack import wait_job

pytestmark = pytest.mark.deploy

# In every prompt, so that a log line holding a prompt is found by grep.
MARK = f"zq{uuid.uuid4().hex[:10]}"
# What each check saw, written to REPORT at the end (times, job counts, image sizes).
SEEN: dict[str, Any] = {}
REPORT = ROOT / "build" / "deploy-tier.json"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    why = docker_missing()
    if why is not None:
        if os.environ.get("GEMMAQ_DEPLOY_REQUIRED") == "1":
            pytest.fail(f"the deploy tier must run here: {why}")
        pytest.skip(why)
    started = time.monotonic()
    images = build_images()
    SEEN["build_s"] = round(time.monotonic() - started)
    sizes = run("docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}")
    SEEN["images"] = [line for line in sizes.splitlines() if images["GEMMAQ_API_IMAGE"] in line
                      or images["GEMMAQ_WORKER_IMAGE"] in line]  # fmt: skip
    compose = Compose(images, tmp_path_factory.mktemp("compose"))
    try:
        compose("up", "-d")
        SEEN["healthy_s"] = round(compose.wait_healthy(), 1)
        yield compose
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        label = f"label=com.docker.compose.project={compose.project}"
        left = run("docker", "ps", "-a", "-q", "--filter", label)
        volumes = run("docker", "volume", "ls", "-q", "--filter", label)
        SEEN["left_after_down_v"] = {"containers": left.split(), "volumes": volumes.split()}
        for image in (images["GEMMAQ_API_IMAGE"], images["GEMMAQ_WORKER_IMAGE"]):
            run("docker", "rmi", image, check=False)
        SEEN["tier_s"] = round(time.monotonic() - started)
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(SEEN, indent=1))


@pytest.fixture(scope="module")
def key(deployment: Compose) -> str:
    out = deployment("run", "--rm", "-T", "migrate", "gemmaq", "users", "create", f"alice-{MARK}")
    return out.strip().splitlines()[-1]


@pytest.fixture
def client(deployment: Compose, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        yield c


def ended(client: httpx.Client, job_ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
    """The jobs once they have ended. While PostgreSQL restarts the API answers 503 (never 500):
    those answers are waited out."""
    deadline = time.monotonic() + timeout
    jobs = []
    for job_id in job_ids:
        while True:
            response = client.get(f"/v1/jobs/{job_id}", params={"wait": 30})
            assert response.status_code in (200, 503), response.text
            job = response.json()
            if response.status_code == 200 and job["status"] in TERMINAL_STATUSES:
                break
            assert time.monotonic() < deadline, job
            if response.status_code == 503:
                time.sleep(1)
        jobs.append(job)
    return jobs


def charged_once(deployment: Compose) -> None:
    """The tenant's usage counts each of its jobs that ended once, however often it ran."""
    ledger = deployment.psql(
        "select sum(l.jobs), (select count(*) from jobs j where j.user_id = u.id and j.status = 'succeeded' "
        ") from usage_ledger l join users u on u.id = l.user_id "
        f"where u.name = 'alice-{MARK}' group by u.id"
    )
    assert len(ledger) == 1 and ledger[0][0] == ledger[0][1], ledger


def test_every_service_comes_up_healthy_on_loopback(deployment: Compose, client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    published = deployment.container("api")["NetworkSettings"]["Ports"]["8000/tcp"]
    assert [p["HostIp"] for p in published] == ["127.0.0.1"]
    for service in ("flower", "prometheus"):
        bindings = deployment.container(service)["NetworkSettings"]["Ports"].values()
        ports = [p for binding in bindings if binding for p in binding]
        assert ports and {p["HostIp"] for p in ports} == {"127.0.0.1"}, (service, ports)


def test_text_and_echo_jobs_and_their_rows(deployment: Compose, client: httpx.Client, key: str) -> None:
    oa = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key=key, max_retries=0, timeout=300)

    def chat(i: int) -> str:
        reply = oa.chat.completions.create(
            model="gemma-3-270m", max_tokens=12, messages=[{"role": "user", "content": f"{MARK} {i}"}]
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.id

    started = time.monotonic()
    ids = [submit(client, text_job(f"{MARK} {i}: capital", max_new_tokens=12))["id"] for i in range(15)]
    ids.append(submit(client, {"variant": "echo", "task": "text", "input": {"prompt": f"{MARK} echo"}})["id"])
    with ThreadPoolExecutor(5) as pool:
        chats = list(pool.map(chat, range(5)))
    jobs = ended(client, ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * 16, [(j["status"], j.get("error")) for j in jobs]
    SEEN["jobs"] = {"text": 15 + len(chats), "echo": 1, "seconds": round(time.monotonic() - started, 1)}
    listed = ", ".join(repr(i) for i in ids)
    rows = deployment.psql(f"select status, count(*) from jobs where id in ({listed}) group by status")
    assert rows == [["succeeded", "16"]]
    assert deployment.psql("select count(*) from job_metrics")[0][0] != "0"


def test_a_crashed_worker_shell_restarts_its_container_and_no_job_is_lost(
    deployment: Compose, client: httpx.Client
) -> None:
    before = deployment.container("worker-cpu")
    # The engine alone first: the shell starts another, and the container stays up.
    engine = [pid for pid, cmd in deployment.processes("worker-cpu").items() if "workers.engine" in cmd]
    assert len(engine) == 1
    deployment.kill("worker-cpu", engine[0])
    job = wait_job(client, submit(client, text_job(f"{MARK} after the engine", max_new_tokens=8))["id"], 240)
    assert job["status"] == "succeeded"
    after_engine = deployment.container("worker-cpu")
    assert after_engine["RestartCount"] == before["RestartCount"]
    assert after_engine["State"]["StartedAt"] == before["State"]["StartedAt"]

    ids = [submit(client, text_job(f"{MARK} essay {i}", max_new_tokens=120))["id"] for i in range(6)]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{ids[0]}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.2)
    # Not pid 1: that is the container's init (`init: true`), whose child the shell is.
    processes = deployment.processes("worker-cpu")
    shell = [pid for pid, cmd in processes.items() if pid != 1 and re.search(r"gemmaq worker\b", cmd)]
    assert len(shell) == 1, processes
    killed = time.monotonic()
    deployment.kill("worker-cpu", shell[0])
    jobs = ended(client, ids, 300)
    SEEN["kill_recovery_s"] = round(time.monotonic() - killed, 1)
    assert [j["status"] for j in jobs] == ["succeeded"] * 6, [(j["status"], j.get("error")) for j in jobs]
    SEEN["kill_attempts"] = sorted(j["attempts"] for j in jobs)
    assert deployment.container("worker-cpu")["RestartCount"] == before["RestartCount"] + 1
    charged_once(deployment)
    deployment.wait_healthy()


def test_postgres_restarts_under_load_and_no_job_is_lost_or_doubled(
    deployment: Compose, client: httpx.Client
) -> None:
    ids = [submit(client, text_job(f"{MARK} pg {i}: rivers", max_new_tokens=40))["id"] for i in range(10)]
    time.sleep(2)
    deployment("restart", "postgres")
    jobs = ended(client, ids, 300)
    assert [j["status"] for j in jobs] == ["succeeded"] * 10, [(j["status"], j.get("error")) for j in jobs]
    SEEN["postgres_restart_attempts"] = sorted(j["attempts"] for j in jobs)
    charged_once(deployment)
    deployment.wait_healthy()


def test_down_and_up_keep_the_results(deployment: Compose, client: httpx.Client) -> None:
    done = submit(client, {"variant": "echo", "task": "text", "input": {"prompt": f"{MARK} kept"}})["id"]
    assert wait_job(client, done)["status"] == "succeeded"
    deployment("down", "--timeout", "60")
    deployment("up", "-d")
    SEEN["healthy_after_up_s"] = round(deployment.wait_healthy(), 1)
    kept = client.get(f"/v1/jobs/{done}").json()
    assert kept["status"] == "succeeded" and MARK in kept["result"]["text"]
    new = wait_job(client, submit(client, text_job(f"{MARK} after up", max_new_tokens=8))["id"], 240)
    assert new["status"] == "succeeded"


def test_the_ha_override_follows_a_redis_master_killed_under_load(
    deployment: Compose, client: httpx.Client
) -> None:
    """docker-compose.ha.yml turned on over the running deployment (a replica and three
    sentinels), then the Redis master killed with jobs in flight: the sentinels promote the
    replica, every gemmaq service follows it, and the old master, started again, rejoins as a
    replica. The later tests run on this deployment."""
    deployment.files.append(HA_FILE)
    deployment("up", "-d")
    SEEN["ha_healthy_s"] = round(deployment.wait_healthy(), 1)

    def master() -> str:
        return deployment.redis_cli(
            "sentinel-1", "sentinel", "get-master-addr-by-name", "gemmaq", port=26379
        ).split()[0]

    def replication(service: str) -> dict[str, str]:
        lines = deployment.redis_cli(service, "info", "replication").splitlines()
        return dict(line.strip().split(":", 1) for line in lines if ":" in line)

    deadline = time.monotonic() + 60
    while not (master() == "redis" and replication("redis-replica").get("master_link_status") == "up"):
        assert time.monotonic() < deadline, (master(), replication("redis-replica"))
        time.sleep(1)

    ids = [submit(client, text_job(f"{MARK} ha {i}: oceans", max_new_tokens=40))["id"] for i in range(12)]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{ids[0]}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.2)
    old_master = deployment.container("redis")["Id"]
    run("docker", "kill", old_master)  # SIGKILL; Docker leaves it stopped until it is started below
    killed = time.monotonic()

    # The API answers 503 (with Retry-After), never 500, until it reaches the promoted replica.
    answers: dict[int, int] = {}
    said: list[str] = []  # the first and the latest 503's message
    while True:
        response = client.post("/v1/jobs", json=text_job(f"{MARK} ha after", max_new_tokens=8))
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
        if response.status_code == 503:
            said[1 if said else 0 :] = [response.json()["error"]["message"][:200]]
        if response.status_code == 202:
            ids.append(response.json()["id"])
            break
        assert response.status_code == 503 and response.headers.get("Retry-After"), response.text
        assert time.monotonic() - killed < 120, answers
        time.sleep(0.5)
    api_back = time.monotonic() - killed
    assert master() == "redis-replica"

    jobs = ended(client, ids, 300)
    assert [j["status"] for j in jobs] == ["succeeded"] * 13, [(j["status"], j.get("error")) for j in jobs]
    done = time.monotonic() - killed

    run("docker", "start", old_master)
    started = time.monotonic()
    while not (replication("redis").get("role") == "slave"
               and replication("redis").get("master_link_status") == "up"):  # fmt: skip
        assert time.monotonic() - started < 90, replication("redis")
        time.sleep(1)
    SEEN["redis_failover"] = {
        "api_back_s": round(api_back, 1),
        "post_answers": answers,
        "post_503_said": said,
        "jobs_ended_s": round(done, 1),
        "attempts": sorted(j["attempts"] for j in jobs),
        "old_master_replica_s": round(time.monotonic() - started, 1),
    }
    assert master() == "redis-replica"
    charged_once(deployment)
    deployment.wait_healthy()


def test_prometheus_scrapes_the_api(deployment: Compose) -> None:
    deadline = time.monotonic() + 90
    while True:
        up = httpx.get(f"{deployment.prometheus}/api/v1/query", params={"query": 'up{job="gemmaq"}'}).json()
        found = httpx.get(f"{deployment.prometheus}/api/v1/label/__name__/values").json()["data"]
        ours = [name for name in found if name.startswith("gemmaq_")]
        if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1" and ours:
            SEEN["prometheus"] = {"up": 1, "gemmaq_metrics": len(ours)}
            return
        assert time.monotonic() < deadline, (up, ours)
        time.sleep(3)


def test_no_log_holds_a_prompt_and_no_container_runs_as_root(deployment: Compose) -> None:
    logs = deployment("logs", "--no-color")
    assert MARK not in logs.replace(f"alice-{MARK}", "")  # the user's name is not a prompt
    for service in ("api", "reconciler", "worker-cpu", "flower"):
        uid = deployment("exec", "-T", service, "python", "-c", "import os; print(os.getuid())").strip()
        assert uid != "0", service
    api_image = deployment.env["GEMMAQ_API_IMAGE"]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    run("docker", "run", "--rm", "--network", "none", api_image, "python", "-c", probe)


def test_down_v_leaves_nothing_running(deployment: Compose) -> None:
    deployment("down", "-v", "--timeout", "30")
    label = f"label=com.docker.compose.project={deployment.project}"
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        assert run("docker", *kind, "-q", "--filter", label).split() == [], kind
