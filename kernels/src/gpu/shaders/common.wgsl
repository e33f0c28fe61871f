// Reading ggml tensors byte by byte. A kernel that includes this file binds
// the tensor's raw bytes as `W: array<u32>` (little-endian words); ggml
// blocks are not word aligned (Q4_0 is 18 bytes), so fields are pulled out
// of the words they straddle.

fn byte_at(o: u32) -> u32 {
    return (W[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// A 16-bit field; every f16 in a ggml block sits at an even offset.
fn u16_at(o: u32) -> u32 {
    let w = W[o >> 2u];
    return select(w & 0xffffu, w >> 16u, (o & 2u) != 0u);
}

fn f16_at(o: u32) -> f32 {
    return unpack2x16float(u16_at(o)).x;
}

// A 32-bit field at any byte offset.
fn u32_at(o: u32) -> u32 {
    let s = (o & 3u) * 8u;
    let lo = W[o >> 2u];
    if s == 0u {
        return lo;
    }
    return (lo >> s) | (W[(o >> 2u) + 1u] << (32u - s));
}

fn i8_of(b: u32) -> i32 {
    return (i32(b) << 24u) >> 24u;
}
