//! Self-healing: a device that dies mid-answer costs a short stall, never
//! the answer, whether it was a plain member, the coordinator or the head;
//! a device that drops off the network is planned around and used again
//! when it returns. Real daemons in network namespaces; the client reads
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
    household::{household, pin, status, wait_live, windows},
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

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The first event on `d` at or after `since` (unix ms) whose kind is
/// `kind` and whose text contains `text`: its time.
fn event_at(d: &NsDaemon, since: u64, kind: &str, text: &str) -> Option<u64> {
    status(d)["events"]
        .as_array()?
        .iter()
        .filter(|e| e["at_ms"].as_u64().unwrap_or(0) >= since)
        .find(|e| e["kind"] == kind && e["text"].as_str().unwrap_or("").contains(text))
        .and_then(|e| e["at_ms"].as_u64())
}

/// Time to detect, to replan and to resume after an event at `t0` (unix
/// ms), from the event logs of `survivors`, for the closing report.
fn timeline(ds: &[NsDaemon], survivors: &[usize], t0: u64, victim: &str) -> String {
    let first = |kind: &str, text: &str| {
        survivors
            .iter()
            .filter_map(|&i| event_at(&ds[i], t0, kind, text))
            .min()
            .map(|t| format!("{} ms", t.saturating_sub(t0)))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "detected {} (dead) / {} (hop failed), replanned {}, plan live {}, answer resumed {} (replay) / {} (failover)",
        first("dead", victim),
        first("fail", ""),
        first("plan", ""),
        first("live", ""),
        first("resume", ""),
        first("failover", ""),
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    /// Neither head nor coordinator.
    Member,
    /// The head that is the coordinator too.
    HeadAndCoordinator,
    /// The coordinator of a pinned plan headed by another device; the
    /// client talks to the head.
    Coordinator,
    /// The head of a pinned plan that another device coordinates; the
    /// client talks to the coordinator.
    Head,
    /// The head of Halda's plan, stopped gracefully (SIGTERM) while its own
    /// client streams: it leaves the ring and hands the answer on.
    LeavingHead,
}

/// Kills `who` with SIGKILL as soon as a greedy 128-token answer streams
/// to a client on a surviving device; the answer must complete, token for
/// token the fault-free one. Returns the longest stall.
fn kill_mid_answer(who: Victim) -> Duration {
    let hosts = Hosts::create(3).expect("hosts");
    let mut ds = household(&hosts, SMOLLM2, "smollm2-135m", "use_all_devices = true\n");
    let name = |i: usize| status(&ds[i])["node"]["name"].as_str().unwrap().to_string();
    let p = wait_live(&ds, "Halda's, all three", |p| {
        p["pinned"] == false && p["devices"].as_array().unwrap().len() == 3
    });
    let idx = |n: &str| {
        ds.iter()
            .position(|d| status(d)["node"]["name"] == n)
            .unwrap()
    };
    let coord = prima_tests::household::coordinator(&ds);
    let other = |not: &[usize]| (0..3).find(|i| !not.contains(i)).unwrap();
    // Pins a plan over all three headed by `h` (a pin gives way to Halda
    // when a device of it dies).
    let pin_head = |h: usize| {
        let names = [name(h), name(other(&[h])), name(other(&[h, other(&[h])]))];
        pin(&ds, 1, &[(&names[0], 10), (&names[1], 10), (&names[2], 10)]);
        wait_live(&ds, "pinned", |p| {
            p["pinned"] == true && windows(p)[0].0 == names[0]
        });
    };
    let (victim, client) = match who {
        Victim::Member => {
            // Halda's own plan: the member that neither heads nor coordinates.
            let head = idx(&windows(&p)[0].0);
            (other(&[head, coord]), head)
        }
        Victim::LeavingHead => {
            let head = idx(&windows(&p)[0].0);
            (head, head)
        }
        Victim::HeadAndCoordinator => {
            pin_head(coord);
            (coord, other(&[coord]))
        }
        Victim::Coordinator | Victim::Head => {
            let h = other(&[coord]);
            pin_head(h);
            if who == Victim::Coordinator {
                (coord, h)
            } else {
                (h, coord)
            }
        }
    };
    let victim_name = name(victim);
    let client_name = name(client);
    let raw = "Once upon a time";
    let n = "128";
    let want = generate(&model(SMOLLM2), raw, 128, false);
    // A fault-free answer first: the pace to compare the stall with.
    let (text, ok, err, calm_gap, calm_total) = stream_ask(
        &hosts,
        &ds[client],
        &["ask", "--raw", "-t", "0", "-n", n, raw],
        || {},
    );
    assert!(ok, "{err}");
    assert_eq!(text.trim_end(), want.trim_end());
    let killed_at = std::cell::Cell::new(0u64);
    let (text, ok, err, gap, total) = stream_ask(
        &hosts,
        &ds[client],
        &["ask", "--raw", "-t", "0", "-n", n, raw],
        || {
            ds[victim].signal(if who == Victim::LeavingHead {
                "TERM"
            } else {
                "KILL"
            });
            killed_at.set(unix_ms());
        },
    );
    assert!(
        ok,
        "{who:?} {victim_name} killed: the answer survives: {err}"
    );
    assert_eq!(
        text.trim_end(),
        want.trim_end(),
        "token for token the fault-free answer"
    );
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let alive: Vec<&NsDaemon> = survivors.iter().map(|&i| &ds[i]).collect();
    let after = wait_live(&alive, "the survivors", |p| {
        p["devices"].as_array().unwrap().len() == 2
    });
    eprintln!(
        "{who:?} ({victim_name}) killed mid-answer, client on {}: answer complete in {total:?} \
         ({calm_total:?} fault-free, longest gap then {calm_gap:?}), longest stall {gap:?}; \
         plan now {:?}\n  {}",
        client_name,
        windows(&after),
        timeline(&ds, &survivors, killed_at.get(), &victim_name)
    );
    ds[victim].kill9();
    gap
}

#[test]
fn a_member_killed_mid_answer_costs_a_short_stall_and_the_answer_completes() {
    let gap = kill_mid_answer(Victim::Member);
    assert!(
        gap <= Duration::from_secs(3),
        "stall {gap:?} (dead after 1.2 s, then replan, load, replay)"
    );
}

#[test]
fn a_head_stopped_gracefully_mid_answer_hands_its_clients_answer_on() {
    let gap = kill_mid_answer(Victim::LeavingHead);
    assert!(gap <= Duration::from_secs(3), "stall {gap:?}");
}

#[test]
fn the_head_and_coordinator_killed_mid_answer_a_client_on_a_survivor_gets_its_answer() {
    let gap = kill_mid_answer(Victim::HeadAndCoordinator);
    assert!(gap <= Duration::from_secs(8), "stall {gap:?}");
}

#[test]
fn the_coordinator_killed_mid_answer_the_head_finishes_the_answer() {
    let gap = kill_mid_answer(Victim::Coordinator);
    assert!(gap <= Duration::from_secs(8), "stall {gap:?}");
}

#[test]
fn the_head_killed_mid_answer_a_client_on_the_coordinator_gets_its_answer() {
    let gap = kill_mid_answer(Victim::Head);
    assert!(gap <= Duration::from_secs(8), "stall {gap:?}");
}

/// The laptop leaves: its link goes down for 10 s. The others plan
/// without it; when it is back it rejoins by itself and the next plan
/// uses it again within 5 s.
#[test]
fn a_device_whose_link_drops_is_planned_around_and_used_again_when_it_returns() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "use_all_devices = true\n");
    let p = wait_live(&ds, "all three", |p| {
        p["devices"].as_array().unwrap().len() == 3
    });
    let coord = prima_tests::household::coordinator(&ds);
    let head = ds
        .iter()
        .position(|d| status(d)["node"]["name"] == windows(&p)[0].0.as_str())
        .unwrap();
    let laptop = (0..3).find(|&i| i != coord && i != head).unwrap();
    let laptop_name = status(&ds[laptop])["node"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let stay: Vec<&NsDaemon> = (0..3).filter(|&i| i != laptop).map(|i| &ds[i]).collect();
    let want = generate(&model(SMOLLM2), "Once upon a time", 48, false);
    let ask = |d: &NsDaemon| {
        let o = d.ctl(&["ask", "--raw", "-t", "0", "-n", "48", "Once upon a time"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(prima_tests::stdout(&o).trim_end(), want.trim_end());
    };
    let down = Instant::now();
    hosts.set_link(laptop, false).expect("link down");
    let without = wait_live(&stay, "without the laptop", |p| {
        !windows(p).iter().any(|(n, _)| *n == laptop_name)
    });
    eprintln!(
        "{laptop_name} off the network: planned around after {:?}: {:?}",
        down.elapsed(),
        windows(&without)
    );
    ask(&ds[head]);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    hosts.set_link(laptop, true).expect("link up");
    let back = Instant::now();
    let back_ms = unix_ms();
    let with = wait_live(&ds, "with the laptop again", |p| {
        windows(p).iter().any(|(n, _)| *n == laptop_name)
    });
    let took = back.elapsed();
    let seen = event_at(&ds[coord], back_ms, "back", &laptop_name)
        .or_else(|| event_at(&ds[coord], back_ms, "join", &laptop_name))
        .map(|t| t.saturating_sub(back_ms));
    eprintln!(
        "{laptop_name} back: used again after {took:?} (alive again at the coordinator after {seen:?} ms): {:?}",
        windows(&with)
    );
    if std::env::var("PRIMA_DEBUG_EVENTS").is_ok() {
        for (i, d) in ds.iter().enumerate() {
            for e in status(d)["events"].as_array().unwrap() {
                let at = e["at_ms"].as_u64().unwrap_or(0);
                if at >= back_ms {
                    eprintln!("  dev{i} +{} ms {} {}", at - back_ms, e["kind"], e["text"]);
                }
            }
        }
    }
    assert!(took <= Duration::from_secs(5), "rejoined after {took:?}");
    let head = ds
        .iter()
        .position(|d| status(d)["node"]["name"] == windows(&with)[0].0.as_str())
        .unwrap();
    ask(&ds[head]);
}

/// Starts device `i` of `hosts` (dev{i}) with the model registered.
fn join(hosts: &Hosts, i: usize, extra: &str) -> NsDaemon {
    let d = NsDaemon::start(
        hosts,
        i,
        &prima_tests::household::config(i, "smollm2-135m", extra),
    );
    status(&d);
    let o = d.ctl(&[
        "models",
        "add",
        model(SMOLLM2).to_str().unwrap(),
        "--name",
        "smollm2-135m",
    ]);
    assert!(o.status.success(), "models add: {o:?}");
    d
}

const TIGHT: &str = "memory_budget_mb = 48\n";

/// Devices join a running household of three whose memory is tight (each
/// daemon may hold 48 MiB in all, about 21-44 of them its own runtime, so
/// Halda's plan streams layers from disk). A
/// roomy fourth device helps: the next plan uses it, live within 5 s of
/// its arrival, and Halda predicts a faster token. A fifth, as tight as the
/// first three, would only add a hop: it is left out, with Halda's reason.
#[test]
fn joining_devices_are_used_when_halda_says_they_help() {
    let hosts = Hosts::create(5).expect("hosts");
    let mut ds = household(&hosts, SMOLLM2, "smollm2-135m", TIGHT);
    let tight = wait_live(&ds, "Halda's for three", |p| p["pinned"] == false);
    let tpot = |p: &serde_json::Value| p["tpot_ms"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "three tight devices: {:?}, predicted {:.1} ms/token",
        windows(&tight),
        tpot(&tight)
    );
    let t = Instant::now();
    ds.push(join(&hosts, 3, ""));
    let with = wait_live(&ds, "with dev3", |p| {
        windows(p).iter().any(|(n, _)| n == "dev3")
    });
    let took = t.elapsed();
    eprintln!(
        "dev3 (roomy) joined: used after {took:?}: {:?}, predicted {:.1} ms/token",
        windows(&with),
        tpot(&with)
    );
    assert!(took <= Duration::from_secs(5), "dev3 used after {took:?}");
    assert!(
        tpot(&with) < tpot(&tight),
        "Halda used dev3 because it helps"
    );
    let want = generate(&model(SMOLLM2), "Once upon a time", 32, false);
    let o = ds[0].ctl(&["ask", "--raw", "-t", "0", "-n", "32", "Once upon a time"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(prima_tests::stdout(&o).trim_end(), want.trim_end());

    let t0 = unix_ms();
    let t = Instant::now();
    ds.push(join(&hosts, 4, TIGHT));
    // The coordinator weighs dev4 once it is alive: it keeps the plan (or
    // plans without dev4); dev4 gets no layers.
    let coord = prima_tests::household::coordinator(&ds);
    let weighed = loop {
        if let Some(at) =
            event_at(&ds[coord], t0, "keep", "").or_else(|| event_at(&ds[coord], t0, "plan", ""))
        {
            break at;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "dev4 never weighed");
        std::thread::sleep(Duration::from_millis(100));
    };
    let p = wait_live(&ds, "after dev4", |_| true);
    eprintln!(
        "dev4 (tight) joined: weighed after {} ms: {:?}; coordinator's last events: {}",
        weighed.saturating_sub(t0),
        windows(&p),
        status(&ds[coord])["events"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .take(3)
            .map(|e| e["text"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(
        !windows(&p).iter().any(|(n, _)| n == "dev4"),
        "dev4 would slow the ring"
    );
    for d in &mut ds {
        d.kill9();
    }
}

/// A small seeded generator (xorshift64*) for the churn schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in lo..=hi milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Churn: for two minutes (PRIMA_CHURN_SECS), one fault at a time on a
/// household of four — kill -9 and restart, SIGTERM and restart, or the
/// link cut and restored — on a seeded schedule (PRIMA_CHURN_SEED), while
/// a client on the fourth device asks in a loop. No request may fail and
/// every answer must be the greedy one.
#[test]
fn churn_never_fails_a_request() {
    let secs: u64 = std::env::var("PRIMA_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("PRIMA_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let hosts = Hosts::create(4).expect("hosts");
    let all = "use_all_devices = true\n";
    let mut ds = household(&hosts, SMOLLM2, "smollm2-135m", all);
    ds.push(join(&hosts, 3, all));
    wait_live(&ds, "all four", |p| {
        p["devices"].as_array().unwrap().len() == 4
    });
    let prompts = [
        "Once upon a time",
        "The capital of France is",
        "Water boils at",
    ];
    let wants: Vec<String> = prompts
        .iter()
        .map(|p| generate(&model(SMOLLM2), p, 40, false))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut rng = Rng(seed.max(1));
    let mut faults: Vec<String> = Vec::new();
    let t0 = Instant::now();
    let results = std::thread::scope(|sc| {
        // The client: on dev3, never a victim.
        let client = sc.spawn(|| {
            let mut out = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let o = hosts
                    .command(3, bin("primactl"))
                    .args(["ask", "--raw", "-t", "0", "-n", "40", prompts[i % 3]])
                    .env_remove("PRIMA_API")
                    .output()
                    .expect("primactl");
                let got = String::from_utf8_lossy(&o.stdout).into_owned();
                let ok = o.status.success() && got.trim_end() == wants[i % 3].trim_end();
                out.push((
                    t0.elapsed(),
                    t.elapsed(),
                    ok,
                    format!("{got:?} {}", String::from_utf8_lossy(&o.stderr)),
                ));
                i += 1;
            }
            out
        });
        while t0.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(rng.ms(2000, 5000));
            let v = (rng.next() % 3) as usize;
            let down = rng.ms(2000, 6000);
            let what = match rng.next() % 3 {
                0 => {
                    ds[v].kill9();
                    std::thread::sleep(down);
                    ds[v].spawn(&hosts);
                    "kill -9, restart"
                }
                1 => {
                    ds[v].terminate(Duration::from_secs(15));
                    std::thread::sleep(down);
                    ds[v].spawn(&hosts);
                    "SIGTERM, restart"
                }
                _ => {
                    hosts.set_link(v, false).expect("link down");
                    std::thread::sleep(down);
                    hosts.set_link(v, true).expect("link up");
                    "link cut, restored"
                }
            };
            faults.push(format!(
                "{:>6.1}s dev{v}: {what} after {down:?}",
                t0.elapsed().as_secs_f64()
            ));
            // One fault at a time: wait for the household of four again.
            let t = Instant::now();
            while status(&ds[3])["cluster"]["devices"]
                .as_array()
                .map(|a| a.iter().filter(|x| x["state"] == "alive").count())
                != Some(4)
            {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "dev{v} did not come back"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        client.join().unwrap()
    });
    let failed: Vec<&(Duration, Duration, bool, String)> =
        results.iter().filter(|r| !r.2).collect();
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    eprintln!(
        "churn (seed {seed}, {secs} s): {} faults, {} requests, {} failed, slowest {slowest:?}\n  {}",
        faults.len(),
        results.len(),
        failed.len(),
        faults.join("\n  ")
    );
    for f in &failed {
        eprintln!("  failed at {:?} after {:?}: {}", f.0, f.1, f.3);
    }
    assert!(faults.len() >= secs as usize / 15, "faults happened");
    assert!(results.len() >= 10, "the client kept asking");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed",
        failed.len(),
        results.len()
    );
    for d in &mut ds {
        d.kill9();
    }
}

/// The link between two live devices breaks while both still reach the
/// third: gossip keeps both alive, so no plan changes; the ring passes
/// their frames through the third device instead. The answer running at
/// that moment completes unchanged, the next ones too, and when the link
/// is mended the direct path is used again.
#[test]
fn a_link_broken_between_two_live_devices_is_relayed_around() {
    let hosts = Hosts::create(3).expect("hosts");
    let ds = household(&hosts, SMOLLM2, "smollm2-135m", "");
    // dev0 -> dev1 -> dev2 -> dev0: the dev1-dev2 hop is the one to break.
    pin(&ds, 1, &[("dev0", 10), ("dev1", 10), ("dev2", 10)]);
    let p = wait_live(&ds, "pinned", |p| p["pinned"] == true);
    let raw = "Once upon a time";
    let want = generate(&model(SMOLLM2), raw, 128, false);
    let args = ["ask", "--raw", "-t", "0", "-n", "128", raw];
    let (text, ok, err, gap, total) = stream_ask(&hosts, &ds[0], &args, || {
        hosts.block(1, 2, true).expect("iptables");
    });
    assert!(ok, "the answer survives a broken link: {err}");
    assert_eq!(text.trim_end(), want.trim_end());
    let relayed = |d: &NsDaemon| {
        status(d)["events"].as_array().unwrap().iter().any(|e| {
            e["text"]
                .as_str()
                .unwrap_or("")
                .contains("relaying through")
        })
    };
    assert!(
        relayed(&ds[1]) || relayed(&ds[2]),
        "dev1 or dev2 relays:\n{}",
        ds[1].log()
    );
    // The devices are alive: the plan keeps its windows (its epoch may
    // grow as the link's RTT leaves the ads; that reloads nothing).
    let now = status(&ds[0])["plan"].clone();
    assert_eq!(windows(&now), windows(&p), "the same plan");
    eprintln!(
        "dev1-dev2 link broken mid-answer: complete in {total:?}, longest stall {gap:?}, plan {:?} kept",
        windows(&now)
    );
    // Steady state through the relay, then the direct path again.
    let (text, ok, err, gap, total) = stream_ask(&hosts, &ds[0], &args, || {});
    assert!(ok, "{err}");
    assert_eq!(text.trim_end(), want.trim_end());
    eprintln!("  through the relay: {total:?}, longest gap {gap:?}");
    hosts.block(1, 2, false).expect("iptables");
    let (text, ok, err, _, total) = stream_ask(&hosts, &ds[0], &args, || {});
    assert!(ok, "{err}");
    assert_eq!(text.trim_end(), want.trim_end());
    eprintln!("  link mended: {total:?}");
    assert!(
        gap <= Duration::from_secs(1),
        "no stall through a steady relay: {gap:?}"
    );
}
