//! The household's recent events as this device saw them, newest last:
//! devices joining, leaving and failing, coordinators elected, plans made
//! and gone live, answers replayed or resumed after a failure, each with
//! its time and how long it took. `primactl status` shows them; the
//! healing tests read them to time detection, replanning and resumption.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// Events kept (older ones are dropped).
const KEEP: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// join, alive, suspect, dead, leave, elect, plan, live, replay,
    /// resume, fail.
    pub kind: &'static str,
    pub text: String,
    /// How long the step took, where it has a duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
}

static LOG: Mutex<VecDeque<Entry>> = Mutex::new(VecDeque::new());

/// Notes an event (one daemon per process: the log is the process's).
pub fn record(kind: &'static str, text: impl Into<String>, took: Option<std::time::Duration>) {
    let at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if log.len() == KEEP {
        log.pop_front();
    }
    log.push_back(Entry {
        at_ms,
        kind,
        text: text.into(),
        took_ms: took.map(|d| d.as_millis() as u64),
    });
}

/// The last `n` events, oldest first.
pub fn recent(n: usize) -> Vec<Entry> {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    log.iter()
        .skip(log.len().saturating_sub(n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order() {
        for i in 0..KEEP + 10 {
            record("plan", format!("e{i}"), None);
        }
        let r = recent(3);
        assert_eq!(r.len(), 3);
        let last = format!("e{}", KEEP + 9);
        assert_eq!(r[2].text, last);
        assert_eq!(recent(10_000).len(), KEEP);
    }
}
