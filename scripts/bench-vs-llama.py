#!/usr/bin/env python3
"""Benchmark primad against llama.cpp on the same model, machine and thread
count, alternating A B A B, and print each figure and the ratio
primad / llama.cpp. Reports numbers; it is not a test.

llama.cpp is the PyPI package llama-cpp-python, compiled from source into a
cached venv by scripts/llama-venv (minutes, once). Run with that venv's python:

    PY=$(scripts/llama-venv)
    cargo build --release -p primad
    $PY scripts/bench-vs-llama.py                    # both models, 1 and 2 threads
    $PY scripts/bench-vs-llama.py --load             # also 2 threads with one core kept busy
    $PY scripts/bench-vs-llama.py --models smollm2 --threads 2 --rounds 5

Prefill (pp) evaluates a prompt of --prompt-tokens in one batch; decode (tg)
evaluates --gen-tokens tokens one at a time from an empty context, as
llama-bench does.
"""
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIMAD = ROOT / "target/release/primad"
FLASH_ATTN = True


def llama_round(path, threads, pp, tg):
    from llama_cpp import Llama
    # Flash attention on, as llama.cpp's CLI defaults to on CPUs and as
    # prima computes attention (the same arithmetic, see ops::attend_body).
    llm = Llama(model_path=str(path), n_ctx=max(pp, tg) + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, flash_attn=FLASH_ATTN)
    text = b"The quick brown fox jumps over the lazy dog. Households own many devices. "
    base = llm.tokenize(text, add_bos=False)
    prompt = (base * (pp // len(base) + 1))[:pp]
    llm.eval(prompt[:1]); llm.reset()  # warm up
    out = {}
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); out["pp"] = pp / (time.perf_counter() - t)
    llm.reset()
    tok = base[0]
    t = time.perf_counter()
    for _ in range(tg):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    out["tg"] = tg / (time.perf_counter() - t)
    del llm
    return out


def primad_round(path, threads, pp, tg):
    r = subprocess.run([str(PRIMAD), "bench", "-m", str(path), "-t", str(threads), "--prompt-tokens", str(pp),
                        "--gen-tokens", str(tg), "--reps", "1", "--json"], check=True, capture_output=True, text=True)
    j = json.loads(r.stdout)
    return {"pp": j["prefill_tok_s"]["median"], "tg": j["decode_tok_s"]["median"]}


def bandwidth(path, threads):
    r = subprocess.run([str(PRIMAD), "bench", "-m", str(path), "-t", str(threads), "--prompt-tokens", "0",
                        "--gen-tokens", "0", "--reps", "1", "--bandwidth", "--json"], check=True, capture_output=True, text=True)
    j = json.loads(r.stdout)
    return j["read_bandwidth_gb_s"], j["bytes_per_token"], j["decode_ceiling_tok_s"]


def busy_core(core):
    """A busy loop pinned to one core, as a competing program would be."""
    return subprocess.Popen(["taskset", "-c", str(core), "sh", "-c", "while :; do :; done"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="A B rounds per configuration")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--load", action="store_true", help="also run 2 threads with core 1 kept busy")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-flash-attn", action="store_true",
                    help="run llama.cpp without flash attention (its older default)")
    a = ap.parse_args()
    global FLASH_ATTN
    FLASH_ATTN = not a.no_flash_attn
    if not PRIMAD.exists():
        sys.exit("build primad first: cargo build --release -p primad")
    paths = dict(zip(a.models, subprocess.run([str(ROOT / "scripts/fetch-models"), *a.models], check=True,
                                             capture_output=True, text=True).stdout.split()))
    configs = [(m, t, False) for m in a.models for t in a.threads]
    if a.load:
        configs += [(m, 2, True) for m in a.models]
    results = []
    for model, threads, loaded in configs:
        path = paths[model]
        hog = busy_core(1) if loaded else None
        try:
            runs = {"llama.cpp": [], "primad": []}
            for _ in range(a.rounds):
                runs["llama.cpp"].append(llama_round(path, threads, a.prompt_tokens, a.gen_tokens))
                runs["primad"].append(primad_round(path, threads, a.prompt_tokens, a.gen_tokens))
        finally:
            if hog:
                hog.kill()
        row = {"model": model, "threads": threads, "load": loaded}
        for eng, rs in runs.items():
            for k in ("pp", "tg"):
                row[f"{eng} {k}"] = statistics.median(r[k] for r in rs)
                row[f"{eng} {k} runs"] = [round(r[k], 1) for r in rs]
        for k in ("pp", "tg"):
            row[f"ratio {k}"] = row[f"primad {k}"] / row[f"llama.cpp {k}"]
        if not loaded:
            bw, bytes_tok, ceiling = bandwidth(path, threads)
            row.update({"bandwidth GB/s": bw, "MB/token": bytes_tok / 1e6, "ceiling tok/s": ceiling,
                        "primad tg % of ceiling": 100 * row["primad tg"] / ceiling,
                        "llama.cpp tg % of ceiling": 100 * row["llama.cpp tg"] / ceiling})
        results.append(row)
        if not a.json:
            tag = " (core 1 busy)" if loaded else ""
            print(f"{model}, {threads} thread(s){tag}:")
            for k, name in (("pp", f"pp{a.prompt_tokens}"), ("tg", f"tg{a.gen_tokens}")):
                print(f"  {name:6} llama.cpp {row[f'llama.cpp {k}']:7.1f} {row[f'llama.cpp {k} runs']}"
                      f"  primad {row[f'primad {k}']:7.1f} {row[f'primad {k} runs']}  ratio {row[f'ratio {k}']:.2f}x")
            if not loaded:
                print(f"  memory {row['bandwidth GB/s']:.1f} GB/s, {row['MB/token']:.1f} MB/token, ceiling "
                      f"{row['ceiling tok/s']:.0f} tok/s: primad at {row['primad tg % of ceiling']:.0f}%, "
                      f"llama.cpp at {row['llama.cpp tg % of ceiling']:.0f}%")
            sys.stdout.flush()
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
