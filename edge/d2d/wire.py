"""The control channel's framing: one JSON object per line, over an (authenticated) stream, with a
bound on a line's length so a peer cannot make the other side buffer without end."""

from __future__ import annotations

import asyncio
import json

from edge.errors import EdgeError

MAX_LINE = 1 << 20


class WireError(EdgeError):
    """The other side sent something that is not this protocol, or went away."""


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    if not line.endswith(b"\n"):
        raise WireError("the connection closed mid-message" if len(line) < MAX_LINE else "a message is too long")
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("a message is not JSON") from None
    if not isinstance(msg, dict):
        raise WireError("a message is not a JSON object")
    return msg


async def read_msg(reader: asyncio.StreamReader) -> dict:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        line = e.partial
    except asyncio.LimitOverrunError:
        raise WireError("a message is too long") from None
    return decode(line)


async def write_msg(writer: asyncio.StreamWriter, msg: dict) -> None:
    writer.write(encode(msg))
    await writer.drain()


def read_msg_sync(f) -> dict:
    """From a file made by ``socket.makefile('rb')``."""
    return decode(f.readline(MAX_LINE))
