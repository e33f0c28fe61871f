//! What the daemon's own memory costs a small device, and keeping it low.
//!
//! On a device whose memory is smaller than the model, every megabyte the
//! process holds for itself is a megabyte of weights read from disk again
//! on every token. Two things matter: glibc's allocator, which by default
//! keeps up to eight arenas per core and grows its mmap threshold until
//! large buffers come from arenas that never shrink (tens of MB of freed
//! but resident memory here), and an honest measure of what the process
//! holds that is not the model.

use std::path::Path;

/// Makes the allocator return freed memory: two arenas instead of eight per
/// core, a fixed mmap threshold (buffers of 256 KiB or more are mapped and
/// unmapped, not kept in an arena), and the heap's free top trimmed above
/// 1 MiB. Measured on a ring device of the bigger-than-memory benchmark:
/// anonymous memory 71 MB before, 28 MB after. Call once, at start-up,
/// before other threads exist.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is
    // called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Gives free memory inside the allocator's arenas back to the system (after
/// a plan is loaded, or a request has ended).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the page-cache pages of `[offset, offset + len)` of `f` (`len` 0:
/// to the end): only clean pages nobody maps go, so this is advice that
/// cannot lose data. A no-op where there is no fadvise (macOS, Windows).
pub fn drop_cached(f: &std::fs::File, offset: u64, len: u64) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; advice only.
        unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (f, offset, len);
}

/// Memory this process holds that is not `model`'s weights: anonymous
/// memory plus the resident pages of every other file it maps (its binary,
/// its libraries). None where /proc cannot tell.
pub fn overhead_excluding(model: &Path) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let model = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    rss_excluding(&smaps, &model)
}

/// Sums the `Rss:` of every mapping in `smaps` (the text of
/// /proc/PID/smaps) except those of the file `skip`.
fn rss_excluding(smaps: &str, skip: &Path) -> Option<u64> {
    let mut total = 0u64;
    let mut counting = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if !first.ends_with(':') {
            // A mapping's header: address perms offset dev inode [path]
            // (a path may hold spaces).
            let path = fields.skip(4).collect::<Vec<_>>().join(" ");
            counting = Path::new(&path) != skip;
        } else if counting && first == "Rss:" {
            total += fields.next()?.parse::<u64>().ok()? << 10;
        }
    }
    (total > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c1e00000 r-xp 00000000 fe:01 123 /usr/bin/primad
Size:              20480 kB
Rss:               10240 kB
Pss:               10240 kB
7f0000000000-7f0070000000 r--s 00000000 fe:01 456 /models/big model.gguf
Size:            1835008 kB
Rss:              460800 kB
7f0070000000-7f0072000000 rw-p 00000000 00:00 0
Size:              32768 kB
Rss:               28000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  76 kB
";

    #[test]
    fn overhead_leaves_out_the_model_and_counts_the_rest() {
        let got = rss_excluding(SMAPS, Path::new("/models/big model.gguf")).unwrap();
        assert_eq!(got, (10240 + 28000 + 76) << 10);
        // Another file of the same name elsewhere is not the model.
        let all = rss_excluding(SMAPS, Path::new("/elsewhere/model.gguf")).unwrap();
        assert_eq!(all, (10240 + 460800 + 28000 + 76) << 10);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_has_an_overhead() {
        let n = overhead_excluding(Path::new("/nonexistent.gguf")).unwrap();
        assert!(n > 1 << 20 && n < 1 << 40, "{n}");
    }
}
