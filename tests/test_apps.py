"""The example app runs against the SDK as a user would run it."""

from __future__ import annotations

import os
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


def test_coding_assistant_streams_a_conversation(tmp_path):
    """Two questions from a pipe: two replies, the second one the model's answer to the whole
    conversation (the same as the SDK gives for those messages)."""
    import edge

    src = tmp_path / "mod.py"
    src.write_text("def reverse(xs):\n    return xs[::-1]\n")
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "coding_assistant" / "assistant.py"), "--file", str(src),
                           "--max-tokens", "12"], input="what does reverse do?\nand for strings?\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(ROOT / "apps" / "coding_assistant"))
    import assistant

    history = [{"role": "system", "content": assistant.SYSTEM},
               {"role": "user", "content": f"Here is mod.py:\n{src.read_text()}"},
               {"role": "assistant", "content": "Read it. What would you like to know?"}]
    with edge.load() as m, open(os.devnull, "w") as sink:
        first = assistant.ask(m, history, "what does reverse do?", max_tokens=12, out=sink)
        second = assistant.ask(m, history, "and for strings?", max_tokens=12, out=sink)
        alone = assistant.ask(m, history[:3], "and for strings?", max_tokens=12, out=sink)
    assert first and proc.stdout == f"{first}\n{second}\n"
    assert second != alone  # the second answer depends on the conversation before it


def test_summarizer_keeps_answering_as_the_budget_drops(tmp_path):
    import edge

    bundle = tmp_path / "offload"
    edge.build(None, bundle, format="offload")
    doc = tmp_path / "doc.txt"
    doc.write_text("\n\n".join(t[:900] for t in stdlib_corpus().heldout_texts()[:3]))
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "summarizer" / "summarize.py"), str(doc), "-m",
                           str(bundle), "--budget", "200MB", "--floor", "160MB", "--section-chars", "800",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 3
    budgets = [line.split("budget ")[1].split(",")[0] for line in lines]
    # 200 MB down to 160 MB (the engine's smallest footprint is ~143 MiB here: 80.5 held + 62.3 headroom)
    assert budgets[0] == "191 MiB" and budgets[-1] == "153 MiB"
    assert all(line.split(": ", 1)[1].strip() for line in lines)  # an answer at every budget


def test_openai_client_example_against_edge_serve():
    from test_serve import Server

    server = Server()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "apps" / "openai_client" / "chat.py"), "sort a list",
                               "--base-url", server.url + "/v1", "--max-tokens", "6"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "6 completion tokens" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "apps" / "openai_client" / "chat.py"), "x", "--base-url",
                           "http://127.0.0.1:9/v1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no edge server" in proc.stderr
