"""The application's settings: one dataclass, built from the Serve config's ``args``.

The same dict travels from the Serve config file (``jobs/serve_config.py`` writes
one) to the builder and to every replica, and is validated once, so a bad value
fails at deploy time with a message naming the key instead of inside a replica's
constructor loop. The model and its tracking store are ``args`` too, never the
deploying shell's environment: ``serve deploy`` builds the application on the
cluster, which never sees that shell.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp.config import ConfigError
from mtp.decoding.config import EngineConfig
from mtp.specs import build
from mtp.tracking.registry import URI_SCHEMES, ModelRef

API_KEY_ENV = "MTP_SERVE_API_KEY"


@dataclass
class ServeConfig:
    """What one application serves and the limits it enforces per request.

    How many requests a replica takes at once is Serve's own ``max_ongoing_requests``
    (the deployment's section of the Serve config); it defaults to four times
    ``engine.max_batch_size``, so that finished rows are refilled from requests already queued.
    """

    model: str | None = None  # checkpoint dir or MLflow URI (models:/name@alias, runs:/id/path)
    model_name: str | None = None  # id in /v1/models; None: derived from ``model``
    tracking_uri: str | None = None  # MLflow store for models:/ and runs:/, passed to resolve_checkpoint; None: its default
    engine: EngineConfig = EngineConfig()  # the ``engine:`` mapping: batch size, device, dtype, tree, compile, ...
    batch_wait_timeout_s: float = 0.0  # extra wait for a batch to fill; 0: rows queued while the
    # engine was busy form the next batch anyway, and a lone request pays no wait
    max_tokens_cap: int = 512  # largest max_tokens a request may ask for
    max_choices: int = 16  # prompts x n in one request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    request_timeout_s: float = 120.0  # a request still running after this gets 504
    stuck_after_s: float = 300.0  # an engine call this long marks the replica unhealthy

    def validate(self) -> "ServeConfig":
        if not self.model:
            raise ConfigError("serve: no model; set args.model in the Serve config (jobs/serve_config.py --model ...)")
        for name in ("max_tokens_cap", "max_choices", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"serve.{name}={value!r} must be a positive integer")
        for name in ("request_timeout_s", "stuck_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"serve.{name}={value!r} must be a positive number")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or self.batch_wait_timeout_s < 0:
            raise ConfigError(f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s!r} must be >= 0")
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError(f"serve.engine={self.engine!r} must be a mapping of engine options")
        self.engine.validate()
        return self

    @property
    def served_name(self) -> str:
        """The OpenAI ``model`` id: ``models:/mtp/3`` -> ``mtp``, ``runs/x/final`` -> ``final``."""
        if self.model_name:
            return self.model_name
        text = str(self.model).rstrip("/")
        ref = ModelRef.parse(text)
        return ref.name if ref else Path(text).name or text

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "engine": self.engine.to_dict()}


    @classmethod
    def from_args(cls, args: dict[str, Any] | None = None) -> "ServeConfig":
        """Build and validate from Serve ``args``; unknown keys are errors.

        A relative checkpoint path is made absolute here, on the machine that builds
        the application, because replicas run in other directories.
        """
        cfg = build(cls, args or {}, "serve")
        if cfg.model and not cfg.model.startswith(URI_SCHEMES):
            cfg.model = str(Path(cfg.model).expanduser().resolve())
        return cfg.validate()
