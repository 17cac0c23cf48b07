"""Serve operations under load, on a real `ray start` cluster: upgrade, replica kill, autoscaling.

    python jobs/bench_serve_ops.py --json serve_ops.json

The phases, what each counts and how, are in ``mtp.bench.serve_ops`` (and ``--help``).
Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

import yaml  # noqa: E402

from mtp.bench import serve_ops  # noqa: E402
from mtp.bench.serve_ops import MODEL, Cluster, autoscale, kill_replica, register_versions, upgrade  # noqa: E402
from mtp.cluster.logs import quiet_process  # noqa: E402
from mtp.serving.deploy import MODEL_DEPLOYMENT, deploy_config  # noqa: E402
from mtp.tracking.registry import CHAMPION  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=serve_ops.__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for upgrade and kill")
    parser.add_argument("--autoscale-clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--settle-s", type=float, default=5.0, help="load before and after each operation")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_process()

    template = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    server = next(d for d in template["applications"][0]["deployments"] if d["name"] == MODEL_DEPLOYMENT)
    server["ray_actor_options"]["num_cpus"] = 0.5  # two replicas fit on a 2-CPU head
    rows = []
    with Cluster(args.num_cpus) as cluster, tempfile.TemporaryDirectory() as tmp:
        url = f"http://127.0.0.1:{cluster.serve_port}"
        register_versions(cluster.tracking_uri, 2, Path(tmp))
        cluster.serve_deploy(deploy_config(template, f"models:/{MODEL}@{CHAMPION}", tracking_uri=cluster.tracking_uri,
                                           port=cluster.serve_port, replicas=1))
        cluster.admin.wait_running(300)
        for phase in (upgrade, kill_replica, autoscale):
            rows.append(phase(cluster, template, url, args))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "phases": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0 if rows[0]["failed"] == 0 else 1


def print_table(rows: list[dict]) -> None:
    print(f"\n{'phase':<44} {'requests':>8} {'failed':>6} {'seconds':>8}  notes")
    for row in rows:
        notes = {k: v for k, v in row.items() if k not in ("phase", "requests", "failed", "seconds", "failures")}
        print(f"{row['phase']:<44} {row['requests']:>8} {row['failed']:>6} {row['seconds']:>8}  {notes}")
        for failure in row["failures"]:
            print(f"{'':<44}   failure: {failure}")
    print("seconds: upgrade = until v2 served and the old replica gone; kill = until the replacement ran; "
          "autoscale = until 2 replicas ran (seconds_back_to_1 after the load stopped)")


if __name__ == "__main__":
    sys.exit(main())
