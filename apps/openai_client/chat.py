"""Talk to a running ``edge serve`` with the official ``openai`` client, unchanged: the model list,
a streamed chat reply, and the token counts the server reports.

    edge serve &                                     # or: edge serve model.gguf --api-key KEY
    python apps/openai_client/chat.py "How do I read a file in Python?"
    python apps/openai_client/chat.py --base-url http://127.0.0.1:8000/v1 --api-key KEY "..."
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("EDGE_API_KEY", "none"))
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.question}],
                                                max_tokens=args.max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            if chunk.usage:
                usage = chunk.usage
    except openai.APIConnectionError:
        print(f"error: no edge server at {args.base_url} (start one with `edge serve`)", file=sys.stderr)
        return 2
    except openai.APIStatusError as e:
        print(f"error: {e.status_code} {e.message}", file=sys.stderr)
        return 2
    print()
    if usage:
        print(f"[{model}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
