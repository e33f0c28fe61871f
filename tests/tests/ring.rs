//! Pipelined-ring inference across three real primad processes, each in its
//! own network namespace, found by mDNS, talking libp2p: greedy answers
//! through the ring equal `primad generate` on one device, for several
//! plans, on both real models; answers survive replans, and a device that
//! freezes mid-answer is planned around.
//!
//! Run with `cargo test --release -p prima-tests --test ring` (as root).

use std::time::{Duration, Instant};

use prima_tests::{
    generate, generate_with,
    household::{coordinator, household, pin, pin_specs, status, wait_live, windows},
    model,
    netns::{Hosts, NsDaemon},
    stdout, GEMMA3, SMOLLM2,
};

const QUESTION: &str = "Why is the sky blue? Explain it to a child.";
const N: usize = 48;

fn ring_stat(d: &NsDaemon, key: &str) -> u64 {
    status(d)["ring"][key].as_u64().unwrap_or(0)
}

/// Pins `plan` (k, [(device, window)], head first) on the coordinator, waits
/// for it to be live everywhere, asks through device `ask_on` and checks the
/// answer against `want`.
fn check_plan(ds: &[NsDaemon], k: u32, plan: &[(&str, u32)], ask_on: usize, want: &str) {
    pin(ds, k, plan);
    let want_windows: Vec<(String, u64)> = plan
        .iter()
        .map(|(n, w)| (n.to_string(), *w as u64))
        .collect();
    let t = Instant::now();
    let p = wait_live(ds, &format!("{plan:?}"), |p| {
        p["pinned"] == true && p["k"] == k && windows(p) == want_windows
    });
    eprintln!(
        "plan k={k} {plan:?} live after {:?} (epoch {})",
        t.elapsed(),
        p["epoch"]
    );
    let head = ds
        .iter()
        .position(|d| status(d)["node"]["name"] == plan[0].0)
        .unwrap();
    let head_before = ring_stat(&ds[head], "head_requests");
    let fwd_before = ring_stat(&ds[ask_on], "forwarded");
    let t = Instant::now();
    let o = ds[ask_on].ctl(&["ask", "-t", "0", "-n", &N.to_string(), QUESTION]);
    assert!(
        o.status.success(),
        "ask on dev{ask_on}: {}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let got = stdout(&o);
    eprintln!("  answer via dev{ask_on} in {:?}: {got:?}", t.elapsed());
    assert_eq!(
        got.trim_end_matches('\n'),
        want.trim_end_matches('\n'),
        "plan {plan:?} k={k}"
    );
    // At least once: a request the ring fails under (a busy CI machine can
    // delay a hop past the deadline) is resumed, and may count twice.
    assert!(
        ring_stat(&ds[head], "head_requests") > head_before,
        "the head answered through the ring"
    );
    if ask_on != head {
        assert!(ring_stat(&ds[ask_on], "forwarded") > fwd_before);
    }
}

#[test]
fn smollm2_through_the_ring_equals_one_device() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "use_all_devices = true\n");
    let want = generate(&model(SMOLLM2), QUESTION, N, true);
    assert!(!want.is_empty());
    // Halda's own plan first (every device used: use_all_devices).
    let p = wait_live(&ds, "Halda's", |p| {
        p["pinned"] == false && p["devices"].as_array().unwrap().len() == 3
    });
    eprintln!("Halda planned k={} {:?}", p["k"], windows(&p));
    let o = ds[1].ctl(&["plan", "--explain"]);
    eprintln!("{}", stdout(&o));
    assert!(stdout(&o).contains("made by Halda"), "{}", stdout(&o));
    let o = ds[2].ctl(&["ask", "-t", "0", "-n", &N.to_string(), QUESTION]);
    assert_eq!(stdout(&o).trim_end(), want.trim_end(), "Halda's plan");
    // Pinned plans: uneven k = 1; k = 2 with the head holding the smallest
    // window; k = 3; and a one-device plan on a device that is not the
    // coordinator.
    check_plan(&ds, 1, &[("dev0", 4), ("dev1", 16), ("dev2", 10)], 1, &want);
    check_plan(&ds, 2, &[("dev1", 3), ("dev2", 7), ("dev0", 5)], 0, &want);
    check_plan(&ds, 3, &[("dev2", 2), ("dev0", 5), ("dev1", 3)], 2, &want);
    check_plan(&ds, 5, &[("dev2", 4), ("dev1", 2)], 0, &want);
    // A bad pin is refused with the reason.
    let c = coordinator(&ds);
    let o = ds[c].ctl(&["plan", "set", "dev0=10", "dev1=10"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("30"), "{err}");
}

