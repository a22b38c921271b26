"""A fleet on loopback: three `segserve serve` processes behind Debian's haproxy (health check
on /readyz, retries on connection failure only), a real Prometheus scraping each of them as
Kubernetes would (namespace and pod labels), and closed-loop load through the balancer the
whole time. What Kubernetes does to a service every day, done here:

(a) a rolling restart, every replica in turn SIGTERM'd and started again, several rounds:
    no request fails;
(b) one replica SIGKILL'd: only requests it held fail, none after haproxy marks it down;
(c) a new model version written into the shared repository: every replica switches, each
    response names the version that answered, no request fails;
(d) the autoscaling queries shipped in deploy/ (prometheus-adapter's rule, KEDA's trigger)
    evaluated over this run's own metrics: "scale up" under load, "scale down" after it.

`make test-fleet` (a few minutes; not part of `make test`). The figures go to
.bench/fleet-report.json and are printed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import (
    ROOT,
    free_port,
    image_bytes,
    require_tool,
    start_prometheus,
    wait_for,
    without_its_commonest_class,
    write_check_set,
)
from segserve.contracts.repository import publishing

pytestmark = pytest.mark.fleet

HAPROXY, PROMETHEUS = shutil.which("haproxy"), shutil.which("prometheus")
REPLICAS = 3
# > haproxy's check interval (0.3 s) x fall (2), with room for a busy machine. FLEET_DRAIN_S
# overrides it for an experiment (0: what a restart loses without the drain).
DRAIN_S = float(os.environ.get("FLEET_DRAIN_S", "2.0"))
# FLEET_REUSE=1: haproxy keeps and reuses keep-alive connections to the replicas (its
# default) instead of one connection per request, for the same kind of experiment.
REUSE = os.environ.get("FLEET_REUSE") == "1"
ROUNDS = 3  # rolling restarts of every replica
NAMESPACE = "segserve"
REPORT = ROOT / ".bench" / "fleet-report.json"


# -- the parts -------------------------------------------------------------------------


class Replica:
    """One `segserve serve` on a fixed port (the balancer's config names it), restartable."""

    def __init__(self, index: int, repository: Path, tmp: Path) -> None:
        self.index, self.repository, self.tmp = index, repository, tmp
        self.name, self.port = f"r{index}", free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "SEGSERVE_WARMUP_SHAPES": "64x64",
            "SEGSERVE_INTRA_OP_THREADS": "1",
            "SEGSERVE_SHUTDOWN_DRAIN_S": str(DRAIN_S),
            "SEGSERVE_REPOSITORY_POLL_S": "1",
        }
        self.starts += 1
        log = (self.tmp / f"{self.name}-{self.starts}.log").open("w")
        cmd = [
            sys.executable,
            "-m",
            "segserve.cli",
            "serve",
            "--repository",
            str(self.repository),
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(60)


class Haproxy:
    """Debian's haproxy in front of the replicas; its admin socket says who is up."""

    def __init__(self, replicas: list[Replica], tmp: Path) -> None:
        self.port, self.socket = free_port(), tmp / "haproxy.sock"
        servers = "\n".join(f"  server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        config = tmp / "haproxy.cfg"
        self.log = tmp / "haproxy.log"
        config.write_text(f"""global
  stats socket {self.socket} mode 600 level admin
  log stdout format raw local0
defaults
  mode http
  log global
  # A line a request: the server that had it, the status sent, how the session ended.
  log-format "request server=%s status=%ST end=%ts id=%hr time_ms=%Tt"
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  # Retry only what never reached a replica (refused or failed connections), on another
  # server: a request a replica accepted is never sent twice.
  retries 3
  retry-on conn-failure
  option redispatch 1
  # A connection to a replica per request: a pooled keep-alive connection to a replica that
  # has just been killed would carry a request that, once sent, the rule above must not
  # repeat. Connecting costs little beside a model run; a dead replica then refuses the
  # connection, which is retried.
  {"" if not REUSE else "# "}option http-server-close
frontend fleet
  bind 127.0.0.1:{self.port}
  capture request header X-Request-ID len 64
  default_backend segserve
backend segserve
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 300ms fall 2 rise 2
  http-after-response set-header X-Served-By %[srv_name]
{servers}
""")
        self.proc = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"], stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, str]:
        """Server name -> "UP" / "DOWN" / ..., as haproxy's `show stat` says; "UP" only once a
        health check has passed (haproxy counts a server as up before its first check)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        header, *rows = data.decode().splitlines()
        columns = header.lstrip("# ").split(",")
        status, check = columns.index("status"), columns.index("check_status")
        states = {}
        for row in (r.split(",") for r in rows if r):
            if row[0] == "segserve" and row[1] not in ("FRONTEND", "BACKEND"):
                checked = row[check].lstrip("* ") in ("L7OK", "L7OKC")
                states[row[1]] = row[status] if checked or row[status] != "UP" else "UNCHECKED"
        return states

    def up(self, name: str) -> bool:
        try:
            return self.status().get(name, "").startswith("UP")
        except OSError:  # the admin socket is not there yet
            return False

    def failed_on(self) -> list[str]:
        """The server of each request haproxy logged as not ended normally (a stream aborted
        with its connection may leave no line at all)."""
        return [
            line.split("server=")[1].split()[0]
            for line in self.log.read_text().splitlines()
            if line.startswith("request ") and "end=--" not in line
        ]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Prometheus:
    def __init__(self, replicas: list[Replica], tmp: Path) -> None:
        self.port = free_port()
        targets = [
            {
                "targets": [f"127.0.0.1:{r.port}"],
                "labels": {"namespace": NAMESPACE, "pod": f"segserve-{r.name}"},
            }
            for r in replicas
        ]
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "segserve", "static_configs": targets}],
                }
            )
        )
        self.proc = start_prometheus(
            PROMETHEUS, config, tmp / "tsdb", self.port, tmp / "prometheus.log"
        )
        self.api = f"http://127.0.0.1:{self.port}/api/v1"

    def query(self, expr: str) -> list:
        body = httpx.get(f"{self.api}/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | str  # HTTP status, or the exception's name
    served_by: str = ""
    version: str = ""
    request_id: str = ""  # sent by the client: haproxy's log and the replicas' logs name it


@dataclass
class Load:
    """Closed-loop clients through the balancer, each on its own keep-alive connection."""

    url: str
    concurrency: int
    payload: bytes
    outcomes: list[Outcome] = field(default_factory=list)
    # Request ids unique across the session: the replicas' logs outlive one Load.
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            sent = 0
            while not self._stop.is_set():
                sent += 1
                rid = f"{self.run}-c{number}-{sent}"
                t0 = time.monotonic()
                try:
                    r = client.post(
                        "/segment",
                        content=self.payload,
                        headers={"Content-Type": "image/png", "X-Request-ID": rid},
                    )
                    outcome = Outcome(
                        t0,
                        time.monotonic(),
                        r.status_code,
                        r.headers.get("x-served-by", ""),
                        r.headers.get("x-model-version", ""),
                        rid,
                    )
                except httpx.HTTPError as exc:
                    outcome = Outcome(
                        t0, time.monotonic(), f"{type(exc).__name__}: {exc}", request_id=rid
                    )
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._client, args=(i,)) for i in range(self.concurrency)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def latency_ms(outcomes: list[Outcome]) -> dict[str, float]:
    ok = sorted((o.ended - o.started) * 1000 for o in outcomes if o.status == 200)
    pick = lambda q: round(ok[min(len(ok) - 1, int(q * len(ok)))], 1)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ok[-1], 1)} if ok else {}


def render(template: str, series: str, matchers: str, group_by: str) -> str:
    """prometheus-adapter's metricsQuery template, filled as the adapter fills it."""
    return (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


# -- the fleet -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tiny_repository, tmp_path_factory):
    for name in ("haproxy", "prometheus"):
        require_tool(name, "`make tools` installs Debian's packages")
    tmp = tmp_path_factory.mktemp("fleet")
    repository = tmp / "repository"
    (repository / "tiny").mkdir(parents=True)
    shutil.copytree(
        tiny_repository / "tiny" / "2", repository / "tiny" / "1"
    )  # uint8 in, labels out
    write_check_set(repository / "tiny")
    replicas = [Replica(i, repository, tmp) for i in range(REPLICAS)]
    for r in replicas:
        r.start()
    balancer, prometheus = Haproxy(replicas, tmp), Prometheus(replicas, tmp)
    report: dict = {"replicas": REPLICAS, "drain_s": DRAIN_S}
    try:
        wait_for(lambda: all(r.ready() for r in replicas), 120, "every replica ready")
        wait_for(lambda: all(balancer.up(r.name) for r in replicas), 30, "haproxy sees them up")
        report["haproxy_at_start"] = balancer.status()
        yield replicas, balancer, prometheus, repository, report
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.stop(signal.SIGKILL)
        balancer.stop()
        prometheus.stop()
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


PAYLOAD = image_bytes(256, 256)
# Small images for the restarts: many fast requests, so that connections are reused and
# idle often, which is when a replica shutting down can lose one.
SMALL = image_bytes(64, 64)


def test_a_rolling_restart_under_load_loses_no_request(fleet):
    replicas, balancer, _, _, report = fleet
    restarts = []
    with Load(balancer.url, 8, SMALL) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 60, "load flowing")
        for _ in range(ROUNDS):
            for r in replicas:
                t0 = time.monotonic()
                r.stop(signal.SIGTERM)  # drains DRAIN_S, then finishes what it holds
                stopped = time.monotonic()
                r.start()
                wait_for(r.ready, 120, f"{r.name} ready again")
                wait_for(lambda r=r: balancer.up(r.name), 30, f"haproxy sees {r.name} up")
                restarts.append(
                    {
                        "replica": r.name,
                        "stop_s": round(stopped - t0, 2),
                        "back_up_s": round(time.monotonic() - stopped, 2),
                    }
                )
    failed = failures(load.outcomes)
    report["rolling_restart"] = {
        "restarts": len(restarts),
        "requests": len(load.outcomes),
        "failed": len(failed),
        "latency_ms": latency_ms(load.outcomes),
        "served_by": {r.name: sum(o.served_by == r.name for o in load.outcomes) for r in replicas},
        "restart_s": restarts,
    }
    assert len(restarts) == ROUNDS * REPLICAS
    assert failed == [], [(o.status, o.served_by) for o in failed[:10]]


def test_a_killed_replica_fails_only_what_it_held(fleet):
    replicas, balancer, _, _, report = fleet
    victim = replicas[0]
    with Load(balancer.url, 8, PAYLOAD) as load:
        wait_for(
            lambda: sum(o.served_by == victim.name for o in load.outcomes) >= 5,
            60,
            "the victim serving",
        )
        failed_before = len(balancer.failed_on())
        victim.stop(signal.SIGKILL)
        dead = time.monotonic()  # the process is gone (reaped): nothing reaches it any more
        wait_for(lambda: not balancer.up(victim.name), 30, "haproxy marks it down")
        marked_down = time.monotonic()
        time.sleep(3)  # traffic goes on around the dead replica
        victim.start()
        wait_for(victim.ready, 120, "the victim ready again")
        wait_for(lambda: balancer.up(victim.name), 30, "haproxy sees the victim up")
    failed = failures(load.outcomes)
    haproxy_failed = balancer.failed_on()[failed_before:]
    report["sigkill"] = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "failed_statuses": sorted({str(o.status) for o in failed}),
        "failed_on_servers": haproxy_failed,
        "marked_down_after_death_s": round(marked_down - dead, 2),
        "latency_ms": latency_ms(load.outcomes),
    }
    # Only requests in flight on the victim when it died: sent before it was gone, failed as
    # it died, at most the clients' concurrency, answered by no other replica (their logs
    # name every request they answered), and where haproxy logged the failure, on the victim.
    # None sent after that: until haproxy marked it down, refused connections were retried.
    survivors = " ".join(
        p.read_text() for r in replicas if r is not victim for p in r.tmp.glob(f"{r.name}-*.log")
    )
    assert len(failed) <= 8
    for o in failed:
        assert o.started < dead and o.ended < dead + 2, o
        assert f"request_id={o.request_id} " not in survivors, o
    assert set(haproxy_failed) <= {victim.name}


def test_a_broken_version_is_refused_by_every_replica_and_never_answers(fleet):
    """A version that loads and runs but cannot say the class the model says most, published
    into the shared repository under load: every replica scores it on the check set and
    refuses it; every answer meanwhile comes from version 1, none fails."""
    replicas, balancer, _, repository, report = fleet
    with Load(balancer.url, 8, PAYLOAD) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 60, "load flowing")
        published = time.monotonic()
        with publishing(repository, "tiny", 9) as folder:
            without_its_commonest_class(repository / "tiny", folder)

        def refused_by(r: Replica) -> bool:
            states = httpx.get(r.url + "/models/tiny", timeout=5).json()["version_states"]
            return any(s["version"] == 9 and s["state"] == "refused" for s in states)

        wait_for(lambda: all(refused_by(r) for r in replicas), 120, "every replica refusing v9")
        refused_after = round(time.monotonic() - published, 2)
        time.sleep(1)
    versions = {o.version for o in load.outcomes if o.status == 200}
    failed = failures(load.outcomes)
    report["broken_version"] = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "versions_answering": sorted(versions),
        "refused_by_all_after_s": refused_after,
    }
    assert failed == [] and versions == {"1"}
    for r in replicas:
        scores = {
            s["version"]: s["scores"]["mean_iu"]
            for s in httpx.get(r.url + "/models/tiny", timeout=5).json()["version_states"]
        }
        assert scores[1] == 1.0 and scores[9] < 0.99, (r.name, scores)


