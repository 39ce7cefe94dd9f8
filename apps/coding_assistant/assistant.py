"""A local coding assistant on the edge SDK: a conversation through the model's chat template,
replies streamed as they are written, optionally about a file you point it at.

    python apps/coding_assistant/assistant.py                      # interactive; /exit quits
    python apps/coding_assistant/assistant.py --file mod.py -m model.gguf --memory-budget 4GiB
    echo "how do I reverse a list?" | python apps/coding_assistant/assistant.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edge

SYSTEM = "You are a concise coding assistant. Answer with code where code answers best."


def ask(model: "edge.Model", history: list[dict], question: str, *, max_tokens: int, out=sys.stdout) -> str:
    """Stream the model's reply to ``question`` after ``history``; returns it and extends ``history``."""
    history.append({"role": "user", "content": question})
    reply = []
    for chunk in model.create_chat_completion(history, max_tokens=max_tokens, temperature=0.2, seed=0, stream=True):
        if chunk["choices"]:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    history.append({"role": "assistant", "content": "".join(reply)})
    return "".join(reply)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="model folder, GGUF or bundle (default: the embedded model)")
    ap.add_argument("--file", type=Path, help="a source file the conversation is about")
    ap.add_argument("--memory-budget", default=None, help="offload engine: stay under this (e.g. 4GiB)")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    history = [{"role": "system", "content": SYSTEM}]
    if args.file:
        try:
            source = args.file.read_text(encoding="utf-8")
        except OSError as e:
            print(f"error: {args.file}: {e.strerror}", file=sys.stderr)
            return 2
        history.append({"role": "user", "content": f"Here is {args.file.name}:\n{source[-4000:]}"})
        history.append({"role": "assistant", "content": "Read it. What would you like to know?"})
    try:
        with edge.load(args.model, memory_budget=args.memory_budget) as model:
            interactive = sys.stdin.isatty()
            while True:
                if interactive:
                    print("you> ", end="", flush=True)
                line = sys.stdin.readline()
                if not line or line.strip() == "/exit":
                    return 0
                if line.strip():
                    if interactive:
                        print("assistant> ", end="", flush=True)
                    ask(model, history, line.strip(), max_tokens=args.max_tokens)
    except edge.EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
