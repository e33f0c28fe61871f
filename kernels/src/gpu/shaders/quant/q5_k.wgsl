// d: f16, dmin: f16, scales: 12 bytes, qh: 32 bytes, qs: 128 bytes.
const QK: u32 = 256u;
const BB: u32 = 176u;
fn deq(blk: u32, j: u32) -> f32 {
    let chunk = j / 64u;
    let r = j % 64u;
    let l = r % 32u;
    let b = byte_at(blk + 48u + chunk * 32u + l);
    let low = select(b & 15u, b >> 4u, r >= 32u);
    let bit = select(1u, 2u, r >= 32u) << (2u * chunk);
    let q = low + select(0u, 16u, (byte_at(blk + 16u + l) & bit) != 0u);
    let sm = scale_min_k4(blk + 4u, j / 32u);
    return f16_at(blk) * f32(sm.x) * f32(q) - f16_at(blk + 2u) * f32(sm.y);
}
