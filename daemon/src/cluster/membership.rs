//! Membership: which household devices are alive, suspected or dead.
//!
//! A pure state machine: it owns no clock and no sockets. The network loop
//! feeds it what it hears (`Event::Heard` for any valid message from a
//! device, heartbeats included) and a periodic `Event::Tick`; it answers with
//! the state changes, each stamped with the membership epoch, which grows by
//! one on every change so that everyone can tell newer views from older ones.
//!
//! A device is `Suspect` once nothing was heard from it for `suspect_after`,
//! and `Dead` after `dead_after`; anything heard makes it `Alive` again. The
//! defaults (heartbeats every 200 ms, suspect at 600 ms, dead at 1.2 s) detect
//! a dead device within 1-2 s on a LAN while tolerating two lost heartbeats.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::Serialize;

/// A device's identity (its libp2p peer id, as text).
pub type NodeId = String;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    pub heartbeat_every: Duration,
    pub suspect_after: Duration,
    pub dead_after: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_millis(200),
            suspect_after: Duration::from_millis(600),
            dead_after: Duration::from_millis(1200),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Alive,
    Suspect,
    Dead,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Alive => "alive",
            PeerState::Suspect => "suspect",
            PeerState::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A valid message from `peer` arrived.
    Heard(NodeId),
    /// `peer` said goodbye (clean shutdown): dead at once.
    Left(NodeId),
    /// `peer` was removed from the roster: forgotten.
    Removed(NodeId),
    /// Time passed.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub peer: NodeId,
    /// None for a device seen for the first time.
    pub from: Option<PeerState>,
    /// None for a device forgotten.
    pub to: Option<PeerState>,
    pub epoch: u64,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub state: PeerState,
    pub last_heard: Instant,
    /// When the current state began.
    pub since: Instant,
}

#[derive(Debug, Clone)]
pub struct Membership {
    cfg: MembershipConfig,
    peers: BTreeMap<NodeId, Peer>,
    epoch: u64,
}

impl Membership {
    pub fn new(cfg: MembershipConfig) -> Self {
        Self {
            cfg,
            peers: BTreeMap::new(),
            epoch: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    pub fn peers(&self) -> &BTreeMap<NodeId, Peer> {
        &self.peers
    }

    pub fn state(&self, peer: &str) -> Option<PeerState> {
        self.peers.get(peer).map(|p| p.state)
    }

    /// Devices not known to be dead (alive or only suspected).
    pub fn live(&self) -> impl Iterator<Item = (&NodeId, &Peer)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.state != PeerState::Dead)
    }

    /// Moves `id` to `to` if it is elsewhere; the change, if any.
    fn transition(&mut self, id: &str, to: PeerState, now: Instant) -> Option<Change> {
        let p = self.peers.get_mut(id)?;
        if p.state == to {
            return None;
        }
        let from = p.state;
        p.state = to;
        p.since = now;
        self.epoch += 1;
        Some(Change {
            peer: id.to_string(),
            from: Some(from),
            to: Some(to),
            epoch: self.epoch,
        })
    }

