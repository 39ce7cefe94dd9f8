"""The request bodies the server accepts, as pydantic models of OpenAI's fields. What edge does
not do is refused with a 400 naming the field, never ignored: ``n`` > 1, ``best_of`` > 1,
``tools`` / ``functions``, a ``response_format`` other than text, ``echo``, ``suffix``,
``logit_bias``; unknown fields too (``extra="forbid"``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def unsupported(self) -> str | None:
        """Why this request cannot be served as asked, or None."""
        if self.n != 1:
            return f"n={self.n}: edge generates one choice per request"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not implemented"
        if self.stream_options is not None and not self.stream:
            return "stream_options needs stream=true"
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return f"stop takes at most 4 strings, got {len(self.stop)}"
        return None


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not implemented"
        if self.suffix:
            return "suffix (fill-in-the-middle) is not implemented"
        if self.best_of not in (None, 1):
            return f"best_of={self.best_of}: edge generates one choice per request"
        if self.logit_bias:
            return "logit_bias is not implemented"
        return super().unsupported()


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools are not implemented"
        if self.response_format and self.response_format.get("type") != "text":
            return f"response_format {self.response_format.get('type')!r}: only 'text' is implemented"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs=true"
        if self.logit_bias:
            return "logit_bias is not implemented"
        return super().unsupported()


class BudgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory_budget: str | int
