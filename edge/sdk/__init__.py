"""The SDK: ``edge.load(...)`` returns a Model with OpenAI-shaped completions and chat completions."""

from edge.runtime.offload.options import OffloadOptions
from edge.sdk.loading import BACKENDS, load
from edge.sdk.model import Model, parse_budget

__all__ = ["BACKENDS", "Model", "OffloadOptions", "load", "parse_budget"]
