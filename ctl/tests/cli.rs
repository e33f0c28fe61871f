//! primactl on its own, with no daemon: help, completions, config checks.

use std::process::Command;

fn primactl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_primactl"))
}

#[test]
fn help_names_every_command() {
    let o = primactl().arg("--help").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "ask",
        "chat",
        "status",
        "models",
        "config",
        "bench",
        "completions",
    ] {
        assert!(s.contains(cmd), "--help lacks {cmd}:\n{s}");
    }
}

#[test]
fn shipped_config_validates_and_typos_are_named() {
    let dir = std::env::temp_dir().join(format!("primactl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    let o = primactl().args(["config", "default"]).output().unwrap();
    std::fs::write(&good, &o.stdout).unwrap();
    let o = primactl()
        .args(["config", "validate"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[sampling]\ntemprature = 0.5\n").unwrap();
    let o = primactl()
        .args(["config", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("temprature") && e.contains("line 2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let o = primactl().args(["completions", shell]).output().unwrap();
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("primactl"));
    }
}
