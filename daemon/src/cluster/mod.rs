//! The household cluster: membership and coordinator election as pure state
//! machines (unit-tested with simulated time). The network loop that feeds
//! them (libp2p, mDNS, gossip) builds on these.

pub mod election;
pub mod membership;
pub mod net;
pub mod pairing;
pub mod roster;
pub mod service;
