//! Pairing: a new device joins a household once, with a short code shown on
//! a member (`primactl pair`) and typed on the new device (`primactl join`).
//!
//! The two run SPAKE2 (symmetric, the code as password) over a plain TCP
//! connection to the member's pairing port, so someone on the Wi-Fi, passive
//! or in the middle, learns nothing to guess the code offline with; each side
//! then proves it holds the same key (HMAC confirmations) before anything
//! secret moves. The joiner sends its peer id and name, the member answers
//! with the household secret and the roster that now includes the joiner,
//! both encrypted with ChaCha20-Poly1305 under the SPAKE2 key.
//!
//! A code lives for two minutes and allows three wrong attempts; then the
//! offer closes. Frames are length-prefixed and capped; every read has a
//! deadline; malformed input ends the exchange with an error, never a panic.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chacha20poly1305::{
    aead::{Aead, KeyInit},
    ChaCha20Poly1305, Nonce,
};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::roster::SignedRoster;

pub const CODE_LIFETIME: Duration = Duration::from_secs(120);
pub const MAX_FAILURES: u32 = 3;
const MAX_FRAME: usize = 64 * 1024;
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const ID: &[u8] = b"prima pair v1";

/// A fresh code: nine digits shown as 3-3-3 (about 30 bits; SPAKE2 allows
/// one online guess per attempt and attempts are capped).
pub fn new_code() -> String {
    let n: u32 = rand::random::<u32>() % 1_000_000_000;
    let d = format!("{n:09}");
    format!("{}-{}-{}", &d[..3], &d[3..6], &d[6..])
}

/// The code as the protocol uses it: digits only, so "123 456 789",
/// "123-456-789" and "123456789" are the same code.
pub fn normalise(code: &str) -> String {
    code.chars().filter(char::is_ascii_digit).collect()
}

/// What the joiner tells the member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub peer_id: String,
    pub name: String,
}

/// What the member gives the joiner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    pub secret: String,
    pub roster: SignedRoster,
}

async fn write_frame(s: &mut TcpStream, data: &[u8]) -> Result<()> {
    if data.len() > MAX_FRAME {
        bail!("frame too large");
    }
    s.write_all(&(data.len() as u32).to_be_bytes()).await?;
    s.write_all(data).await?;
    s.flush().await?;
    Ok(())
}

async fn read_frame(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    tokio::time::timeout(STEP_TIMEOUT, s.read_exact(&mut len))
        .await
        .map_err(|_| anyhow!("the other side went quiet"))??;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        bail!("the other side sent a {len}-byte frame (limit {MAX_FRAME})");
    }
    let mut buf = vec![0u8; len];
    tokio::time::timeout(STEP_TIMEOUT, s.read_exact(&mut buf))
        .await
        .map_err(|_| anyhow!("the other side went quiet"))??;
    Ok(buf)
}

fn confirm(key: &[u8], role: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    m.update(b"prima pair confirm ");
    m.update(role);
    m.finalize().into_bytes().to_vec()
}

fn cipher(key: &[u8]) -> ChaCha20Poly1305 {
    let k: [u8; 32] = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .expect("any key length")
        .chain_update(b"prima pair aead")
        .finalize()
        .into_bytes()
        .into();
    ChaCha20Poly1305::new(&k.into())
}

fn nonce(n: u8) -> Nonce {
    let mut b = [0u8; 12];
    b[11] = n;
    b.into()
}

/// Both sides: SPAKE2, then key confirmation. `member` says which role
/// confirms first. Err(WrongCode) when the confirmations disagree.
async fn handshake(s: &mut TcpStream, code: &str, member: bool) -> Result<Vec<u8>> {
    let (spake, msg) = Spake2::<Ed25519Group>::start_symmetric(
        &Password::new(normalise(code).as_bytes()),
        &Identity::new(ID),
    );
    write_frame(s, &msg).await?;
    let theirs = read_frame(s).await?;
    let key = spake
        .finish(&theirs)
        .map_err(|e| anyhow!("pairing handshake: {e:?}"))?;
    let (mine, expect) = if member {
        (confirm(&key, b"member"), confirm(&key, b"joiner"))
    } else {
        (confirm(&key, b"joiner"), confirm(&key, b"member"))
    };
    write_frame(s, &mine).await?;
    let got = read_frame(s).await?;
    if got != expect {
        return Err(WrongCode.into());
    }
    Ok(key)
}

