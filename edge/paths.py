"""Where edge keeps the files it derives (converted GGUFs, probe models, verification stamps,
cached profiles and routing): $EDGE_CACHE_DIR, else ~/.cache/edge."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("EDGE_CACHE_DIR") or Path.home() / ".cache" / "edge")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
