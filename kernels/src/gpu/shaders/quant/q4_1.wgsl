// d: f16, m: f16, qs: 16 bytes.
const QK: u32 = 32u;
const BB: u32 = 20u;
// q * d, without the min.
fn deq_scaled(blk: u32, j: u32) -> f32 {
    let b = byte_at(blk + 4u + (j & 15u));
    let q = select(b & 15u, b >> 4u, j >= 16u);
    return f32(q) * f16_at(blk);
}
fn deq(blk: u32, j: u32) -> f32 {
    return deq_scaled(blk, j) + f16_at(blk + 2u);
}
// The CPU's Q4_1 dot product takes the min term from the activation block's
// f16 sum (Q8_1's s), not from the values: so does the matvec.
const HAS_MIN: bool = true;
fn deq_min(blk: u32) -> f32 {
    return f16_at(blk + 2u);
}
