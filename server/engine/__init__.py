"""The inference engine: a model runner with a batched KV cache, a continuous-batching
scheduler on its own thread, sampling, and hot model swaps for requantization.

It speaks tokens and images, not HTTP: `server.serving` turns OpenAI requests into
`GenerationRequest`s and events back into responses.
"""

from server.engine.engine import Engine, EngineOverloaded
from server.engine.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams

__all__ = [
    "Engine",
    "EngineOverloaded",
    "FinishReason",
    "GenerationEvent",
    "GenerationRequest",
    "SamplingParams",
]
