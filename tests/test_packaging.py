"""The package's shape: its layer contracts hold (import-linter), and the wheel a user installs
carries the data edge needs at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contracts_in_pyproject_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_the_wheel_carries_the_device_profiles_and_the_default_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {Path(n).stem for n in names if n.startswith("edge/device/hw-profiles/") and n.endswith(".yaml")}
    shipped = {p.stem for p in (ROOT / "edge" / "device" / "hw-profiles").glob("*.yaml")}
    assert profiles == shipped and "raspberry-pi-5-8gb" in profiles
    for f in ("config.json", "tokenizer.json", "model.safetensors", "generation_config.json"):
        assert f"edge/models/default/{f}" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_no_bench_script_shadows_an_installed_package():
    """Tests put bench/ on sys.path to import its model writers; a script there named like an
    installed package replaces it for everything imported after (transformers 5.25 imported
    bench/kernels.py for Hugging Face's `kernels` package and every tiny-checkpoint test failed)."""
    code = ("import importlib.util, pathlib, sys\n"
            f"names = sorted(p.stem for p in pathlib.Path({str(ROOT / 'bench')!r}).glob('*.py'))\n"
            "print(' '.join(n for n in names if importlib.util.find_spec(n) is not None))")
    # a fresh interpreter started outside the repository, so neither bench/ nor tests/ is on its path
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], f"bench scripts named like installed packages: {proc.stdout.strip()}"
