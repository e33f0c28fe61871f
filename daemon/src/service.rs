//! `primad service install|uninstall|status`: run primad as the operating
//! system's service (systemd on Linux, launchd on macOS, the service manager
//! on Windows), the same way the packages in `packaging/` do.
//!
//! Install is idempotent: it creates what is missing (a `prima` system user
//! on Linux, the state and config directories, the config file from the
//! shipped defaults) and never overwrites an existing config. Uninstall
//! stops and removes the service and keeps state unless asked to purge.

#[cfg(not(windows))]
use anyhow::{bail, Context, Result};
#[cfg(target_os = "linux")]
use std::path::{Path, PathBuf};

/// The packaged systemd unit (ExecStart is rewritten to this binary).
pub const SYSTEMD_UNIT: &str = include_str!("../../packaging/linux/primad.service");
/// The packaged launchd job.
pub const LAUNCHD_PLIST: &str = include_str!("../../packaging/macos/org.prima.primad.plist");

/// The unit text for a primad binary at `exe`.
pub fn systemd_unit(exe: &str) -> String {
    SYSTEMD_UNIT.replace("ExecStart=/usr/bin/primad ", &format!("ExecStart={exe} "))
}

/// The launchd job for a primad binary at `exe`.
pub fn launchd_plist(exe: &str) -> String {
    LAUNCHD_PLIST.replace(
        "<string>/usr/local/bin/primad</string>",
        &format!("<string>{exe}</string>"),
    )
}

#[cfg(unix)]
fn exe() -> Result<String> {
    let p = std::env::current_exe().context("finding this program's path")?;
    let p = p.canonicalize().unwrap_or(p);
    Ok(p.display().to_string())
}

#[cfg(unix)]
fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`primad service {what}` changes system files and needs root: run it with sudo");
    }
    Ok(())
}

#[cfg(unix)]
fn run(cmd: &str, args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))
}

// ----------------------------------------------------------------- Linux

#[cfg(target_os = "linux")]
const UNIT_PATH: &str = "/etc/systemd/system/primad.service";
#[cfg(target_os = "linux")]
const STATE_DIR: &str = "/var/lib/prima";
#[cfg(target_os = "linux")]
const CONFIG: &str = "/etc/prima/primad.toml";

#[cfg(target_os = "linux")]
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(target_os = "linux")]
fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).is_ok_and(|o| o.status.success())
}

#[cfg(target_os = "linux")]
fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

