//! Several real primad processes, each in its own network namespace on a
//! private bridge, finding each other by real mDNS, talking real libp2p.
//!
//! Run with `cargo test --release -p prima-tests --test cluster` (as root).

use std::time::{Duration, Instant};

use prima_tests::{
    household::status,
    netns::{Hosts, NsDaemon},
};
use serde_json::Value;

const OPEN: &str = "[cluster]\nopen_household = true\n";

fn config(name: &str, extra: &str) -> String {
    format!("[node]\nname = \"{name}\"\n{extra}")
}

/// (alive device ids incl. itself, coordinator) as one daemon sees it.
fn view(s: &Value) -> (Vec<String>, String) {
    let c = &s["cluster"];
    let mut alive: Vec<String> = c["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "alive")
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    alive.sort();
    (alive, c["coordinator"].as_str().unwrap_or("").to_string())
}

fn id(s: &Value) -> String {
    s["node"]["id"].as_str().unwrap().to_string()
}

/// Waits until every daemon in `ds` sees exactly `want` alive and the same
/// coordinator; returns how long it took and that coordinator.
fn wait_agreement(ds: &[&NsDaemon], want: &[String], timeout: Duration) -> (Duration, String) {
    let t = Instant::now();
    let mut want = want.to_vec();
    want.sort();
    loop {
        let views: Vec<Option<(Vec<String>, String)>> =
            ds.iter().map(|d| d.status().map(|s| view(&s))).collect();
        if views.iter().all(|v| v.is_some()) {
            let vs: Vec<_> = views.into_iter().flatten().collect();
            if vs
                .iter()
                .all(|(alive, c)| *alive == want && *c == vs[0].1 && want.contains(c))
            {
                return (t.elapsed(), vs[0].1.clone());
            }
            if t.elapsed() > timeout {
                panic!("no agreement on {want:?} after {timeout:?}: {vs:?}");
            }
        } else if t.elapsed() > timeout {
            panic!("a daemon did not answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pairs `joiner` into `member`'s household with a fresh code.
fn pair(member: &NsDaemon, joiner: &NsDaemon) {
    let o = member.ctl(&["pair", "--no-wait"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "pair: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let code = out
        .split_whitespace()
        .find(|w| w.len() == 11 && w.chars().filter(|c| *c == '-').count() == 2)
        .unwrap_or_else(|| panic!("no code in {out}"))
        .to_string();
    let o = joiner.ctl(&["join", &code]);
    assert!(
        o.status.success(),
        "join: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn household_forms_survives_a_dead_coordinator_and_takes_it_back() {
    let hosts = Hosts::create(3).expect("hosts");
    let mut ds: Vec<NsDaemon> = (0..3)
        .map(|i| NsDaemon::start(&hosts, i, &config(&format!("dev{i}"), "")))
        .collect();
    let ids: Vec<String> = ds.iter().map(|d| id(&status(d))).collect();
    // Pairing, end to end with the codes.
    let t = Instant::now();
    pair(&ds[0], &ds[1]);
    pair(&ds[1], &ds[2]);
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    let (took, _) = wait_agreement(&refs, &ids, Duration::from_secs(10));
    eprintln!(
        "paired 3 devices in {:?} (agreement {took:?} after the last join)",
        t.elapsed()
    );
    drop(refs);
    // Now the household's devices start fresh: discovery and election time.
    for d in ds.iter_mut() {
        d.kill9();
    }
    let t0 = Instant::now();
    for d in ds.iter_mut() {
        d.spawn(&hosts);
    }
    for d in &ds {
        status(d);
    }
    let up = t0.elapsed();
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    let (took, coord) = wait_agreement(&refs, &ids, Duration::from_secs(10));
    eprintln!(
        "3 devices: APIs up after {up:?}; all see each other and agree on coordinator {coord} \
         {took:?} later ({:?} from start)",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5) + up,
        "discovery + election took {took:?}"
    );
    // The same coordinator is the one every view names; it is a member.
    assert!(ids.contains(&coord));

    // kill -9 the coordinator: the others elect another within 3 s.
    let ci = ids.iter().position(|i| *i == coord).unwrap();
    ds[ci].kill9();
    let t1 = Instant::now();
    let rest: Vec<String> = ids.iter().filter(|i| **i != coord).cloned().collect();
    let others: Vec<&NsDaemon> = ds
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ci)
        .map(|(_, d)| d)
        .collect();
    let (took, new_coord) = wait_agreement(&others, &rest, Duration::from_secs(6));
    eprintln!("coordinator killed: {new_coord} elected after {took:?}");
    assert!(took < Duration::from_secs(3), "re-election took {took:?}");
    assert_ne!(new_coord, coord);
    drop(others);

    // It comes back by itself (same state dir, same identity) within 5 s.
    let t2 = Instant::now();
    ds[ci].spawn(&hosts);
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    let (took, back) = wait_agreement(&refs, &ids, Duration::from_secs(10));
    eprintln!(
        "restarted device rejoined after {:?} (coordinator {back})",
        t2.elapsed()
    );
    assert!(
        t2.elapsed() < Duration::from_secs(5),
        "rejoin took {:?}",
        t2.elapsed()
    );
    assert_eq!(back, coord, "the most capable device coordinates again");
    let _ = (took, t1);
}

#[test]
fn a_cut_link_is_dead_then_alive_again() {
    let hosts = Hosts::create(2).expect("hosts");
    let ds: Vec<NsDaemon> = (0..2)
        .map(|i| NsDaemon::start(&hosts, i, &config(&format!("dev{i}"), OPEN)))
        .collect();
    let ids: Vec<String> = ds.iter().map(|d| id(&status(d))).collect();
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    wait_agreement(&refs, &ids, Duration::from_secs(10));
    hosts.set_link(1, false).unwrap();
    let t = Instant::now();
    let state_of_1 = || {
        let s = ds[0].status().unwrap();
        let d = s["cluster"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == ids[1].as_str())
            .cloned()
            .unwrap();
        d["state"].as_str().unwrap().to_string()
    };
    while state_of_1() != "dead" {
        assert!(t.elapsed() < Duration::from_secs(5), "never marked dead");
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!("link cut: device marked dead after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2));
    hosts.set_link(1, true).unwrap();
    let (took, _) = wait_agreement(&refs, &ids, Duration::from_secs(10));
    eprintln!(
        "link restored: alive again after {took:?} (cut for {:?})",
        t.elapsed()
    );
}

#[test]
fn an_unpaired_device_cannot_join() {
    let hosts = Hosts::create(3).expect("hosts");
    let members: Vec<NsDaemon> = (0..2)
        .map(|i| NsDaemon::start(&hosts, i, &config(&format!("dev{i}"), "")))
        .collect();
    status(&members[0]);
    status(&members[1]);
    pair(&members[0], &members[1]);
    // The stranger has a household of its own, and even dials a member directly.
    let stranger = NsDaemon::start(
        &hosts,
        2,
        &config(
            "stranger",
            &format!(
                "[cluster]\nstatic_peers = [\"/ip4/{}/tcp/7341\"]\n",
                hosts.addr(0)
            ),
        ),
    );
    let ids: Vec<String> = members.iter().map(|d| id(&status(d))).collect();
    let sid = id(&status(&stranger));
    let refs: Vec<&NsDaemon> = members.iter().collect();
    wait_agreement(&refs, &ids, Duration::from_secs(10));
    // Give discovery and the stranger's dials time to happen.
    let t = Instant::now();
    let mut seen_nearby = false;
    while t.elapsed() < Duration::from_secs(4) {
        let s = members[0].status().unwrap();
        let c = &s["cluster"];
        assert!(
            c["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["id"] != sid.as_str()),
            "the stranger got in: {c}"
        );
        if c["nearby_unpaired"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["addrs"].to_string().contains(&hosts.addr(2)))
        {
            seen_nearby = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        seen_nearby,
        "members should list the stranger as an unpaired device nearby"
    );
    let s = stranger.status().unwrap();
    let devs = s["cluster"]["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1, "the stranger saw members: {devs:?}");
}

#[test]
fn wrong_codes_fail_and_close_the_offer_then_removal_locks_out() {
    let hosts = Hosts::create(2).expect("hosts");
    let ds: Vec<NsDaemon> = (0..2)
        .map(|i| NsDaemon::start(&hosts, i, &config(&format!("dev{i}"), "")))
        .collect();
    let ids: Vec<String> = ds.iter().map(|d| id(&status(d))).collect();
    let o = ds[0].ctl(&["pair", "--no-wait"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let code = out
        .split_whitespace()
        .find(|w| w.len() == 11)
        .unwrap()
        .to_string();
    let wrong = if code.starts_with('9') {
        code.replacen('9', "1", 1)
    } else {
        format!("9{}", &code[1..])
    };
    let addr = hosts.addr(0);
    for attempt in 1..=3 {
        let o = ds[1].ctl(&["join", &wrong, "--addr", &addr]);
        assert!(
            !o.status.success(),
            "attempt {attempt} with a wrong code succeeded"
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("not accepted") || e.contains("connect"), "{e}");
    }
    // Three strikes: the offer is closed, even the right code fails now.
    let t = Instant::now();
    while ds[0].status().unwrap()["cluster"]["pairing"] == true {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the offer stayed open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = ds[1].ctl(&["join", &code, "--addr", &addr]);
    assert!(
        !o.status.success(),
        "a closed offer accepted the right code"
    );
    let s1 = ds[1].status().unwrap();
    assert_eq!(s1["cluster"]["devices"].as_array().unwrap().len(), 1);

    // A fresh code works; then removing the device locks it out.
    pair(&ds[0], &ds[1]);
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    wait_agreement(&refs, &ids, Duration::from_secs(10));
    let o = ds[0].ctl(&["devices", "remove", "dev1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    loop {
        let s = ds[0].status().unwrap();
        let gone = s["cluster"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["id"] != ids[1].as_str());
        if gone {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "removed device still listed: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It stays out: its connections are refused.
    std::thread::sleep(Duration::from_secs(2));
    let s = ds[0].status().unwrap();
    assert!(
        s["cluster"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["id"] != ids[1].as_str()),
        "the removed device came back: {s}"
    );
}

#[test]
fn malformed_gossip_from_a_paired_device_is_dropped() {
    let hosts = Hosts::create(3).expect("hosts");
    let mut ds: Vec<NsDaemon> = (0..3)
        .map(|i| NsDaemon::start(&hosts, i, &config(&format!("dev{i}"), "")))
        .collect();
    let ids: Vec<String> = ds.iter().map(|d| id(&status(d))).collect();
    pair(&ds[0], &ds[1]);
    pair(&ds[0], &ds[2]);
    let refs: Vec<&NsDaemon> = ds.iter().collect();
    wait_agreement(&refs, &ids, Duration::from_secs(10));
    drop(refs);
    let epoch = ds[0].status().unwrap()["cluster"]["roster"]["epoch"].clone();
    // Device 2 turns hostile: same identity and household key, bad frames.
    ds[2].kill9();
    let o = hosts
        .command(2, prima_tests::bin("primad"))
        .arg("debug-hostile-gossip")
        .arg("--config")
        .arg(ds[2].dir.path().join("primad.toml"))
        .arg("--state-dir")
        .arg(ds[2].dir.path().join("state"))
        .args(["--peer", &format!("/ip4/{}/tcp/7341", hosts.addr(0))])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hostile sender: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sent 5"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    // Both members still run, still see each other, and kept their roster.
    for d in &ds[..2] {
        let s = d.status().expect("a member stopped answering");
        assert_eq!(
            s["cluster"]["roster"]["epoch"], epoch,
            "a forged roster was taken"
        );
    }
    let refs: Vec<&NsDaemon> = ds[..2].iter().collect();
    wait_agreement(&refs, &ids[..2], Duration::from_secs(5));
    let log = ds[0].log();
    assert!(log.contains("dropped a malformed gossip message"), "{log}");
    assert!(
        log.contains("dropped gossip of another protocol version"),
        "{log}"
    );
    assert!(log.contains("roster with a bad signature"), "{log}");
    assert!(log.contains("dropped an oversized gossip message"), "{log}");
}
