"""A document summarizer that keeps answering while its memory budget drops (the elastic offload
engine): each section of a document gets a one-line summary, and between sections the budget is
lowered, as a phone's OS would take memory back. The model resizes in place (expert cache, then
BitStack blocks where the bundle has them) and the summaries go on.

    python apps/summarizer/summarize.py DOC.txt -m OFFLOAD_BUNDLE --budget 600MB --floor 300MB
    python apps/summarizer/summarize.py DOC.txt -m OFFLOAD_BUNDLE --elastic   # follow the memory free
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edge
from edge.units import format_bytes, parse_bytes


def sections(text: str, chars: int) -> list[str]:
    """The document in pieces of about ``chars`` characters, cut at blank lines where possible."""
    out, cur = [], ""
    for block in text.split("\n\n"):
        if cur and len(cur) + len(block) > chars:
            out.append(cur)
            cur = ""
        cur += block + "\n\n"
    return out + ([cur] if cur.strip() else [])


def summarize(model: "edge.Model", section: str, max_tokens: int) -> str:
    r = model.create_chat_completion([{"role": "system", "content": "Summarize in one line."},
                                      {"role": "user", "content": section[-1500:]}],
                                     max_tokens=max_tokens, temperature=0)
    text = r["choices"][0]["message"]["content"].strip()
    return text.splitlines()[0] if text else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("document", type=Path)
    ap.add_argument("-m", "--model", required=True, help="an offload bundle (edge build MODEL --format offload)")
    ap.add_argument("--budget", default="600MB", help="the memory budget to start from")
    ap.add_argument("--floor", default="300MB", help="the budget it drops to by the last section")
    ap.add_argument("--elastic", action="store_true", help="follow the memory free instead of dropping on a schedule")
    ap.add_argument("--section-chars", type=int, default=1200)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    try:
        text = args.document.read_text(encoding="utf-8")
        start, floor = parse_bytes(args.budget), parse_bytes(args.floor)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = sections(text, args.section_chars)
    try:
        with edge.load(args.model, memory_budget=start) as model:
            if args.elastic:
                model.elastic(floor=floor)
            for i, part in enumerate(parts):
                if not args.elastic and len(parts) > 1:
                    budget = int(start - (start - floor) * i / (len(parts) - 1))
                    model.set_memory_budget(budget, reason=f"section {i + 1}")
                m = model.metrics()
                line = summarize(model, part, args.max_tokens)
                print(f"[{i + 1}/{len(parts)}] budget {format_bytes(m['memory_budget_bytes'])}, expert cache "
                      f"{format_bytes(m['expert_cache_bytes'])}: {line}", flush=True)
    except edge.EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
