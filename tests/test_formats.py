"""Model ingest: sharded and BF16 safetensors, GGUF round trips, damaged files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge
from edge.errors import ModelFormatError, UnsupportedModelError
from edge.formats import gguf_read, hf


def _shard(src, dst):
    """Re-save a checkpoint as two shards plus an index."""
    from safetensors.numpy import save_file

    from edge.formats import safetensors_io as st

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    infos = st.read_header(src / "model.safetensors")
    names = sorted(infos)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        tensors = {}
        for n in part:
            tensors[n] = st.load(infos[n])
        save_file(tensors, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_reads_the_same(tmp_path, default_dir):
    sharded = _shard(default_dir, tmp_path / "sharded")
    assert hf.read_spec(sharded) == hf.read_spec(default_dir)
    a, b = hf.load_weights(default_dir), hf.load_weights(sharded)
    assert all((x.down == y.down).all() for x, y in zip(a.layers, b.layers))


def test_bf16_tensors_are_widened_exactly(tmp_path, default_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edge.formats import safetensors_io as st

    bf16 = tmp_path / "bf16"
    shutil.copytree(default_dir, bf16)
    infos = st.read_header(default_dir / "model.safetensors")
    save_file({n: torch.from_numpy(st.load(i)).to(torch.bfloat16) for n, i in infos.items()},
              str(bf16 / "model.safetensors"))
    spec = hf.read_spec(bf16)
    assert spec.weight_dtype == "BF16" and spec.expert_bytes * 2 == hf.read_spec(default_dir).expert_bytes
    got = hf.load_weights(bf16).layers[0].gate
    want = torch.from_numpy(hf.load_weights(default_dir).layers[0].gate).to(torch.bfloat16).float().numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("outtype,dtype", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_gguf_types_keep_the_architecture(tmp_path, default_dir, outtype, dtype):
    from edge.formats.gguf_write import write_gguf

    out = tmp_path / f"m-{outtype}.gguf"
    write_gguf(hf.load_weights(default_dir), default_dir / "tokenizer.json", out, outtype=outtype, bos_id=0, eos_id=0)
    spec = gguf_read.read_spec(out)
    assert spec.architecture() == hf.read_spec(default_dir).architecture()
    assert spec.weight_dtype == dtype
    w = gguf_read.load_weights(out)  # dequantized: close to the original
    ref = hf.load_weights(default_dir)
    err = np.abs(w.layers[0].gate - ref.layers[0].gate).max() / np.abs(ref.layers[0].gate).max()
    assert err < {"f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.2}[outtype]


def test_truncated_gguf_names_the_sizes(tmp_path, default_gguf_f32):
    bad = tmp_path / "cut.gguf"
    data = default_gguf_f32.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="cut.gguf"):
        edge.inspect(bad)


def test_qwen_checkpoints_are_read(tiny_qwen2, tiny_qwen3):
    s2, s3 = hf.read_spec(tiny_qwen2), hf.read_spec(tiny_qwen3)
    assert (s2.arch, s2.n_shared_experts, s2.shared_expert_ffn_size, s2.attn_bias) == ("qwen2_moe", 1, 64, True)
    assert (s3.arch, s3.qk_norm, s3.head_dim, s3.norm_topk_prob) == ("qwen3_moe", True, 16, True)
    assert s2.expert_params == 2 * 8 * 3 * 64 * 32  # shared expert counts as dense


def test_unsupported_rope_scaling(tmp_path, default_dir):
    d = tmp_path / "m"
    shutil.copytree(default_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn'"):
        hf.read_spec(d)