#[derive(Debug, thiserror::Error)]
#[error("the pairing code does not match")]
pub struct WrongCode;

/// Member side of one attempt on an accepted connection: returns who
/// joined; `welcome` builds the answer (it adds the joiner to the roster).
pub async fn serve_one(
    mut s: TcpStream,
    code: &str,
    welcome: impl FnOnce(&JoinRequest) -> Result<Welcome>,
) -> Result<JoinRequest> {
    let key = handshake(&mut s, code, true).await?;
    let aead = cipher(&key);
    let req = read_frame(&mut s).await?;
    let req = aead
        .decrypt(&nonce(1), req.as_ref())
        .map_err(|_| anyhow!("the joiner's message does not decrypt"))?;
    let req: JoinRequest = serde_json::from_slice(&req).context("the joiner's message")?;
    let w = welcome(&req)?;
    let out = aead
        .encrypt(&nonce(2), serde_json::to_vec(&w)?.as_ref())
        .map_err(|_| anyhow!("encrypting the welcome"))?;
    write_frame(&mut s, &out).await?;
    Ok(req)
}

/// Joiner side: connects to `addr` and pairs with `code`.
pub async fn join(addr: std::net::SocketAddr, code: &str, me: &JoinRequest) -> Result<Welcome> {
    let mut s = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("no answer from {addr}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let key = handshake(&mut s, code, false).await?;
    let aead = cipher(&key);
    let req = aead
        .encrypt(&nonce(1), serde_json::to_vec(me)?.as_ref())
        .map_err(|_| anyhow!("encrypting the request"))?;
    write_frame(&mut s, &req).await?;
    let w = read_frame(&mut s).await?;
    let w = aead
        .decrypt(&nonce(2), w.as_ref())
        .map_err(|_| anyhow!("the member's answer does not decrypt"))?;
    let w: Welcome = serde_json::from_slice(&w).context("the member's answer")?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::roster::Roster;

    async fn pair(member_code: &str, joiner_code: &str) -> (Result<JoinRequest>, Result<Welcome>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mc = member_code.to_string();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve_one(s, &mc, |req| {
                let mut r = Roster::founding("m", "member", 1);
                r.epoch += 1;
                r.members.insert(
                    req.peer_id.clone(),
                    crate::cluster::roster::Member {
                        name: req.name.clone(),
                        added: 2,
                    },
                );
                Ok(Welcome {
                    secret: hex::encode([9u8; 32]),
                    roster: r.sign(&[9u8; 32]),
                })
            })
            .await
        });
        let me = JoinRequest {
            peer_id: "j".into(),
            name: "phone".into(),
        };
        let j = join(addr, joiner_code, &me).await;
        (server.await.unwrap(), j)
    }

    #[tokio::test]
    async fn the_right_code_pairs() {
        let (m, j) = pair("123-456-789", "123 456 789").await;
        assert_eq!(m.unwrap().name, "phone");
        let w = j.unwrap();
        assert!(w.roster.verify(&[9u8; 32]));
        assert!(w.roster.roster.contains("j"));
    }

    #[tokio::test]
    async fn a_wrong_code_fails_on_both_sides_and_moves_nothing() {
        let (m, j) = pair("123-456-789", "123-456-780").await;
        assert!(m.unwrap_err().downcast_ref::<WrongCode>().is_some());
        assert!(j.is_err());
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_are_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut results = vec![];
            for _ in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                results.push(
                    serve_one(s, "111111111", |_| bail!("must not be reached"))
                        .await
                        .map(|_| ()),
                );
            }
            results
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        c2.write_all(&5u32.to_be_bytes()).await.unwrap();
        c2.write_all(b"hello").await.unwrap();
        let r = server.await.unwrap();
        assert!(
            r[0].as_ref().unwrap_err().to_string().contains("frame"),
            "{r:?}"
        );
        assert!(r[1].is_err());
    }

    #[test]
    fn codes_look_right() {
        let c = new_code();
        assert_eq!(c.len(), 11);
        assert_eq!(normalise(&c).len(), 9);
    }
}
