"""Write a Serve config that `serve deploy` / `serve run` can use as is.

    python jobs/serve_config.py --model models:/mtp-tiny@champion > serve.yaml
    serve deploy serve.yaml                                   # RAY_ADDRESS: the cluster's dashboard
    python jobs/serve_config.py --model models:/mtp-tiny@champion --autoscale 1,2 -o serve.yaml

The model, the MLflow tracking URI (--tracking-uri, else MLFLOW_TRACKING_URI) and the
path of the `mtp` package are written into the config, since `serve deploy` builds
the application on the cluster, where the deploying shell's environment never
arrives. An alias is pinned to the version it names now: deploy again after moving
the alias and Serve replaces the replicas one by one, without dropping requests.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from mtp.config import ConfigError  # noqa: E402
from mtp.serving.deploy import deploy_config  # noqa: E402

TEMPLATE = REPO / "serve" / "config.yaml"


def _pair(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX replicas, got {text!r}") from None
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/name@alias, models:/name/version, runs:/..., or a path")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow store the replicas resolve the model in (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="Serve config to start from (default: %(default)s)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the template's)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of ModelServer replicas")
    scale.add_argument("--autoscale", type=_pair, metavar="MIN,MAX", help="autoscale ModelServer between MIN and MAX replicas")
    parser.add_argument("--no-pin", action="store_true", help="keep an alias as is (replicas resolve it when they start)")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        config = deploy_config(yaml.safe_load(args.template.read_text()), args.model, tracking_uri=args.tracking_uri,
                               port=args.port, replicas=args.replicas, autoscaling=args.autoscale, pin=not args.no_pin)
    except (ConfigError, OSError) as exc:
        print(f"serve_config: {exc}", file=sys.stderr)
        return 2
    text = f"# written by jobs/serve_config.py --model {args.model}\n" + yaml.safe_dump(config, sort_keys=False)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
