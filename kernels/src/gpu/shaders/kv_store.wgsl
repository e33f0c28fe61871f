// Writes a batch's keys and values into the layer's cache at positions
// pos.., rounded to f16 and packed two to a word.

struct P {
    kvd: u32,
    pos: u32,
    n: u32,
}

@group(0) @binding(0) var<storage, read> K: array<f32>;
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read_write> KC: array<u32>;
@group(0) @binding(3) var<storage, read_write> VC: array<u32>;
@group(0) @binding(4) var<uniform> p: P;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    let half = p.kvd / 2u;
    if i >= half || t >= p.n {
        return;
    }
    let src = t * p.kvd + 2u * i;
    let dst = (p.pos + t) * half + i;
    KC[dst] = pack2x16float(vec2<f32>(K[src], K[src + 1u]));
    VC[dst] = pack2x16float(vec2<f32>(V[src], V[src + 1u]));
}
