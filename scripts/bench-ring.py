#!/usr/bin/env python3
"""Ring benchmarks: three real primad processes, each in its own network
namespace on a private bridge (veth, real mDNS, real libp2p), measured side
by side in one run. Prints every figure and ratio; it is not a test.

Needs root (namespaces, cgroups) and the release binaries:

    cargo build --release -p primad -p primactl
    python3 scripts/bench-ring.py overhead     # 1: ring TPOT/prefill vs the same model on one device
    python3 scripts/bench-ring.py hetero       # 3: one CPU-throttled device: Halda vs a memory-proportional split
    python3 scripts/bench-ring.py links        # 4: TPOT vs link RTT (tbf rate limit + injected per-hop delay)
    python3 scripts/bench-ring.py bigger       # 2: a model 3x a device's memory limit: prima's ring vs llama.cpp
                                               #    (needs scripts/llama-venv; run it with that venv's python)
    python3 scripts/bench-ring.py speculative  # 5: speculative decoding on one device and on the ring,
                                               #    self-drafts and a same-vocabulary model draft
    python3 scripts/bench-ring.py all

Each configuration is measured in alternating rounds (A B A B ...) through
`primactl bench` on the head (time to first token, decode tokens/s; median
of --requests requests per round), and the medians over rounds are compared.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release"
MODELS = Path(os.environ.get("PRIMA_MODELS", Path.home() / ".cache/prima/models"))
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
LONG_PROMPT = ("Households own many devices: laptops, desktops, phones and small boxes. " * 12).strip()


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


class Household:
    """Three (or n) primad in namespaces; torn down on exit."""

    def __init__(self, n=3, extra="", env=None, memory_limit=None):
        self.tag = f"pb{os.getpid() % 100000}"
        self.n = n
        self.work = Path(tempfile.mkdtemp(prefix="prima-bench-"))
        self.procs = []
        self.cgroups = []
        sh("ip", "netns", "add", f"{self.tag}-br")
        sh("ip", "-n", f"{self.tag}-br", "link", "set", "lo", "up")
        sh("ip", "-n", f"{self.tag}-br", "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", f"{self.tag}-br", "link", "set", "br0", "up")
        for i in range(n):
            ns = f"{self.tag}-{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"vb{i}", "netns", f"{self.tag}-br")
            sh("ip", "-n", ns, "addr", "add", f"10.79.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            sh("ip", "-n", f"{self.tag}-br", "link", "set", f"vb{i}", "master", "br0")
            sh("ip", "-n", f"{self.tag}-br", "link", "set", f"vb{i}", "up")
        for i in range(n):
            d = self.work / f"dev{i}"
            d.mkdir()
            (d / "primad.toml").write_text(
                f'[node]\nname = "dev{i}"\n[cluster]\nopen_household = true\n'
                f'[ring]\ntimeout_ms = 30000\n{extra}\n')
            e = dict(os.environ, RUST_LOG="info,sled=warn,libp2p=warn,mdns_sd=warn", **(env or {}))
            log = open(d / "primad.log", "w")
            cmd = ["ip", "netns", "exec", f"{self.tag}-{i}", str(BIN / "primad"),
                   "--config", str(d / "primad.toml"), "--state-dir", str(d / "state"),
                   "--api-addr", "127.0.0.1:7340"]
            if memory_limit:
                # A low-RAM device: the daemon starts inside a memory cgroup.
                cg = memory_cgroup(f"{self.tag}-mem{i}", memory_limit)
                self.cgroups.append(cg)
                cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + cmd
            p = subprocess.Popen(cmd, stdout=log, stderr=log, env=e)
            self.procs.append(p)
        for i in range(n):
            for _ in range(200):
                if self.ctl(i, "status", "--json", check=False).returncode == 0:
                    break
                time.sleep(0.05)

    def ctl(self, i, *args, check=True):
        return sh("ip", "netns", "exec", f"{self.tag}-{i}", BIN / "primactl", *args, check=check)

    def status(self, i):
        return json.loads(self.ctl(i, "status", "--json").stdout)

    def add_model(self, path, name="smollm2-135m", copies=False):
        """copies: every device gets its own copy of the file (as separate
        machines have), so no page of it is shared between their memory
        cgroups."""
        for i in range(self.n):
            p = path
            if copies:
                p = self.work / f"dev{i}" / Path(path).name
                shutil.copyfile(path, p)
                evict(p)
            self.ctl(i, "models", "add", p, "--name", name)

    def coordinator(self):
        c = self.status(0)["cluster"]["coordinator"]
        return next(i for i in range(self.n) if self.status(i)["node"]["id"] == c)

    def wait_household(self, timeout=30):
        t = time.time()
        while time.time() - t < timeout:
            alive = [sum(d["state"] == "alive" for d in self.status(i)["cluster"]["devices"]) for i in range(self.n)]
            if all(a == self.n for a in alive):
                return
            time.sleep(0.1)
        raise SystemExit(f"no household of {self.n}")

    def pin(self, k, windows):
        args = ["plan", "set", "--k", str(k)] + [f"{n}={w}" for n, w in windows]
        for _ in range(50):
            r = self.ctl(self.coordinator(), *args, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"pin failed: {r.stderr}")
        return self.wait_live(lambda p: p["pinned"] and [(d["node"], d["window"]) for d in p["devices"]] == [
            (n, w) for n, w in windows])

    def unpin(self):
        self.ctl(self.coordinator(), "plan", "clear")
        return self.wait_live(lambda p: not p["pinned"])

    def wait_live(self, f, timeout=60):
        t = time.time()
        while time.time() - t < timeout:
            plans = [self.status(i)["plan"] for i in range(self.n)]
            if all(p and p.get("live") and p["epoch"] == plans[0]["epoch"] and f(p) for p in plans):
                return plans[0]
            time.sleep(0.1)
        raise SystemExit(f"no live plan: {plans}")

    def bench(self, on, requests, tokens, prompt):
        r = self.ctl(on, "bench", "--json", "--requests", str(requests), "--max-tokens", str(tokens),
                     "--prompt", prompt, check=False)
        if r.returncode != 0:
            for i in range(self.n):
                log = (self.work / f"dev{i}" / "primad.log").read_text().splitlines()
                print(f"  dev{i} log tail:\n    " + "\n    ".join(log[-8:]))
            raise SystemExit(f"primactl bench failed: {r.stderr.strip()}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def throttle(self, i, cores):
        """Puts device i's daemon in a cgroup v1 CPU quota of `cores`."""
        cg = Path(f"/sys/fs/cgroup/cpu/{self.tag}-{i}")
        cg.mkdir(exist_ok=True)
        (cg / "cpu.cfs_period_us").write_text("100000")
        (cg / "cpu.cfs_quota_us").write_text(str(int(100000 * cores)))
        pid = self.procs[i].pid
        # The daemon is the child of `ip netns exec` (which execs it).
        (cg / "cgroup.procs").write_text(str(pid))
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                (cg / "tasks").write_text(t.name)
            except OSError:
                pass
        self.cgroups.append(cg)

    def shape_links(self, rate_mbit):
        for i in range(self.n):
            sh("ip", "netns", "exec", f"{self.tag}-{i}", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "50ms")

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for cg in self.cgroups:
            try:
                cg.rmdir()
            except OSError:
                pass
        for i in range(self.n):
            sh("ip", "netns", "del", f"{self.tag}-{i}", check=False)
        sh("ip", "netns", "del", f"{self.tag}-br", check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def memory_cgroup(name, limit):
    cg = Path("/sys/fs/cgroup/memory") / name
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def cgroup_report(cg):
    stat = {}
    for line in (cg / "memory.oom_control").read_text().splitlines():
        k, v = line.split()
        stat[k] = int(v)
    return {"peak_mb": int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20,
            "failcnt": int((cg / "memory.failcnt").read_text()), "oom_kill": stat.get("oom_kill", 0)}


def disk_reads(pid):
    """Bytes the process has made the kernel read from storage so far (its
    own reads and page faults; read-ahead it triggered counts too)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


LLAMA_RUN = r"""
import sys, time, json
import llama_cpp.llama_cpp as C
if sys.argv[2] == "mmap":
    orig = C.llama_model_default_params
    def no_repack():
        p = orig(); p.use_extra_bufts = False; return p
    C.llama_model_default_params = no_repack
from llama_cpp import Llama
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
load = time.perf_counter() - t
toks = llm.tokenize(b"Once upon a time", add_bos=False)
llm.eval(toks)
times = []
tok = toks[-1]
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); llm.eval([tok]); times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load, "ms_per_token": sorted(times)[len(times) // 2] * 1000}))
"""


def llama_under_limit(model, limit, mode, tokens):
    cg = memory_cgroup(f"pbl{os.getpid() % 100000}", limit)
    try:
        evict(model)
        r = subprocess.run(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c",
                            LLAMA_RUN, str(model), mode, str(tokens)], capture_output=True, text=True, timeout=900)
        rep = cgroup_report(cg)
        if r.returncode != 0:
            return {"outcome": f"exit {r.returncode} ({'OOM-killed' if rep['oom_kill'] else r.stderr.strip()[-200:]})", **rep}
        return {"outcome": "ok", **json.loads(r.stdout.strip().splitlines()[-1]), **rep}
    finally:
        try:
            cg.rmdir()
        except OSError:
            pass


def alternate(h, configs, rounds, requests, tokens, prompt, on=0):
    """configs: name -> callable that makes that configuration live.
    Returns name -> {"ttft": [...], "tps": [...]}."""
    res = {n: {"ttft": [], "tps": []} for n in configs}
    for r in range(rounds):
        for name, setup in configs.items():
            setup()
            b = h.bench(on, requests, tokens, prompt)
            res[name]["ttft"].append(b["ttft_ms_median"])
            res[name]["tps"].append(b["decode_tok_s_median"])
            print(f"  round {r + 1} {name:<28} TTFT {b['ttft_ms_median']:7.1f} ms   "
                  f"decode {b['decode_tok_s_median']:6.1f} tok/s  (TPOT {1000 / b['decode_tok_s_median']:6.2f} ms)",
                  flush=True)
    return res


def summary(res, base):
    med = {n: (statistics.median(v["ttft"]), 1000 / statistics.median(v["tps"])) for n, v in res.items()}
    b_ttft, b_tpot = med[base]
    for n, (ttft, tpot) in med.items():
        print(f"  {n:<28} TTFT {ttft:7.1f} ms ({ttft / b_ttft:4.2f}x)   TPOT {tpot:6.2f} ms ({tpot / b_tpot:4.2f}x {base})")
    return med


def overhead(a):
    print("== 1. ring overhead: SmolLM2, 3 devices in namespaces vs one device (same daemons) ==")
    h = Household()
    try:
        h.wait_household()
        h.add_model(SMOLLM2)
        cfg = {
            "one device (dev0: 30)": lambda: h.pin(1, [("dev0", 30)]),
            "ring k=1 (10/10/10)": lambda: h.pin(1, [("dev0", 10), ("dev1", 10), ("dev2", 10)]),
            "ring k=2 (5/5/5)": lambda: h.pin(2, [("dev0", 5), ("dev1", 5), ("dev2", 5)]),
        }
        res = alternate(h, cfg, a.rounds, a.requests, a.tokens, LONG_PROMPT)
        summary(res, "one device (dev0: 30)")
    finally:
        h.close()


def hetero(a):
    print("== 3. heterogeneity: dev2 throttled to 0.25 core; Halda (measured profiles) vs memory-proportional ==")
    h = Household(extra="auto_profile = true")
    try:
        h.wait_household()
        h.throttle(2, 0.25)
        h.add_model(SMOLLM2)
        for i in range(h.n):
            p = json.loads(h.ctl(i, "profile", "--json").stdout)["profile"]
            print(f"  dev{i} measured: " + ", ".join(f"{k} {v:.1f} GFLOPS" for k, v in p["cpu"]["flops"].items()))
        time.sleep(1.5)  # the coordinator replans once the measured profiles arrive
        plan = h.unpin()
        print("  Halda's plan: k=%d %s, predicted %.1f ms/token; left out: %s" % (
            plan["k"], [(d["node"], d["window"]) for d in plan["devices"]], plan["tpot_ms"] or 0,
            [(d["name"], d["why"]) for d in plan["dropped"]]))
        cfg = {
            "Halda": lambda: h.unpin(),
            "proportional (10/10/10)": lambda: h.pin(1, [("dev0", 10), ("dev1", 10), ("dev2", 10)]),
        }
        res = alternate(h, cfg, a.rounds, a.requests, a.tokens, LONG_PROMPT)
        med = summary(res, "proportional (10/10/10)")
        print(f"  Halda is {med['proportional (10/10/10)'][1] / med['Halda'][1]:.2f}x faster per token")
    finally:
        h.close()


def links(a):
    print("== 4. Wi-Fi-like links: tbf 100 Mbit/s plus an injected one-way delay per ring hop ==")
    rows = []
    for delay in [0, 1, 2.5, 5]:
        h = Household(env={"PRIMA_DEBUG_HOP_DELAY_MS": str(delay)})
        try:
            h.wait_household()
            h.shape_links(100)
            h.add_model(SMOLLM2)
            cfg = {
                "ring k=1 (10/10/10)": lambda: h.pin(1, [("dev0", 10), ("dev1", 10), ("dev2", 10)]),
                "one device": lambda: h.pin(1, [("dev0", 30)]),
            }
            print(f" link RTT +{2 * delay} ms (one-way {delay} ms per hop)")
            res = alternate(h, cfg, a.rounds, a.requests, a.tokens, LONG_PROMPT)
            med = summary(res, "one device")
            rows.append((2 * delay, med["ring k=1 (10/10/10)"][1], med["one device"][1]))
        finally:
            h.close()
    print("  RTT added (ms)   ring TPOT (ms)   one device (ms)   ratio")
    for rtt, ring, one in rows:
        print(f"  {rtt:14.1f}   {ring:14.2f}   {one:15.2f}   {ring / one:5.2f}")


def bigger(a):
    model = MODELS / "synth-ref-q4_0.gguf"
    if not model.is_file():
        sh(BIN / "primad", "synth", "--shape", "ref", "--quant", "q4_0", "-o", model)
    size = model.stat().st_size
    limit = a.limit_mib << 20
    print(f"== 2. bigger than memory: {model.name} ({size / 1e9:.2f} GB), every device limited to "
          f"{a.limit_mib} MiB ({size / limit:.1f}x its limit) ==")
    print(" llama.cpp alone under one such limit (2 threads, -c 512, cold page cache):")
    llama = {}
    for mode in [m for m in a.llama_modes.split(",") if m]:
        r = llama_under_limit(model, limit, mode, a.llama_tokens)
        llama[mode] = r
        print(f"  {mode:<8} {json.dumps(r)}", flush=True)
    print(" prima: three devices in namespaces, each in its own memory cgroup at that limit:")
    evict(model)
    # `ip netns exec` mounts a fresh /sys without the cgroup hierarchy, so
    # the daemons cannot read their limit there: tell them (the documented
    # override).
    h = Household(extra=f'memory_budget_mb = {a.limit_mib}\n[model]\ndefault = "synth-ref"\nctx = 512\n',
                  memory_limit=limit)
    try:
        h.wait_household()
        h.add_model(model, "synth-ref", copies=not a.shared_file)
        t = time.time()
        if a.halda:
            p = h.wait_live(lambda p: not p["pinned"])
            print(f"  Halda's plan k={p['k']} {[(d['node'], d['window']) for d in p['devices']]} live after "
                  f"{time.time() - t:.1f} s, predicted {p.get('tpot_ms') or 0:.0f} ms/token")
        else:
            windows = [("dev0", a.head_window)] + [(f"dev{i}", (28 - a.head_window) // 2) for i in (1, 2)]
            h.pin(1, windows)
            print(f"  plan k=1 {windows} live after {time.time() - t:.1f} s (loads and warms up only its layers)")
        for line in (h.work / "dev1" / "primad.log").read_text().splitlines():
            if "streaming" in line:
                print("  dev1:", line.split("INFO")[-1].strip()[:200])
        rows = []
        for r in range(a.rounds):
            before = [disk_reads(p.pid) for p in h.procs]
            b = h.bench(0, a.requests, a.tokens, "Once upon a time")
            reads = [(disk_reads(p.pid) - x) / (a.requests * a.tokens) / 1e6 for p, x in zip(h.procs, before)]
            tpot = 1000 / b["decode_tok_s_median"]
            rows.append(tpot)
            print(f"  round {r + 1}: TPOT {tpot:.1f} ms, TTFT {b['ttft_ms_median']:.0f} ms, read from disk per "
                  f"token: {' + '.join(f'{x:.1f}' for x in reads)} = {sum(reads):.1f} MB", flush=True)
        tpot = statistics.median(rows)
        halda = {d["node"]: d for d in h.status(0)["plan"]["devices"]}
        for i, cg in enumerate(h.cgroups):
            st = Path(f"/proc/{h.procs[i].pid}/status").read_text()
            mem = {k: v.split()[0] for k, v in (l.split(":", 1) for l in st.splitlines()) if k in ("RssAnon", "RssFile", "VmHWM")}
            print(f"  dev{i} cgroup: {json.dumps(cgroup_report(cg))}, process kB: {mem}")
            d = halda.get(f"dev{i}", {})
            if d.get("anon_bytes"):
                anon = int(mem["RssAnon"]) / 1024
                ok = "inside" if anon <= d["anon_bytes"] / 2**20 else "OVER"
                print(f"    anonymous memory {anon:.1f} MiB, Halda assumed {d['anon_bytes'] / 2**20:.1f} MiB "
                      f"(caches at ctx 512, buffers, runtime): {ok}; Halda's demand "
                      f"{d['ram_bytes'] / 2**20:.0f} of {d['ram_budget_bytes'] / 2**20:.0f} MiB")
        mm = llama.get("mmap", {}).get("ms_per_token")
        ref = 1131.0
        print(f"  prima ring TPOT {tpot:.1f} ms/token")
        if mm:
            print(f"  llama.cpp pure mmap {mm:.1f} ms/token -> prima is {mm / tpot:.2f}x faster")
        print(f"  (reference README: llama.cpp pure mmap {ref} ms/token at 583 MiB -> {ref / tpot:.2f}x)")
    finally:
        h.close()


GEMMA3 = MODELS / "gemma-3-270m-q4_k_m.gguf"


def speculative(a):
    print("== 5. speculative decoding: `primactl bench --speculative` (plain, then with the draft; greedy) ==")
    print("   drafts: the model's own first N layers + output head (no second model), or a whole")
    print("   model with the same vocabulary (SmolLM2 as its own draft: every draft agrees, the")
    print("   upper bound of what batched verification buys, paid with a full draft per token);")
    print("   plain and speculative requests alternate, medians of --requests each")
    cases = [
        ("smollm2", SMOLLM2, 30, "draft_layers = 8", "self, 8 of 30 layers, p_min 0.6"),
        ("smollm2", SMOLLM2, 30, "draft_layers = 29\np_min = 0.0", "self, 29 of 30 layers, p_min 0"),
        ("smollm2", SMOLLM2, 30, f'draft_model = "{SMOLLM2}"', "SmolLM2 itself, p_min 0.6"),
        ("smollm2", SMOLLM2, 30, f'draft_model = "{SMOLLM2}"\np_min = 0.0', "SmolLM2 itself, p_min 0"),
        ("gemma3", GEMMA3, 18, "draft_layers = 6", "self, 6 of 18 layers, p_min 0.6"),
        ("gemma3", GEMMA3, 18, "draft_layers = 16\np_min = 0.0", "self, 16 of 18 layers, p_min 0"),
    ]
    rows = []
    for delay in [0, 5]:
        for name, path, n_layer, draft, label in cases:
            if not path.is_file():
                print(f"  {path} missing: run scripts/fetch-models")
                continue
            extra = f'[model]\ndefault = "{name}"\n[speculative]\n{draft}\n'
            h = Household(extra=extra, env={"PRIMA_DEBUG_HOP_DELAY_MS": str(delay)})
            try:
                h.wait_household()
                h.add_model(path, name)
                third = n_layer // 3
                plans = {"one device": [("dev0", n_layer)],
                         "ring 3 devices": [("dev0", third), ("dev1", third), ("dev2", n_layer - 2 * third)]}
                for where, windows in plans.items():
                    if delay and where == "one device":
                        continue  # no hops, nothing delayed
                    h.pin(1, windows)
                    r = h.ctl(0, "bench", "--speculative", "--json", "--requests", str(a.requests),
                              "--max-tokens", str(a.tokens), "--prompt", "Write a short story about a lighthouse keeper.")
                    b = json.loads(r.stdout.strip().splitlines()[-1])
                    sp = b["speculative"]
                    rows.append((name, label, where, delay, b["plain"]["decode_tok_s_median"],
                                 sp["decode_tok_s_median"], sp["acceptance"], sp["drafted"], b["speedup"]))
                    print(f"  {name:<8} {label:<34} {where:<15} hop +{delay} ms: plain {rows[-1][4]:6.1f} tok/s, "
                          f"speculative {rows[-1][5]:6.1f} tok/s ({b['speedup']:.2f}x), "
                          f"{100 * sp['acceptance']:.0f}% of {sp['drafted']} drafts accepted", flush=True)
            finally:
                h.close()
    print("  model    draft                              where           hop   plain  spec  speed-up  accepted")
    for name, label, where, delay, plain, spec, acc, drafted, speedup in rows:
        print(f"  {name:<8} {label:<34} {where:<15} {delay:3} ms {plain:6.1f} {spec:6.1f}  {speedup:5.2f}x  "
              f"{100 * acc:4.0f}% of {drafted}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["overhead", "hetero", "links", "bigger", "speculative", "all"])
    ap.add_argument("--limit-mib", type=int, default=583, help="bigger: per-device memory limit")
    ap.add_argument("--head-window", type=int, default=6, help="bigger: layers on the head (it also holds the output)")
    ap.add_argument("--llama-modes", default="mmap,default", help="bigger: llama.cpp runs (mmap = --no-repack)")
    ap.add_argument("--llama-tokens", type=int, default=8)
    ap.add_argument("--halda", action="store_true",
                    help="bigger: run Halda's own plan instead of pinning --head-window and an even split")
    ap.add_argument("--shared-file", action="store_true",
                    help="bigger: all three devices map one file (by default each has its own copy, as separate "
                         "machines do; one shared file makes cgroup v1 charge a page to whichever device read "
                         "it first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-ring needs root (network namespaces, cgroups)")
    if not SMOLLM2.is_file():
        raise SystemExit(f"{SMOLLM2} missing: run scripts/fetch-models smollm2")
    for w in (["overhead", "hetero", "links", "bigger", "speculative"] if a.which == "all" else [a.which]):
        {"overhead": overhead, "hetero": hetero, "links": links, "bigger": bigger,
         "speculative": speculative}[w](a)


if __name__ == "__main__":
    main()
