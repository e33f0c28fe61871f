const QK: u32 = 1u;
const BB: u32 = 2u;
fn deq(blk: u32, j: u32) -> f32 {
    return bitcast<f32>(u16_at(blk) << 16u);
}
