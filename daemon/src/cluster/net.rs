//! The network loop: one task owns the libp2p swarm and the mDNS daemon; the
//! rest of primad reads the cluster's state from a shared snapshot and sends
//! commands over a bounded channel.
//!
//! Transport: TCP, then a private-network handshake keyed by the household
//! secret (libp2p pnet: a device without the key cannot complete Noise, so
//! its bytes never reach an application protocol), then Noise and yamux.
//! Discovery: mDNS `_prima._tcp.local.` with a random instance name, the
//! protocol version and a tag derived from the household secret and the
//! current five-minute window; outsiders learn nothing about the device, and
//! members recognise each other by the tag. Gossip: a gossipsub topic per
//! household carries each device's profile and heartbeat; membership and the
//! election (pure state machines) turn those into alive/suspect/dead and one
//! coordinator.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use libp2p::{
    allow_block_list::{self, AllowedPeers},
    core::{upgrade::Version, Transport},
    gossipsub, identify,
    multiaddr::Protocol,
    noise, ping,
    pnet::{PnetConfig, PreSharedKey},
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::ring::{
    plan::RingPlan,
    planner::{self, Candidate},
    Pin, Ring, RingAd,
};

use super::{
    election::{self, Election},
    membership::{self, Membership, MembershipConfig, PeerState},
    roster::SignedRoster,
};

pub const SERVICE: &str = "_prima._tcp.local.";
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest gossip message the daemon accepts; bigger ones are dropped with a
/// log line.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// Largest frame gossipsub decodes at all (bigger ones it drops itself).
const MAX_GOSSIP_FRAME: usize = 1 << 20;
const TAG_WINDOW_SECS: u64 = 300;

/// What this device tells the household about itself (the profiler issue
/// adds its measurements).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub name: String,
    pub os: String,
    pub cores: u32,
    pub ram_mb: u64,
}

impl Profile {
    pub fn local(name: &str) -> Self {
        let ram = sysinfo::System::new()
            .map(|mut sys| {
                sys.refresh_memory();
                sys.total_memory()
            })
            .unwrap_or(0);
        Self {
            name: name.to_string(),
            os: std::env::consts::OS.to_string(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            ram_mb: ram / (1 << 20),
        }
    }

    /// Capability for the election: cores first, then memory.
    pub fn score(&self) -> u64 {
        (self.cores as u64) << 32 | self.ram_mb.min(u32::MAX as u64)
    }
}

/// A heartbeat on the household topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Heartbeat {
    v: u32,
    profile: Profile,
    term: u64,
    coordinator: String,
    #[serde(default)]
    bye: bool,
    /// The sender's roster (paired households), so changes spread.
    #[serde(default)]
    roster: Option<SignedRoster>,
    /// The sender's part in the ring: its model, readiness, measured
    /// profile, and (from the coordinator) the plan.
    #[serde(default)]
    ring: Option<RingAd>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub id: String,
    pub name: String,
    pub role: &'static str,
    pub state: &'static str,
    pub addr: Option<String>,
    pub rtt_ms: Option<f64>,
    pub os: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub this_device: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nearby {
    pub instance: String,
    pub addrs: Vec<String>,
    /// A member of some household offering to pair (`primactl pair`), and
    /// the port to pair on.
    pub pairing_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterStatus {
    pub enabled: bool,
    /// A short fingerprint of the household key (not the key).
    pub household: String,
    pub open_household: bool,
    pub epoch: u64,
    pub term: u64,
    pub coordinator: Option<String>,
    pub devices: Vec<DeviceStatus>,
    /// prima devices on the LAN that are not of this household.
    pub nearby_unpaired: Vec<Nearby>,
    pub listen: Vec<String>,
    /// Paired households: the roster (peer id -> name) and its epoch.
    pub roster: Option<super::roster::Roster>,
    /// A pairing code is open on this device.
    pub pairing: bool,
    /// The ring plan this device follows.
    pub plan: Option<PlanStatus>,
}

/// The ring plan as `primactl plan` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStatus {
    pub plan: RingPlan,
    /// Every device has loaded its windows.
    pub live: bool,
    /// By rank.
    pub ready: Vec<bool>,
    /// This device's rank, if it is in the plan.
    pub my_rank: Option<usize>,
}

pub enum Command {
    Shutdown,
    /// Announce (or stop announcing) that this device accepts pairing.
    SetPairing(bool),
    /// A new roster made here (a device paired or removed): apply and spread.
    Roster(SignedRoster),
    /// Pin a plan (None: let Halda plan again). Only the coordinator plans.
    Pin(
        Option<Pin>,
        tokio::sync::oneshot::Sender<std::result::Result<(), String>>,
    ),
}

pub struct Cluster {
    pub status: Arc<RwLock<ClusterStatus>>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Cluster {
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.commands.clone()
    }

    pub async fn send(&self, c: Command) {
        let _ = self.commands.send(c).await;
    }

