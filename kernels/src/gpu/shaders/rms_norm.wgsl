// x = x / rms(x) * g, in place, one workgroup per row of `len`.

struct P {
    len: u32,
    eps: f32,
    rows: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<uniform> p: P;

const WG: u32 = 64u;
var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.grid_x;
    let o = row * p.len;
    var acc = 0.0;
    if row < p.rows {
        for (var i = lid; i < p.len; i += WG) {
            acc += X[o + i] * X[o + i];
        }
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if row >= p.rows {
        return;
    }
    let scale = 1.0 / sqrt(part[0] / f32(p.len) + p.eps);
    for (var i = lid; i < p.len; i += WG) {
        X[o + i] = (X[o + i] * scale) * G[i];
    }
}
