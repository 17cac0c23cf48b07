"""Inference for MTP models: static KV caches, vanilla and self-speculative decoding.

``Engine`` is the entry point (``mtp.decoding.engine``); the request/result types
(``mtp.decoding.api``) are what evaluation and Serve code against.
"""

from mtp.decoding.api import Generation, GenerationStats, SamplingParams
from mtp.decoding.engine import Engine
from mtp.decoding.tree import DraftTree

__all__ = ["DraftTree", "Engine", "Generation", "GenerationStats", "SamplingParams"]