/// The last layers of a device's window on its GPU (Mesa's software Vulkan
/// device here): the ring's answer equals one device running the same
/// layers on the GPU, and the device reports them loaded there.
#[test]
fn gpu_layers_in_a_window_answer_as_one_device_with_the_same_placement() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(
        &hosts,
        SMOLLM2,
        "smollm2-135m",
        // The software GPU is slow, and slower still with the other ring
        // tests' nine daemons on two cores: this test is about placement,
        // so the hop deadline is generous.
        "timeout_ms = 30000\n[gpu]\nallow_software = true\n",
    );
    // A short raw prompt: the software device prefills slowly (about 10
    // tokens/s through these 4 layers).
    let (prompt, n) = ("Once upon a time", 24);
    let want = generate_with(
        &model(SMOLLM2),
        prompt,
        n,
        false,
        &["--gpu", "4", "--allow-software-gpu"],
    );
    // The head runs the model's last window (then the output head): its
    // last 4 layers are the model's, as `generate --gpu 4` places them.
    pin_specs(
        &ds,
        1,
        &["dev0=10:4".into(), "dev1=10".into(), "dev2=10".into()],
    );
    wait_live(&ds, "pinned, 4 GPU layers on dev0", |p| {
        p["pinned"] == true && p["devices"][0]["gpu_layers"] == 4
    });
    let o = ds[1].ctl(&["ask", "--raw", "-t", "0", "-n", &n.to_string(), prompt]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).trim_end(), want.trim_end());
    let log = ds[0].log();
    assert!(
        log.lines().any(|l| l.contains("ring windows loaded")
            && l.contains("windows=[20..30]")
            && l.contains("gpu_layers=[4]")),
        "dev0 loaded layers 20..30, the last 4 on the GPU:\n{log}"
    );
    let status = status(&ds[0]);
    assert!(
        status["gpu"]["using"]["name"]
            .as_str()
            .is_some_and(|n| n.contains("llvmpipe")),
        "{}",
        status["gpu"]
    );
}

/// Speculative decoding across the ring: the head drafts with the model's
/// first 29 layers (most drafts are wrong, so both paths run: a verified
/// prefix kept, a rejected tail rolled back on every device), each draft is
/// verified in one trip with logits for every position, and the greedy
/// answer is the plain one, token for token, with or without speculation.
#[test]
fn speculative_decoding_on_the_ring_keeps_the_greedy_answer() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(
        &hosts,
        SMOLLM2,
        "smollm2-135m",
        "[speculative]\ndraft_layers = 29\np_min = 0.0\n",
    );
    let want = generate(&model(SMOLLM2), QUESTION, N, true);
    pin(&ds, 1, &[("dev0", 10), ("dev1", 10), ("dev2", 10)]);
    wait_live(&ds, "pinned across three devices", |p| {
        p["pinned"] == true && windows(p).len() == 3
    });
    let ask = |speculative: Option<bool>| {
        let mut body = serde_json::json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": N,
            "temperature": 0,
        });
        if let Some(on) = speculative {
            body["speculative"] = on.into();
        }
        // Asked on dev1: the head (dev0) answers and its usage comes back.
        let (code, v) = ds[1].post("/v1/chat/completions", &body);
        assert_eq!(code, 200, "{v}");
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            v["usage"].clone(),
        )
    };
    let (text, usage) = ask(None);
    assert_eq!(text, want, "speculative ring answer");
    let sp = &usage["speculative"];
    let n = |k: &str| sp[k].as_u64().unwrap_or(0);
    eprintln!("speculative on the ring: {sp}");
    assert!(n("drafted") > 0 && n("accepted") > 0, "{usage}");
    assert!(
        n("accepted") < n("drafted"),
        "some drafts rejected: {usage}"
    );
    // Every accepted draft is a trip round the ring saved: each token
    // came from a pass or a kept draft (one more pass reads an end token).
    let done = usage["completion_tokens"].as_u64().unwrap();
    let steps = n("passes") + n("accepted");
    assert!((done..=done + 1).contains(&steps), "{usage}");
    // The head counts what its draft did.
    let load = status(&ds[0])["load"].clone();
    assert_eq!(load["spec_drafted"].as_u64(), Some(n("drafted")), "{load}");
    assert_eq!(
        load["spec_accepted"].as_u64(),
        Some(n("accepted")),
        "{load}"
    );
    let (text, usage) = ask(Some(false));
    assert_eq!(text, want, "plain ring answer");
    assert!(usage["speculative"].is_null(), "{usage}");
    // primactl bench compares the two on the same daemon.
    let o = ds[1].ctl(&[
        "bench",
        "--speculative",
        "--requests",
        "1",
        "--max-tokens",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("bench JSON");
    assert!(b["speedup"].as_f64().is_some_and(|x| x > 0.0), "{b}");
    assert!(b["speculative"]["drafted"].as_u64().unwrap_or(0) > 0, "{b}");
}

#[test]
fn gemma3_through_the_ring_equals_one_device() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(&hosts, GEMMA3, "gemma3-270m", "");
    let want = generate(&model(GEMMA3), QUESTION, N, true);
    assert!(!want.is_empty());
    // Gemma 3 270M has 18 layers: sliding-window and global layers end up
    // on different devices.
    check_plan(&ds, 2, &[("dev0", 2), ("dev1", 4), ("dev2", 3)], 1, &want);
    check_plan(&ds, 1, &[("dev2", 11), ("dev1", 7)], 0, &want);
}

