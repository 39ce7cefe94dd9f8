"""The ``edge`` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def edge_cli(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_run_default_model_prints_generated_text():
    proc = edge_cli("run", "def fibonacci(", "--max-tokens", "24", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(")
    assert len(proc.stdout.strip()) > len("def fibonacci(") + 10


def test_stream_and_no_stream_print_the_same_text():
    args = ("run", "import ", "-n", "20", "--seed", "3")
    a, b = edge_cli(*args, "--stream"), edge_cli(*args, "--no-stream")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_inspect_hf_and_its_gguf_agree(default_dir, default_gguf_f32):
    a = json.loads(edge_cli("inspect", str(default_dir), "--json").stdout)
    b = json.loads(edge_cli("inspect", str(default_gguf_f32), "--json").stdout)
    arch_keys = [k for k in a if k not in ("dense_bytes", "expert_bytes", "weight_dtype", "source_format")]
    assert {k: a[k] for k in arch_keys} == {k: b[k] for k in arch_keys}
    assert a["arch"] == "mixtral" and a["n_layers"] == 4 and a["n_experts"] == 8 and a["top_k"] == 2
    assert a["expert_params"] == 4 * 8 * 3 * 128 * 256
    table = edge_cli("inspect")
    assert table.returncode == 0 and "mixtral" in table.stdout and "8 routed, top-2" in table.stdout


def test_missing_path(tmp_path):
    assert_one_line_error(edge_cli("inspect", str(tmp_path / "nope")), "no such file or folder")
    assert_one_line_error(edge_cli("run", "x", "-m", str(tmp_path / "nope")), "no such file or folder")


def test_truncated_safetensors(tmp_path, default_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(default_dir, bad)
    path = bad / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    proc = edge_cli("inspect", str(bad))
    assert_one_line_error(proc, "model.safetensors is truncated", f"{size:,}", f"{size // 2:,}")
    assert_one_line_error(edge_cli("run", "x", "-m", str(bad)), "truncated")


def test_dense_model_config_is_refused(tmp_path, default_dir):
    dense = tmp_path / "dense"
    shutil.copytree(default_dir, dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg["model_type"] = "llama"
    for key in ("num_local_experts", "num_experts_per_tok"):
        cfg.pop(key)
    (dense / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(edge_cli("inspect", str(dense)), "dense 'llama' model")


def test_text_file_named_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    assert_one_line_error(edge_cli("inspect", str(fake)), "model.gguf is not a GGUF file")
    assert_one_line_error(edge_cli("run", "x", "-m", str(fake)), "not a GGUF file")


def test_bad_options_change_nothing(tmp_path, default_dir):
    assert_one_line_error(edge_cli("run", "x", "--temperature", "-1"), "temperature must be >= 0")
    assert_one_line_error(edge_cli("run", "x", "--backend", "gpu"), "unknown backend 'gpu'")
    out = tmp_path / "b"
    assert_one_line_error(edge_cli("build", str(default_dir), "-o", str(out), "--type", "q9"), "unknown GGUF weight type")
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = edge_cli("--debug", "inspect", str(tmp_path / "nope"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_build_then_run_bundle(tmp_path, default_dir):
    out = tmp_path / "bundle"
    proc = edge_cli("build", str(default_dir), "-o", str(out), "--type", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file()
    run = edge_cli("run", "class ", "-m", str(out), "-n", "16", "-t", "0")
    assert run.returncode == 0 and run.stdout.startswith("class ") and len(run.stdout) > 10


@pytest.mark.parametrize("cmd", [["--help"], ["run", "--help"], ["build", "--help"], ["inspect", "--help"]])
def test_help(cmd):
    proc = edge_cli(*cmd)
    assert proc.returncode == 0 and "Usage" in proc.stdout
