"""Point a registry alias (default: champion) at a model version.

    python jobs/promote.py models:/mtp-tiny@newest              # the newest run's model becomes @champion
    python jobs/promote.py models:/mtp-tiny/4 --alias candidate

Evaluation, Serve configs (jobs/serve_config.py) and the README address models by
alias, so promoting is what changes which model they use. The tracking store is
--tracking-uri, else MLFLOW_TRACKING_URI, else the local default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.config import TrackingConfig  # noqa: E402
from mtp.tracking.registry import CHAMPION, ModelRef, set_alias  # noqa: E402
from mtp.tracking.store import tracking_uri  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--alias", default=CHAMPION)
    parser.add_argument("--tracking-uri")
    args = parser.parse_args(argv)
    store = tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
    try:
        pinned = set_alias(args.model, args.alias, store)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing model or version
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    print(f"{ModelRef(ModelRef.parse(pinned).name, alias=args.alias)} -> {pinned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