    /// Says goodbye to the household and stops the loop.
    pub async fn shutdown(self) {
        let _ = self.commands.send(Command::Shutdown).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Paired households: only roster members may connect (checked when a
    /// connection is established, before any protocol stream opens).
    gate: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    gossipsub: gossipsub::Behaviour,
    ping: ping::Behaviour,
    identify: identify::Behaviour,
    /// `/prima/ring/1` and `/prima/ask/1` streams.
    stream: libp2p_stream::Behaviour,
}

pub struct Settings {
    pub cfg: prima_config::Cluster,
    pub key: libp2p_identity::Keypair,
    pub secret: [u8; 32],
    pub profile: Profile,
    /// None for an open household (no roster, no gate).
    pub roster: Option<SignedRoster>,
    pub store: Arc<crate::store::Store>,
    pub ring: Option<Arc<Ring>>,
    /// Context length plans are made for.
    pub n_ctx: u32,
    pub use_all_devices: bool,
}

/// The port pairing listens on while a code is open.
pub fn pairing_port(cfg: &prima_config::Cluster) -> u16 {
    cfg.listen_port.wrapping_add(1)
}

/// The key all devices of an open household share.
pub fn open_household_secret() -> [u8; 32] {
    Sha256::digest(b"prima open household v1").into()
}

fn fingerprint(secret: &[u8; 32]) -> String {
    let h = Sha256::new()
        .chain_update(b"prima household id")
        .chain_update(secret)
        .finalize();
    hex::encode(&h[..6])
}

/// The mDNS tag for a five-minute window: members compute the same, anyone
/// else sees random-looking bytes that change every window.
pub fn tag(secret: &[u8; 32], window: u64) -> String {
    let h = Sha256::new()
        .chain_update(b"prima mdns tag")
        .chain_update(secret)
        .chain_update(window.to_le_bytes())
        .finalize();
    hex::encode(&h[..8])
}

fn window_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / TAG_WINDOW_SECS)
        .unwrap_or(0)
}

fn is_member_tag(secret: &[u8; 32], t: &str) -> bool {
    let w = window_now();
    [w, w.wrapping_sub(1), w + 1]
        .iter()
        .any(|&w| tag(secret, w) == t)
}

/// Interface names that are virtual, container or VPN plumbing.
fn is_virtual_interface(name: &str) -> bool {
    const PREFIXES: [&str; 12] = [
        "docker",
        "veth",
        "br-",
        "virbr",
        "vbox",
        "vmnet",
        "tun",
        "tap",
        "wg",
        "zt",
        "tailscale",
        "utun",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

fn interface_names() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn build_swarm(s: &Settings) -> Result<Swarm<Behaviour>> {
    build_swarm_with(s, MAX_GOSSIP_FRAME)
}

fn build_swarm_with(s: &Settings, max_transmit: usize) -> Result<Swarm<Behaviour>> {
    let psk = PreSharedKey::new(s.secret);
    let topic = household_topic(&s.secret);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(s.key.clone())
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(Duration::from_secs(10)),
            )
        })?
        .with_behaviour(|key| {
            let gcfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(max_transmit)
                .flood_publish(true)
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gcfg,
            )
            .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            gossipsub.subscribe(&topic)?;
            let gate = s.roster.as_ref().map(|r| {
                let mut g = allow_block_list::Behaviour::<AllowedPeers>::default();
                for id in r.roster.members.keys() {
                    if let Ok(p) = id.parse::<PeerId>() {
                        g.allow_peer(p);
                    }
                }
                g
            });
            Ok(Behaviour {
                gate: Toggle::from(gate),
                gossipsub,
                // A ping unanswered for 2 s marks the link broken for the
                // ring (which then relays) even while gossip, which takes
                // any path, still says the device is alive.
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(Duration::from_millis(1000))
                        .with_timeout(Duration::from_secs(2)),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/prima/id/{PROTOCOL_VERSION}"),
                    key.public(),
                )),
                stream: libp2p_stream::Behaviour::new(),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

fn household_topic(secret: &[u8; 32]) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!(
        "/prima/household/{}/{PROTOCOL_VERSION}",
        fingerprint(secret)
    ))
}

/// For tests of hostile input: joins the household as the device of `s`
/// (which must be on the roster) by dialling `target`, then publishes
/// malformed, wrongly versioned, forged and oversized gossip. Returns how
/// many messages went out.
pub async fn send_hostile_gossip(s: Settings, target: Multiaddr) -> Result<usize> {
    let mut swarm = build_swarm_with(&s, MAX_GOSSIP_FRAME)?;
    let topic = household_topic(&s.secret);
    swarm.dial(target.clone())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| {
                anyhow::anyhow!("no member subscribed within 10 s (is {target} on the roster?)")
            })?;
        if let SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
            ..
        })) = ev
        {
            break;
        }
    }
    let good = Heartbeat {
        v: PROTOCOL_VERSION,
        profile: s.profile.clone(),
        term: 1,
        coordinator: String::new(),
        bye: false,
        roster: None,
        ring: None,
    };
    let mut wrong_version = good.clone();
    wrong_version.v = 99;
    let mut forged = good.clone();
    if let Some(r) = &s.roster {
        let mut r = r.roster.clone();
        r.epoch += 1000;
        r.members.clear();
        forged.roster = Some(r.sign(&[0xAA; 32]));
    }
    let payloads: Vec<Vec<u8>> = vec![
        b"\xff\xfe not json at all".to_vec(),
        br#"{"v":1,"profile":{"name":"x"}}"#.to_vec(),
        serde_json::to_vec(&wrong_version)?,
        serde_json::to_vec(&forged)?,
        vec![b'{'; 4 * MAX_GOSSIP_BYTES],
    ];
    let mut sent = 0;
    for p in payloads {
        if swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), p)
            .is_ok()
        {
            sent += 1;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(_ev) = tokio::time::timeout_at(until, swarm.select_next_some()).await {}
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(_ev) = tokio::time::timeout_at(until, swarm.select_next_some()).await {}
    Ok(sent)
}

/// Starts the loop, writing its state into `status`. Fails (with what to
/// do) when the port is taken.
pub async fn start(s: Settings, status: Arc<RwLock<ClusterStatus>>) -> Result<Cluster> {
    let mut swarm = build_swarm(&s)?;
    let listen: Multiaddr = format!("/ip4/0.0.0.0/tcp/{}", s.cfg.listen_port)
        .parse()
        .expect("valid multiaddr");
    swarm.listen_on(listen).with_context(|| {
        format!(
            "cannot listen on TCP port {} for the cluster ([cluster] listen_port)",
            s.cfg.listen_port
        )
    })?;
    let mdns = if s.cfg.mdns {
        Some(start_mdns(&s).context("starting mDNS")?)
    } else {
        None
    };
    *status.write().expect("status") = ClusterStatus {
        enabled: true,
        household: fingerprint(&s.secret),
        open_household: s.cfg.open_household,
        roster: s.roster.as_ref().map(|r| r.roster.clone()),
        ..Default::default()
    };
    if let Some(r) = &s.ring {
        r.attach(swarm.behaviour().stream.new_control());
    }
    let (tx, rx) = mpsc::channel(16);
    let lp = Loop::new(s, swarm, mdns, status.clone());
    let task = tokio::spawn(lp.run(rx));
    Ok(Cluster {
        status,
        commands: tx,
        task,
    })
}

