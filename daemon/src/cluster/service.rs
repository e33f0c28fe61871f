//! The cluster as the rest of primad sees it: start and restart the network
//! loop, open a pairing code, join a household, remove a device.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use libp2p_identity::Keypair;
use tokio::sync::Mutex;

use super::{
    net::{self, ClusterStatus, Command, Profile, Settings},
    pairing::{self, JoinRequest, Welcome, WrongCode},
    roster::{Member, Roster, SignedRoster},
};
use crate::{api::now_secs, store::Store};

struct Offer {
    code: String,
    expires: Instant,
}

pub struct ClusterCtl {
    pub status: Arc<RwLock<ClusterStatus>>,
    running: Mutex<Option<net::Cluster>>,
    /// The running loop's command channel, reachable without the lock.
    commands: RwLock<Option<tokio::sync::mpsc::Sender<Command>>>,
    cfg: prima_config::Cluster,
    key: Keypair,
    profile: Profile,
    store: Arc<Store>,
    me: String,
    offer: Mutex<Option<Offer>>,
    ring: Option<Arc<crate::ring::Ring>>,
    n_ctx: u32,
    use_all_devices: bool,
}

impl ClusterCtl {
    pub async fn start(
        cfg: prima_config::Cluster,
        key: Keypair,
        profile: Profile,
        store: Arc<Store>,
        ring: Option<(Arc<crate::ring::Ring>, u32, bool)>,
    ) -> Result<Arc<Self>> {
        let (ring, n_ctx, use_all_devices) = match ring {
            Some((r, n, all)) => (Some(r), n, all),
            None => (None, 0, false),
        };
        let me = key.public().to_peer_id().to_string();
        let ctl = Arc::new(Self {
            status: Arc::new(RwLock::new(ClusterStatus::default())),
            running: Mutex::new(None),
            commands: RwLock::new(None),
            cfg,
            key,
            profile,
            store,
            me,
            offer: Mutex::new(None),
            ring,
            n_ctx,
            use_all_devices,
        });
        ctl.launch().await?;
        Ok(ctl)
    }

    /// The household secret and roster this device runs with now.
    fn household(&self) -> Result<([u8; 32], Option<SignedRoster>)> {
        if self.cfg.open_household {
            return Ok((net::open_household_secret(), None));
        }
        let secret = self.store.household_secret()?;
        let roster = match self.store.roster()? {
            Some(r) if r.verify(&secret) => r,
            Some(_) => bail!(
                "the stored roster does not match the household key; the state dir is damaged"
            ),
            None => {
                // A household of one, founded now.
                let r = Roster::founding(&self.me, &self.profile.name, now_secs()).sign(&secret);
                self.store.set_roster(&r)?;
                r
            }
        };
        Ok((secret, Some(roster)))
    }

    /// See [`net::send_hostile_gossip`].
    pub async fn hostile_gossip(
        cfg: prima_config::Cluster,
        key: Keypair,
        profile: Profile,
        store: Arc<Store>,
        target: &str,
    ) -> Result<usize> {
        let me = key.public().to_peer_id().to_string();
        let ctl = Self {
            status: Arc::new(RwLock::new(ClusterStatus::default())),
            running: Mutex::new(None),
            commands: RwLock::new(None),
            cfg: cfg.clone(),
            key: key.clone(),
            profile: profile.clone(),
            store: store.clone(),
            me,
            offer: Mutex::new(None),
            ring: None,
            n_ctx: 0,
            use_all_devices: false,
        };
        let (secret, roster) = ctl.household()?;
        let target = target
            .parse()
            .map_err(|e| anyhow!("--peer {target}: {e}"))?;
        net::send_hostile_gossip(
            Settings {
                cfg,
                key,
                secret,
                profile,
                roster,
                store,
                ring: None,
                n_ctx: 0,
                use_all_devices: false,
            },
            target,
        )
        .await
    }

    async fn launch(&self) -> Result<()> {
        let (secret, roster) = self.household()?;
        let c = net::start(
            Settings {
                cfg: self.cfg.clone(),
                key: self.key.clone(),
                secret,
                profile: self.profile.clone(),
                roster,
                store: self.store.clone(),
                ring: self.ring.clone(),
                n_ctx: self.n_ctx,
                use_all_devices: self.use_all_devices,
            },
            self.status.clone(),
        )
        .await?;
        *self.commands.write().expect("commands") = Some(c.sender());
        *self.running.lock().await = Some(c);
        Ok(())
    }