def test_a_new_version_rolls_across_the_fleet_without_an_error(fleet):
    replicas, balancer, _, repository, report = fleet
    with Load(balancer.url, 8, PAYLOAD) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 60, "load flowing")
        published = time.monotonic()
        with publishing(repository, "tiny", 2) as folder:  # appears whole, at once
            for name in ("model.onnx", "model.json"):
                shutil.copyfile(repository / "tiny" / "1" / name, folder / name)

        def switched() -> bool:
            recent = [o for o in load.outcomes[-60:] if o.status == 200]
            return {o.served_by for o in recent if o.version == "2"} >= {r.name for r in replicas}

        wait_for(switched, 120, "every replica answering with version 2")
        time.sleep(1)
    failed = failures(load.outcomes)
    first_v2 = {
        r.name: min(
            (o.ended for o in load.outcomes if o.served_by == r.name and o.version == "2"),
            default=None,
        )
        for r in replicas
    }
    report["new_version"] = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "switched_after_s": {k: round(v - published, 2) for k, v in first_v2.items()},
        "latency_ms": latency_ms(load.outcomes),
    }
    assert failed == []
    for r in replicas:  # once a replica has answered with v2, what it gets later is v2 too
        switched_by = first_v2[r.name]
        late_v1 = [
            o
            for o in load.outcomes
            if o.served_by == r.name and o.version == "1" and o.started > switched_by
        ]
        assert switched_by is not None and late_v1 == [], (r.name, late_v1[:3])


