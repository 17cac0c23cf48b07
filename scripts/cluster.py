"""A real Ray cluster and MLflow tracking server on this machine, the way a cluster runs them.

    python scripts/cluster.py up      # = make cluster-up: a `ray start` head + `mlflow server`
    source .cluster/env.sh            # RAY_ADDRESS, auth token, MLFLOW_TRACKING_URI for the CLI
    python scripts/cluster.py down    # = make cluster-down: stops exactly what `up` started

Why a script rather than a bare `ray start --head`:
- the head runs with this interpreter's bin directory first on PATH, so that
  `ray job submit -- python jobs/...` runs the venv's python (a job's entrypoint
  inherits the PATH of the process that ran `ray start`);
- the head gets its own --temp-dir and ports, so it neither collides with another Ray
  on the machine nor becomes the one a plain `ray.init()` joins by accident, and
  `down` can find every process it started by that temp dir (never `ray stop`,
  which stops every Ray on the machine);
- the head starts with token authentication (RAY_AUTH_MODE=token), its token in
  .cluster/ray_auth_token, since Ray's ports are reachable from other machines;
- jobs and Serve replicas inherit MLFLOW_TRACKING_URI from the head, pointing at an
  `mlflow server` that proxies artifacts (workers need no access to its disk).

State lives in --state-dir (default .cluster/): state.json (what to stop), env.sh
(what a shell needs), the token, the MLflow store and its artifacts, and logs. The
MLflow data is kept across `down`/`up`; the Ray temp dir is removed by `down`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE = "state.json"
RAY_PORTS = (
    "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
)


class ClusterError(RuntimeError):
    """The cluster could not be started or stopped; the message says what to look at."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS reports free now (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_http(url: str, timeout_s: float, what: str, log: Path) -> None:
    """Wait until ``url`` answers at all (an HTTP error such as 401 still means the server is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(0.5)
    raise ClusterError(f"{what} did not answer {url} within {timeout_s:g}s; see {log}")


def cluster_processes(session: int, marker: str) -> list[int]:
    """PIDs in the Ray head's session (``ray start`` ran as its leader, and its daemons and
    their workers inherit it) or whose command line names the cluster's unique temp dir."""
    found, parents = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] == "Z":  # already dead, waiting for a (here slow) reaper: nothing to stop
            continue
        parents[int(entry.name)] = int(stat[1])
        if int(stat[3]) == session or marker in cmdline:
            found.add(int(entry.name))
    grew = True
    while grew:  # and their descendants, wherever they moved
        grown = {pid for pid, parent in parents.items() if parent in found} - found
        found |= grown
        grew = bool(grown)
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def terminate(pids: list[int], timeout_s: float = 5.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``timeout_s``."""
    kill = os.killpg if group else os.kill
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        if not any(alive(p) for p in pids):
            return


def listening(ports: set[int]) -> dict[int, str]:
    """Which of ``ports`` listen, on which local address (``0.0.0.0``/``::``: every interface)."""
    found: dict[int, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state != "0A" or int(port, 16) not in ports:  # 0A: LISTEN
                continue
            found[int(port, 16)] = _address(address, width)
    return found


def _address(hex_address: str, width: int) -> str:
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])
    words = bytes.fromhex(hex_address)
    return socket.inet_ntop(socket.AF_INET6, b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4)))


def exposed(state: dict) -> dict[str, int]:
    """The cluster's ports that listen on every interface, by name (what ``--host`` could not bind)."""
    names = {port: name for name, port in state["ports"].items()}
    bound = listening(set(names))
    return {names[port]: port for port, address in sorted(bound.items()) if address in ("0.0.0.0", "::")}


def up(state_dir: Path, num_cpus: int | None, auth: bool, host: str = "127.0.0.1") -> dict:
    """Start the MLflow server and the Ray head, their ports bound to ``host`` where Ray lets
    them be (``exposed`` says which are not); write state.json and env.sh; return the state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STATE).exists():
        raise ClusterError(f"{state_dir / STATE} exists: a cluster is up (run `down` first)")
    bin_dir = Path(sys.executable).parent  # the venv's bin: not resolved, a venv's python is a symlink
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    ports = dict(zip(RAY_PORTS + ("mlflow", "serve"), free_ports(len(RAY_PORTS) + 2)))
    # Short and unique: Ray's unix sockets live under it (path length is limited), and
    # `down` finds this cluster's processes by it.
    ray_tmp = tempfile.mkdtemp(prefix="mtp-ray-", dir="/tmp")
    local = "127.0.0.1" if host in ("127.0.0.1", "0.0.0.0", "::") else host  # where clients reach it
    mlflow_uri = f"http://{local}:{ports['mlflow']}"
    from ray.util import get_node_ip_address  # the address Ray binds (it ignores 127.0.0.1)

    gcs_address = f"{get_node_ip_address()}:{ports['port']}"
    # RAY_ADDRESS for every process of the cluster: Ray's own actors (Train's placement
    # group cleaner, ...) otherwise find several Ray instances on a shared machine and fail.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ADDRESS": gcs_address}
    dashboard = f"http://{local}:{ports['dashboard-port']}"
    client_env = {  # what a shell needs: `ray job submit` and `serve deploy` talk to the dashboard,
        # a driver started in the shell (python jobs/train.py) joins the head's GCS
        "RAY_API_SERVER_ADDRESS": dashboard, "RAY_DASHBOARD_ADDRESS": dashboard, "RAY_ADDRESS": gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }
    if auth:
        token = state_dir / "ray_auth_token"
        if not token.exists():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        client_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token.resolve()))
    else:
        client_env["RAY_AUTH_MODE"] = "disabled"
    env.update({k: v for k, v in client_env.items() if k.startswith(("RAY_AUTH", "MLFLOW"))})

    store = (state_dir / "mlflow").resolve()
    store.mkdir(exist_ok=True)
    mlflow_log = logs / "mlflow.log"
    mlflow = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=store,
        stdout=mlflow_log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    state = {"ray_temp_dir": ray_tmp, "mlflow_pgid": mlflow.pid, "ports": ports, "env": client_env,
             "gcs_address": gcs_address, "mlflow_store": str(store)}
    (state_dir / STATE).write_text(json.dumps(state, indent=2))  # from here on, `down` can clean up
    ray_args = [str(bin_dir / "ray"), "start", "--head", "--temp-dir", ray_tmp, "--dashboard-host", host,
                "--include-dashboard", "true", "--disable-usage-stats"]
    ray_args += [f"--{name}={ports[name]}" for name in RAY_PORTS]
    if num_cpus is not None:
        ray_args.append(f"--num-cpus={num_cpus}")
    if local != "127.0.0.1":  # Ray replaces a loopback node address by the machine's own (services.py)
        ray_args.append(f"--node-ip-address={local}")
    ray_log = logs / "ray-start.log"
    with ray_log.open("ab") as out:  # its own session: `down` stops every process in it
        head = subprocess.Popen(ray_args, env=env, cwd=state_dir, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        state["ray_session"] = head.pid
        (state_dir / STATE).write_text(json.dumps(state, indent=2))
        started = head.wait()
    if started != 0:
        raise ClusterError(f"`ray start` failed (exit {started}); see {ray_log}")
    wait_http(f"{dashboard}/api/version", 60, "the Ray dashboard", ray_log)
    wait_http(f"{mlflow_uri}/health", 120, "the MLflow server", mlflow_log)
    exports = "".join(f"export {k}={v}\n" for k, v in client_env.items())
    exports += f"export MTP_SERVE_PORT={ports['serve']}\nexport PATH={bin_dir}:$PATH  # ray, serve, python: the venv's\n"
    (state_dir / "env.sh").write_text(exports)
    return state


def down(state_dir: Path) -> list[int]:
    """Stop every process of this cluster (found by its temp dir) and the MLflow server."""
    path = state_dir / STATE
    if not path.exists():
        raise ClusterError(f"no cluster state in {path}; nothing to stop")
    state = json.loads(path.read_text())
    ray_pids: list[int] = []
    for _ in range(3):  # a dying raylet or Serve controller can start a process after the first look
        found = cluster_processes(state.get("ray_session", -1), state["ray_temp_dir"])
        if not found:
            break
        terminate(found)
        ray_pids += found
    terminate([state["mlflow_pgid"]], group=True)
    shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    path.unlink()
    (state_dir / "env.sh").unlink(missing_ok=True)
    return ray_pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--state-dir", type=Path, default=REPO / ".cluster")
    parser.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    parser.add_argument("--no-auth", action="store_true", help="start Ray without token authentication")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the dashboard, the MLflow server and (where Ray allows) the Ray ports listen "
                             "on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            try:
                state = up(args.state_dir, args.num_cpus, auth=not args.no_auth, host=args.host)
            except BaseException:
                if (args.state_dir / STATE).exists():
                    down(args.state_dir)
                raise
            env = state["env"]
            print(f"Ray head:       {state['gcs_address']} (temp dir {state['ray_temp_dir']})")
            print(f"Ray dashboard:  {env['RAY_API_SERVER_ADDRESS']}  (ray job submit / serve deploy address)")
            print(f"MLflow server:  {env['MLFLOW_TRACKING_URI']}  (store {state['mlflow_store']})")
            print(f"Serve port:     {state['ports']['serve']}  (jobs/serve_config.py --port)")
            print(f"Ray auth:       {env['RAY_AUTH_MODE']}")
            wide = exposed(state)
            if wide and args.host not in ("0.0.0.0", "::"):
                print(f"Listening on every interface (Ray 2.60 has no option to bind them to {args.host}; token "
                      f"auth guards them): {', '.join(f'{name} {port}' for name, port in wide.items())}")
            print(f"\nFor the CLI:    source {args.state_dir / 'env.sh'}")
        else:
            stopped = down(args.state_dir)
            print(f"stopped {len(stopped)} Ray processes and the MLflow server")
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