#[test]
fn replans_mid_answer_replay_and_a_frozen_device_is_planned_around() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "");
    let want = generate(&model(SMOLLM2), QUESTION, N, true);
    check_plan(
        &ds,
        1,
        &[("dev0", 10), ("dev1", 10), ("dev2", 10)],
        0,
        &want,
    );

    // The plan changes twice while a long answer streams: the head replays
    // the session on each new plan and the answer is still the greedy one.
    // Long enough (SmolLM2 does not stop within 400 tokens here) that both
    // new plans go live well before it ends: 160 tokens, about 1.6 s on
    // the ring, left too little margin once decoding got faster.
    let raw = "Once upon a time";
    let long = 400;
    let want_long = generate(&model(SMOLLM2), raw, long, false);
    let (o, took) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let t = Instant::now();
            (
                ds[0].ctl(&["ask", "--raw", "-t", "0", "-n", &long.to_string(), raw]),
                t.elapsed(),
            )
        });
        std::thread::sleep(Duration::from_millis(600));
        pin(&ds, 2, &[("dev0", 4), ("dev2", 6), ("dev1", 5)]);
        std::thread::sleep(Duration::from_millis(600));
        pin(&ds, 1, &[("dev0", 20), ("dev1", 10)]);
        h.join().unwrap()
    });
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let replays = ds[0].log().matches("replaying the session").count();
    eprintln!("long answer through two replans in {took:?}, {replays} replay(s)");
    assert!(replays >= 1, "the plan changed under the answer");
    assert_eq!(stdout(&o).trim_end(), want_long.trim_end());
    check_plan(
        &ds,
        1,
        &[("dev0", 10), ("dev1", 10), ("dev2", 10)],
        0,
        &want,
    );

    // A long answer starts; then dev1 freezes mid-answer: its connections
    // stay open, it never answers again. It is declared dead, the ring is
    // planned around it (its pin cannot hold: Halda plans until it is
    // back), the head replays, and the answer completes, unchanged.
    let want_long = generate(&model(SMOLLM2), raw, 300, false);
    let (o, took) = std::thread::scope(|sc| {
        let h = sc.spawn(|| ds[0].ctl(&["ask", "--raw", "-t", "0", "-n", "300", raw]));
        std::thread::sleep(Duration::from_millis(1500));
        ds[1].signal("STOP");
        let t = Instant::now();
        let o = h.join().unwrap();
        (o, t.elapsed())
    });
    ds[1].signal("CONT");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("answer done {took:?} after dev1 froze");
    assert!(
        o.status.success(),
        "the ring heals around a frozen device: {err}"
    );
    assert_eq!(stdout(&o).trim_end(), want_long.trim_end());
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn layers_beyond_the_memory_budget_stream_and_answers_stay_exact() {
    let hosts = Hosts::create(3).expect("hosts");
    // A budget far below the windows: most layers are read ahead and
    // dropped after use on every device.
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "memory_budget_mb = 48\n");
    let want = generate(&model(SMOLLM2), QUESTION, N, true);
    check_plan(&ds, 2, &[("dev0", 5), ("dev1", 5), ("dev2", 5)], 1, &want);
    for d in &ds {
        assert!(
            d.log().contains("streaming the rest"),
            "dev{} streams:\n{}",
            d.host,
            d.log()
        );
    }
}

/// Each device measures its links' bandwidth over libp2p and advertises it
/// to Halda: a link shaped to 40 Mbit/s reads as such, an unshaped one far
/// faster.
#[test]
fn link_bandwidth_is_measured() {
    let hosts = Hosts::create(3).expect("hosts");
    hosts.shape(0, 40).expect("tc");
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "");
    let measured = |d: &NsDaemon| -> Vec<(String, f64)> {
        status(d)["ring"]["bandwidth_mbit_s"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|l| (l[0].as_str().unwrap().to_string(), l[1].as_f64().unwrap()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let t = Instant::now();
    while measured(&ds[0]).len() < 2 || measured(&ds[1]).len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no bandwidth measured"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (from0, from1) = (measured(&ds[0]), measured(&ds[1]));
    eprintln!("dev0 (shaped to 40 Mbit/s): {from0:?}; dev1: {from1:?}");
    for (_, b) in &from0 {
        assert!((20.0..=60.0).contains(b), "shaped link measured {b} Mbit/s");
    }
    let to2 = from1.iter().find(|(n, _)| n == "dev2").unwrap().1;
    assert!(to2 > 200.0, "an unshaped veth measured {to2} Mbit/s");
}
