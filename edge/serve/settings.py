"""The server's settings: one pydantic model read from ``EDGE_*`` environment variables, with the
CLI's flags and SDK keyword arguments laid over them (``ServeSettings(**given)``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="forbid")

    model: str | None = Field(None, description="model folder, GGUF file or bundle; None: the embedded default model")
    host: str = Field("127.0.0.1", description="address to bind (loopback unless you mean it)")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Bearer key every request but /health must carry")
    concurrency: int = Field(1, ge=1, le=64, description="generations at once (each holds its own copy of the model)")
    queue_size: int = Field(8, ge=0, le=4096, description="requests that may wait for a generation slot")
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may take, waiting included")
    backend: str = "auto"
    memory_budget: str | None = None
    n_ctx: int | None = Field(None, ge=16)
    threads: int | None = Field(None, ge=1)
    chat_template: str | None = None
    peers: str | None = Field(None, description="run across paired peers: 'auto' (mDNS) or host:port,host:port")
    ep: str | None = Field(None, description="ONNX Runtime's execution provider (cpu, xnnpack, qnn, coreml, openvino)")

    @property
    def exposed(self) -> bool:
        return self.host not in LOOPBACK
