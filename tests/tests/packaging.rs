//! Packaging, for real on this machine (as root): the .deb built by
//! cargo-deb puts the binaries, the systemd unit, the config and the `prima`
//! user in place; the unit passes `systemd-analyze verify`; the installed
//! daemon, started exactly as the unit says (as its user, with its
//! arguments, in a network namespace of its own), answers `primactl ask`;
//! purge removes it all. `primad service install` writes an equivalent unit,
//! is idempotent, and `uninstall --purge` removes what it made.
//!
//! One test, because both paths install the same system files.
//!
//! Run with `cargo test --release -p prima-tests --test packaging` (needs
//! root, cargo-deb, dpkg and systemd-analyze; scripts/test installs them).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use prima_tests::{bin, generate, model, netns::Hosts, run, stdout, SMOLLM2};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

fn user_exists(name: &str) -> bool {
    run(Command::new("getent").args(["passwd", name]))
        .status
        .success()
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "prima"]))
        .stdout
        .starts_with(b"install ok installed")
}

/// Purges the package even when the test fails half-way.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "prima"]).output();
        let _ = Command::new(bin("primad"))
            .args(["service", "uninstall", "--purge"])
            .output();
    }
}

/// The value of `Key=` in a unit.
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

#[test]
fn deb_and_service_install_put_a_working_daemon_in_place_and_purge_removes_it() {
    assert!(
        prima_tests::netns::is_root(),
        "the packaging test installs a package and needs root"
    );
    let _purge = Purge;
    if installed() {
        ok(Command::new("dpkg").args(["--purge", "prima"]));
    }

    // --- the .deb
    let out = tempfile::tempdir().unwrap();
    let t = Instant::now();
    ok(Command::new("cargo")
        .current_dir(workspace())
        .args(["deb", "-p", "primad", "--no-build", "--no-strip", "-o"])
        .arg(out.path()));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote a .deb");
    eprintln!("built {} in {:?}", deb.display(), t.elapsed());
    let contents = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for f in [
        "./usr/bin/primad",
        "./usr/bin/primactl",
        "./etc/prima/primad.toml",
        "primad.service",
    ] {
        assert!(contents.contains(f), "{f} in the package:\n{contents}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .arg("conffiles"));
    assert!(conffiles.contains("/etc/prima/primad.toml"), "{conffiles}");

    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());
    let unit_path = [
        "/lib/systemd/system/primad.service",
        "/usr/lib/systemd/system/primad.service",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("the unit is installed");
    for p in [
        "/usr/bin/primad",
        "/usr/bin/primactl",
        "/etc/prima/primad.toml",
    ] {
        assert!(Path::new(p).exists(), "{p} installed");
    }
    assert!(user_exists("prima"), "the prima user exists");
    let owner = ok(Command::new("stat").args(["-c", "%U %a", "/var/lib/prima"]));
    assert_eq!(owner.trim(), "prima 750");
    ok(Command::new("systemd-analyze").arg("verify").arg(unit_path));
    let unit = std::fs::read_to_string(unit_path).unwrap();
    assert_eq!(unit, primad::service::SYSTEMD_UNIT, "the packaged unit");

    // --- the installed daemon, started as the unit says, answers.
    let hosts = Hosts::create(1).expect("a namespace for the installed daemon");
    let exec: Vec<&str> = unit_value(&unit, "ExecStart").split_whitespace().collect();
    let user = unit_value(&unit, "User");
    // A model the prima user may read.
    let m = PathBuf::from("/var/lib/prima/test-smollm2.gguf");
    std::fs::copy(model(SMOLLM2), &m).unwrap();
    ok(Command::new("chown").args(["prima:prima"]).arg(&m));
    let mut daemon = hosts
        .command(0, "runuser")
        .args(["-u", user, "--"])
        .args(&exec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        let mut c = hosts.command(0, "/usr/bin/primactl");
        c.args(args);
        c
    };
    let t = Instant::now();
    while !run(&mut ctl(&["status"])).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the installed daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&mut ctl(&[
        "models",
        "add",
        m.to_str().unwrap(),
        "--name",
        "smollm2-135m",
    ]));
    let q = "What is the capital of France?";
    let got = ok(&mut ctl(&["ask", "-t", "0", "-n", "24", q]));
    assert_eq!(got.trim_end(), generate(&m, q, 24, true).trim_end());
    let st: serde_json::Value = serde_json::from_str(&ok(&mut ctl(&["status", "--json"]))).unwrap();
    assert_eq!(st["node"]["state_dir"], "/var/lib/prima", "{st}");
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let code = daemon.wait().unwrap();
    eprintln!("installed daemon answered and stopped: {code}");
    drop(hosts);

    // --- purge
    ok(Command::new("dpkg").args(["--purge", "prima"]));
    assert!(!installed());
    for p in [
        "/usr/bin/primad",
        "/usr/bin/primactl",
        "/etc/prima/primad.toml",
        "/var/lib/prima",
    ] {
        assert!(!Path::new(p).exists(), "{p} removed by purge");
    }
    assert!(!unit_path.exists(), "unit removed");
    assert!(!user_exists("prima"), "user removed by purge");

    // --- primad service install / status / uninstall
    let primad = bin("primad");
    let first = ok(Command::new(&primad).args(["service", "install"]));
    eprintln!("{first}");
    let written = std::fs::read_to_string("/etc/systemd/system/primad.service").unwrap();
    let exe = primad.canonicalize().unwrap().display().to_string();
    assert_eq!(
        written.replace(&exe, "/usr/bin/primad"),
        primad::service::SYSTEMD_UNIT,
        "the same unit as the package's, with this binary"
    );
    ok(Command::new("systemd-analyze")
        .arg("verify")
        .arg("/etc/systemd/system/primad.service"));
    assert!(user_exists("prima"));
    assert_eq!(
        std::fs::read_to_string("/etc/prima/primad.toml").unwrap(),
        prima_config::SHIPPED
    );
    // Idempotent, and a changed config is kept.
    std::fs::write("/etc/prima/primad.toml", "[node]\nname = \"mine\"\n").unwrap();
    let second = ok(Command::new(&primad).args(["service", "install"]));
    assert!(second.contains("unchanged"), "{second}");
    assert!(second.contains("kept the existing config"), "{second}");
    assert_eq!(
        std::fs::read_to_string("/etc/prima/primad.toml").unwrap(),
        "[node]\nname = \"mine\"\n"
    );
    let status = ok(Command::new(&primad).args(["service", "status"]));
    assert!(
        status.contains("/etc/systemd/system/primad.service"),
        "{status}"
    );
    // Uninstall keeps state unless purging.
    let un = ok(Command::new(&primad).args(["service", "uninstall"]));
    assert!(un.contains("kept"), "{un}");
    assert!(!Path::new("/etc/systemd/system/primad.service").exists());
    assert!(Path::new("/etc/prima/primad.toml").exists());
    ok(Command::new(&primad).args(["service", "uninstall", "--purge"]));
    assert!(!Path::new("/etc/prima").exists());
    assert!(!Path::new("/var/lib/prima").exists());
    assert!(!user_exists("prima"));
}
