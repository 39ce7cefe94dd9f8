"""The example app runs against the SDK as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge.data.corpus import stdlib_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_complete_code_app_suggests_a_continuation():
    target = stdlib_corpus().heldout_files[0]
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "complete_code.py"), str(target), "--line", "30",
                           "--max-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_complete_code_app_reports_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "complete_code.py"), str(tmp_path / "x.py"),
                           "--line", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
