//! The household roster: which devices belong, signed with a key derived
//! from the household secret, so only members can issue a roster and every
//! member can check one. A higher epoch replaces a lower one.

use std::collections::BTreeMap;

use libp2p_identity::{ed25519, Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Unix seconds.
    pub added: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub epoch: u64,
    /// Peer id (text) -> member.
    pub members: BTreeMap<String, Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoster {
    pub roster: Roster,
    /// ed25519 signature (hex) over the roster's canonical JSON.
    pub sig: String,
}

/// The roster-signing key every member derives from the household secret.
fn household_keypair(secret: &[u8; 32]) -> Keypair {
    let mut seed: [u8; 32] = Sha256::new()
        .chain_update(b"prima roster key")
        .chain_update(secret)
        .finalize()
        .into();
    let sk = ed25519::SecretKey::try_from_bytes(&mut seed).expect("32 bytes");
    Keypair::from(ed25519::Keypair::from(sk))
}

impl Roster {
    /// A household of one.
    pub fn founding(me: &str, name: &str, now: u64) -> Self {
        let mut members = BTreeMap::new();
        members.insert(
            me.to_string(),
            Member {
                name: name.to_string(),
                added: now,
            },
        );
        Self { epoch: 1, members }
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rosters serialise")
    }

    pub fn sign(&self, secret: &[u8; 32]) -> SignedRoster {
        let sig = household_keypair(secret)
            .sign(&self.bytes())
            .expect("ed25519 signing cannot fail");
        SignedRoster {
            roster: self.clone(),
            sig: hex::encode(sig),
        }
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.members.contains_key(peer)
    }

    /// The peer id of the member called `name`.
    pub fn by_name(&self, name: &str) -> Option<&String> {
        self.members
            .iter()
            .find(|(_, m)| m.name == name)
            .map(|(id, _)| id)
    }
}

impl SignedRoster {
    pub fn verify(&self, secret: &[u8; 32]) -> bool {
        let public: PublicKey = household_keypair(secret).public();
        hex::decode(&self.sig).is_ok_and(|sig| public.verify(&self.roster.bytes(), &sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_hold_only_for_the_household() {
        let a = [7u8; 32];
        let b = [8u8; 32];
        let r = Roster::founding("peer-a", "laptop", 1);
        let s = r.sign(&a);
        assert!(s.verify(&a));
        assert!(!s.verify(&b));
        let mut forged = s.clone();
        forged.roster.members.insert(
            "intruder".into(),
            Member {
                name: "x".into(),
                added: 2,
            },
        );
        assert!(!forged.verify(&a));
        let mut garbage = s;
        garbage.sig = "zz".into();
        assert!(!garbage.verify(&a));
    }

    #[test]
    fn lookups() {
        let r = Roster::founding("peer-a", "laptop", 1);
        assert!(r.contains("peer-a"));
        assert_eq!(r.by_name("laptop").map(String::as_str), Some("peer-a"));
        assert_eq!(r.by_name("phone"), None);
    }
}