struct Mdns {
    daemon: mdns_sd::ServiceDaemon,
    events: mdns_sd::Receiver<mdns_sd::ServiceEvent>,
    instance: String,
    window: u64,
    /// While pairing is open: a second instance whose TXT carries the
    /// pairing port (a new instance is noticed at once, where a changed TXT
    /// record on a known one may not be).
    pair_instance: Option<String>,
}

fn service_info(
    s: &Settings,
    instance: &str,
    window: u64,
    pairing: bool,
) -> Result<mdns_sd::ServiceInfo> {
    let mut props = vec![
        ("v", PROTOCOL_VERSION.to_string()),
        ("tag", tag(&s.secret, window)),
    ];
    if pairing {
        props.push(("pair", pairing_port(&s.cfg).to_string()));
    }
    Ok(mdns_sd::ServiceInfo::new(
        SERVICE,
        instance,
        &format!("{instance}.local."),
        "",
        s.cfg.listen_port,
        &props[..],
    )?
    .enable_addr_auto())
}

fn start_mdns(s: &Settings) -> Result<Mdns> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    if s.cfg.interfaces.is_empty() {
        for name in interface_names() {
            if is_virtual_interface(&name) {
                daemon.disable_interface(mdns_sd::IfKind::Name(name))?;
            }
        }
    } else {
        daemon.disable_interface(mdns_sd::IfKind::All)?;
        for name in &s.cfg.interfaces {
            daemon.enable_interface(mdns_sd::IfKind::Name(name.clone()))?;
        }
    }
    let instance = format!("prima-{:016x}", rand::random::<u64>());
    let window = window_now();
    daemon.register(service_info(s, &instance, window, false)?)?;
    let events = daemon.browse(SERVICE)?;
    Ok(Mdns {
        daemon,
        events,
        instance,
        window,
        pair_instance: None,
    })
}

struct PeerInfo {
    profile: Option<Profile>,
    addr: Option<Multiaddr>,
    rtt: Option<Duration>,
}

/// A device's heartbeats unheard directly for this long, while they still
/// arrive through others, mark the direct link to it broken.
const LINK_BROKEN_AFTER: Duration = Duration::from_millis(1000);

struct Loop {
    s: Settings,
    swarm: Swarm<Behaviour>,
    mdns: Option<Mdns>,
    status: Arc<RwLock<ClusterStatus>>,
    me: PeerId,
    topic: gossipsub::IdentTopic,
    membership: Membership,
    election: Election,
    peers: HashMap<PeerId, PeerInfo>,
    /// Member addresses worth dialling, with the last attempt.
    dialable: HashMap<Multiaddr, Option<Instant>>,
    /// Which device answered at a dialled address, so a device reachable at
    /// several addresses is not redialled on the others while connected.
    addr_peer: HashMap<Multiaddr, PeerId>,
    nearby: BTreeMap<String, Nearby>,
    roster: Option<SignedRoster>,
    pairing: bool,
    /// What the last plan was made from; a new plan is made when it changes.
    plan_key: String,
    /// Highest plan epoch seen anywhere.
    max_epoch: u64,
    /// Highest epoch of a plan made by another device: while coordinating,
    /// this device outbids it so that everyone converges on one plan.
    rival_epoch: u64,
    last_plan_check: Instant,
    /// Per device: when its heartbeat last came straight from it, and when
    /// it last came at all.
    heard_via: HashMap<PeerId, (Instant, Instant)>,
}

