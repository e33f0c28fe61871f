const QK: u32 = 1u;
const BB: u32 = 4u;
fn deq(blk: u32, j: u32) -> f32 {
    return bitcast<f32>(W[blk >> 2u]);
}
