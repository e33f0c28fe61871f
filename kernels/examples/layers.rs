//! Writes the hidden state after the embedding and after every layer for a
//! token sequence evaluated as one batch, as raw little-endian f32
//! (`[1 + n_layers][n_tokens][n_embd]`). A debugging aid for locating where
//! the engine parts from llama.cpp (compare with its `l_out-N` tensors):
//!
//!     cargo run --release -p prima-kernels --example layers -- MODEL '[2, 818]' OUT.bin
use prima_kernels::{model::KvCache, Model};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::open(&args[1]).expect("model");
    let ids: Vec<u32> = args[2]
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().parse().expect("id"))
        .collect();
    let layers = model.config.n_layer;
    let mut kv = KvCache::new(&model.config, 0..layers, 512);
    let mut h = model.embed(&ids).expect("embed");
    let mut out: Vec<f32> = h.data.clone();
    for il in 0..layers {
        model
            .forward_layers(il..il + 1, &mut h, &mut kv, 0)
            .expect("layer");
        out.extend_from_slice(&h.data);
    }
    let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[3], bytes).expect("write");
}
