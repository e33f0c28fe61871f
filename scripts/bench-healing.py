#!/usr/bin/env python3
"""Healing benchmark: time to detect, to replan and to resume for each kind
of fault, over several runs of the healing scenarios (tests/tests/healing.rs:
real primad processes in network namespaces, real mDNS and libp2p, faults
injected with signals, `ip link` and iptables). Prints medians and ranges;
it is not a test (the tests assert; this measures).

Needs root and the release binaries and test binary:

    cargo build --release -p primad -p primactl -p prima-tests --tests
    python3 scripts/bench-healing.py              # 3 runs, 60 s of churn each
    python3 scripts/bench-healing.py --runs 5 --churn-secs 120

Figures per event (ms after the fault, from the survivors' event logs):
detected = a survivor declared the device dead (or a hop failed); replanned =
the coordinator's next plan; live = that plan ready on every device;
resumed = the answer's next token after the replay (or the failover to a new
head). The stall is the longest gap the client saw in its streamed answer.
"""
import argparse, re, statistics, subprocess, sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KILL = re.compile(r"^(\w+) \((dev\d)\) killed mid-answer.*longest stall ([\d.]+)(ms|s|µs)")
TIMES = re.compile(
    r"detected (\S+) ms \(dead\) / (\S+)(?: ms)? \(hop failed\), replanned (\S+)(?: ms)?, "
    r"plan live (\S+)(?: ms)?, answer resumed (\S+)(?: ms)? \(replay\) / (\S+)(?: ms)? \(failover\)"
)
LINK = re.compile(r"link broken mid-answer: .* longest stall ([\d.]+)(ms|s|µs)")
AROUND = re.compile(r"off the network: planned around after ([\d.]+)(ms|s)")
BACK = re.compile(r"back: used again after ([\d.]+)(ms|s)")
JOIN = re.compile(r"dev3 \(roomy\) joined: used after ([\d.]+)(ms|s)")
CHURN = re.compile(r"churn \(seed (\d+), (\d+) s\): (\d+) faults, (\d+) requests, (\d+) failed, slowest ([\d.]+)(ms|s)")


def ms(value, unit):
    v = float(value)
    return v * {"s": 1000.0, "ms": 1.0, "µs": 0.001}[unit]


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):7.0f} ({min(xs):.0f}-{max(xs):.0f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--churn-secs", type=int, default=60)
    a = ap.parse_args()
    rows = defaultdict(lambda: defaultdict(list))
    churn = []
    for run in range(a.runs):
        print(f"run {run + 1}/{a.runs} ...", file=sys.stderr, flush=True)
        env = {"PRIMA_CHURN_SECS": str(a.churn_secs), "PRIMA_CHURN_SEED": str(run + 1)}
        p = subprocess.run(
            ["cargo", "test", "--release", "-q", "-p", "prima-tests", "--test", "healing",
             "--", "--nocapture", "--test-threads", "1"],
            cwd=ROOT, env={**__import__("os").environ, **env}, capture_output=True, text=True)
        out = p.stdout + p.stderr
        if p.returncode != 0:
            print(out[-4000:], file=sys.stderr)
            sys.exit(f"run {run + 1}: the healing tests failed")
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if m := KILL.search(line):
                kind = {"Member": "kill -9 member", "Coordinator": "kill -9 coordinator",
                        "Head": "kill -9 head", "HeadAndCoordinator": "kill -9 head+coordinator",
                        "LeavingHead": "SIGTERM head (graceful)"}[m.group(1)]
                r = rows[kind]
                r["stall"].append(ms(m.group(3), m.group(4)))
                if i + 1 < len(lines) and (t := TIMES.search(lines[i + 1])):
                    det = [num(t.group(1)), num(t.group(2))]
                    det = [d for d in det if d is not None]
                    r["detected"].append(min(det) if det else None)
                    r["replanned"].append(num(t.group(3)))
                    r["live"].append(num(t.group(4)))
                    res = [x for x in (num(t.group(5)), num(t.group(6))) if x is not None]
                    r["resumed"].append(min(res) if res else None)
            elif m := LINK.search(line):
                rows["link between two live devices broken"]["stall"].append(ms(m.group(1), m.group(2)))
            elif m := AROUND.search(line):
                rows["device's link down (leaves)"]["replanned"].append(ms(m.group(1), m.group(2)))
            elif m := BACK.search(line):
                rows["device's link back (returns)"]["live"].append(ms(m.group(1), m.group(2)))
            elif m := JOIN.search(line):
                rows["a helpful device joins"]["live"].append(ms(m.group(1), m.group(2)))
            elif m := CHURN.search(line):
                churn.append((int(m.group(3)), int(m.group(4)), int(m.group(5)), ms(m.group(6), m.group(7))))
    print(f"\nHealing, {a.runs} run(s): median (min-max), ms after the event")
    print(f"{'event':42} {'detected':>18} {'replanned':>18} {'plan live':>18} {'resumed':>18} {'client stall':>18}")
    for kind, r in rows.items():
        print(f"{kind:42} " + " ".join(f"{summary(r[k]):>18}" for k in
                                        ("detected", "replanned", "live", "resumed", "stall")))
    for f, n, failed, slowest in churn:
        print(f"churn: {f} faults, {n} requests, {failed} failed, slowest request {slowest:.0f} ms")


if __name__ == "__main__":
    main()
