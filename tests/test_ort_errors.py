"""Bad input to the ONNX Runtime backend: one clear line, exit 2, nothing changed. Damaged bundle
files, execution providers this onnxruntime lacks, operators it does not implement, and files
ONNX Runtime cannot parse, each on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import edge
from edge.errors import EdgeError, UnsupportedModelError
from edge.runtime.ort import OrtBackend
from test_bad_input import cli, one_line_error


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ortbad") / "default-int4"
    edge.build(None, out, format="onnx")
    return out


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def _spec(bundle: Path):
    from edge.formats.bundle import read_manifest

    return read_manifest(bundle).spec


def test_missing_execution_provider_names_the_package(bundle):
    line = one_line_error(cli("run", "x", "-m", str(bundle), "--ep", "qnn", "-n", "2"), "qnn", "onnxruntime-qnn")
    assert "it has cpu" in line
    one_line_error(cli("run", "x", "-m", str(bundle), "--ep", "openvino", "-n", "2"), "onnxruntime-openvino")
    one_line_error(cli("run", "x", "-m", str(bundle), "--ep", "tpu", "-n", "2"), "unknown execution provider 'tpu'")
    one_line_error(cli("run", "x", "--backend", "llamacpp", "--ep", "cpu", "-n", "2"), "--ep", "llamacpp")


def test_wrong_backend_or_type(bundle, tmp_path):
    one_line_error(cli("run", "x", "-m", str(bundle), "--backend", "llamacpp", "-n", "2"), "onnx bundle", "ONNX Runtime")
    one_line_error(cli("build", "-o", str(tmp_path / "o"), "--format", "onnx", "--type", "q4_k_m"), "int4, int8 or f32")
    assert not (tmp_path / "o").exists()


def test_damaged_external_weights(copy):
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    one_line_error(cli("run", "x", "-m", str(copy), "-n", "2"), "model.onnx.data", "SHA-256")
    with open(data, "r+b") as f:
        f.truncate(1000)
    one_line_error(cli("run", "x", "-m", str(copy), "-n", "2"), "model.onnx.data", "1,000 bytes")


def test_onnx_runtime_load_errors_are_one_line(copy):
    """What the bundle's checksums would catch first, met by the backend itself (a bundle edited
    after its manifest was written): ONNX Runtime's own failures become one line."""
    spec = _spec(copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(EdgeError, match=r"external weights do not match the graph") as e:
        OrtBackend(copy / "model.onnx", spec, n_ctx=64, max_context=2048, n_threads=1)
    assert "\n" not in str(e.value)
    (copy / "model.onnx").write_bytes(b"\x08\x07 not a protobuf" * 50)
    with pytest.raises(EdgeError, match=r"cannot load it .*Protobuf parsing failed"):
        OrtBackend(copy / "model.onnx", spec, n_ctx=64, max_context=2048, n_threads=1)


@pytest.mark.parametrize("op, words", [("BiasAdd", r"BiasAdd \(version 1\) is not implemented by onnxruntime"),
                                       ("NoSuchOp", "com.microsoft:NoSuchOp is unknown to onnxruntime")])
def test_operator_this_onnxruntime_lacks(op, words, bundle, tmp_path):
    """A graph with an operator that has no CPU kernel in this onnxruntime (BiasAdd: CUDA only), or
    one it has never heard of (a bundle made for a newer release)."""
    import onnx_ir as ir
    from onnx_ir import tape

    t = tape.Tape()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4, 8]))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8]))
    y = t.op(op, [x, b, x], {}, domain="com.microsoft")
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x, b], [y], nodes=t.nodes, opset_imports={"": 21, "com.microsoft": 1})
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedModelError, match=words) as e:
        OrtBackend(tmp_path / "model.onnx", _spec(bundle), n_ctx=64, max_context=2048, n_threads=1)
    assert "\n" not in str(e.value)


def test_serve_refuses_a_missing_provider_before_starting(bundle):
    one_line_error(cli("serve", str(bundle), "--ep", "coreml", "--port", "0"), "coreml", "macOS")
