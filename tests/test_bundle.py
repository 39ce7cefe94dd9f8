"""Edge bundles: atomic builds, verification on load, tamper detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import edge
from edge.errors import BundleError
from edge.formats.bundle import read_manifest


@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory, default_dir):
    out = tmp_path_factory.mktemp("b") / "bundle"
    edge.build(default_dir, out, format="gguf", weight_type="q8_0")
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_manifest_lists_files_with_sizes_and_hashes(gguf_bundle):
    m = read_manifest(gguf_bundle)
    assert m.schema_version == 1 and m.format == "gguf" and m.weight_type == "q8_0"
    assert m.spec.n_experts == 8 and m.spec.weight_dtype == "Q8_0"
    (entry,) = m.files
    assert entry.path == "model.gguf"
    assert entry.size_bytes == (gguf_bundle / "model.gguf").stat().st_size
    assert len(entry.sha256) == 64
    assert not list(gguf_bundle.parent.glob(".bundle.tmp-*"))


@pytest.mark.parametrize("fmt,backend", [("gguf", "llamacpp"), ("edge", "reference")])
def test_bundle_loads_and_generates(tmp_path, default_dir, fmt, backend):
    out = tmp_path / "b"
    edge.build(default_dir, out, format=fmt)
    with edge.load(out) as m:
        assert m.backend_name == backend
        text = m.create_completion("def fibonacci(", max_tokens=12, temperature=0)["choices"][0]["text"]
    with edge.load(default_dir) as ref:
        want = ref.create_completion("def fibonacci(", max_tokens=12, temperature=0)["choices"][0]["text"]
    assert text.strip()
    if fmt == "edge":  # f32 weights: identical to the checkpoint
        assert text == want


def test_flipped_byte_is_detected_even_after_a_good_load(tmp_path, gguf_bundle):
    b = _copy(gguf_bundle, tmp_path / "b")
    edge.load(b).close()  # first load hashes and remembers the file
    path = b / "model.gguf"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(BundleError, match=r"model\.gguf fails its SHA-256 check"):
        edge.load(b)
    with pytest.raises(BundleError, match="SHA-256"):  # and it keeps failing
        edge.load(b)


def test_truncated_file_is_a_size_error(tmp_path, gguf_bundle):
    b = _copy(gguf_bundle, tmp_path / "b")
    path = b / "model.gguf"
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(BundleError, match=f"model.gguf is {size - 100:,} bytes; the manifest says {size:,}"):
        edge.load(b)


def test_verify_rehashes_files(tmp_path, gguf_bundle):
    b = _copy(gguf_bundle, tmp_path / "b")
    edge.load(b).close()
    path = b / "model.gguf"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a re-hash sees it
    edge.load(b).close()
    with pytest.raises(BundleError, match="SHA-256"):
        edge.load(b, verify=True)


def test_existing_target_is_refused_and_force_replaces(tmp_path, default_dir):
    out = tmp_path / "b"
    edge.build(default_dir, out, format="gguf", weight_type="q4_0")
    with pytest.raises(edge.EdgeError, match="already exists"):
        edge.build(default_dir, out, format="gguf", weight_type="q8_0")
    assert read_manifest(out).weight_type == "q4_0"
    edge.build(default_dir, out, format="gguf", weight_type="q8_0", force=True)
    assert read_manifest(out).weight_type == "q8_0"
    assert not list(tmp_path.glob(".b.*"))  # no temporary or old copies left behind


def test_killed_build_leaves_no_bundle(tmp_path, default_dir):
    out = tmp_path / "killed"
    code = f"import edge; edge.build({str(default_dir)!r}, {str(out)!r}, format='gguf', weight_type='q4_0')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".killed.tmp-*")) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".killed.tmp-*")), "the build never started writing"
    assert not out.exists()
    with pytest.raises(edge.EdgeError, match="no such file"):
        edge.load(out)
    # The next build of the same target succeeds and sweeps the dead build's leftovers.
    edge.build(default_dir, out, format="gguf", weight_type="q4_0")
    assert read_manifest(out).weight_type == "q4_0"
    assert not list(tmp_path.glob(".killed.tmp-*"))


def test_build_failing_midway_cleans_up(tmp_path, default_dir):
    src = _copy(default_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 512  # the tensors say 256: found only while writing weights
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(edge.EdgeError, match=r"has shape \[256, 128\], config implies \[512, 128\]"):
        edge.build(src, out, format="gguf")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_malformed_manifest_names_the_field(tmp_path, gguf_bundle):
    b = _copy(gguf_bundle, tmp_path / "b")
    data = json.loads((b / "manifest.json").read_text())
    data["files"][0]["size_bytes"] = "many"
    (b / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"field 'files\.0\.size_bytes'"):
        edge.load(b)