def test_the_shipped_autoscaling_queries_follow_the_load(fleet):
    replicas, balancer, prometheus, _, report = fleet
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "config.yaml").read_text())
    hpa = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "hpa.yaml").read_text())
    keda = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "keda-scaledobject.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    target = float(metric["pods"]["target"]["averageValue"].removesuffix("m")) / 1000
    (rule,) = [r for r in rules["rules"] if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    pods = "|".join(f"segserve-{r.name}" for r in replicas)
    adapter = render(
        rule["metricsQuery"],
        rule["seriesQuery"].split("{")[0],
        f'namespace="{NAMESPACE}",pod=~"{pods}"',
        "pod",
    )
    trigger = keda["spec"]["triggers"][0]["metadata"]
    threshold = float(trigger["threshold"])

    def decisions() -> dict:
        """What the HPA (through the adapter) and KEDA would ask for, from these metrics."""
        per_pod = [float(s["value"][1]) for s in prometheus.query(adapter)]
        (total,) = prometheus.query(trigger["query"]) or [{"value": [0, "0"]}]
        average = sum(per_pod) / max(len(per_pod), 1)
        return {
            "adapter_per_pod_s": [round(v, 3) for v in per_pod],
            "hpa_desired": math.ceil(len(replicas) * average / target),
            "keda_query_s": round(float(total["value"][1]), 3),
            "keda_desired": math.ceil(float(total["value"][1]) / threshold),
        }

    heavy = image_bytes(1000, 1000)  # a few hundred ms each here: queues build on every replica
    with Load(balancer.url, 6 * REPLICAS, heavy) as load:
        wait_for(lambda: decisions()["hpa_desired"] > REPLICAS, 90, "the adapter's query rising")
        under_load = decisions()
    wait_for(lambda: decisions()["hpa_desired"] < REPLICAS, 90, "the adapter's query falling")
    after = decisions()
    report["autoscaling"] = {
        "target_s": target,
        "keda_threshold_s": threshold,
        "under_load": under_load,
        "after": after,
        "requests": len(load.outcomes),
        "failed": len(failures(load.outcomes)),
    }
    assert under_load["hpa_desired"] > REPLICAS and under_load["keda_desired"] > REPLICAS
    assert after["hpa_desired"] < REPLICAS and after["keda_desired"] < REPLICAS
    queued = render(
        rules["rules"][1]["metricsQuery"],
        "segserve_queued_pixels",
        f'namespace="{NAMESPACE}",pod=~"{pods}"',
        "pod",
    )
    assert len(prometheus.query(queued)) == REPLICAS  # the second rule evaluates per pod too
