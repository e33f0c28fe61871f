//! A household of three daemons in network namespaces serving one model,
//! and what the ring and healing tests ask of it.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    model,
    netns::{Hosts, NsDaemon},
};

/// The config of device `i` (named dev{i}) serving `model_name`, in an open
/// household (pairing is tested elsewhere), with a 4 s ring deadline unless
/// `extra` (appended to `[ring]`) sets its own.
pub fn config(i: usize, model_name: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout_ms") {
        ""
    } else {
        "timeout_ms = 4000\n"
    };
    format!(
        "[node]\nname = \"dev{i}\"\n[model]\ndefault = \"{model_name}\"\n\
         [cluster]\nopen_household = true\n\
         [ring]\nauto_profile = false\n{timeout}{extra}"
    )
}

pub fn status(d: &NsDaemon) -> Value {
    let t = Instant::now();
    loop {
        if let Some(s) = d.status() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not answer:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts three daemons serving `file` as `name`, each with the model
/// registered, and waits until they form one household.
pub fn household(hosts: &Hosts, file: &str, name: &str, extra: &str) -> Vec<NsDaemon> {
    let ds: Vec<NsDaemon> = (0..3)
        .map(|i| NsDaemon::start(hosts, i, &config(i, name, extra)))
        .collect();
    let path = model(file);
    for d in &ds {
        status(d);
        let o = d.ctl(&["models", "add", path.to_str().unwrap(), "--name", name]);
        assert!(o.status.success(), "models add: {o:?}");
    }
    let t = Instant::now();
    loop {
        let alive: Vec<usize> = ds
            .iter()
            .map(|d| {
                status(d)["cluster"]["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|x| x["state"] == "alive")
                    .count()
            })
            .collect();
        // ... and the coordinator has made a first plan (all hold the model).
        let planned = ds.iter().all(|d| !status(d)["plan"]["devices"].is_null());
        if alive.iter().all(|&n| n == 3) && planned {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no household of 3: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ds
}

/// The device every daemon follows as coordinator, once the election has
/// settled: a device that just joined becomes a candidate only after a
/// 500 ms grace, so the first coordinator may still hand over; the answer is
/// one all agree on and that has held for a second.
pub fn coordinator(ds: &[NsDaemon]) -> usize {
    let t = Instant::now();
    let mut held: Option<(String, Instant)> = None;
    loop {
        let views: Vec<String> = ds
            .iter()
            .map(|d| {
                status(d)["cluster"]["coordinator"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        let agreed = views.iter().all(|v| *v == views[0]) && !views[0].is_empty();
        match &held {
            Some((c, since)) if agreed && *c == views[0] => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return ds
                        .iter()
                        .position(|d| status(d)["node"]["id"] == c.as_str())
                        .expect("the coordinator is one of ours");
                }
            }
            _ => held = agreed.then(|| (views[0].clone(), Instant::now())),
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no settled coordinator after 20 s: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every daemon follows one live plan satisfying `f`; returns it.
pub fn wait_live<D: std::borrow::Borrow<NsDaemon>>(
    ds: &[D],
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let plans: Vec<Value> = ds
            .iter()
            .map(|d| status(d.borrow())["plan"].clone())
            .collect();
        let same = plans.iter().all(|p| p["epoch"] == plans[0]["epoch"]);
        if same && plans.iter().all(|p| p["live"] == true && f(p)) {
            return plans[0].clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no live plan ({what}) after 30 s: {plans:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn windows(p: &Value) -> Vec<(String, u64)> {
    p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["node"].as_str().unwrap().to_string(),
                d["window"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Pins `plan` (k, [(device, window)], head first) on the coordinator.
pub fn pin(ds: &[NsDaemon], k: u32, plan: &[(&str, u32)]) {
    let specs: Vec<String> = plan.iter().map(|(n, w)| format!("{n}={w}")).collect();
    pin_specs(ds, k, &specs);
}

/// Pins a plan given as `primactl plan set` arguments (`dev2=10:4`: a window
/// of 10 layers, the last 4 on the GPU).
pub fn pin_specs(ds: &[NsDaemon], k: u32, specs: &[String]) {
    let mut c = coordinator(ds);
    let mut args: Vec<String> = vec!["plan".into(), "set".into(), "--k".into(), k.to_string()];
    args.extend(specs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Right after start-up a device's model may not have reached the
    // coordinator yet: the pin is refused, saying so; try again. Should the
    // coordinator have handed over meanwhile, ask the new one.
    let t = Instant::now();
    loop {
        let o = ds[c].ctl(&args);
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        let moved = err.contains("only the coordinator plans");
        assert!(
            (moved || err.contains("not live or does not hold"))
                && t.elapsed() < Duration::from_secs(10),
            "plan set: {o:?}"
        );
        if moved {
            c = coordinator(ds);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
