"""The hardware profiler measures this machine, quickly, and caches what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from edge.device.profile import cached_profile, memory_bandwidth_gbps
from edge.hardware import HardwareProfile


def test_profile_measures_this_machine_in_seconds(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    t0 = time.time()
    p = cached_profile(refresh=True, storage_dir=where)
    assert time.time() - t0 < 30
    assert p.source == "measured" and p.cores_logical == psutil.cpu_count()
    assert p.ram_total_bytes == psutil.virtual_memory().total
    assert p.memory_bandwidth_gbps > 0.5 and p.gemv_q4_gflops > 0.1 and p.gemv_q8_gflops > 0.1
    assert p.storage_buffered_read_mbps > 1 and p.storage_path == str(where)
    assert not list(where.iterdir())  # the scratch file is gone
    assert p.usable_memory_bytes <= p.ram_total_bytes


def test_profile_is_cached_with_a_timestamp(tmp_path):
    first = cached_profile(refresh=True)
    t0 = time.time()
    again = cached_profile()
    assert time.time() - t0 < 1.0  # read from the cache, not measured again
    assert again.measured_unix == first.measured_unix
    assert HardwareProfile.from_dict(json.loads(json.dumps(again.to_dict()))) == again


def test_bandwidth_measure_agrees_with_itself():
    a, b = memory_bandwidth_gbps(64 << 20), memory_bandwidth_gbps(64 << 20)
    assert 0.5 < a / b < 2


def test_cli_profile_json_and_bad_storage(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edge.cli", "profile", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["cores_logical"] >= 1
    bad = subprocess.run([sys.executable, "-m", "edge.cli", "profile", "--storage", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "nope" in bad.stderr
