"""Serve operations under load, on a real `ray start` cluster: upgrade, replica kill, autoscaling
(``jobs/bench_serve_ops.py`` runs the phases and prints the table).

In one run, on a cluster of its own (scripts/cluster.py up: a `ray start` head and an
`mlflow server`, torn down at the end), with two registered versions of a small
random-init model and closed-loop clients sending short completions throughout:

1. upgrade: `serve deploy` of a config whose `@champion` alias now names version 2
   (jobs/serve_config.py pins it), under load; counts failed requests (target 0) and
   checks that /v1/models reports the new version afterwards;
2. replica kill: 2 replicas, one SIGKILLed under load; counts failed requests (at most
   what the killed replica had in flight) and the time until Serve replaced it;
3. autoscaling: autoscaling_config 1..2 replicas; heavier load until 2 replicas run,
   then no load until 1 is left; reports both times.

Times depend on the machine's load (2 shared cores here): read them as orders of
magnitude; failed-request counts are the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
import yaml

from mtp.checkpoint import save_checkpoint
from mtp.config import build_config
from mtp.model import MTPTransformer
from mtp.serving.deploy import ServeAdmin, deploy_config
from mtp.tokenizer import ByteTokenizer
from mtp.tracking.registry import CHAMPION, log_model, set_alias
from mtp.tracking.store import experiment_id

REPO = Path(__file__).resolve().parents[3]  # scripts/cluster.py starts and stops the cluster

MODEL = "serve-ops-bench"
PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n", "# sort a list\n"]


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str = ""


@dataclass
class Load:
    """Closed-loop clients, each sending one completion after another until stopped."""

    url: str
    clients: int
    max_tokens: int
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def _client(self, index: int) -> None:
        session = requests.Session()
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": self.max_tokens, "temperature": 0}
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                response = session.post(f"{self.url}/v1/completions", json=body, timeout=120)
                ok, detail = response.status_code == 200, f"HTTP {response.status_code}"
                if not ok:
                    detail += f" {response.text[:160]}"
            except requests.RequestException as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
            with self._lock:
                self.outcomes.append(Outcome(start, time.monotonic(), ok, detail))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def summary(self) -> dict:
        failed = [o for o in self.outcomes if not o.ok]
        return {"requests": len(self.outcomes), "failed": len(failed),
                "failures": sorted({o.detail for o in failed})[:5]}

    def in_flight_at(self, moment: float) -> int:
        return sum(1 for o in self.outcomes if o.started <= moment <= o.ended)


class Cluster:
    """scripts/cluster.py up/down in a temporary state dir, as a user runs it."""

    def __init__(self, num_cpus: int) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="mtp-serve-ops-"))
        self.num_cpus = num_cpus

    def __enter__(self) -> "Cluster":
        script = [sys.executable, str(REPO / "scripts" / "cluster.py")]
        subprocess.run([*script, "up", "--state-dir", str(self.state_dir), "--num-cpus", str(self.num_cpus)],
                       check=True, stdout=subprocess.DEVNULL)
        state = json.loads((self.state_dir / "state.json").read_text())
        self.env = {**os.environ, **state["env"]}
        self.serve_port = state["ports"]["serve"]
        self.tracking_uri = state["env"]["MLFLOW_TRACKING_URI"]
        token = Path(state["env"]["RAY_AUTH_TOKEN_PATH"]).read_text() if "RAY_AUTH_TOKEN_PATH" in state["env"] else None
        self.admin = ServeAdmin(state["env"]["RAY_DASHBOARD_ADDRESS"], token)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([sys.executable, str(REPO / "scripts" / "cluster.py"), "down", "--state-dir", str(self.state_dir)],
                       check=False, stdout=subprocess.DEVNULL)

    def serve_deploy(self, config: dict) -> None:
        path = self.state_dir / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path)], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def register_versions(tracking_uri: str, count: int, root: Path) -> None:
    """``count`` versions of a small random-init model (different seeds), each from its own run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    experiment = experiment_id(client, "serve-ops-bench", tracking_uri)
    cfg = build_config(overrides={"train.preset": "debug"})
    for seed in range(count):
        torch.manual_seed(seed)
        checkpoint = save_checkpoint(root / f"v{seed}", MTPTransformer(cfg.model), cfg, ByteTokenizer())
        run_id = client.create_run(experiment, run_name=f"serve-ops-v{seed + 1}").info.run_id
        log_model(run_id, checkpoint, tracking_uri, MODEL)
        client.set_terminated(run_id)


def served_version(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["version"]


def running(admin: ServeAdmin) -> list[dict]:
    return [r for r in admin.replicas() if r["state"] == "RUNNING"]


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held; raises TimeoutError naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout_s:g}s")


def upgrade(cluster: Cluster, template: dict, url: str, args) -> dict:
    before = served_version(url)
    with Load(url, args.clients, args.max_tokens) as load:
        time.sleep(args.settle_s)
        set_alias(f"models:/{MODEL}/2", CHAMPION, cluster.tracking_uri)
        config = deploy_config(template, f"models:/{MODEL}@{CHAMPION}", tracking_uri=cluster.tracking_uri,
                               port=cluster.serve_port, replicas=1)
        cluster.serve_deploy(config)
        rollout = wait_for(lambda: served_version(url) == "2" and len(cluster.admin.replicas()) == 1
                           and cluster.admin.applications()["mtp"]["status"] == "RUNNING", 300, "version 2 serving")
        time.sleep(args.settle_s)
    return {"phase": "upgrade v1 -> v2 (serve deploy)", **load.summary(), "version_before": before,
            "version_after": served_version(url), "seconds": round(rollout, 1)}


def kill_replica(cluster: Cluster, template: dict, url: str, args) -> dict:
    config = deploy_config(template, f"models:/{MODEL}@{CHAMPION}", tracking_uri=cluster.tracking_uri,
                           port=cluster.serve_port, replicas=2)
    cluster.serve_deploy(config)
    wait_for(lambda: len(running(cluster.admin)) == 2, 300, "2 replicas running")
    with Load(url, args.clients, args.max_tokens) as load:
        time.sleep(args.settle_s)
        victim = running(cluster.admin)[0]
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        replaced = wait_for(lambda: len(running(cluster.admin)) == 2 and victim["pid"] not in
                            {r["pid"] for r in running(cluster.admin)}, 300, "the killed replica replaced")
        time.sleep(args.settle_s)
    return {"phase": "SIGKILL 1 of 2 replicas", **load.summary(), "in_flight_at_kill": load.in_flight_at(killed_at),
            "seconds": round(replaced, 1)}


def autoscale(cluster: Cluster, template: dict, url: str, args) -> dict:
    config = deploy_config(template, f"models:/{MODEL}@{CHAMPION}", tracking_uri=cluster.tracking_uri,
                           port=cluster.serve_port, autoscaling=(1, 2), target_ongoing_requests=2)
    cluster.serve_deploy(config)
    wait_for(lambda: len(cluster.admin.replicas()) == 1 and len(running(cluster.admin)) == 1, 300, "1 replica")
    with Load(url, args.autoscale_clients, args.max_tokens) as load:
        up = wait_for(lambda: len(running(cluster.admin)) == 2, 300, "scaled up to 2 replicas")
    down = wait_for(lambda: len(cluster.admin.replicas()) == 1, 300, "scaled back to 1 replica")
    return {"phase": f"autoscale 1..2 ({args.autoscale_clients} clients, then none)", **load.summary(),
            "seconds": round(up, 1), "seconds_back_to_1": round(down, 1)}
