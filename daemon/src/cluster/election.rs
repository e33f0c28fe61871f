//! Coordinator election: one coordinator per household, chosen
//! deterministically from the live roster, with terms.
//!
//! Every device runs the same rule on the same inputs, so no voting round is
//! needed: among the live candidates, the most capable one (highest
//! `score`, ties broken by the larger id) coordinates. A device that just
//! appeared becomes a candidate only after `join_grace` of being alive, so a
//! flapping link cannot bounce the coordinator back and forth. The term
//! grows by one each time a device's view of the coordinator changes, and a
//! device adopts a higher term it hears for the coordinator it also chose,
//! so after a partition heals everyone converges on one (term, coordinator).
//!
//! Pure: no clock, no I/O; the network loop feeds it events.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::membership::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The live roster as membership sees it now: id, capability score and
    /// since when it has been alive. `me` is always a candidate.
    Roster(Vec<(NodeId, u64, Instant)>),
    /// Another device announced its view.
    Announce {
        from: NodeId,
        term: u64,
        coordinator: NodeId,
    },
    /// Time passed (grace periods may have run out).
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub term: u64,
    pub coordinator: NodeId,
}

#[derive(Debug, Clone)]
pub struct Election {
    me: NodeId,
    my_score: u64,
    join_grace: Duration,
    roster: BTreeMap<NodeId, (u64, Instant)>,
    view: View,
}

