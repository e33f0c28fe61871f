//! Feeds arbitrary bytes to the GGUF reader, then to everything that reads
//! metadata from an accepted file (model config, tokenizer). None of it may
//! panic; accepted tensors must lie inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prima_kernels::{Config, Gguf, Tokenizer};

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::from_vec(data.to_vec()) {
        for t in &g.tensors {
            assert!(t.offset + t.size <= g.file_len());
            let _ = g.tensor_data(t);
        }
        let _ = Config::from_metadata(&g.metadata);
        let _ = Tokenizer::from_metadata(&g.metadata);
    }
});
