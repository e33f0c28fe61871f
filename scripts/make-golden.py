#!/usr/bin/env python3
"""Produce golden outputs from llama.cpp for prima's engine tests.

Runs llama.cpp (through llama-cpp-python, built from source by
scripts/llama-venv) on the real models and writes
kernels/tests/data/llama-cpp-golden.json. Not run in CI: CI only reads the
JSON this writes. Usage:

    scripts/llama-venv                       # once: builds llama.cpp (minutes)
    ~/.cache/prima/llama-venv/bin/python scripts/make-golden.py
"""
import json, os, subprocess, sys
from pathlib import Path

from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
models = subprocess.run([ROOT / "scripts/fetch-models"], check=True, capture_output=True, text=True).stdout.split()
SMOL, GEMMA = models

LONG = ("The history of computing is a story of people finding ways to make machines do arithmetic, "
        "then logic, then language. Early mechanical calculators could add and subtract; later, "
        "electromechanical relays and vacuum tubes made programmable computers possible. In the "
        "decades that followed, transistors and integrated circuits shrank these machines from rooms "
        "to desks to pockets. Today, a household might own a dozen devices, each with")

TOKENIZE = [
    "Hello, world!",
    "  leading spaces and   runs   of\twhitespace\n\n\nnewlines",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "unicode: café, naïve, Ærøskøbing, 日本語のテキスト, Ελληνικά, русский",
    "emoji 🦀🚀 👍🏽 family 👨‍👩‍👧",
    "code: fn main() { println!(\"{}\", x + 1); } // done",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn> literal specials",
]


def generate(llm, ids, n):
    # Forget the previous case: llama-cpp-python would otherwise keep the
    # common prefix (the BOS token) computed in the previous case's batch,
    # whose size sets llama.cpp's summation orders.
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if llm.token_eos() == t or t in (llm.token_eos(),):
            break
        out.append(t)
        if len(out) >= n:
            break
    return out


REFERENCE = json.loads((ROOT.parent / "shared/reference/llama-cpp-reference.json").read_text()) \
    if (ROOT.parent / "shared/reference/llama-cpp-reference.json").exists() \
    else json.loads((ROOT / "kernels/tests/data/llama-cpp-reference.json").read_text())


def model_cases(path, chat):
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2, verbose=False, flash_attn=True)
    cases = []
    # The shared reference prompts again, answered by the llama.cpp built
    # here: where a build of llama.cpp elsewhere broke a near-tie the other
    # way, the shared file and this one part, and this one is what the
    # engine is held to token for token.
    for ref in REFERENCE["models"][Path(path).name]["cases"]:
        ids = ref["prompt_ids"]
        out = generate(llm, ids, len(ref["output_ids"]))
        cases.append({"name": "here:" + ref["prompt"], "prompt": ref["prompt"], "chat": False,
                      "prompt_ids": ids, "output_ids": out,
                      "output": llm.detokenize(out).decode("utf-8", "replace")})
    ids = llm.tokenize(LONG.encode(), add_bos=True, special=False)
    assert len(ids) > 64, len(ids)
    out = generate(llm, ids, 128)
    cases.append({"name": "long-prompt-128", "prompt": LONG, "chat": False, "prompt_ids": ids,
                  "output_ids": out, "output": llm.detokenize(out).decode("utf-8", "replace")})
    if chat:
        msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
        from jinja2 import Template
        tmpl = llm.metadata["tokenizer.chat_template"]
        rendered = Template(tmpl).render(messages=msgs, add_generation_prompt=True)
        ids = llm.tokenize(rendered.encode(), add_bos=True, special=True)
        out = generate(llm, ids, 64)
        cases.append({"name": "chat-poem", "prompt": msgs[0]["content"], "chat": True,
                      "rendered_prompt": rendered, "prompt_ids": ids, "output_ids": out,
                      "output": llm.detokenize(out).decode("utf-8", "replace")})
    # Logits, to the last bit: the long prompt and its answer evaluated as
    # one batch, and as generation evaluates them (the prompt as a batch,
    # then one token at a time). For each position the three best ids and
    # their logits, which are f32 values and survive JSON exactly.
    lp = next(c for c in cases if c["name"] == "long-prompt-128")
    seq = lp["prompt_ids"] + lp["output_ids"]
    n_prompt = len(lp["prompt_ids"])
    def top3(scores):
        out = []
        for row in scores:
            ids = sorted(range(len(row)), key=lambda i: -row[i])[:3]
            out.append([[i, float(row[i])] for i in ids])
        return out
    lg = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2, verbose=False, flash_attn=True,
               logits_all=True)
    lg.eval(seq)
    batch = top3(lg.scores[:len(seq)])
    lg.reset()
    lg.eval(seq[:n_prompt])
    for t in seq[n_prompt:]:
        lg.eval([t])
    decode = top3(lg.scores[:len(seq)])
    del lg
    logits = {"ids": seq, "prompt_len": n_prompt, "batch_top3": batch, "decode_top3": decode}
    toks = []
    for text in TOKENIZE:
        toks.append({"text": text,
                     "ids": llm.tokenize(text.encode(), add_bos=False, special=False),
                     "ids_parse_special": llm.tokenize(text.encode(), add_bos=False, special=True)})
    return {"cases": cases, "tokenize": toks, "logits": logits}


golden = {
    "source": "llama.cpp via llama-cpp-python 0.3.36 (vendored llama.cpp), CPU, 2 threads, flash attention on (the CLI default), greedy; "
              "prompt evaluated as one batch, then one token at a time",
    "models": {
        Path(SMOL).name: model_cases(SMOL, chat=True),
        Path(GEMMA).name: model_cases(GEMMA, chat=False),
    },
}
dest = ROOT / "kernels/tests/data/llama-cpp-golden.json"
dest.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {dest}", file=sys.stderr)
