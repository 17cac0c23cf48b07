"""The one module that connects to Ray and asks the cluster what it has.

Training, evaluation, sweeps, Serve helpers and the benches (mtp.bench) all join Ray through
``connect()``, so ``mtp`` reaches every worker the same way (``runtime_env``
``py_modules``, which also works on nodes that have no copy of this checkout), and
they read the cluster through ``nodes()`` and ``resources()``, which never block a
job for longer than their timeout.

Why not ``ray.nodes()`` / ``ray.cluster_resources()``: both go through the driver's
``GlobalStateAccessor``, a second GCS connection with its own io thread and no
deadline. In a long-lived driver it was seen to wait forever for a reply
(``GlobalStateAccessor::GetAllTotalResources`` in gdb, io thread idle in epoll) while
a second driver on the same cluster got its answer in milliseconds. Ray Serve moved
off that accessor for the same reasons (ray-project/ray ``serve/_private/
cluster_node_info_cache.py``: "rather than the legacy GlobalStateAccessor path (which
opens a second connection...)"), and ray-project/ray#58182 fixed a race in its lazy
initialisation. The queries here use the connection the driver already runs on
(``global_worker.gcs_client``, as Serve does) with a deadline on every call.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MTP_PACKAGE = Path(__file__).resolve().parents[1]  # .../mtp, shipped to every worker
DEFAULT_TIMEOUT_S = 30.0
RAY_BOOTSTRAP_FILE = "/tmp/ray/ray_current_cluster"  # where `ray start` writes the head's address
ACTOR_ALIVE = 2  # gcs_pb2.ActorTableData.ALIVE


class ClusterQueryError(RuntimeError):
    """Ray's control store did not answer a cluster query (in time, or at all)."""


@dataclass(frozen=True)
class Node:
    """One alive node: its id, address and total resources (``{"CPU": 8.0, "GPU": 1.0, ...}``)."""

    node_id: str
    address: str
    resources: dict[str, float]


def runtime_env() -> dict[str, Any]:
    """How ``mtp`` reaches workers, Train controllers and Serve replicas (a ``py_modules``
    upload), with the job's log verbosity (``mtp.cluster.logs``)."""
    from mtp.cluster import logs

    return {"py_modules": [str(MTP_PACKAGE)], "env_vars": logs.worker_env_vars(),
            "worker_process_setup_hook": "mtp.cluster.logs.quiet_process"}


def cluster_address() -> str | None:
    """The cluster ``connect()`` would join (RAY_ADDRESS, or a running ``ray start`` head), or None
    when it would start a local instance. Cheap: no ``import ray``; the head must accept a connection."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        address = Path(RAY_BOOTSTRAP_FILE).read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def connect(address: str | None = None, **local_options: Any) -> None:
    """Join a Ray cluster once per process, carrying ``mtp`` to its workers.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for the job it
    starts) names the cluster; without either, a cluster already running on this
    machine (``ray start``) is joined, else a local instance is started. ``"local"``
    always starts a fresh local instance; ``local_options`` (``num_cpus``,
    ``object_store_memory``, ...) size it. A local instance has no dashboard unless
    asked (it halves the start-up time).
    """
    import ray

    from mtp.cluster import logs

    if ray.is_initialized():
        return
    logs.quiet_process()
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logs.ray_log_level(), **local_options}
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env(), **options)


def nodes(timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Node]:
    """The alive nodes of the connected cluster, sorted by id."""
    from ray.core.generated import gcs_pb2

    found = _query("get_all_node_info", timeout_s)
    return sorted(
        (Node(node_id.hex(), info.node_manager_address, dict(info.resources_total))
         for node_id, info in found.items() if info.state == gcs_pb2.GcsNodeInfo.ALIVE),
        key=lambda node: node.node_id,
    )


def resources(available: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, float]:
    """Total resources of the alive nodes, or what is free on them now (``available=True``)."""
    if not available:
        return total_resources(nodes(timeout_s))
    return total_resources(free_nodes(timeout_s))


def free_nodes(timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Node]:
    """The alive nodes with what is free on each now (``resources`` = available, not total)."""
    alive = {node.node_id: node for node in nodes(timeout_s)}
    free = []
    for usage in _query("get_all_resource_usage", timeout_s).resource_usage_data.batch:
        node = alive.get(usage.node_id.hex())
        if node is not None:
            free.append(Node(node.node_id, node.address, dict(usage.resources_available)))
    return sorted(free, key=lambda node: node.node_id)


def holders(names: tuple[str, ...] = ("CPU", "GPU"), timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict[str, float]]:
    """Who holds ``names`` now: alive actors by class (``ServeReplica:app:Model``, ...) -> resources held."""
    import asyncio

    async def query(client):
        return await asyncio.wait_for(client.async_get_all_actor_info(timeout=timeout_s), timeout_s)

    actors = _in_thread(lambda client: asyncio.run(query(client)), "its actor list", timeout_s)
    held: dict[str, dict[str, float]] = {}
    for actor in actors.values():
        if actor.state != ACTOR_ALIVE:
            continue
        for name, amount in actor.required_resources.items():
            if name in names and amount > 0:
                who = (actor.class_name or "actor").rsplit(".", 1)[-1]  # not test.<locals>.Holder
                mine = held.setdefault(who, {})
                mine[name] = mine.get(name, 0.0) + amount
    return held


def total_resources(alive: list[Node]) -> dict[str, float]:
    """The sum of the given nodes' resources."""
    totals: dict[str, float] = {}
    for node in alive:
        for name, amount in node.resources.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def _query(method: str, timeout_s: float) -> Any:
    """Call ``method`` on the driver's own GCS client, with a deadline that holds."""
    return _in_thread(lambda client: getattr(client, method)(timeout=timeout_s), method, timeout_s)


def _in_thread(call: Any, what: str, timeout_s: float) -> Any:
    """``call(gcs_client)`` in a helper thread, given up on after ``timeout_s``.

    The binding's own ``timeout`` was seen not to hold in a long-lived driver after a Ray
    Train run (``NodeInfoAccessor::GetAllNoCache`` waiting on a future for ever, GIL
    released). A thread that never returns is left behind; the caller gets a
    ClusterQueryError and carries on without the answer.
    """
    import ray

    if not ray.is_initialized():
        raise ClusterQueryError("not connected to Ray: call mtp.cluster.ray_env.connect() first")
    client = ray._private.worker.global_worker.gcs_client
    answer: dict[str, Any] = {}

    def run() -> None:
        try:
            answer["value"] = call(client)
        except Exception as exc:  # the binding raises its own (unexported) RPC error types
            answer["error"] = exc

    thread = threading.Thread(target=run, name="mtp-gcs-query", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if "value" in answer:
        return answer["value"]
    detail = answer.get("error", "no answer, its own deadline did not hold")
    raise ClusterQueryError(f"Ray's GCS did not answer ({what}) within {timeout_s:g} s: {detail}")
