//! Prints the top logits after each position of a token sequence, evaluated
//! either as one batch or token by token. A debugging aid for comparing the
//! engine with llama.cpp:
//!
//!     cargo run --release -p prima-kernels --example logits -- MODEL '[2, 818]' [seq]
use prima_kernels::{engine::Session, Model};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::open(&args[1]).expect("model");
    let ids: Vec<u32> = args[2]
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().parse().expect("id"))
        .collect();
    let sequential = args.get(3).is_some_and(|s| s == "seq");
    let mut s = Session::new(&model, 512);
    let nv = model.config.n_vocab;
    let logits = if sequential {
        let mut all = Vec::new();
        for &id in &ids {
            all.extend(s.eval_last(&[id]).expect("eval"));
        }
        all
    } else {
        let rows: Vec<usize> = (0..ids.len()).collect();
        s.eval(&ids, &rows).expect("eval")
    };
    if let Ok(path) = std::env::var("DUMP") {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes).expect("dump");
        return;
    }
    for (i, l) in logits.chunks_exact(nv).enumerate() {
        let mut idx: Vec<usize> = (0..nv).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let top: Vec<String> = idx[..3]
            .iter()
            .map(|&t| format!("{t}:{:.4}", l[t]))
            .collect();
        println!("{i}: {}", top.join(" "));
    }
}
