// Causal attention of one query head of one token over the f16 KV cache
// (GQA: `group` query heads share a KV head; a sliding window limits how far
// back a token looks). As ggml: the query is rounded to f16 to meet the f16
// keys, softmax runs through ggml's expf, and the probabilities are rounded
// to f16 to meet the f16 values. Three passes over the keys (max, sum,
// weighted values) instead of a score buffer as long as the context.

struct P {
    hd: u32,
    qd: u32,
    kvd: u32,
    group: u32,
    pos: u32,
    window: u32,    // 0: attend to every earlier position
    scale: f32,
}

@group(0) @binding(0) var<storage, read> Q: array<f32>;
@group(0) @binding(1) var<storage, read> KC: array<u32>;
@group(0) @binding(2) var<storage, read> VC: array<u32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;
@group(0) @binding(4) var<uniform> p: P;

const WG: u32 = 64u;
const MAX_HD: u32 = 512u;
var<workgroup> qs: array<f32, 512>;
var<workgroup> red: array<f32, 64>;
var<workgroup> pt: array<f32, 64>;

fn score(j: u32, koff: u32) -> f32 {
    let base = (j * p.kvd + koff) / 2u;
    var s = 0.0;
    for (var d = 0u; d < p.hd; d += 2u) {
        let k = unpack2x16float(KC[base + d / 2u]);
        s += qs[d] * k.x + qs[d + 1u] * k.y;
    }
    return s * p.scale;
}

fn reduce_max(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let out = red[0];
    workgroupBarrier();
    return out;
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let out = red[0];
    workgroupBarrier();
    return out;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wg.x;
    let t = wg.y;
    let pos = p.pos + t;
    let koff = (head / p.group) * p.hd;
    var first = 0u;
    if p.window != 0u && pos + 1u > p.window {
        first = pos + 1u - p.window;
    }
    let qo = t * p.qd + head * p.hd;
    for (var d = lid; d < p.hd; d += WG) {
        qs[d] = round_f16(Q[qo + d]);
    }
    workgroupBarrier();

    var m = -3.4e38;
    for (var j = first + lid; j <= pos; j += WG) {
        m = max(m, score(j, koff));
    }
    let mx = reduce_max(m, lid);
    var sum = 0.0;
    for (var j = first + lid; j <= pos; j += WG) {
        sum += expf(score(j, koff) - mx);
    }
    let inv = 1.0 / reduce_sum(sum, lid);

    var acc: array<f32, 8>;
    for (var k = 0u; k < 8u; k++) {
        acc[k] = 0.0;
    }
    for (var start = first; start <= pos; start += WG) {
        let j = start + lid;
        var pj = 0.0;
        if j <= pos {
            pj = round_f16(expf(score(j, koff) - mx) * inv);
        }
        pt[lid] = pj;
        workgroupBarrier();
        let count = min(WG, pos + 1u - start);
        for (var k = 0u; k * WG + lid < p.hd; k++) {
            let d = k * WG + lid;
            var a = 0.0;
            for (var jj = 0u; jj < count; jj++) {
                let w = VC[((start + jj) * p.kvd + koff + d) / 2u];
                let v = unpack2x16float(w);
                a += pt[jj] * select(v.x, v.y, (d & 1u) == 1u);
            }
            acc[k] += a;
        }
        workgroupBarrier();
    }
    for (var k = 0u; k * WG + lid < p.hd; k++) {
        O[qo + k * WG + lid] = acc[k];
    }
}
