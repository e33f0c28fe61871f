// Scale and min of sub-block `s` (0..8) from the 12 packed bytes of Q4_K/Q5_K
// at byte `o`.
fn scale_min_k4(o: u32, s: u32) -> vec2<u32> {
    if s < 4u {
        return vec2<u32>(byte_at(o + s) & 63u, byte_at(o + s + 4u) & 63u);
    }
    let sc = (byte_at(o + s + 4u) & 15u) | ((byte_at(o + s - 4u) >> 6u) << 4u);
    let mn = (byte_at(o + s + 4u) >> 4u) | ((byte_at(o + s) >> 6u) << 4u);
    return vec2<u32>(sc, mn);
}
