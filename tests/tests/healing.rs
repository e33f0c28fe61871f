//! Self-healing: a device that dies mid-answer costs a short stall, never
//! the answer. Three real daemons in network namespaces; the client reads
//! the streamed answer as it comes and measures the longest gap.
//!
//! Run with `cargo test --release -p prima-tests --test healing` (as root).

use std::{
    io::Read,
    process::Stdio,
    time::{Duration, Instant},
};

use prima_tests::{
    bin, generate,
    household::{household, status, wait_live, windows},
    model,
    netns::{Hosts, NsDaemon},
    SMOLLM2,
};

/// Streams `primactl ask` on device `on`; calls `at_start` once the first
/// bytes arrived; returns (answer, exit ok, stderr, longest gap between
/// arrivals after the start, total time).
fn stream_ask(
    hosts: &Hosts,
    on: &NsDaemon,
    args: &[&str],
    at_start: impl FnOnce(),
) -> (String, bool, String, Duration, Duration) {
    let t0 = Instant::now();
    let mut child = hosts
        .command(on.host, bin("primactl"))
        .args(args)
        .env_remove("PRIMA_API")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("primactl");
    let mut out = child.stdout.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    let mut last = None::<Instant>;
    let mut gap = Duration::ZERO;
    let mut at_start = Some(at_start);
    loop {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let now = Instant::now();
        if let Some(l) = last {
            gap = gap.max(now - l);
        }
        last = Some(now);
        text.extend_from_slice(&buf[..n]);
        if let Some(f) = at_start.take() {
            f();
        }
    }
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    let ok = child.wait().unwrap().success();
    (
        String::from_utf8_lossy(&text).into_owned(),
        ok,
        err,
        gap,
        t0.elapsed(),
    )
}

#[test]
fn a_device_killed_mid_answer_costs_a_short_stall_and_the_answer_completes() {
    let hosts = Hosts::create(3).expect("hosts");
    let mut ds = household(&hosts, SMOLLM2, "smollm2-135m", "use_all_devices = true\n");
    let p = wait_live(&ds, "Halda's, all three", |p| {
        p["pinned"] == false && p["devices"].as_array().unwrap().len() == 3
    });
    let names: Vec<String> = windows(&p).into_iter().map(|(n, _)| n).collect();
    let idx = |name: &str| {
        ds.iter()
            .position(|d| status(d)["node"]["name"] == name)
            .unwrap()
    };
    let head = idx(&names[0]);
    // A device that neither heads the ring nor coordinates (losing those is
    // failover, another matter).
    let coord = status(&ds[head])["cluster"]["coordinator"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = names[1..]
        .iter()
        .map(|n| idx(n))
        .find(|&i| status(&ds[i])["node"]["id"] != coord.as_str())
        .expect("a plain member");
    let raw = "Once upon a time";
    let n = "128";
    let want = generate(&model(SMOLLM2), raw, 128, false);
    // A fault-free answer first: the pace to compare the stall with.
    let (text, ok, err, calm_gap, calm_total) = stream_ask(
        &hosts,
        &ds[head],
        &["ask", "--raw", "-t", "0", "-n", n, raw],
        || {},
    );
    assert!(ok, "{err}");
    assert_eq!(text.trim_end(), want.trim_end());
    eprintln!(
        "plan {:?}; fault-free: {calm_total:?}, longest gap {calm_gap:?}",
        windows(&p)
    );
    // Now kill the device after rank 0 as soon as the answer streams.
    let killed_at = std::cell::Cell::new(None);
    let (text, ok, err, gap, total) = stream_ask(
        &hosts,
        &ds[head],
        &["ask", "--raw", "-t", "0", "-n", n, raw],
        || {
            ds[victim].signal("KILL");
            killed_at.set(Some(Instant::now()));
        },
    );
    assert!(ok, "the answer survives: {err}");
    assert_eq!(
        text.trim_end(),
        want.trim_end(),
        "token for token the fault-free answer"
    );
    assert!(
        ds[head].log().contains("replaying the session"),
        "the head replayed"
    );
    let after = status(&ds[head])["plan"].clone();
    eprintln!(
        "killed dev{victim} mid-answer: answer complete in {total:?} ({calm_total:?} fault-free), \
         longest stall {gap:?}; plan now {:?}",
        windows(&after)
    );
    assert_eq!(after["devices"].as_array().unwrap().len(), 2);
    assert!(
        gap <= Duration::from_secs(3),
        "stall {gap:?} (dead after 1.2 s, then replan, load, replay)"
    );
    ds[victim].kill9();
}
