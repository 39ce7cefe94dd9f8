"""Bad input gets one clear line and exit code 2, and changes nothing: cut and damaged GGUFs, dense
GGUFs, types edge does not compute, budgets below the trunk, impossible configs; and a fuzz of the
GGUF, safetensors-header and manifest readers (random truncations, flipped bytes, absurd counts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import EdgeError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(p: subprocess.CompletedProcess, *parts: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory) -> Path:
    """A real Q4_K_M MoE GGUF made by llama.cpp's quantizer (the default model, 3.2 MiB)."""
    import edge

    out = tmp_path_factory.mktemp("gguf") / "b"
    edge.build(None, out, format="gguf", weight_type="q4_k_m")
    return out / "model.gguf"


def test_a_gguf_cut_inside_its_tensor_data_names_the_tensor_and_the_bytes(moe_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    size = moe_gguf.stat().st_size
    cut.write_bytes(moe_gguf.read_bytes()[: size - 100_000])
    for args in (("inspect", str(cut)), ("run", "x", "-m", str(cut), "--backend", "offload", "-n", "1"),
                 ("build", str(cut), "-o", str(tmp_path / "out"), "--format", "offload")):
        line = one_line_error(cli(*args), "cut.gguf is cut short: tensor", "bytes missing", f"ends at {size - 100_000:,}")
        assert "reshape" not in line
    assert not (tmp_path / "out").exists()


def test_a_gguf_cut_inside_its_header(moe_gguf, tmp_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(moe_gguf.read_bytes()[:5000])
    one_line_error(cli("inspect", str(cut)), "head.gguf is a damaged GGUF file (5,000 bytes)")


def test_a_damaged_length_in_the_metadata_is_refused_before_parsing(moe_gguf, tmp_path):
    """One flipped byte in the length of a metadata string sends a parser into the tensor data;
    gguf-py parsed garbage items there for 42 s and over 2 GiB (found by the fuzz test below).
    edge checks every length against the file first."""
    import gguf

    field = gguf.GGUFReader(str(moe_gguf)).fields["tokenizer.ggml.model"]
    at = field.offset + 8 + len("tokenizer.ggml.model") + 4 + 1   # the 2nd byte of the string's length
    data = bytearray(moe_gguf.read_bytes())
    data[at] ^= 187
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    one_line_error(cli("inspect", str(bad)), "bad.gguf is a damaged GGUF file", "is not a key")


def _tiny_gguf(path: Path, *, arch: str, experts: int, expert_type: str = "F32") -> Path:
    """A small GGUF written with gguf-py: a dense llama (experts=0) or a qwen3moe whose expert
    tensors have ``expert_type`` (bytes of the right size, random)."""
    import gguf

    from edge.formats.gguf_stream import TensorPlan, write_streaming
    from edge.runtime import ggml

    D, F, V = 256, 256, 64
    rng = np.random.default_rng(0)

    def meta(w) -> None:
        w.add_block_count(1)
        w.add_context_length(128)
        w.add_embedding_length(D)
        w.add_head_count(4)
        w.add_head_count_kv(4)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_feed_forward_length(F)
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(2)
            w.add_expert_feed_forward_length(F)

    def rand(name: str, shape: tuple[int, ...], tname: str = "F32") -> TensorPlan:
        gtype = ggml.type_id(tname)
        from edge.formats.gguf_stream import tensor_bytes

        n = tensor_bytes(gtype, shape)
        return TensorPlan(name, shape, gtype, lambda: rng.integers(0, 255, n, dtype=np.uint8) if tname != "F32"
                          else rng.standard_normal(shape).astype(np.float32))

    ts = [rand("token_embd.weight", (V, D)), rand("output_norm.weight", (D,)), rand("blk.0.attn_norm.weight", (D,)),
          rand("blk.0.attn_q.weight", (D, D)), rand("blk.0.attn_k.weight", (D, D)), rand("blk.0.attn_v.weight", (D, D)),
          rand("blk.0.attn_output.weight", (D, D)), rand("blk.0.ffn_norm.weight", (D,))]
    if experts:
        ts += [rand("blk.0.attn_q_norm.weight", (64,)), rand("blk.0.attn_k_norm.weight", (64,)),
               rand("blk.0.ffn_gate_inp.weight", (experts, D)),
               rand("blk.0.ffn_gate_exps.weight", (experts, F, D), expert_type),
               rand("blk.0.ffn_up_exps.weight", (experts, F, D), expert_type),
               rand("blk.0.ffn_down_exps.weight", (experts, D, F), expert_type)]
    else:
        ts += [rand("blk.0.ffn_gate.weight", (F, D)), rand("blk.0.ffn_up.weight", (F, D)), rand("blk.0.ffn_down.weight", (D, F))]
    write_streaming(path, arch, meta, ts)
    assert gguf.GGUFReader(str(path)).tensors  # a valid file
    return path


def test_a_dense_gguf_is_refused(tmp_path):
    dense = _tiny_gguf(tmp_path / "dense.gguf", arch="llama", experts=0)
    one_line_error(cli("inspect", str(dense)), "dense.gguf is a dense 'llama' model (no experts)")
    one_line_error(cli("run", "x", "-m", str(dense), "--memory-budget", "1GiB"), "dense 'llama' model")


def test_a_type_edge_does_not_compute_names_the_tensor_and_the_type(tmp_path):
    odd = _tiny_gguf(tmp_path / "iq2.gguf", arch="qwen3moe", experts=4, expert_type="IQ2_XXS")
    out = tmp_path / "out"
    for args in (("run", "x", "-m", str(odd), "--backend", "offload", "-n", "1"),
                 ("build", str(odd), "-o", str(out), "--format", "offload")):
        one_line_error(cli(*args), "tensor blk.0.ffn_gate_exps.weight is IQ2_XXS, which edge does not compute")
    assert not out.exists()


def test_a_budget_below_the_trunk_is_refused_before_loading(moe_gguf):
    line = one_line_error(cli("run", "x", "-m", str(moe_gguf), "--memory-budget", "2MiB", "-n", "1"),
                          "memory budget 2 MiB is below what must stay resident")
    assert "dense weights" in line and "KV cache for 2048 tokens" in line


def test_an_impossible_config_is_one_line(tmp_path, default_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(default_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_local_experts"] = -3
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("inspect", str(bad)), "config.json describes an impossible model", "n_experts", "-3")
    one_line_error(cli("build", str(bad), "-o", str(tmp_path / "out"), "--format", "offload"), "impossible model")
    assert not (tmp_path / "out").exists()


# --- fuzz: the readers give clean errors only -------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutations(data: bytes):
    return st.one_of(
        st.integers(0, len(data)).map(lambda n: data[:n]),  # truncation
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
            lambda flips: _flip(data, flips)),  # flipped bytes
        st.tuples(st.sampled_from([8, 16]), st.integers(2**20, 2**63 - 1)).map(
            lambda c: data[: c[0]] + int(c[1]).to_bytes(8, "little") + data[c[0] + 8:]),  # absurd tensor/kv counts
    )


def _flip(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for at, x in flips:
        b[at] ^= x
    return bytes(b)


def _header_of(gguf_path: Path, n: int = 200_000) -> bytes:
    return gguf_path.read_bytes()[:n]


@pytest.fixture(scope="module")
def gguf_bytes(moe_gguf) -> bytes:
    return moe_gguf.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_the_gguf_reader(gguf_bytes, tmp_path_factory, data):
    from edge.formats.gguf_read import open_reader, read_spec

    head = data.draw(_mutations(gguf_bytes[:60_000]))  # the header and tensor table live here
    path = tmp_path_factory.mktemp("fz") / "m.gguf"
    path.write_bytes(head + gguf_bytes[len(head):] if len(head) == 60_000 else head)
    try:
        read_spec(path, open_reader(path))
    except EdgeError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(data=st.data())
def test_fuzz_the_safetensors_header_reader(default_dir, tmp_path_factory, data):
    from edge.formats.safetensors_io import read_header

    raw = (default_dir / "model.safetensors").read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    head = data.draw(_mutations(raw[: 8 + hlen]))
    path = tmp_path_factory.mktemp("fz") / "model.safetensors"
    path.write_bytes(head + raw[len(head):] if len(head) == 8 + hlen else head)
    try:
        read_header(path)
    except EdgeError as e:
        assert str(e) and "\n" not in str(e)


@pytest.fixture(scope="module")
def manifest_text(tmp_path_factory) -> str:
    import edge

    out = tmp_path_factory.mktemp("b") / "b"
    edge.build(None, out, format="gguf", weight_type="q8_0")
    return (out / "manifest.json").read_text()


@FUZZ
@given(data=st.data())
def test_fuzz_the_manifest_reader(manifest_text, tmp_path_factory, data):
    from edge.formats.bundle import read_manifest

    text = data.draw(_mutations(manifest_text.encode()))
    bundle = tmp_path_factory.mktemp("fz")
    (bundle / "manifest.json").write_bytes(text)
    try:
        read_manifest(bundle)
    except EdgeError as e:
        assert str(e) and "\n" not in str(e)


def test_usage_errors_are_clean():
    """An unknown command or a missing argument: click's usage message, exit 2, no traceback (typer
    >= 0.26 raises its vendored copy of click's exceptions, which the entry point once let through)."""
    for args, words in ((("nosuch",), "No such command 'nosuch'"), (("run",), "Missing argument 'prompt'")):
        p = cli(*args)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