    pub fn on_event(&mut self, now: Instant, ev: Event) -> Vec<Change> {
        let mut out = Vec::new();
        match ev {
            Event::Heard(id) => match self.peers.get_mut(&id) {
                Some(p) => {
                    p.last_heard = p.last_heard.max(now);
                    out.extend(self.transition(&id, PeerState::Alive, now));
                }
                None => {
                    self.peers.insert(
                        id.clone(),
                        Peer {
                            state: PeerState::Alive,
                            last_heard: now,
                            since: now,
                        },
                    );
                    self.epoch += 1;
                    out.push(Change {
                        peer: id,
                        from: None,
                        to: Some(PeerState::Alive),
                        epoch: self.epoch,
                    });
                }
            },
            Event::Left(id) => out.extend(self.transition(&id, PeerState::Dead, now)),
            Event::Removed(id) => {
                if let Some(p) = self.peers.remove(&id) {
                    self.epoch += 1;
                    out.push(Change {
                        peer: id,
                        from: Some(p.state),
                        to: None,
                        epoch: self.epoch,
                    });
                }
            }
            Event::Tick => {
                // Ticks only ever demote; only hearing from a device promotes it.
                let demote: Vec<(NodeId, PeerState)> = self
                    .peers
                    .iter()
                    .filter_map(|(id, p)| {
                        let quiet = now.saturating_duration_since(p.last_heard);
                        let want = if quiet >= self.cfg.dead_after {
                            PeerState::Dead
                        } else if quiet >= self.cfg.suspect_after {
                            PeerState::Suspect
                        } else {
                            PeerState::Alive
                        };
                        (want > p.state).then(|| (id.clone(), want))
                    })
                    .collect();
                for (id, want) in demote {
                    out.extend(self.transition(&id, want, now));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs heartbeats from `peers` every 200 ms over `[from, to)` while the
    /// link is `up(t)`, ticking every 50 ms; returns the changes.
    fn simulate(
        m: &mut Membership,
        t0: Instant,
        from: u64,
        to: u64,
        peers: &[&str],
        up: impl Fn(u64) -> bool,
    ) -> Vec<Change> {
        let mut out = vec![];
        let mut t = from;
        while t < to {
            if t.is_multiple_of(200) && up(t) {
                for p in peers {
                    out.extend(m.on_event(t0 + ms(t), Event::Heard(p.to_string())));
                }
            }
            out.extend(m.on_event(t0 + ms(t), Event::Tick));
            t += 50;
        }
        out
    }

    #[test]
    fn new_devices_are_alive_and_bump_the_epoch() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        let c = m.on_event(t0, Event::Heard("a".into()));
        assert_eq!(c[0].to, Some(PeerState::Alive));
        assert_eq!(c[0].from, None);
        assert_eq!(m.epoch(), 1);
        assert!(m.on_event(t0 + ms(10), Event::Heard("a".into())).is_empty());
        assert_eq!(m.epoch(), 1, "hearing an alive device again is no change");
    }

    #[test]
    fn silence_makes_suspect_then_dead_within_two_seconds() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        simulate(&mut m, t0, 0, 1000, &["a", "b"], |_| true);
        assert_eq!(m.state("a"), Some(PeerState::Alive));
        // b goes silent at 1000 ms; a keeps talking.
        let mut changes = vec![];
        let mut t = 1000;
        while t < 3000 {
            if t % 200 == 0 {
                changes.extend(m.on_event(t0 + ms(t), Event::Heard("a".into())));
            }
            changes.extend(m.on_event(t0 + ms(t), Event::Tick));
            t += 50;
        }
        let b: Vec<_> = changes.iter().filter(|c| c.peer == "b").collect();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].to, Some(PeerState::Suspect));
        assert_eq!(b[1].to, Some(PeerState::Dead));
        // Last heard at 800 ms: dead by 800 + 1200 = 2000 ms.
        assert_eq!(m.peers()["b"].since, t0 + ms(2000));
        assert!(changes.iter().all(|c| c.peer != "a"));
        assert!(b[1].epoch > b[0].epoch);
    }

    #[test]
    fn one_lost_heartbeat_is_tolerated() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        // Every third heartbeat lost.
        let c = simulate(&mut m, t0, 0, 5000, &["a"], |t| t % 600 != 200);
        assert_eq!(c.len(), 1, "only the first sighting: {c:?}");
    }

    #[test]
    fn flapping_link_is_suspected_not_killed_and_recovers() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        // Up 1 s, down 0.8 s, repeatedly: suspect during gaps, never dead.
        let c = simulate(&mut m, t0, 0, 8000, &["a"], |t| t % 1800 < 1000);
        assert!(c.iter().any(|c| c.to == Some(PeerState::Suspect)));
        assert!(c.iter().all(|c| c.to != Some(PeerState::Dead)), "{c:?}");
        assert_eq!(m.state("a"), Some(PeerState::Alive));
    }

    #[test]
    fn dead_device_comes_back_alive() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        simulate(&mut m, t0, 0, 1000, &["a"], |_| true);
        simulate(&mut m, t0, 1000, 4000, &["a"], |_| false);
        assert_eq!(m.state("a"), Some(PeerState::Dead));
        let c = simulate(&mut m, t0, 4000, 4400, &["a"], |_| true);
        assert_eq!(c[0].from, Some(PeerState::Dead));
        assert_eq!(c[0].to, Some(PeerState::Alive));
        assert_eq!(m.live().count(), 1);
    }

    #[test]
    fn goodbye_and_removal() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now();
        m.on_event(t0, Event::Heard("a".into()));
        let c = m.on_event(t0, Event::Left("a".into()));
        assert_eq!(c[0].to, Some(PeerState::Dead));
        assert!(m.on_event(t0, Event::Left("a".into())).is_empty());
        let c = m.on_event(t0, Event::Removed("a".into()));
        assert_eq!(c[0].to, None);
        assert!(m.peers().is_empty());
        assert!(m.on_event(t0, Event::Removed("zz".into())).is_empty());
    }

    #[test]
    fn out_of_order_time_does_not_resurrect_or_panic() {
        let mut m = Membership::new(MembershipConfig::default());
        let t0 = Instant::now() + ms(10_000);
        m.on_event(t0, Event::Heard("a".into()));
        // A tick from "the past" (clock skew between tasks) changes nothing.
        assert!(m.on_event(t0 - ms(5000), Event::Tick).is_empty());
        m.on_event(t0 + ms(2000), Event::Tick);
        assert_eq!(m.state("a"), Some(PeerState::Dead));
        // A late-delivered old message does not move last_heard backwards.
        m.on_event(t0 + ms(1), Event::Heard("a".into()));
        assert_eq!(m.peers()["a"].last_heard, t0 + ms(1));
    }
}
