"""Inference for MTP models: static KV caches, vanilla and self-speculative decoding.

``reference`` is the specification: a batch-1 self-speculative decoder on the model's
own ``trunk``/``head``/``logits``, short enough to read in one sitting. ``Engine``
(``mtp.decoding.engine``) is the fast path, tested against it token for token and
step for step; ``Engine(model, tokenizer, EngineConfig(...))`` is the one way to build
one, and ``mtp.decoding.acceptance`` holds its acceptance rule. The request/result
types (``mtp.decoding.api``) are what evaluation and Serve code against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtp.lazy import exports

# public name -> its module, imported on first use: the config alone needs no torch (mtp.lazy)
_EXPORTS = {
    "DraftTree": "mtp.decoding.tree",
    "Engine": "mtp.decoding.engine",
    "EngineConfig": "mtp.decoding.config",
    "Generation": "mtp.decoding.api",
    "GenerationStats": "mtp.decoding.api",
    "RequestError": "mtp.decoding.api",
    "SamplingParams": "mtp.decoding.api",
    "reference": "mtp.decoding.reference",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(globals(), _EXPORTS)

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from mtp.decoding import reference
    from mtp.decoding.api import Generation, GenerationStats, RequestError, SamplingParams
    from mtp.decoding.config import EngineConfig
    from mtp.decoding.engine import Engine
    from mtp.decoding.tree import DraftTree
