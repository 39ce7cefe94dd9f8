"""The runtime stays light: importing edge and running a model never imports torch."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_import_edge_is_light():
    mods = _modules_after("import edge")
    assert "torch" not in mods and "transformers" not in mods
    assert "llama_cpp" not in mods and "onnxruntime" not in mods  # nothing heavy at import


def test_running_models_does_not_import_torch(tmp_path):
    code = (
        "import edge\n"
        "with edge.load() as m: m.create_completion('def f(', max_tokens=4)\n"
        f"edge.build(None, {str(tmp_path / 'b')!r}, format='gguf', weight_type='q8_0')\n"
        f"with edge.load({str(tmp_path / 'b')!r}) as m: m.create_completion('def f(', max_tokens=4)\n"
    )
    mods = _modules_after(code)
    assert "llama_cpp" in mods
    assert "torch" not in mods and "transformers" not in mods
