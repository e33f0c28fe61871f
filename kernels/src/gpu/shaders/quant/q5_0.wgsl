// d: f16, qh: 4 bytes (bit j is element j's fifth bit), qs: 16 bytes.
const QK: u32 = 32u;
const BB: u32 = 22u;
fn deq(blk: u32, j: u32) -> f32 {
    let b = byte_at(blk + 6u + (j & 15u));
    let lo = select(b & 15u, b >> 4u, j >= 16u);
    let hi = (u32_at(blk + 2u) >> j) & 1u;
    return f32(i32(lo | (hi << 4u)) - 16) * f16_at(blk);
}
