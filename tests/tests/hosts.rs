//! The multi-host harness itself: namespaces, a daemon inside one, reached
//! from another over the bridge, links cut and restored, and cleanup.

use std::time::Duration;

use prima_tests::{bin, netns::Hosts, run};

fn curl_ok(h: &Hosts, from: usize, url: &str) -> bool {
    run(h
        .command(from, "curl")
        .args(["-fs", "--max-time", "2", url]))
    .status
    .success()
}

/// Polls `f` every 100 ms until it holds or `limit` passes.
fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_daemon_in_one_host_is_reachable_from_another() {
    let h = Hosts::create(2).expect("creating hosts");
    let ns1 = h.ns(1);
    let dir = tempfile::tempdir().unwrap();
    // Off loopback the API needs a token.
    std::fs::write(dir.path().join("primad.toml"), "[api]\ntoken = \"t\"\n").unwrap();
    let mut daemon = h
        .command(1, bin("primad"))
        .arg("--state-dir")
        .arg(dir.path())
        .args(["--api-addr", &format!("{}:7340", h.addr(1))])
        .env("PRIMAD_CONFIG", dir.path().join("primad.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{}:7340/health", h.addr(1));
    assert!(
        eventually(Duration::from_secs(10), || curl_ok(&h, 0, &url)),
        "primad in {ns1} not reachable from host 0"
    );
    h.set_link(1, false).unwrap();
    assert!(!curl_ok(&h, 0, &url), "a cut link must not answer");
    h.set_link(1, true).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || curl_ok(&h, 0, &url)),
        "restored link must answer again"
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let names: Vec<String> = (0..h.len()).map(|i| h.ns(i)).collect();
    drop(h);
    let listed = String::from_utf8_lossy(
        &run(std::process::Command::new("ip").args(["netns", "list"])).stdout,
    )
    .into_owned();
    for n in names {
        assert!(!listed.contains(&n), "namespace {n} leaked: {listed}");
    }
}

/// The profiler reads the memory limit of the cgroup it runs in (v1 here,
/// v2 elsewhere), so a low-RAM device is planned as one.
#[test]
fn the_profiler_sees_its_memory_cgroup() {
    assert!(
        prima_tests::netns::is_root(),
        "needs root to create a memory cgroup"
    );
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers");
    let name = format!("prima-test-{}", std::process::id());
    let (dir, limit_file) = if v1.is_dir() {
        (v1.join(&name), "memory.limit_in_bytes")
    } else if v2.is_file() {
        (
            std::path::Path::new("/sys/fs/cgroup").join(&name),
            "memory.max",
        )
    } else {
        panic!("no memory cgroup hierarchy at /sys/fs/cgroup");
    };
    std::fs::create_dir(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _c = Cleanup(dir.clone());
    let limit: u64 = 600 << 20;
    std::fs::write(dir.join(limit_file), limit.to_string()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} profile --json --scratch {}",
        dir.display(),
        bin("primad").display(),
        scratch.path().display()
    );
    let o = run(std::process::Command::new("sh").args(["-c", &script]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let avail = v["memory"]["available_bytes"].as_u64().unwrap();
    eprintln!(
        "in a {} MiB cgroup the profiler reports {} MiB available",
        limit >> 20,
        avail >> 20
    );
    assert!(
        avail <= limit,
        "available {avail} above the cgroup limit {limit}"
    );
    assert!(avail > 100 << 20, "available {avail} implausibly small");
}