    pub async fn shutdown(&self) {
        if let Some(c) = self.running.lock().await.take() {
            c.shutdown().await;
        }
    }

    async fn send(&self, c: Command) {
        let tx = self.commands.read().expect("commands").clone();
        if let Some(tx) = tx {
            let _ = tx.send(c).await;
        }
    }

    /// Pins the ring plan (None: Halda plans again); only on the coordinator.
    pub async fn pin(&self, pin: Option<crate::ring::Pin>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Pin(pin, tx)).await;
        rx.await
            .map_err(|_| anyhow!("the cluster is restarting; try again"))?
            .map_err(|e| anyhow!(e))
    }

    /// Opens (or returns the open) pairing code; returns it with its
    /// remaining lifetime in seconds.
    pub async fn pair(self: &Arc<Self>) -> Result<(String, u64)> {
        if self.cfg.open_household {
            bail!(
                "this household is open ([cluster] open_household): devices join without pairing"
            );
        }
        let mut offer = self.offer.lock().await;
        if let Some(o) = offer.as_ref().filter(|o| o.expires > Instant::now()) {
            return Ok((o.code.clone(), (o.expires - Instant::now()).as_secs()));
        }
        let port = net::pairing_port(&self.cfg);
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("cannot listen for pairing on TCP port {port}"))?;
        let code = pairing::new_code();
        let expires = Instant::now() + pairing::CODE_LIFETIME;
        *offer = Some(Offer {
            code: code.clone(),
            expires,
        });
        drop(offer);
        self.send(Command::SetPairing(true)).await;
        tracing::info!(port, "pairing open for {:?}", pairing::CODE_LIFETIME);
        let me = self.clone();
        let c = code.clone();
        tokio::spawn(async move {
            me.serve_pairing(listener, &c, expires).await;
            *me.offer.lock().await = None;
            me.send(Command::SetPairing(false)).await;
        });
        Ok((code, pairing::CODE_LIFETIME.as_secs()))
    }

    async fn serve_pairing(&self, listener: tokio::net::TcpListener, code: &str, expires: Instant) {
        let mut failures = 0;
        loop {
            let left = expires.saturating_duration_since(Instant::now());
            let accepted = match tokio::time::timeout(left, listener.accept()).await {
                Err(_) => {
                    tracing::info!("pairing code expired");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pairing listener");
                    return;
                }
                Ok(Ok(a)) => a,
            };
            let (stream, from) = accepted;
            // An attempt may not outlive the code.
            let left = expires.saturating_duration_since(Instant::now());
            let res = match tokio::time::timeout(
                left,
                pairing::serve_one(stream, code, |req| self.welcome(req)),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!("pairing code expired during an attempt");
                    return;
                }
            };
            match res {
                Ok(req) => {
                    tracing::info!(device = %req.name, %from, "a device joined the household");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    if e.downcast_ref::<WrongCode>().is_some() {
                        tracing::warn!(%from, attempt = failures, "pairing attempt with a wrong code");
                    } else {
                        tracing::warn!(%from, attempt = failures, error = %format!("{e:#}"), "pairing attempt failed");
                    }
                    if failures >= pairing::MAX_FAILURES {
                        tracing::warn!(
                            "pairing closed after {failures} failed attempts; open a new code"
                        );
                        return;
                    }
                    // Slow down guessing further.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Adds the joiner to the roster (stored and spread) and hands over the
    /// household secret.
    fn welcome(&self, req: &JoinRequest) -> Result<Welcome> {
        if req.peer_id.parse::<libp2p::PeerId>().is_err() || req.name.len() > 64 {
            bail!("the joiner sent an invalid identity");
        }
        let secret = self.store.household_secret()?;
        let mut r = self
            .store
            .roster()?
            .map(|s| s.roster)
            .ok_or_else(|| anyhow!("no roster"))?;
        if r.contains(&req.peer_id) {
            bail!("a device with that identity is already a member");
        }
        r.epoch = r.epoch.saturating_add(1);
        r.members.insert(
            req.peer_id.clone(),
            Member {
                name: req.name.clone(),
                added: now_secs(),
            },
        );
        let signed = r.sign(&secret);
        self.store.set_roster(&signed)?;
        // The loop applies it (gate, gossip).
        let tx = self.commands.read().expect("commands").clone();
        if let Some(tx) = tx {
            if tx.try_send(Command::Roster(signed.clone())).is_err() {
                tracing::warn!(
                    "the network loop is busy: the new roster spreads at its next change"
                );
            }
        }
        Ok(Welcome {
            secret: hex::encode(secret),
            roster: signed,
        })
    }

    /// Joins the household of a member that has a code open: at `addr`
    /// (ip or ip:port) or whichever offers pairing nearby.
    pub async fn join(self: &Arc<Self>, code: &str, addr: Option<&str>) -> Result<Roster> {
        if self.cfg.open_household {
            bail!("this device is in an open household ([cluster] open_household); turn it off to pair");
        }
        if pairing::normalise(code).len() != 9 {
            bail!("a pairing code has 9 digits, like 123-456-789");
        }
        let me = JoinRequest {
            peer_id: self.me.clone(),
            name: self.profile.name.clone(),
        };
        let wrong = || {
            anyhow!(
                "the code was not accepted (wrong or expired); open a new one with `primactl pair`"
            )
        };
        if let Some(a) = addr {
            let t = parse_target(a, net::pairing_port(&self.cfg))?;
            return match pairing::join(t, code, &me).await {
                Ok(w) => self.adopt(w).await,
                Err(e) if e.downcast_ref::<WrongCode>().is_some() => Err(wrong()),
                Err(e) => Err(e),
            };
        }
        // Offers seen by mDNS; one that refuses (closed since) is skipped and
        // the search goes on until the deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tried = std::collections::HashSet::new();
        let mut last_err = None;
        while Instant::now() < deadline {
            let fresh: Vec<SocketAddr> = self
                .offers()
                .into_iter()
                .filter(|t| !tried.contains(t))
                .collect();
            for t in fresh {
                match pairing::join(t, code, &me).await {
                    Ok(w) => return self.adopt(w).await,
                    Err(e) if e.downcast_ref::<WrongCode>().is_some() => return Err(wrong()),
                    Err(e) => {
                        tracing::info!(target = %t, error = %format!("{e:#}"), "pairing attempt");
                        tried.insert(t);
                        last_err = Some(e);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_err.unwrap_or_else(|| {
            anyhow!(
                "no device nearby offers pairing; run `primactl pair` on a member first \
                 (or give its address with --addr)"
            )
        }))
    }

    fn offers(&self) -> Vec<SocketAddr> {
        self.status
            .read()
            .expect("status")
            .nearby_unpaired
            .iter()
            .filter_map(|n| n.pairing_port.map(|p| (n, p)))
            .flat_map(|(n, p)| {
                n.addrs
                    .iter()
                    .filter_map(move |a| a.parse().ok().map(|ip| SocketAddr::new(ip, p)))
            })
            .collect()
    }

    async fn adopt(&self, w: Welcome) -> Result<Roster> {
        let secret: [u8; 32] = hex::decode(&w.secret)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| anyhow!("the member sent a malformed household key"))?;
        if !w.roster.verify(&secret) || !w.roster.roster.contains(&self.me) {
            bail!("the member's roster does not check out");
        }
        self.store.set_household(&secret, &w.roster)?;
        tracing::info!(
            members = w.roster.roster.members.len(),
            "joined a household"
        );
        // Restart the network loop with the household's key.
        self.shutdown().await;
        self.launch().await?;
        Ok(w.roster.roster)
    }

    /// Removes a device (by name or id) from the household.
    pub async fn remove(&self, who: &str) -> Result<Roster> {
        let (secret, roster) = self.household()?;
        let mut r = roster
            .map(|s| s.roster)
            .ok_or_else(|| anyhow!("an open household has no roster to remove devices from"))?;
        let id = if r.contains(who) {
            who.to_string()
        } else {
            r.by_name(who)
                .cloned()
                .ok_or_else(|| anyhow!("no device called '{who}' in this household"))?
        };
        if id == self.me {
            bail!("this is the device itself; remove it from another member");
        }
        r.members.remove(&id);
        r.epoch = r.epoch.saturating_add(1);
        let signed = r.sign(&secret);
        self.store.set_roster(&signed)?;
        self.send(Command::Roster(signed)).await;
        Ok(r)
    }
}

fn parse_target(a: &str, default_port: u16) -> Result<SocketAddr> {
    if let Ok(s) = a.parse::<SocketAddr>() {
        return Ok(s);
    }
    let ip: std::net::IpAddr = a
        .parse()
        .map_err(|_| anyhow!("'{a}' is not an IP address or IP:PORT"))?;
    Ok(SocketAddr::new(ip, default_port))
}
