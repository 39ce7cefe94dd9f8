"""Train edge's embedded default model: a tiny Mixtral-architecture MoE on the Python stdlib.

    python scripts/train_default_model.py --out edge/models/default

Needs the ``convert`` extra (torch, transformers). Seeded and deterministic up to CPU float
reduction order; about 18 minutes on 2 cores. Writes a Hugging Face checkpoint (config.json,
model.safetensors), the trained tokenizer (tokenizer.json) and training.json (hyperparameters,
loss curve, held-out perplexity next to a unigram baseline, greedy samples).
See docs/default-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.data.corpus import EOT, stdlib_corpus  # noqa: E402

# Model shape: >= 4 layers, >= 8 experts, top-2 (issue 2), small enough to train on 2 cores in
# ~20 minutes and to ship as fp32 under 25 MB (4.5 M parameters, 18 MB).
CONFIG = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    router_aux_loss_coef=0.02,  # keeps experts in use; Mixtral's own default
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    sliding_window=None,
)
SEQ = 256
SAMPLE_PROMPTS = ["def fibonacci(", "import os\n", "class Queue:\n"]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # Byte-level BPE with the GPT-2 pre-tokenizer regex: llama.cpp knows it as pre-tokenizer "gpt-2".
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def unigram_perplexity(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[held].mean()))


def model_perplexity(model, held: np.ndarray) -> float:
    import torch

    n = (len(held) - 1) // SEQ
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 16):
            rows = [held[j * SEQ : j * SEQ + SEQ + 1] for j in range(i, min(n, i + 16))]
            x = torch.from_numpy(np.stack(rows))
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def greedy(model, tok, prompt: str, n: int = 64) -> str:
    import torch

    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("edge/models/default"))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    corpus = stdlib_corpus()
    train_texts, held_texts = corpus.train_texts(), corpus.heldout_texts()
    tok = train_tokenizer(train_texts, CONFIG["vocab_size"])
    train_ids, held_ids = encode_stream(tok, train_texts), encode_stream(tok, held_texts)
    print(f"corpus: {len(corpus.train_files)} train files ({len(train_ids)} tokens), "
          f"{len(corpus.heldout_files)} held-out files ({len(held_ids)} tokens)", flush=True)

    config = MixtralConfig(**CONFIG, output_router_logits=True)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses = []
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, len(train_ids) - SEQ - 1, size=args.batch)
        x = torch.from_numpy(np.stack([train_ids[s : s + SEQ + 1] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = lm + config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(lm.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {float(lm):.3f}  aux {float(out.aux_loss):.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    ppl = model_perplexity(model, held_ids)
    uni = unigram_perplexity(train_ids, held_ids, CONFIG["vocab_size"])
    samples = {p: greedy(model, tok, p) for p in SAMPLE_PROMPTS}
    print(f"held-out perplexity {ppl:.2f}  (unigram baseline {uni:.2f})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save(str(args.out / "tokenizer.json"))
    report = {
        "config": CONFIG, "seq_len": SEQ, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "parameters": n_params,
        "train_files": len(corpus.train_files), "heldout_files": len(corpus.heldout_files),
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
        "corpus_root": str(corpus.root), "python": sys.version.split()[0],
        "heldout_perplexity": ppl, "unigram_perplexity": uni,
        "loss_every_50": losses[::50], "seconds": time.time() - t0, "greedy_samples": samples,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    for p, s in samples.items():
        print("-" * 60, "\n" + s)


if __name__ == "__main__":
    main()
