"""A deployable Serve config: the template plus the model, its tracking store and the package.

``serve deploy`` hands a config file to the Serve controller, which builds the
application on the cluster: nothing from the deploying shell (environment,
working directory) reaches it. So everything the replicas need is written into
the config: ``args.model`` (an alias such as ``models:/mtp-tiny@champion`` is
pinned to the version it names now, so deploying again after the alias moved is a
config change that Serve rolls out replica by replica, and the deployed version is
visible in the file), ``args.tracking_uri``, and ``PYTHONPATH`` to this checkout's
source root for clusters whose nodes share it (an image with ``pip install .``
does not need it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mtp.config import ConfigError
from mtp.decoding.config import EngineConfig
from mtp.tracking.registry import ModelRef, pin_alias

APP_IMPORT_PATH = "mtp.serving.app:build_app"
MODEL_DEPLOYMENT = "ModelServer"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # .../platform, which holds the mtp package


def deploy_config(
    template: dict[str, Any],
    model: str,
    *,
    tracking_uri: str | None = None,
    port: int | None = None,
    replicas: int | None = None,
    autoscaling: tuple[int, int] | None = None,
    target_ongoing_requests: float | None = None,
    source_root: Path | None = SOURCE_ROOT,
    pin: bool = True,
) -> dict[str, Any]:
    """The template (a parsed Serve config) made deployable for ``model``."""
    config = copy.deepcopy(template)
    apps = [a for a in config.get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"the Serve config template must hold one application with import_path {APP_IMPORT_PATH}")
    app = apps[0]
    served = model
    if pin:
        try:
            served = pin_alias(model, tracking_uri)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    ref = ModelRef.parse(model)
    name = ref.name if ref else None
    args = app.setdefault("args", {})
    args["model"] = served
    if name and not args.get("model_name"):
        args["model_name"] = name
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    if source_root is not None:
        env_vars["PYTHONPATH"] = str(source_root)
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    deployment = next((d for d in app.setdefault("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), None)
    if deployment is None:
        deployment = {"name": MODEL_DEPLOYMENT}
        app["deployments"].append(deployment)
    if replicas is not None and autoscaling is not None:
        raise ConfigError("give replicas or autoscaling, not both")
    if replicas is not None:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = replicas
    if autoscaling is not None:
        low, high = autoscaling
        if not 0 <= low <= high or high < 1:
            raise ConfigError(f"autoscaling {low},{high}: need 0 <= min <= max and max >= 1")
        deployment.pop("num_replicas", None)
        deployment["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high,
            "target_ongoing_requests": target_ongoing_requests or EngineConfig.from_dict(args.get("engine"), "serve.engine").max_batch_size,
            "upscale_delay_s": 3, "downscale_delay_s": 10,
        }
    return config


class ServeAdmin:
    """Serve's REST API on a cluster's dashboard (what ``serve status`` reads), for scripts
    and tests that watch a deployment: application state, replica states and pids.

    The token (``RAY_AUTH_TOKEN_PATH`` / ``RAY_AUTH_TOKEN``) is sent when the cluster uses
    Ray's token authentication.
    """

    def __init__(self, dashboard: str, token: str | None = None) -> None:
        import os

        self.dashboard = dashboard.rstrip("/")
        if token is None and os.environ.get("RAY_AUTH_TOKEN"):
            token = os.environ["RAY_AUTH_TOKEN"]
        elif token is None and os.environ.get("RAY_AUTH_TOKEN_PATH"):
            token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def applications(self) -> dict[str, Any]:
        import requests

        response = requests.get(f"{self.dashboard}/api/serve/applications/", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json().get("applications", {})

    def replicas(self, app: str = "mtp", deployment: str = MODEL_DEPLOYMENT) -> list[dict[str, Any]]:
        """The deployment's replicas: ``state`` (RUNNING, STARTING, STOPPING, ...), ``pid``, ``replica_id``."""
        found = self.applications().get(app, {}).get("deployments", {}).get(deployment, {})
        return list(found.get("replicas", []))

    def wait(self, ready, timeout_s: float, what: str, app: str = "mtp") -> dict[str, Any]:
        """Poll until ``ready(application)`` holds; raises TimeoutError naming ``what`` and the last state."""
        import time

        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.applications().get(app, {})
            except OSError:
                last = {}
            if last and ready(last):
                return last
            time.sleep(1.0)
        raise TimeoutError(f"{what} within {timeout_s:g}s; last state: {last.get('status')} {last.get('message', '')!r}")

    def wait_running(self, timeout_s: float = 300, app: str = "mtp") -> dict[str, Any]:
        return self.wait(lambda a: a.get("status") == "RUNNING", timeout_s, f"application {app!r} did not reach RUNNING", app)
