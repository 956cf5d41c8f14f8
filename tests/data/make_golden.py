"""Regenerate tests/data/golden_smollm2.json: reference outputs of Hugging Face transformers for the
SmolLM2-135M-Instruct Q4_1 GGUF (dequantised by transformers, run in fp32 on CPU).

    pip install -e '.[golden]'
    python tests/data/make_golden.py [--gguf PATH] [--out PATH]

Needs torch + transformers; the tests only read the JSON it writes and never import this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = ROOT / "checkpoints/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent / "golden_smollm2.json"
MAX_NEW_TOKENS = 32

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 3.14159 and 1,000,000 items in 2024",
    "  two leading spaces, trailing   \n\n\tTabs\t\tand\r\nCRLF\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Café, naïve, résumé, Ünïcödé, Straße, ångström",
    "日本語のテキストと中文，还有한국어",
    "Emoji 🤖🎉👍🏽 and a ZWJ family 👨‍👩‍👧 ✨",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    " It's we'll they've I'M   ",
    '{"key": [1, 2.5e-3, null], "url": "https://example.com/a?b=c&d=e"}',
    "<|endoftext|><repo_name>jaxserve<file_sep>README.md",
    "\u00a0non-breaking\u3000ideographic space\u200bzero-width",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": "Name a primary colour."},
    ],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,"},
        {"role": "user", "content": "Now one about mountains 🏔️."},
    ],
]

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def teacher_forced(model, ids: list[int]) -> tuple[list[float], list[float]]:
    """For t >= 1: log p(ids[t] | ids[:t]), and its margin over the best other token (negative
    where the full-sequence forward would not pick ids[t] greedily)."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()  # [T-1, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ids[1:])[:, None]  # [T-1, 1]
    picked = logprobs.gather(1, target)[:, 0]  # [T-1]
    best_other = logprobs.scatter(1, target, float("-inf")).max(dim=-1).values  # [T-1]
    margin = picked - best_other
    return [round(float(x), 6) for x in picked], [round(float(x), 6) for x in margin]


@torch.no_grad()
def greedy(model, prompt_ids: list[int], eos_ids: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
    )
    return out[0, len(prompt_ids) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    gguf_path: Path = args.gguf.resolve()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    print(f"load: {time.perf_counter() - t0:.1f}s", flush=True)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [tok.eos_token_id])

    t = time.perf_counter()
    tokenize = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in TEXTS]
    chat = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else list(enc)
        chat.append(
            {"messages": messages, "add_generation_prompt": True, "text": text, "ids": list(ids)}
        )
    print(f"tokenizer: {time.perf_counter() - t:.1f}s", flush=True)

    prompts = [("raw", p, tok.encode(p, add_special_tokens=False)) for p in RAW_PROMPTS]
    prompts += [("chat", c["messages"], c["ids"]) for c in chat]
    generate = []
    for kind, prompt, prompt_ids in prompts:
        t = time.perf_counter()
        output_ids = greedy(model, prompt_ids, eos_ids)
        t_gen = time.perf_counter() - t
        logprobs, margins = teacher_forced(model, prompt_ids + output_ids)
        generate.append(
            {
                "kind": kind,
                "prompt": prompt if kind == "raw" else None,
                "messages": prompt if kind == "chat" else None,
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "output_text": tok.decode(output_ids, skip_special_tokens=False),
                "stopped_on_eos": bool(output_ids) and output_ids[-1] in eos_ids,
                "logprobs": logprobs,
                "output_margin": margins[len(prompt_ids) - 1 :],
            }
        )
        print(
            f"generate[{kind}] {len(prompt_ids)}+{len(output_ids)} tokens: {t_gen:.1f}s, "
            f"teacher-forced: {time.perf_counter() - t - t_gen:.1f}s "
            f"-> {generate[-1]['output_text']!r}",
            flush=True,
        )

    golden = {
        "meta": {
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha256(gguf_path),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
            "dtype": "float32",
            "device": "cpu",
            "max_new_tokens": MAX_NEW_TOKENS,
            "generated_by": "tests/data/make_golden.py",
        },
        "special": {
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": eos_ids,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        },
        "tokenize": tokenize,
        "chat": chat,
        "generate": generate,
    }
    args.out.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.1f} KiB) in {time.perf_counter() - t0:.1f}s total")


if __name__ == "__main__":
    sys.exit(main())
