// Rounds activation rows as the CPU's matrix products do before their
// integer dot products (ggml's vec-dot formats), leaving each value as the
// f32 the CPU's quantised activation stands for: then a plain f32 matvec
// reproduces the CPU's numerics. Per mode:
//   0 F32 (copy), 1 F16, 2 BF16 (round each value),
//   3 Q8_0 and 4 Q8_1 (blocks of 32: d = amax / 127 as f16, q = round(x / d)),
//     Q8_1 also writing each block's f16 sum d * sum(q) to S,
//   5 Q8_K (blocks of 256: f32 d from the signed largest value).
// One invocation per block (per value for modes 0-2).

struct P {
    cols: u32,
    rows: u32,
    mode: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read_write> XQ: array<f32>;
@group(0) @binding(2) var<storage, read_write> S: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

fn to_f16(x: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}

// Round to nearest bf16, ties to even (finite inputs).
fn to_bf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let r = b + 0x7fffu + ((b >> 16u) & 1u);
    return bitcast<f32>(r & 0xffff0000u);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * p.grid_x) * 64u + lid;
    let total = p.cols * p.rows;
    if p.mode <= 2u {
        if i >= total {
            return;
        }
        let v = X[i];
        if p.mode == 0u {
            XQ[i] = v;
        } else if p.mode == 1u {
            XQ[i] = to_f16(v);
        } else {
            XQ[i] = to_bf16(v);
        }
        return;
    }
    var qk = 32u;
    if p.mode == 5u {
        qk = 256u;
    }
    if i * qk >= total {
        return;
    }
    let o = i * qk;
    if p.mode == 5u {
        var amax = 0.0;
        var mx = 0.0;
        for (var j = 0u; j < qk; j++) {
            let a = abs(X[o + j]);
            if a > amax {
                amax = a;
                mx = X[o + j];
            }
        }
        if amax == 0.0 {
            for (var j = 0u; j < qk; j++) {
                XQ[o + j] = 0.0;
            }
            return;
        }
        let iscale = -127.0 / mx;
        let d = 1.0 / iscale;
        for (var j = 0u; j < qk; j++) {
            XQ[o + j] = min(round(iscale * X[o + j]), 127.0) * d;
        }
        return;
    }
    var amax = 0.0;
    for (var j = 0u; j < qk; j++) {
        amax = max(amax, abs(X[o + j]));
    }
    let d = amax / 127.0;
    var id = 0.0;
    if amax != 0.0 {
        id = 127.0 / amax;
    }
    let dh = to_f16(d);
    var sum = 0.0;
    for (var j = 0u; j < qk; j++) {
        let q = round(X[o + j] * id);
        sum += q;
        XQ[o + j] = q * dh;
    }
    if p.mode == 4u {
        S[i] = to_f16(d * sum);
    }
}