#[cfg(target_os = "linux")]
pub fn install() -> Result<()> {
    require_root("install")?;
    let exe = exe()?;
    if !user_exists("prima") {
        let o = run(
            "useradd",
            &[
                "--system",
                "--user-group",
                "--home-dir",
                STATE_DIR,
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "prima daemon",
                "prima",
            ],
        )?;
        if !o.status.success() {
            bail!(
                "creating the prima user failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        println!("created the system user prima");
    }
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let o = run("chown", &["prima:prima", STATE_DIR])?;
    if !o.status.success() {
        bail!(
            "chown {STATE_DIR}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(STATE_DIR, std::fs::Permissions::from_mode(0o750))?;
    }
    let config = PathBuf::from(CONFIG);
    if config.exists() {
        println!("kept the existing config {CONFIG}");
    } else {
        write_if_changed(&config, prima_config::SHIPPED)?;
        println!("wrote the default config {CONFIG}");
    }
    let changed = write_if_changed(Path::new(UNIT_PATH), &systemd_unit(&exe))?;
    println!(
        "{} {UNIT_PATH} (ExecStart={exe})",
        if changed { "wrote" } else { "unchanged:" }
    );
    if systemd_running() {
        for args in [
            &["daemon-reload"][..],
            &["enable", "--now", "primad.service"][..],
        ] {
            let o = run("systemctl", args)?;
            if !o.status.success() {
                bail!(
                    "systemctl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        println!("primad is enabled and running (systemctl status primad; journalctl -u primad)");
    } else {
        println!(
            "systemd is not running on this machine (PID 1 is something else): the unit is \
             installed for when it is; start primad now with\n  runuser -u prima -- {exe} \
             --config {CONFIG} --state-dir {STATE_DIR}"
        );
    }
    Ok(())
}

#[cfg(target_os = "linux")]
pub fn uninstall(purge: bool) -> Result<()> {
    require_root("uninstall")?;
    let unit = Path::new(UNIT_PATH);
    if systemd_running() && unit.exists() {
        let _ = run("systemctl", &["disable", "--now", "primad.service"])?;
    }
    if unit.exists() {
        std::fs::remove_file(unit).with_context(|| format!("removing {UNIT_PATH}"))?;
        println!("removed {UNIT_PATH}");
        if systemd_running() {
            let _ = run("systemctl", &["daemon-reload"])?;
        }
    } else {
        println!("no {UNIT_PATH}: the service was not installed this way");
    }
    if purge {
        for d in [STATE_DIR, "/etc/prima"] {
            if Path::new(d).exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {d}"))?;
                println!("removed {d}");
            }
        }
        if user_exists("prima") {
            let o = run("userdel", &["prima"])?;
            if o.status.success() {
                println!("removed the user prima");
            }
        }
    } else {
        println!("kept {STATE_DIR} (identity, models) and {CONFIG}; --purge removes them");
    }
    Ok(())
}

#[cfg(target_os = "linux")]
pub fn status() -> Result<()> {
    let unit = Path::new(UNIT_PATH);
    let packaged = Path::new("/lib/systemd/system/primad.service");
    let installed = [unit, packaged].into_iter().find(|p| p.exists());
    match installed {
        Some(p) => println!("unit       {}", p.display()),
        None => println!("unit       not installed (primad service install)"),
    }
    if systemd_running() {
        for what in ["is-enabled", "is-active"] {
            let o = run("systemctl", &[what, "primad.service"])?;
            println!(
                "{:<10} {}",
                what.trim_start_matches("is-"),
                String::from_utf8_lossy(&o.stdout).trim()
            );
        }
    } else {
        println!("systemd    not running on this machine");
    }
    println!(
        "user       {}",
        if user_exists("prima") {
            "prima"
        } else {
            "missing"
        }
    );
    println!(
        "config     {CONFIG}{}",
        if Path::new(CONFIG).exists() {
            ""
        } else {
            " (missing)"
        }
    );
    println!("state      {STATE_DIR}");
    Ok(())
}

// ----------------------------------------------------------------- macOS

#[cfg(target_os = "macos")]
const PLIST_PATH: &str = "/Library/LaunchDaemons/org.prima.primad.plist";

#[cfg(target_os = "macos")]
pub fn install() -> Result<()> {
    require_root("install")?;
    let exe = exe()?;
    let support = "/Library/Application Support/prima";
    std::fs::create_dir_all(support).with_context(|| format!("creating {support}"))?;
    std::fs::create_dir_all("/Library/Logs/prima").context("creating /Library/Logs/prima")?;
    let config = std::path::Path::new(support).join("primad.toml");
    if !config.exists() {
        std::fs::write(&config, prima_config::SHIPPED)
            .with_context(|| format!("writing {}", config.display()))?;
        println!("wrote the default config {}", config.display());
    }
    std::fs::write(PLIST_PATH, launchd_plist(&exe))
        .with_context(|| format!("writing {PLIST_PATH}"))?;
    // Reload: bootout fails harmlessly when the job is not loaded.
    let _ = run("launchctl", &["bootout", "system/org.prima.primad"]);
    let o = run("launchctl", &["bootstrap", "system", PLIST_PATH])?;
    if !o.status.success() {
        bail!(
            "launchctl bootstrap: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    println!("primad is installed as a LaunchDaemon and running ({PLIST_PATH})");
    Ok(())
}

#[cfg(target_os = "macos")]
pub fn uninstall(purge: bool) -> Result<()> {
    require_root("uninstall")?;
    let _ = run("launchctl", &["bootout", "system/org.prima.primad"]);
    if std::path::Path::new(PLIST_PATH).exists() {
        std::fs::remove_file(PLIST_PATH).with_context(|| format!("removing {PLIST_PATH}"))?;
        println!("removed {PLIST_PATH}");
    }
    if purge {
        let _ = std::fs::remove_dir_all("/Library/Application Support/prima");
        let _ = std::fs::remove_dir_all("/Library/Logs/prima");
        println!("removed prima's state, config and logs");
    }
    Ok(())
}

#[cfg(target_os = "macos")]
pub fn status() -> Result<()> {
    let o = run("launchctl", &["print", "system/org.prima.primad"])?;
    if o.status.success() {
        println!("loaded     {PLIST_PATH}");
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            let l = l.trim();
            if l.starts_with("state =") || l.starts_with("pid =") {
                println!("           {l}");
            }
        }
    } else {
        println!("not installed (sudo primad service install)");
    }
    Ok(())
}

// ----------------------------------------------------------------- Windows

#[cfg(windows)]
pub use windows_svc::{install, run_as_service, status, uninstall};

#[cfg(windows)]
mod windows_svc {
    //! The Windows service: `primad service install` registers `primad
    //! service run` with the service manager, which then starts it at boot.

    use std::{ffi::OsString, time::Duration};

    use anyhow::{Context, Result};
    use windows_service::{
        define_windows_service,
        service::{
            ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl,
            ServiceExitCode, ServiceInfo, ServiceStartType, ServiceState, ServiceStatus,
            ServiceType,
        },
        service_control_handler::{self, ServiceControlHandlerResult},
        service_dispatcher,
        service_manager::{ServiceManager, ServiceManagerAccess},
    };

    const NAME: &str = "primad";

    pub fn install() -> Result<()> {
        let exe = std::env::current_exe()?;
        let manager =
            ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CREATE_SERVICE)
                .context("opening the service manager (run as Administrator)")?;
        let info = ServiceInfo {
            name: OsString::from(NAME),
            display_name: OsString::from("prima daemon"),
            service_type: ServiceType::OWN_PROCESS,
            start_type: ServiceStartType::AutoStart,
            error_control: ServiceErrorControl::Normal,
            executable_path: exe,
            launch_arguments: vec![OsString::from("service"), OsString::from("run")],
            dependencies: vec![],
            account_name: None,
            account_password: None,
        };
        let service = manager
            .create_service(&info, ServiceAccess::START)
            .context("creating the service (is it installed already?)")?;
        service.start::<OsString>(&[]).context("starting primad")?;
        println!(
            "primad is installed as a Windows service and running. Allow TCP 7341-7342 \
             and UDP 5353 (mDNS) on private networks in Windows Defender Firewall."
        );
        Ok(())
    }

    pub fn uninstall(_purge: bool) -> Result<()> {
        let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
            .context("opening the service manager (run as Administrator)")?;
        let service = manager
            .open_service(
                NAME,
                ServiceAccess::STOP | ServiceAccess::DELETE | ServiceAccess::QUERY_STATUS,
            )
            .context("primad is not installed as a service")?;
        let _ = service.stop();
        service.delete().context("removing the service")?;
        println!("removed the primad service");
        Ok(())
    }

    pub fn status() -> Result<()> {
        let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
        match manager.open_service(NAME, ServiceAccess::QUERY_STATUS) {
            Ok(s) => println!("service    {:?}", s.query_status()?.current_state),
            Err(_) => println!("service    not installed (primad service install)"),
        }
        Ok(())
    }

    define_windows_service!(ffi_service_main, service_main);

    /// `primad service run`: what the service manager starts.
    pub fn run_as_service() -> Result<()> {
        service_dispatcher::start(NAME, ffi_service_main).context("starting as a service")?;
        Ok(())
    }

    fn service_main(_args: Vec<OsString>) {
        let handler = service_control_handler::register(NAME, |event| match event {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                crate::serve::request_shutdown();
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        });
        let Ok(handle) = handler else { return };
        let status = |state, accept| ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: ServiceExitCode::Win32(0),
            checkpoint: 0,
            wait_hint: Duration::from_secs(30),
            process_id: None,
        };
        let _ = handle.set_service_status(status(
            ServiceState::Running,
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        ));
        let result =
            crate::serve::load_config(None, &Default::default()).and_then(crate::serve::run);
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "primad stopped with an error");
        }
        let _ =
            handle.set_service_status(status(ServiceState::Stopped, ServiceControlAccept::empty()));
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
pub fn install() -> Result<()> {
    bail!("primad service is supported on Linux (systemd), macOS (launchd) and Windows")
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
pub fn uninstall(_purge: bool) -> Result<()> {
    bail!("primad service is supported on Linux (systemd), macOS (launchd) and Windows")
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
pub fn status() -> Result<()> {
    bail!("primad service is supported on Linux (systemd), macOS (launchd) and Windows")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_given_binary_and_keeps_everything_else() {
        let u = systemd_unit("/opt/prima/bin/primad");
        assert!(u.contains(
            "ExecStart=/opt/prima/bin/primad --config /etc/prima/primad.toml --state-dir /var/lib/prima"
        ));
        assert_eq!(
            u.replace("/opt/prima/bin/primad", "/usr/bin/primad"),
            SYSTEMD_UNIT
        );
        assert!(SYSTEMD_UNIT.contains("Type=notify"));
        assert!(SYSTEMD_UNIT.contains("User=prima"));
        let p = launchd_plist("/opt/x/primad");
        assert!(p.contains("<string>/opt/x/primad</string>") && p.contains("KeepAlive"));
    }
}
