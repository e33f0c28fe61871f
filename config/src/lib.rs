//! primad's configuration: a strict schema (unknown keys are errors that name
//! the key and its line), the platform default locations, and the shipped,
//! commented `primad.toml` whose values are exactly the built-in defaults.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The shipped default configuration file, commented.
pub const SHIPPED: &str = include_str!("../primad.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax errors and schema errors (unknown key, wrong type): the message
    /// carries the line and column.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: Node,
    pub api: Api,
    pub model: ModelCfg,
    pub sampling: Sampling,
    pub store: Store,
    pub catalog: Catalog,
    pub cluster: Cluster,
    pub ring: Ring,
    pub gpu: Gpu,
    pub speculative: Speculative,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Node {
    /// Empty: the host name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    pub addr: String,
    pub token: String,
    pub queue_limit: usize,
    pub max_body_bytes: usize,
    pub shutdown_grace_secs: u64,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:7340".into(),
            token: String::new(),
            queue_limit: 16,
            max_body_bytes: 1 << 20,
            shutdown_grace_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelCfg {
    pub default: String,
    pub ctx: usize,
    pub max_tokens: usize,
    pub threads: usize,
}

impl Default for ModelCfg {
    fn default() -> Self {
        Self {
            default: "smollm2-135m".into(),
            ctx: 2048,
            max_tokens: 512,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    pub state_dir: String,
    pub models_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Catalog {
    pub index_url: String,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            index_url: "https://pypi.org/simple".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub enabled: bool,
    pub listen_port: u16,
    pub mdns: bool,
    pub interfaces: Vec<String>,
    pub static_peers: Vec<String>,
    pub open_household: bool,
    pub heartbeat_ms: u64,
    pub suspect_ms: u64,
    pub dead_ms: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            enabled: true,
            listen_port: 7341,
            mdns: true,
            interfaces: vec![],
            static_peers: vec![],
            open_household: false,
            heartbeat_ms: 200,
            suspect_ms: 600,
            dead_ms: 1200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ring {
    pub enabled: bool,
    pub timeout_ms: u64,
    pub ubatch: usize,
    pub use_all_devices: bool,
    pub prefetch: bool,
    pub auto_profile: bool,
    pub memory_budget_mb: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout_ms: 15000,
            ubatch: 64,
            use_all_devices: false,
            prefetch: true,
            auto_profile: true,
            memory_budget_mb: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gpu {
    pub enabled: bool,
    pub adapter: String,
    pub allow_software: bool,
    pub memory_mb: u64,
}

impl Default for Gpu {
    fn default() -> Self {
        Self {
            enabled: true,
            adapter: String::new(),
            allow_software: false,
            memory_mb: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Speculative {
    /// The model's own first N layers and output head as the draft; 0: not.
    pub draft_layers: u32,
    /// A smaller model with the same vocabulary as the draft: a catalog
    /// name or a GGUF path; empty: none.
    pub draft_model: String,
    pub max_draft: u32,
    pub p_min: f32,
}

impl Default for Speculative {
    fn default() -> Self {
        Self {
            draft_layers: 0,
            draft_model: String::new(),
            max_draft: 8,
            p_min: 0.6,
        }
    }
}

impl Speculative {
    /// Whether a draft is configured.
    pub fn enabled(&self) -> bool {
        self.draft_layers > 0 || !self.draft_model.trim().is_empty()
    }
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(cfg)
    }

    /// Reads and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `--config FILE` if given, else the platform default file if it exists,
    /// else the defaults. Returns the config and the file it came from.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        if let Some(p) = explicit {
            return Ok((Self::from_file(p)?, Some(p.to_path_buf())));
        }
        let default = default_config_path();
        if default.is_file() {
            return Ok((Self::from_file(&default)?, Some(default)));
        }
        Ok((Self::default(), None))
    }

    /// Checks what the schema cannot: value ranges and the rule that an API
    /// reachable from other machines needs a token.
    pub fn validate(&self) -> Result<(), String> {
        let addr = self.api_addr()?;
        if !addr.ip().is_loopback() && self.api.token.is_empty() {
            return Err(format!(
                "[api] addr = \"{}\" is reachable from other machines, so [api] token must be set \
                 (clients then send `Authorization: Bearer TOKEN`)",
                self.api.addr
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err("[api] max_body_bytes must be at least 1024".into());
        }
        if self.model.ctx < 16 {
            return Err("[model] ctx must be at least 16 tokens".into());
        }
        if self.model.max_tokens == 0 {
            return Err("[model] max_tokens must be at least 1".into());
        }
        if !(0.0..=100.0).contains(&self.sampling.temperature) {
            return Err("[sampling] temperature must be between 0 and 100".into());
        }
        if !(0.0..=1.0).contains(&self.sampling.top_p)
            || !(0.0..=1.0).contains(&self.sampling.min_p)
        {
            return Err("[sampling] top_p and min_p must be between 0 and 1".into());
        }
        let c = &self.cluster;
        if c.heartbeat_ms == 0 || c.suspect_ms <= c.heartbeat_ms || c.dead_ms <= c.suspect_ms {
            return Err(
                "[cluster] needs 0 < heartbeat_ms < suspect_ms < dead_ms (a device is suspected \
                 after missing some heartbeats, and dead later)"
                    .into(),
            );
        }
        if self.ring.timeout_ms < 100 {
            return Err("[ring] timeout_ms must be at least 100".into());
        }
        if !(1..=512).contains(&self.ring.ubatch) {
            return Err("[ring] ubatch must be between 1 and 512 tokens".into());
        }
        let sp = &self.speculative;
        if sp.draft_layers > 0 && !sp.draft_model.trim().is_empty() {
            return Err(
                "[speculative] draft_layers and draft_model are two kinds of draft; set one".into(),
            );
        }
        if !(1..=32).contains(&sp.max_draft) {
            return Err("[speculative] max_draft must be between 1 and 32 tokens".into());
        }
        if !(0.0..=1.0).contains(&sp.p_min) {
            return Err("[speculative] p_min must be between 0 and 1".into());
        }
        if self.model.default.trim().is_empty() {
            return Err("[model] default must name a model".into());
        }
        Ok(())
    }

    pub fn api_addr(&self) -> Result<SocketAddr, String> {
        self.api.addr.parse().map_err(|e| {
            format!(
                "[api] addr = \"{}\" is not HOST:PORT with a numeric IP ({e})",
                self.api.addr
            )
        })
    }

    /// The state directory: the configured one or the platform default.
    pub fn state_dir(&self) -> PathBuf {
        if self.store.state_dir.is_empty() {
            default_state_dir()
        } else {
            PathBuf::from(&self.store.state_dir)
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        if self.store.models_dir.is_empty() {
            self.state_dir().join("models")
        } else {
            PathBuf::from(&self.store.models_dir)
        }
    }
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        // The effective uid decides which directories are ours; reading it
        // from /proc avoids a libc dependency here.
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
            })
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// The platform's default config file.
pub fn default_config_path() -> PathBuf {
    if cfg!(target_os = "macos") {
        PathBuf::from("/Library/Application Support/prima/primad.toml")
    } else if cfg!(windows) {
        env_path("ProgramData")
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
            .join(r"prima\primad.toml")
    } else {
        PathBuf::from("/etc/prima/primad.toml")
    }
}

/// The platform's default state directory.
pub fn default_state_dir() -> PathBuf {
    if cfg!(windows) {
        return env_path("ProgramData")
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
            .join("prima");
    }
    if cfg!(target_os = "macos") {
        if is_root() {
            return PathBuf::from("/Library/Application Support/prima");
        }
        if let Some(home) = env_path("HOME") {
            return home.join("Library/Application Support/prima");
        }
    }
    // systemd's StateDirectory= sets this for services.
    if let Some(dir) = env_path("STATE_DIRECTORY") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/var/lib/prima");
    }
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return dir.join("prima");
    }
    if let Some(home) = env_path("HOME") {
        return home.join(".local/state/prima");
    }
    PathBuf::from("prima-state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_defaults() {
        let cfg = Config::parse(SHIPPED, "primad.toml").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[api]\naddr = \"127.0.0.1:1\"\nqueue_limt = 3\n";
        let err = Config::parse(text, "my.toml").unwrap_err().to_string();
        assert!(err.contains("my.toml"), "{err}");
        assert!(err.contains("queue_limt"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let err = Config::parse("[apii]\n", "x").unwrap_err().to_string();
        assert!(err.contains("apii") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let err = Config::parse("[model]\nctx = \"big\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn open_api_needs_a_token() {
        let err = Config::parse("[api]\naddr = \"0.0.0.0:7340\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("token"), "{err}");
        Config::parse("[api]\naddr = \"0.0.0.0:7340\"\ntoken = \"s3cret\"\n", "x").unwrap();
        Config::parse("[api]\naddr = \"[::1]:7340\"\n", "x").unwrap();
    }

    #[test]
    fn bad_address_is_explained() {
        let err = Config::parse("[api]\naddr = \"localhost\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
    }

    #[test]
    fn dirs_follow_the_config() {
        let cfg = Config::parse("[store]\nstate_dir = \"/tmp/s\"\n", "x").unwrap();
        assert_eq!(cfg.state_dir(), PathBuf::from("/tmp/s"));
        assert_eq!(cfg.models_dir(), PathBuf::from("/tmp/s/models"));
    }
}
