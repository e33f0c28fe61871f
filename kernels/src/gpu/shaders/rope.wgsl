// Rotary position embedding in place over `n_heads` heads of `hd` in each
// token's row. CS holds, per token, the (cos, sin) of each rotated pair,
// computed on the CPU as ggml does (theta stepped in f32).

struct P {
    n_heads: u32,
    hd: u32,
    n_dims: u32,
    neox: u32,
    row_stride: u32,
}

@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> CS: array<f32>;
@group(0) @binding(2) var<uniform> p: P;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pairs = p.n_dims / 2u;
    let i = gid.x;
    let t = gid.y;
    if i >= p.n_heads * pairs {
        return;
    }
    let head = i / pairs;
    let k = i % pairs;
    let c = CS[(t * pairs + k) * 2u];
    let s = CS[(t * pairs + k) * 2u + 1u];
    let base = t * p.row_stride + head * p.hd;
    var ia = base + 2u * k;
    var ib = ia + 1u;
    if p.neox != 0u {
        ia = base + k;
        ib = base + k + pairs;
    }
    let a = X[ia];
    let b = X[ib];
    X[ia] = a * c - b * s;
    X[ib] = a * s + b * c;
}