impl Loop {
    fn new(
        s: Settings,
        swarm: Swarm<Behaviour>,
        mdns: Option<Mdns>,
        status: Arc<RwLock<ClusterStatus>>,
    ) -> Self {
        let me = *swarm.local_peer_id();
        let mcfg = MembershipConfig {
            heartbeat_every: Duration::from_millis(s.cfg.heartbeat_ms),
            suspect_after: Duration::from_millis(s.cfg.suspect_ms),
            dead_after: Duration::from_millis(s.cfg.dead_ms),
        };
        let mut dialable = HashMap::new();
        for p in &s.cfg.static_peers {
            match p.parse::<Multiaddr>() {
                Ok(a) => {
                    dialable.insert(a, None);
                }
                Err(e) => {
                    tracing::warn!(peer = %p, error = %e, "ignoring a bad [cluster] static_peers entry")
                }
            }
        }
        let roster = s.roster.clone();
        Self {
            topic: household_topic(&s.secret),
            election: Election::new(
                me.to_string(),
                s.profile.score(),
                Duration::from_millis(500),
            ),
            membership: Membership::new(mcfg),
            me,
            s,
            swarm,
            mdns,
            status,
            peers: HashMap::new(),
            dialable,
            addr_peer: HashMap::new(),
            nearby: BTreeMap::new(),
            roster,
            pairing: false,
            plan_key: String::new(),
            max_epoch: 0,
            rival_epoch: 0,
            last_plan_check: Instant::now(),
            heard_via: HashMap::new(),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut heartbeat = tokio::time::interval(Duration::from_millis(self.s.cfg.heartbeat_ms));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut redial = tokio::time::interval(Duration::from_millis(1000));
        for t in [&mut heartbeat, &mut tick, &mut redial] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mdns_events = self.mdns.as_ref().map(|m| m.events.clone());
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                ev = async {
                    match &mdns_events {
                        Some(r) => r.recv_async().await.ok(),
                        None => std::future::pending().await,
                    }
                } => if let Some(ev) = ev { self.on_mdns(ev) },
                _ = heartbeat.tick() => self.publish(false),
                _ = tick.tick() => self.on_tick(),
                _ = redial.tick() => self.redial(),
                cmd = commands.recv() => match cmd {
                    Some(Command::SetPairing(on)) => {
                        self.pairing = on;
                        self.announce();
                    }
                    Some(Command::Roster(r)) => self.apply_roster(r),
                    Some(Command::Pin(pin, reply)) => {
                        let _ = reply.send(self.pin(pin));
                    }
                    Some(Command::Shutdown) | None => {
                        self.publish(true);
                        // Let the goodbye leave before the connections close.
                        let until = tokio::time::Instant::now() + Duration::from_millis(150);
                        while let Ok(ev) = tokio::time::timeout_at(until, self.swarm.select_next_some()).await {
                            self.on_swarm(ev);
                        }
                        if let Some(m) = &self.mdns {
                            let _ = m.daemon.unregister(&format!("{}.{SERVICE}", m.instance));
                            if let Some(p) = &m.pair_instance {
                                let _ = m.daemon.unregister(&format!("{p}.{SERVICE}"));
                            }
                            let _ = m.daemon.shutdown();
                        }
                        break;
                    }
                },
            }
        }
    }

    fn publish(&mut self, bye: bool) {
        let view = self.election.view();
        let links = self.links();
        let ring = self.s.ring.as_ref().map(|r| {
            let mut ad = r.local_ad();
            ad.links = links;
            if self.election.is_coordinator() {
                ad.plan = r.plan().filter(|p| p.coordinator == self.me.to_string());
            }
            ad
        });
        let hb = Heartbeat {
            v: PROTOCOL_VERSION,
            profile: self.s.profile.clone(),
            term: view.term,
            coordinator: view.coordinator.clone(),
            bye,
            roster: self.roster.clone(),
            ring,
        };
        let data = serde_json::to_vec(&hb).expect("heartbeats serialise");
        // No peers yet is normal for a household of one.
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data);
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "cluster listening");
                self.status
                    .write()
                    .expect("status")
                    .listen
                    .push(address.to_string());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %addr, "connected to a household device");
                let e = self.peers.entry(peer_id).or_insert(PeerInfo {
                    profile: None,
                    addr: None,
                    rtt: None,
                });
                if endpoint.is_dialer() {
                    self.addr_peer.insert(addr.clone(), peer_id);
                }
                if endpoint.is_dialer() || e.addr.is_none() {
                    e.addr = Some(addr);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, cause = ?cause, "disconnected");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // Wrong household key, or not prima at all: refused before
                // any application bytes.
                tracing::debug!(%send_back_addr, %error, "refused an incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                propagation_source,
                ..
            })) => {
                // Heartbeats are flood-published: one that reaches us only
                // through another device means the direct link is broken.
                if let Some(src) = message.source {
                    let now = Instant::now();
                    let e = self.heard_via.entry(src).or_insert((now, now));
                    e.1 = now;
                    if propagation_source == src {
                        e.0 = now;
                    }
                }
                self.on_gossip(message)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt = Some(rtt);
                }
                if let Some(r) = &self.s.ring {
                    r.mark_ok(&peer.to_string());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Err(e),
                ..
            })) => {
                tracing::debug!(%peer, error = %e, "ping failed");
                if let Some(r) = &self.s.ring {
                    r.mark_broken(&peer.to_string());
                }
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, message: gossipsub::Message) {
        let Some(from) = message.source else {
            return;
        };
        if from == self.me {
            return;
        }
        if self
            .roster
            .as_ref()
            .is_some_and(|r| !r.roster.contains(&from.to_string()))
        {
            tracing::debug!(peer = %from, "dropped gossip from a device not on the roster");
            return;
        }
        if message.data.len() > MAX_GOSSIP_BYTES {
            tracing::warn!(peer = %from, bytes = message.data.len(), limit = MAX_GOSSIP_BYTES, "dropped an oversized gossip message");
            return;
        }
        let hb: Heartbeat = match serde_json::from_slice(&message.data) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer = %from, bytes = message.data.len(), error = %e, "dropped a malformed gossip message");
                return;
            }
        };
        if hb.v != PROTOCOL_VERSION {
            tracing::warn!(peer = %from, version = hb.v, "dropped gossip of another protocol version");
            return;
        }
        if let Some(r) = hb.roster.clone() {
            if self
                .roster
                .as_ref()
                .is_some_and(|mine| r.roster.epoch > mine.roster.epoch)
            {
                if r.verify(&self.s.secret) {
                    self.apply_roster(r);
                } else {
                    tracing::warn!(peer = %from, "dropped a roster with a bad signature");
                }
            }
        }
        let now = Instant::now();
        let id = from.to_string();
        let changes = if hb.bye {
            self.membership
                .on_event(now, membership::Event::Left(id.clone()))
        } else {
            self.membership
                .on_event(now, membership::Event::Heard(id.clone()))
        };
        self.log_changes(&changes);
        let e = self.peers.entry(from).or_insert(PeerInfo {
            profile: None,
            addr: None,
            rtt: None,
        });
        let name = hb.profile.name.clone();
        e.profile = Some(hb.profile);
        if let (Some(ring), Some(ad)) = (&self.s.ring, hb.ring) {
            if let Some(p) = &ad.plan {
                self.max_epoch = self.max_epoch.max(p.epoch);
                if p.coordinator != self.me.to_string() {
                    self.rival_epoch = self.rival_epoch.max(p.epoch);
                }
                // Plans come from the device that made them, while it
                // says it coordinates.
                if p.coordinator == id && hb.coordinator == id && !hb.bye {
                    ring.adopt(p.clone());
                }
            }
            ring.peers.write().expect("peers").insert(
                id.clone(),
                crate::ring::PeerAd {
                    name,
                    ad,
                    heard: now,
                },
            );
        }
        if !hb.bye {
            self.election.on_event(
                now,
                election::Event::Announce {
                    from: id,
                    term: hb.term,
                    coordinator: hb.coordinator,
                },
            );
        }
        if !changes.is_empty() {
            self.update_election(now);
        }
    }

    fn log_changes(&self, changes: &[membership::Change]) {
        for c in changes {
            let name = c
                .peer
                .parse::<PeerId>()
                .ok()
                .and_then(|p| self.peers.get(&p))
                .and_then(|p| p.profile.as_ref())
                .map(|p| p.name.clone())
                .unwrap_or_else(|| c.peer.clone());
            let from = c.from.map(PeerState::as_str).unwrap_or("unknown");
            let to = c.to.map(PeerState::as_str).unwrap_or("removed");
            tracing::info!(device = %name, from, to, epoch = c.epoch, "membership");
            let kind = match (from, to) {
                ("unknown", "alive") => "join",
                (_, "alive") => "back",
                (_, "suspect") => "suspect",
                (_, "dead") => "dead",
                _ => "leave",
            };
            crate::events::record(kind, format!("{name}: {from} -> {to}"), None);
        }
    }

    fn note_election(&self, coordinator: &str, term: u64) {
        let name = if coordinator == self.me.to_string() {
            format!("{} (this device)", self.s.profile.name)
        } else {
            coordinator
                .parse::<PeerId>()
                .ok()
                .and_then(|p| self.peers.get(&p))
                .and_then(|p| p.profile.as_ref())
                .map(|p| p.name.clone())
                .unwrap_or_else(|| coordinator.to_string())
        };
        crate::events::record("elect", format!("coordinator {name}, term {term}"), None);
    }

    fn update_election(&mut self, now: Instant) {
        let roster: Vec<(String, u64, Instant)> = self
            .membership
            .live()
            .map(|(id, p)| {
                let score = id
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|pid| self.peers.get(&pid))
                    .and_then(|i| i.profile.as_ref())
                    .map(Profile::score)
                    .unwrap_or(0);
                (id.clone(), score, p.since)
            })
            .collect();
        if let Some(v) = self.election.on_event(now, election::Event::Roster(roster)) {
            tracing::info!(coordinator = %v.coordinator, term = v.term, me = self.election.is_coordinator(), "coordinator elected");
            self.note_election(&v.coordinator, v.term);
        }
    }

    /// Marks ring links broken or mended from how heartbeats arrive.
    fn check_links(&self, now: Instant) {
        let Some(ring) = &self.s.ring else { return };
        for (peer, &(direct, any)) in &self.heard_via {
            let recent =
                now.duration_since(any) < Duration::from_millis(self.s.cfg.heartbeat_ms * 3);
            if !recent {
                continue; // silent altogether: membership's business
            }
            if now.duration_since(direct) > LINK_BROKEN_AFTER {
                ring.mark_broken(&peer.to_string());
            } else if now.duration_since(direct)
                < Duration::from_millis(self.s.cfg.heartbeat_ms * 3)
            {
                ring.mark_ok(&peer.to_string());
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.check_links(now);
        let changes = self.membership.on_event(now, membership::Event::Tick);
        self.log_changes(&changes);
        // A dead device's connections go: after a long cut TCP would resend
        // on them only after its backed-off timeout (seconds), so when the
        // device is back, fresh connections (redialled every second) carry
        // gossip at once.
        for c in changes.iter().filter(|c| c.to == Some(PeerState::Dead)) {
            if let Ok(p) = c.peer.parse::<PeerId>() {
                let _ = self.swarm.disconnect_peer_id(p);
                self.heard_via.remove(&p);
            }
        }
        self.update_election(now);
        if let Some(v) = self.election.on_event(now, election::Event::Tick) {
            tracing::info!(coordinator = %v.coordinator, term = v.term, "coordinator elected");
            self.note_election(&v.coordinator, v.term);
        }
        self.refresh_mdns_tag();
        // A device lost or found is planned around at once.
        if !changes.is_empty() || self.last_plan_check.elapsed() >= Duration::from_millis(250) {
            self.last_plan_check = now;
            let _ = self.replan(false);
        }
        self.write_status();
    }

    /// RTTs to the devices this one is connected to, by name.
    fn links(&self) -> Vec<(String, f64)> {
        self.peers
            .values()
            .filter_map(|p| {
                let name = p.profile.as_ref()?.name.clone();
                Some((name, p.rtt?.as_secs_f64() * 1e3))
            })
            .collect()
    }

    /// Sets or clears the pin and plans again at once.
    fn pin(&mut self, pin: Option<Pin>) -> std::result::Result<(), String> {
        let Some(ring) = self.s.ring.clone() else {
            return Err("the ring is disabled on this device ([ring] enabled)".into());
        };
        if !self.election.is_coordinator() {
            let c = self.election.view().coordinator.clone();
            let name = c
                .parse::<PeerId>()
                .ok()
                .and_then(|p| self.peers.get(&p))
                .and_then(|i| i.profile.as_ref())
                .map(|p| p.name.clone())
                .unwrap_or(c);
            return Err(format!(
                "only the coordinator plans; ask '{name}' (primactl on that device)"
            ));
        }
        let old = ring.pin.read().expect("pin").clone();
        *ring.pin.write().expect("pin") = pin;
        match self.replan(true) {
            Ok(()) => Ok(()),
            Err(e) => {
                *ring.pin.write().expect("pin") = old;
                self.plan_key.clear();
                Err(e)
            }
        }
    }

    /// On the coordinator: plans the ring again when the devices holding
    /// the model, their profiles or the pin changed. `force` reports errors
    /// (and plans even if nothing changed).
    fn replan(&mut self, force: bool) -> std::result::Result<(), String> {
        let Some(ring) = self.s.ring.clone() else {
            return Ok(());
        };
        if !self.election.is_coordinator() {
            return Ok(());
        }
        let local = ring.local_ad();
        let leaving = ring.is_leaving();
        // A coordinator that is leaving still plans (the household's
        // model as the running plan names it), without itself.
        let model = match (local.model.clone(), ring.plan()) {
            (Some(m), _) => m,
            (None, Some(p)) if leaving => crate::ring::ModelAd {
                name: p.model.clone(),
                sha256: p.sha256.clone(),
                n_layer: p.n_layer,
            },
            _ => return Err("this device does not hold the household's model".into()),
        };
        let Some(path) = ring.model_file() else {
            return Err("the model file is missing here".into());
        };
        let me = self.me.to_string();
        let mut cands = Vec::new();
        if !leaving {
            cands.push(Candidate {
                id: me.clone(),
                name: self.s.profile.name.clone(),
                device: local.device.clone(),
                cores: self.s.profile.cores,
                ram_mb: self.s.profile.ram_mb,
                links: self.links(),
                memory_budget: local.memory_budget,
                bandwidth: local.bandwidth.clone(),
                draft_bytes: local.draft_bytes,
            });
        }
        {
            let peers = ring.peers.read().expect("peers");
            let mut live: Vec<&String> = self.membership.live().map(|(id, _)| id).collect();
            live.sort();
            for id in live {
                let Some(p) = peers.get(id) else { continue };
                if p.ad.model.as_ref().is_none_or(|m| m.sha256 != model.sha256) {
                    continue;
                }
                let info = id
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|pid| self.peers.get(&pid));
                let prof = info.and_then(|i| i.profile.clone());
                cands.push(Candidate {
                    id: id.clone(),
                    name: p.name.clone(),
                    device: p.ad.device.clone(),
                    cores: prof.as_ref().map(|p| p.cores).unwrap_or(1),
                    ram_mb: prof.as_ref().map(|p| p.ram_mb).unwrap_or(1024),
                    links: p.ad.links.clone(),
                    memory_budget: p.ad.memory_budget,
                    bandwidth: p.ad.bandwidth.clone(),
                    draft_bytes: p.ad.draft_bytes,
                });
            }
        }
        // Taking over from another coordinator: its pin (if the running
        // plan is pinned) becomes ours, so a pin survives elections.
        // (`force` is a pin being set here: that one stands.)
        if let Some(cur) = ring.plan().filter(|p| p.coordinator != me && !force) {
            *ring.pin.write().expect("pin") = cur.pinned.then(|| crate::ring::Pin {
                k: cur.k,
                windows: cur
                    .devices
                    .iter()
                    .map(|d| (d.name.clone(), d.window))
                    .collect(),
                gpu_layers: cur.devices.iter().map(|d| d.gpu_layers).collect(),
            });
        }
        let mut pin = ring.pin.read().expect("pin").clone();
        // A pinned device that is gone (dead, left, lost the model) does not
        // stop the household: Halda plans around it until it is back, and
        // the pin applies again then. Setting a pin (`force`) still insists.
        if let Some(p) = pin.as_ref().filter(|_| !force) {
            let gone: Vec<&String> = p
                .windows
                .iter()
                .map(|(n, _)| n)
                .filter(|n| !cands.iter().any(|c| &c.name == *n || &c.id == *n))
                .collect();
            if !gone.is_empty() {
                tracing::debug!(?gone, "pinned devices are not live: planning with Halda");
                pin = None;
            }
        }
        // Material changes only: a device measured, its free memory moving
        // by more than about 20%, a slow link's RTT or any link's bandwidth
        // doubling.
        let key = serde_json::to_string(&(
            cands
                .iter()
                .map(|c| {
                    let mem = c
                        .device
                        .as_ref()
                        .map(|d| (d.memory.available_bytes.max(1) as f64).log(1.2).round() as i64);
                    let links: Vec<(String, i64)> = c
                        .links
                        .iter()
                        // LAN-fast links (< 5 ms) are all alike; above,
                        // a doubling is material. Jitter is not.
                        .map(|(n, r)| {
                            let b = if *r < 5.0 { 0 } else { r.log2().round() as i64 };
                            (n.clone(), b)
                        })
                        .collect();
                    // A link's bandwidth halving or doubling is material.
                    let bw: Vec<(String, i64)> = c
                        .bandwidth
                        .iter()
                        .map(|(n, b)| (n.clone(), b.max(1.0).log2().round() as i64))
                        .collect();
                    (&c.id, c.device.is_some(), mem, links, bw)
                })
                .collect::<Vec<_>>(),
            &model,
            &pin,
        ))
        .unwrap_or_default();
        let current = ring.plan();
        let mine = current.as_ref().is_some_and(|p| p.coordinator == me);
        let outbid = current
            .as_ref()
            .is_some_and(|p| self.rival_epoch >= p.epoch);
        if key == self.plan_key && mine && !outbid && !force {
            return Ok(());
        }
        self.plan_key = key;
        let epoch = self
            .max_epoch
            .max(current.as_ref().map(|p| p.epoch).unwrap_or(0))
            + 1;
        // The running plan (ours, or one a coordinator before us made) is
        // kept unless the new one is clearly faster: autoscaling without
        // churn. A plan of ours that a rival outbid is not kept.
        let keepable = current.as_ref().filter(|_| !(force || mine && outbid));
        let req = planner::Request {
            model: &model,
            path: &path,
            candidates: &cands,
            pin: pin.as_ref(),
            epoch,
            coordinator: &me,
            n_ctx: self.s.n_ctx,
            use_all_devices: self.s.use_all_devices,
            current: keepable,
        };
        let t = Instant::now();
        match planner::make_plan(&req) {
            Ok(planner::Planned::Keep { current_ms, new_ms }) => {
                tracing::info!(
                    current_ms, new_ms, took = ?t.elapsed(),
                    "kept the ring plan: the best new one is not clearly faster"
                );
                crate::events::record(
                    "keep",
                    format!(
                        "kept plan epoch {}: the best new plan predicts {new_ms:.1} ms/token \
                         against {current_ms:.1} (switching needs {:.0}% gain)",
                        keepable.map(|p| p.epoch).unwrap_or(0),
                        planner::SWITCH_GAIN * 100.0
                    ),
                    Some(t.elapsed()),
                );
                // A plan taken over from another coordinator is issued
                // again under this one; the layout is the same, so no
                // device reloads anything.
                if let Some(p) = keepable.filter(|p| p.coordinator != me) {
                    let mut p = p.clone();
                    p.epoch = epoch;
                    p.coordinator = me.clone();
                    self.max_epoch = epoch;
                    ring.adopt(p);
                    self.publish(false);
                }
                Ok(())
            }
            Ok(planner::Planned::New(plan)) => {
                tracing::info!(
                    epoch, devices = cands.len(), took = ?t.elapsed(),
                    tpot_ms = ?plan.tpot_ms, "planned the ring"
                );
                let windows: Vec<String> = plan
                    .devices
                    .iter()
                    .map(|d| format!("{} {}", d.name, d.window))
                    .collect();
                crate::events::record(
                    "plan",
                    format!(
                        "epoch {epoch}: k={} [{}]{}",
                        plan.k,
                        windows.join(", "),
                        if plan.pinned { " (pinned)" } else { "" }
                    ),
                    Some(t.elapsed()),
                );
                self.max_epoch = epoch;
                ring.adopt(plan);
                self.publish(false);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot plan the ring");
                Err(e)
            }
        }
    }

    /// Installs a newer roster: the gate follows it, it is stored, and it
    /// spreads with the next heartbeats.
    fn apply_roster(&mut self, r: SignedRoster) {
        let old: Vec<String> = self
            .roster
            .as_ref()
            .map(|o| o.roster.members.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(g) = self.swarm.behaviour_mut().gate.as_mut() {
            for id in r.roster.members.keys() {
                if let Ok(p) = id.parse::<PeerId>() {
                    g.allow_peer(p);
                }
            }
            for id in old.iter().filter(|id| !r.roster.contains(id)) {
                if let Ok(p) = id.parse::<PeerId>() {
                    tracing::info!(peer = %p, "device removed from the household");
                    g.disallow_peer(p);
                    let _ = self
                        .membership
                        .on_event(Instant::now(), membership::Event::Removed(id.clone()));
                }
            }
        }
        if !r.roster.contains(&self.me.to_string()) {
            tracing::warn!("this device was removed from its household; pair it again to rejoin");
        }
        if let Err(e) = self.s.store.set_roster(&r) {
            tracing::warn!(error = %e, "could not store the roster");
        }
        tracing::info!(
            epoch = r.roster.epoch,
            members = r.roster.members.len(),
            "roster updated"
        );
        self.status.write().expect("status").roster = Some(r.roster.clone());
        self.roster = Some(r);
    }

    fn announce(&mut self) {
        let Some(m) = &mut self.mdns else { return };
        if let Some(old) = m.pair_instance.take() {
            let _ = m.daemon.unregister(&format!("{old}.{SERVICE}"));
        }
        if self.pairing {
            let inst = format!("prima-{:016x}", rand::random::<u64>());
            match service_info(&self.s, &inst, window_now(), true) {
                Ok(info) => match m.daemon.register(info) {
                    Ok(()) => m.pair_instance = Some(inst),
                    Err(e) => tracing::warn!(error = %e, "mDNS pairing announcement failed"),
                },
                Err(e) => tracing::warn!(error = %e, "mDNS record"),
            }
        }
    }

    fn refresh_mdns_tag(&mut self) {
        let Some(m) = &mut self.mdns else { return };
        let w = window_now();
        if w != m.window {
            m.window = w;
            match service_info(&self.s, &m.instance, w, false) {
                Ok(info) => {
                    if let Err(e) = m.daemon.register(info) {
                        tracing::warn!(error = %e, "mDNS re-announcement failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "mDNS record"),
            }
        }
    }

    fn on_mdns(&mut self, ev: mdns_sd::ServiceEvent) {
        let svc = match ev {
            mdns_sd::ServiceEvent::ServiceResolved(svc) => svc,
            mdns_sd::ServiceEvent::ServiceRemoved(_, fullname) => {
                let instance = fullname.trim_end_matches(SERVICE).trim_end_matches('.');
                self.nearby.remove(instance);
                return;
            }
            _ => return,
        };
        let Some(m) = &self.mdns else { return };
        if svc.fullname.starts_with(&m.instance)
            || m.pair_instance
                .as_ref()
                .is_some_and(|p| svc.fullname.starts_with(p))
        {
            return; // ourselves
        }
        let addrs: Vec<Ipv4Addr> = svc.get_addresses_v4().into_iter().collect();
        let tag_ok = svc
            .txt_properties
            .get_property_val_str("tag")
            .is_some_and(|t| is_member_tag(&self.s.secret, t));
        let version_ok = svc.txt_properties.get_property_val_str("v") == Some("1");
        if tag_ok && version_ok {
            for ip in addrs {
                let a = Multiaddr::empty()
                    .with(Protocol::Ip4(ip))
                    .with(Protocol::Tcp(svc.port));
                if !self.dialable.contains_key(&a) {
                    tracing::info!(addr = %a, "found a household device by mDNS");
                    self.dialable.insert(a.clone(), None);
                    self.dial(a);
                }
            }
        } else {
            let instance = svc
                .fullname
                .trim_end_matches(SERVICE)
                .trim_end_matches('.')
                .to_string();
            if !self.nearby.contains_key(&instance) {
                tracing::info!(%instance, "an unpaired prima device is nearby");
            }
            let pairing_port = svc
                .txt_properties
                .get_property_val_str("pair")
                .and_then(|p| p.parse().ok());
            self.nearby.insert(
                instance.clone(),
                Nearby {
                    instance,
                    addrs: addrs.iter().map(|a| a.to_string()).collect(),
                    pairing_port,
                },
            );
        }
    }

    fn dial(&mut self, a: Multiaddr) {
        self.dialable.insert(a.clone(), Some(Instant::now()));
        if let Err(e) = self.swarm.dial(a.clone()) {
            tracing::debug!(addr = %a, error = %e, "dial");
        }
    }

    /// Dials known member addresses that have no live connection.
    fn redial(&mut self) {
        let connected: Vec<Multiaddr> = self
            .peers
            .iter()
            .filter(|(p, _)| self.swarm.is_connected(p))
            .filter_map(|(_, i)| i.addr.clone())
            .collect();
        let due: Vec<Multiaddr> = self
            .dialable
            .iter()
            .filter(|(a, last)| {
                !connected.contains(a)
                    && !self
                        .addr_peer
                        .get(*a)
                        .is_some_and(|p| self.swarm.is_connected(p))
                    && last.is_none_or(|t| t.elapsed() >= Duration::from_millis(900))
            })
            .map(|(a, _)| a.clone())
            .collect();
        for a in due {
            self.dial(a);
        }
    }

    fn write_status(&self) {
        let view = self.election.view();
        let mut devices = vec![DeviceStatus {
            id: self.me.to_string(),
            name: self.s.profile.name.clone(),
            role: if view.coordinator == self.me.to_string() {
                "coordinator"
            } else {
                "member"
            },
            state: "alive",
            addr: None,
            rtt_ms: None,
            os: self.s.profile.os.clone(),
            cores: self.s.profile.cores,
            ram_mb: self.s.profile.ram_mb,
            this_device: true,
        }];
        for (id, p) in self.membership.peers() {
            let info = id
                .parse::<PeerId>()
                .ok()
                .and_then(|pid| self.peers.get(&pid));
            let prof = info.and_then(|i| i.profile.clone());
            devices.push(DeviceStatus {
                id: id.clone(),
                name: prof.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                role: if &view.coordinator == id {
                    "coordinator"
                } else {
                    "member"
                },
                state: p.state.as_str(),
                addr: info.and_then(|i| i.addr.as_ref()).map(|a| a.to_string()),
                rtt_ms: info.and_then(|i| i.rtt).map(|d| d.as_secs_f64() * 1e3),
                os: prof.as_ref().map(|p| p.os.clone()).unwrap_or_default(),
                cores: prof.as_ref().map(|p| p.cores).unwrap_or(0),
                ram_mb: prof.as_ref().map(|p| p.ram_mb).unwrap_or(0),
                this_device: false,
            });
        }
        if let Some(r) = &self.s.ring {
            let mut e = r.elected.write().expect("elected");
            if *e != view.coordinator {
                *e = view.coordinator.clone();
            }
        }
        let mut st = self.status.write().expect("status");
        st.epoch = self.membership.epoch();
        st.term = view.term;
        st.coordinator = Some(view.coordinator.clone());
        st.devices = devices;
        st.nearby_unpaired = self.nearby.values().cloned().collect();
        st.pairing = self.pairing;
        st.plan = self.s.ring.as_ref().and_then(|r| {
            let plan = r.plan()?;
            let ready = r.readiness();
            Some(PlanStatus {
                live: ready.iter().all(|&x| x),
                ready,
                my_rank: plan.rank_of(&self.me.to_string()),
                plan,
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_rotate_and_differ_by_household() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        assert_ne!(tag(&a, 5), tag(&a, 6));
        assert_ne!(tag(&a, 5), tag(&b, 5));
        assert!(is_member_tag(&a, &tag(&a, window_now())));
        assert!(is_member_tag(&a, &tag(&a, window_now() - 1)));
        assert!(!is_member_tag(&b, &tag(&a, window_now())));
        assert!(!is_member_tag(&a, "not a tag"));
    }

    #[test]
    fn virtual_interfaces_are_recognised() {
        for v in [
            "docker0",
            "veth12ab",
            "br-1234",
            "virbr0",
            "tun0",
            "wg0",
            "tailscale0",
        ] {
            assert!(is_virtual_interface(v), "{v}");
        }
        for p in ["eth0", "enp3s0", "wlan0", "wlp2s0", "en0", "lo"] {
            assert!(!is_virtual_interface(p), "{p}");
        }
    }

    #[test]
    fn malformed_heartbeats_do_not_parse() {
        assert!(serde_json::from_slice::<Heartbeat>(b"\xff\xfe").is_err());
        assert!(serde_json::from_slice::<Heartbeat>(b"{\"v\":1}").is_err());
        let ok = serde_json::to_vec(&Heartbeat {
            v: 1,
            profile: Profile::local("x"),
            term: 1,
            coordinator: "c".into(),
            bye: false,
            roster: None,
            ring: Some(RingAd::default()),
        })
        .unwrap();
        assert!(serde_json::from_slice::<Heartbeat>(&ok).is_ok());
        // A ring advertisement with a broken plan does not parse either.
        let bad = String::from_utf8(ok)
            .unwrap()
            .replace("\"plan\":null", "\"plan\":{\"epoch\":\"x\"}");
        assert!(bad.contains("\"epoch\":\"x\""));
        assert!(serde_json::from_slice::<Heartbeat>(bad.as_bytes()).is_err());
    }

    #[test]
    fn more_cores_score_higher_than_more_ram() {
        let a = Profile {
            name: "a".into(),
            os: "linux".into(),
            cores: 8,
            ram_mb: 8_000,
        };
        let b = Profile {
            cores: 4,
            ram_mb: 64_000,
            ..a.clone()
        };
        assert!(a.score() > b.score());
    }
}
