"""Inference for MTP models: static KV caches, vanilla and self-speculative decoding.

``reference`` is the specification: a batch-1 self-speculative decoder on the model's
own ``trunk``/``head``/``logits``, short enough to read in one sitting. ``Engine``
(``mtp.decoding.engine``) is the fast path, tested against it token for token and
step for step; ``Engine(model, tokenizer, EngineConfig(...))`` is the one way to build
one, and ``mtp.decoding.acceptance`` holds its acceptance rule. The request/result
types (``mtp.decoding.api``) are what evaluation and Serve code against.
"""

from mtp.decoding import reference
from mtp.decoding.api import Generation, GenerationStats, RequestError, SamplingParams
from mtp.decoding.config import EngineConfig
from mtp.decoding.engine import Engine
from mtp.decoding.tree import DraftTree

__all__ = ["DraftTree", "Engine", "EngineConfig", "Generation", "GenerationStats", "RequestError", "SamplingParams", "reference"]
