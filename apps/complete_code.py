"""Code completion in a text editor's style, built on the edge SDK.

Give it a Python file and a line number; it feeds the file up to that line to the model and
prints the suggested continuation, streaming, the way an editor plug-in would show ghost text.

    python apps/complete_code.py some_file.py --line 40
    python apps/complete_code.py some_file.py --line 40 --model my-bundle/ --max-tokens 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edge


def suggest(model: "edge.Model", source: str, line: int, *, max_tokens: int = 48) -> str:
    """The model's continuation of the first ``line`` lines, stopped at the next blank line."""
    prefix = "".join(source.splitlines(keepends=True)[:line])
    tokens = model.tokenize(prefix)
    budget = 1024 - max_tokens  # keep the prompt inside the context window: the tail matters most
    if len(tokens) > budget:
        prefix = model.detokenize(tokens[-budget:])
    result = model.create_completion(prefix, max_tokens=max_tokens, temperature=0, stop=["\n\n"])
    return result["choices"][0]["text"]


def main() -> int:
    ap = argparse.ArgumentParser(description="Suggest how a Python file continues at a given line.")
    ap.add_argument("file", type=Path)
    ap.add_argument("--line", type=int, required=True, help="complete after this many lines")
    ap.add_argument("--model", default=None, help="bundle, checkpoint or GGUF (default: embedded model)")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    try:
        source = args.file.read_text()
        with edge.load(args.model, n_ctx=1024) as model:
            print(suggest(model, source, args.line, max_tokens=args.max_tokens))
    except (edge.EdgeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