impl Election {
    pub fn new(me: NodeId, my_score: u64, join_grace: Duration) -> Self {
        Self {
            view: View {
                term: 1,
                coordinator: me.clone(),
            },
            me,
            my_score,
            join_grace,
            roster: BTreeMap::new(),
        }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    pub fn is_coordinator(&self) -> bool {
        self.view.coordinator == self.me
    }

    pub fn set_score(&mut self, score: u64) {
        self.my_score = score;
    }

    fn choose(&self, now: Instant) -> NodeId {
        let mut best = (self.my_score, self.me.clone());
        for (id, &(score, since)) in &self.roster {
            if id == &self.me {
                continue;
            }
            let settled = now.saturating_duration_since(since) >= self.join_grace
                // The coordinator everyone already follows needs no grace.
                || *id == self.view.coordinator;
            if settled && (score, id.clone()) > best {
                best = (score, id.clone());
            }
        }
        best.1
    }

    /// Returns the new view when it changed.
    pub fn on_event(&mut self, now: Instant, ev: Event) -> Option<View> {
        match ev {
            Event::Roster(r) => {
                self.roster = r.into_iter().map(|(id, s, t)| (id, (s, t))).collect();
            }
            Event::Announce {
                from,
                term,
                coordinator,
            } => {
                if !self.roster.contains_key(&from) {
                    return None; // not a live member (or not one at all)
                }
                if term > self.view.term && coordinator == self.view.coordinator {
                    self.view.term = term;
                    return Some(self.view.clone());
                }
                return None;
            }
            Event::Tick => {}
        }
        let chosen = self.choose(now);
        if chosen != self.view.coordinator {
            self.view = View {
                term: self.view.term.saturating_add(1),
                coordinator: chosen,
            };
            return Some(self.view.clone());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn roster(t: Instant, members: &[(&str, u64)]) -> Event {
        Event::Roster(
            members
                .iter()
                .map(|(id, s)| (id.to_string(), *s, t))
                .collect(),
        )
    }

    #[test]
    fn alone_i_coordinate() {
        let e = Election::new("a".into(), 10, ms(500));
        assert!(e.is_coordinator());
        assert_eq!(e.view().term, 1);
    }

    #[test]
    fn most_capable_wins_ties_by_id_and_all_agree() {
        let t0 = Instant::now();
        let members = [("a", 10), ("b", 30), ("c", 30)];
        let mut views = vec![];
        for (me, score) in members {
            let mut e = Election::new(me.into(), score, ms(500));
            e.on_event(t0, roster(t0, &members));
            e.on_event(t0 + ms(600), Event::Tick);
            views.push(e.view().coordinator.clone());
        }
        assert_eq!(views, ["c", "c", "c"]);
    }

    #[test]
    fn newcomer_waits_out_the_grace_period() {
        let t0 = Instant::now();
        let mut e = Election::new("a".into(), 10, ms(500));
        assert!(e
            .on_event(t0, roster(t0, &[("a", 10), ("b", 99)]))
            .is_none());
        assert!(e.is_coordinator());
        let v = e.on_event(t0 + ms(500), Event::Tick).expect("b takes over");
        assert_eq!(v.coordinator, "b");
        assert_eq!(v.term, 2);
    }

    #[test]
    fn coordinator_leaves_and_the_next_takes_over_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new("a".into(), 10, ms(500));
        e.on_event(t0, roster(t0, &[("a", 10), ("b", 99), ("c", 50)]));
        e.on_event(t0 + ms(600), Event::Tick);
        assert_eq!(e.view().coordinator, "b");
        // b is dead: the roster no longer lists it; c has long been alive.
        let v = e
            .on_event(t0 + ms(5000), roster(t0, &[("a", 10), ("c", 50)]))
            .unwrap();
        assert_eq!(v.coordinator, "c");
        assert_eq!(v.term, 3);
    }

    #[test]
    fn flapping_candidate_never_takes_over() {
        let t0 = Instant::now();
        let mut e = Election::new("a".into(), 10, ms(1000));
        let mut changes = 0;
        // b is up 600 ms, down 400 ms, over and over; each return restarts its grace.
        for cycle in 0..10u64 {
            let up = t0 + ms(cycle * 1000);
            changes += e
                .on_event(up, roster(up, &[("a", 10), ("b", 99)]))
                .is_some() as u32;
            changes += e.on_event(up + ms(550), Event::Tick).is_some() as u32;
            changes += e.on_event(up + ms(600), roster(up, &[("a", 10)])).is_some() as u32;
        }
        assert_eq!(changes, 0);
        assert!(e.is_coordinator());
    }

    #[test]
    fn partition_heals_to_one_view() {
        let t0 = Instant::now();
        let all = [("a", 10), ("b", 20), ("c", 30), ("d", 40)];
        let mut es: Vec<Election> = all
            .iter()
            .map(|(id, s)| Election::new(id.to_string(), *s, ms(300)))
            .collect();
        for e in es.iter_mut() {
            e.on_event(t0, roster(t0, &all));
            e.on_event(t0 + ms(400), Event::Tick);
        }
        assert!(es.iter().all(|e| e.view().coordinator == "d"));
        // Partition {a, b} | {c, d}.
        let t1 = t0 + ms(1000);
        for e in es.iter_mut().take(2) {
            e.on_event(t1, roster(t0, &all[..2]));
        }
        for e in es.iter_mut().skip(2) {
            e.on_event(t1, roster(t0, &all[2..]));
        }
        assert_eq!(es[0].view().coordinator, "b");
        assert_eq!(es[1].view().coordinator, "b");
        assert_eq!(es[3].view().coordinator, "d");
        // Heal: everyone sees everyone again (d had been alive all along).
        let t2 = t0 + ms(3000);
        for e in es.iter_mut() {
            e.on_event(t2, roster(t0, &all));
        }
        assert!(es.iter().all(|e| e.view().coordinator == "d"));
        // Terms differ after the split; announcements converge them.
        let max_term = es.iter().map(|e| e.view().term).max().unwrap();
        let from = es
            .iter()
            .find(|e| e.view().term == max_term)
            .unwrap()
            .me
            .clone();
        for e in es.iter_mut() {
            e.on_event(
                t2,
                Event::Announce {
                    from: from.clone(),
                    term: max_term,
                    coordinator: "d".into(),
                },
            );
        }
        assert!(es.iter().all(|e| e.view().term == max_term));
    }

    #[test]
    fn announcements_from_strangers_or_for_others_are_ignored() {
        let t0 = Instant::now();
        let mut e = Election::new("a".into(), 10, ms(0));
        e.on_event(t0, roster(t0, &[("a", 10), ("b", 5)]));
        let stranger = Event::Announce {
            from: "x".into(),
            term: 99,
            coordinator: "a".into(),
        };
        assert!(e.on_event(t0, stranger).is_none());
        let other = Event::Announce {
            from: "b".into(),
            term: 99,
            coordinator: "b".into(),
        };
        assert!(e.on_event(t0, other).is_none());
        assert_eq!(e.view().term, 1);
    }
}
