"""Edge bundle v1: a folder with manifest.json and checksummed weight files.

A bundle is written into a hidden temporary folder beside the target and renamed into place
only when complete, so an interrupted build leaves no bundle. Loading checks every file's size;
SHA-256 is checked on the first load of a file (remembered by size and mtime) or with verify=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from edge._version import __version__
from edge.errors import BundleError, field_error, read_json_object
from edge.paths import cache_dir
from edge.spec import ModelSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
class Progress(Protocol):
    """What a long job reports: a message, and for work measured in bytes or items, how far it is."""

    def __call__(self, msg: str, done: int | None = None, total: int | None = None) -> None: ...


def no_progress(msg: str, done: int | None = None, total: int | None = None) -> None:
    """A Progress that reports nothing."""


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    size_bytes: int
    sha256: str
    role: Literal["weights", "tokenizer", "experts", "bitstack"]


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["hf", "gguf"]  # tokenizer.json, or the tokenizer embedded in the GGUF
    file: str
    eos_ids: tuple[int, ...]
    bos_id: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int
    name: str
    format: Literal["gguf", "edge", "offload", "onnx"]
    weight_type: str  # gguf: f32/f16/q8_0/...; edge: f32/f16; onnx: int4/int8/f32
    spec: ModelSpec
    tokenizer: TokenizerInfo
    files: tuple[FileEntry, ...]
    tool: str
    created_unix: int
    source: str
    experts: dict | None = None  # offload bundles: the expert store's index (edge/quant/store.py)
    locality: dict | None = None  # offload bundles: SCH curves and hotness from a calibration trace
    bitstack: dict | None = None  # offload bundles with stacked attention: the stack's index (edge/quant/stack.py)
    onnx: dict | None = None  # onnx bundles: the graph's facts (edge/builder/onnx_graph.py write_onnx)

    def weights_file(self) -> FileEntry:
        return next(f for f in self.files if f.role == "weights")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def copy_tokenizer(tokenizer_json: Path, dest: Path) -> dict[str, str]:
    """Copy a Hugging Face tokenizer into a bundle being written: tokenizer.json and, where its folder
    has them, tokenizer_config.json (special tokens, chat template) and chat_template.jinja; returns
    the manifest roles of the files copied."""
    roles = {}
    for name in TOKENIZER_FILES:
        src = tokenizer_json if name == "tokenizer.json" else tokenizer_json.parent / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            roles[name] = "tokenizer"
    return roles


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: Path) -> Manifest:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an edge bundle (no {MANIFEST})")
    data = read_json_object(path, BundleError)
    if data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version")
        raise BundleError(f"{path}: schema version {found!r} is not supported (this edge reads {SCHEMA_VERSION})")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise BundleError(field_error(str(path), e)) from None


def _stamp_path(bundle: Path) -> Path:
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:24]
    return cache_dir("verified") / f"{key}.json"


def verify_bundle(bundle: Path, manifest: Manifest, *, full: bool = False,
                  progress: Progress | None = None) -> None:
    """Sizes always; hashes for files not yet verified in their current (size, mtime) or when full.
    An expert store is hashed only when full: its records are checked one by one as they are read."""
    stamp_file = _stamp_path(bundle)
    try:
        stamps = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamps = {}
    for entry in manifest.files:
        path = bundle / entry.path
        if not path.is_file():
            raise BundleError(f"bundle file {entry.path} is missing from {bundle}")
        st = path.stat()
        if st.st_size != entry.size_bytes:
            raise BundleError(
                f"bundle file {entry.path} is {st.st_size:,} bytes; the manifest says {entry.size_bytes:,}")
        seen = [st.st_size, st.st_mtime_ns, entry.sha256]
        if entry.role == "experts" and not full:
            continue  # every record carries its own checksums, checked as it is read (runtime/offload/store.py)
        if full or stamps.get(entry.path) != seen:
            if progress:
                progress(f"verifying {entry.path}")
            digest = sha256_file(path)
            if digest != entry.sha256:
                stamps.pop(entry.path, None)
                _write_json(stamp_file, stamps)
                raise BundleError(
                    f"bundle file {entry.path} fails its SHA-256 check (manifest {entry.sha256[:12]}…, "
                    f"file {digest[:12]}…): it is corrupted or was modified")
            stamps[entry.path] = seen
    _write_json(stamp_file, stamps)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _clean_stale(out: Path) -> None:
    """Remove temporary folders that earlier, killed builds of the same target left behind."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bundle(out: Path, *, force: bool, populate: Callable[[Path], dict],
                 progress: Progress | None = None) -> Manifest:
    """Create ``out`` atomically. ``populate(tmpdir)`` writes the files and returns the manifest
    fields except files/tool/created; this function hashes, writes the manifest and renames."""
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another -o or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = populate(tmp)
        roles = fields.pop("roles")
        entries = []
        for name, role in roles.items():
            if progress:
                progress(f"hashing {name}")
            path = tmp / name
            entries.append(FileEntry(path=name, size_bytes=path.stat().st_size, sha256=sha256_file(path), role=role))
        manifest = Manifest(schema_version=SCHEMA_VERSION, files=tuple(entries), tool=f"edge {__version__}",
                            created_unix=int(time.time()), **fields)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():  # --force: move the old bundle aside, then swap
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
