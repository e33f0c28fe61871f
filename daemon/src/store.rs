//! primad's durable state, in sled: the node identity, the model registry,
//! settings and the cached device profile.
//!
//! Every write that a caller is told about has been flushed to disk first, so
//! a `kill -9` right after an answer loses nothing; a model entry is one
//! key written in one step, so the registry never holds half an entry.

use std::path::{Path, PathBuf};

use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state dir {dir} is in use by another primad (pass --state-dir to run a second one)")]
    Locked { dir: PathBuf },
    #[error("cannot create state dir {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("state store at {dir}: {source}")]
    Db { dir: PathBuf, source: sled::Error },
    #[error("state store: {0}")]
    Io(#[from] sled::Error),
    #[error("state store: stored {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
}

/// A registered model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub arch: String,
    /// Unix seconds.
    pub added: u64,
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    models: sled::Tree,
}

const IDENTITY: &[u8] = b"identity";
const IDENTITY_HOME: &[u8] = b"identity-home";
const HOUSEHOLD: &[u8] = b"household-secret";
const ROSTER: &[u8] = b"roster";
const PROFILE: &[u8] = b"profile";

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(200))
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        dir: dir.to_path_buf(),
                    }
                }
                _ => StoreError::Db {
                    dir: dir.to_path_buf(),
                    source,
                },
            })?;
        let meta = db.open_tree("meta")?;
        let models = db.open_tree("models")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            db,
            meta,
            models,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This node's ed25519 identity, created on first use.
    pub fn identity(&self) -> Result<Keypair, StoreError> {
        if let Some(bytes) = self.meta.get(IDENTITY)? {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| StoreError::Corrupt {
                what: "node identity".into(),
                detail: e.to_string(),
            });
        }
        let key = Keypair::generate_ed25519();
        let bytes = key
            .to_protobuf_encoding()
            .expect("ed25519 keys always encode");
        // compare_and_swap: two racing first starts cannot end with two keys.
        match self
            .meta
            .compare_and_swap(IDENTITY, None::<&[u8]>, Some(bytes))?
        {
            Ok(()) => {
                self.db.flush()?;
                Ok(key)
            }
            Err(_) => self.identity(),
        }
    }

    /// The identity, unless the state dir was copied: `home` fingerprints
    /// the machine and place this state belongs to (see [`home_fingerprint`]).
    /// When the stored fingerprint differs, this copy gets a fresh identity,
    /// so two devices never share one; returns whether that happened.
    pub fn identity_for_home(&self, home: &str) -> Result<(Keypair, bool), StoreError> {
        let stored = self.meta.get(IDENTITY_HOME)?;
        let key = self.identity()?;
        match stored {
            Some(h) if h.as_ref() == home.as_bytes() => Ok((key, false)),
            None => {
                self.meta.insert(IDENTITY_HOME, home.as_bytes())?;
                self.db.flush()?;
                Ok((key, false))
            }
            Some(_) => {
                let fresh = Keypair::generate_ed25519();
                let bytes = fresh
                    .to_protobuf_encoding()
                    .expect("ed25519 keys always encode");
                self.meta.insert(IDENTITY, bytes)?;
                self.meta.insert(IDENTITY_HOME, home.as_bytes())?;
                self.db.flush()?;
                Ok((fresh, true))
            }
        }
    }

    /// The household's shared secret: a household of one is formed on
    /// first start (pairing replaces it with the household's).
    pub fn household_secret(&self) -> Result<[u8; 32], StoreError> {
        if let Some(v) = self.meta.get(HOUSEHOLD)? {
            return v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                what: "household secret".into(),
                detail: format!("{} bytes, expected 32", v.len()),
            });
        }
        let fresh: [u8; 32] = rand::random();
        match self
            .meta
            .compare_and_swap(HOUSEHOLD, None::<&[u8]>, Some(&fresh[..]))?
        {
            Ok(()) => {
                self.db.flush()?;
                Ok(fresh)
            }
            Err(_) => self.household_secret(),
        }
    }

    /// Joins another household: its secret and roster replace ours in one
    /// batch, flushed before returning.
    pub fn set_household(
        &self,
        secret: &[u8; 32],
        roster: &crate::cluster::roster::SignedRoster,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert(HOUSEHOLD, &secret[..]);
        b.insert(ROSTER, serde_json::to_vec(roster).expect("json"));
        self.meta.apply_batch(b)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn roster(&self) -> Result<Option<crate::cluster::roster::SignedRoster>, StoreError> {
        match self.meta.get(ROSTER)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: "roster".into(),
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    pub fn set_roster(
        &self,
        roster: &crate::cluster::roster::SignedRoster,
    ) -> Result<(), StoreError> {
        self.meta
            .insert(ROSTER, serde_json::to_vec(roster).expect("json"))?;
        self.db.flush()?;
        Ok(())
    }

    pub fn peer_id(&self) -> Result<PeerId, StoreError> {
        Ok(self.identity()?.public().to_peer_id())
    }

    pub fn models(&self) -> Result<Vec<ModelEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.models.iter() {
            let (k, v) = kv?;
            out.push(decode_model(&k, &v)?);
        }
        Ok(out)
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelEntry>, StoreError> {
        match self.models.get(name.as_bytes())? {
            Some(v) => Ok(Some(decode_model(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Inserts or replaces an entry and flushes before returning.
    pub fn put_model(&self, entry: &ModelEntry) -> Result<(), StoreError> {
        let v = serde_json::to_vec(entry).expect("model entries serialise");
        self.models.insert(entry.name.as_bytes(), v)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes an entry; returns whether it existed.
    pub fn remove_model(&self, name: &str) -> Result<bool, StoreError> {
        let had = self.models.remove(name.as_bytes())?.is_some();
        self.db.flush()?;
        Ok(had)
    }

    pub fn profile(&self) -> Result<Option<serde_json::Value>, StoreError> {
        match self.meta.get(PROFILE)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: "device profile".into(),
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    pub fn set_profile(&self, profile: &serde_json::Value) -> Result<(), StoreError> {
        self.meta
            .insert(PROFILE, serde_json::to_vec(profile).expect("json"))?;
        self.db.flush()?;
        Ok(())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(format!("setting/{key}"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.meta
            .insert(format!("setting/{key}"), value.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }
}

fn decode_model(key: &[u8], v: &[u8]) -> Result<ModelEntry, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        what: format!("model entry {:?}", String::from_utf8_lossy(key)),
        detail: e.to_string(),
    })
}

/// Where this state lives: the machine (its machine-id, else host name) and
/// the state dir's canonical path. A copied state dir differs in one of them.
pub fn home_fingerprint(state_dir: &Path) -> String {
    let machine = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    format!("{machine}:{}", dir.display())
}

/// Whether `name` is an acceptable model name: 1-64 of `a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// A model name from a file name: lower case, other characters turned to `-`.
pub fn name_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches(['.', '_', '-']).to_string();
    name.truncate(64);
    if name.is_empty() {
        name = "model".into();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            path: "/m/x.gguf".into(),
            sha256: "ab".repeat(32),
            size: 42,
            arch: "llama".into(),
            added: 1,
        }
    }

    #[test]
    fn identity_is_stable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = Store::open(dir.path()).unwrap().peer_id().unwrap();
        let again = Store::open(dir.path()).unwrap().peer_id().unwrap();
        assert_eq!(id, again);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(id, Store::open(other.path()).unwrap().peer_id().unwrap());
    }

    #[test]
    fn a_copied_state_dir_gets_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, fresh) = s.identity_for_home("m1:/var/lib/prima").unwrap();
        assert!(!fresh);
        let (again, fresh) = s.identity_for_home("m1:/var/lib/prima").unwrap();
        assert!(!fresh);
        assert_eq!(a.public(), again.public());
        // The same bytes seen from another machine (or path): a new device.
        let (b, fresh) = s.identity_for_home("m2:/var/lib/prima").unwrap();
        assert!(fresh);
        assert_ne!(a.public(), b.public());
        assert_eq!(s.peer_id().unwrap(), b.public().to_peer_id());
        let (c, fresh) = s.identity_for_home("m2:/var/lib/prima").unwrap();
        assert!(!fresh);
        assert_eq!(b.public(), c.public());
    }

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("locked").to_string();
        assert!(err.contains("in use"), "{err}");
    }

    #[test]
    fn models_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_model(&entry("b")).unwrap();
        s.put_model(&entry("a")).unwrap();
        let names: Vec<_> = s.models().unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.model("a").unwrap(), Some(entry("a")));
        assert!(s.remove_model("a").unwrap());
        assert!(!s.remove_model("a").unwrap());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.models().unwrap(), vec![entry("b")]);
    }

    #[test]
    fn settings_and_profile_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.set_setting("k", "v").unwrap();
            s.set_profile(&serde_json::json!({"cores": 2})).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.setting("k").unwrap().as_deref(), Some("v"));
        assert_eq!(s.profile().unwrap().unwrap()["cores"], 2);
    }

    #[test]
    fn names() {
        assert!(valid_model_name("smollm2-135m"));
        assert!(!valid_model_name("Smol"));
        assert!(!valid_model_name("-x"));
        assert!(!valid_model_name(""));
        assert!(!valid_model_name("a/b"));
        assert_eq!(
            name_from_path(Path::new("/x/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(name_from_path(Path::new("/x/ä b.gguf")), "b");
    }
}
