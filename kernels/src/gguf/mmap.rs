//! The memory map under a GGUF file. The only unsafe code in the reader.

use std::{fs::File, io, path::Path};

pub(super) struct Mmap {
    map: memmap2::Mmap,
}

impl Mmap {
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process. A model
        // file truncated or rewritten by another process while mapped would be
        // undefined behaviour; model files are immutable once registered (the
        // store writes new files under new names), which is the contract every
        // mmap-based model loader (llama.cpp included) relies on.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self { map })
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// Hints the kernel to read `[offset, offset + len)` ahead. Errors are
    /// ignored: this is advice, correctness never depends on it.
    pub(super) fn will_need(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            let page = 4096;
            let start = offset / page * page;
            let end = (offset + len).min(self.map.len());
            if start < end {
                let _ = self
                    .map
                    .advise_range(memmap2::Advice::WillNeed, start, end - start);
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    /// Drops this mapping's pages of `[offset, offset + len)` (page-aligned
    /// inward), so they stop counting against this process; the next access
    /// reads them again from the page cache or the file.
    pub(super) fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            let page = 4096;
            let start = offset.div_ceil(page) * page;
            let end = ((offset + len).min(self.map.len())) / page * page;
            if start < end {
                // SAFETY: the map is a read-only private file mapping that is
                // never written, so MADV_DONTNEED only drops page-table
                // entries: later reads fault the same file contents back in.
                // No reference into the range is invalidated (the bytes stay
                // readable), which is what makes this sound for `&[u8]`
                // views held elsewhere.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}
