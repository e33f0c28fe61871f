// d: f16, m: f16, qh: 4 bytes, qs: 16 bytes.
const QK: u32 = 32u;
const BB: u32 = 24u;
// q * d, without the min.
fn deq_scaled(blk: u32, j: u32) -> f32 {
    let b = byte_at(blk + 8u + (j & 15u));
    let lo = select(b & 15u, b >> 4u, j >= 16u);
    let hi = (u32_at(blk + 4u) >> j) & 1u;
    return f32(lo | (hi << 4u)) * f16_at(blk);
}
fn deq(blk: u32, j: u32) -> f32 {
    return deq_scaled(blk, j) + f16_at(blk + 2u);
}
// As Q4_1: the min term comes from the activation block's f16 sum.
const HAS_MIN: bool = true;
fn deq_min(blk: u32) -> f32 {
    return f16_at(blk + 2u);
}
