// e^x to about an ulp: ggml's vector expf (see ops::ggml_expf), which the
// CPU's softmax uses, so attention matches it; and a driver's exp() may be
// coarser (the Vulkan spec allows 3 + 2|x| ulp) where the SiLU gate's
// rounding feeds the 8-bit rounding of the next matvec. ggml rounds
// x * log2(e) with the 1.5 * 2^23 trick; round() says the same without
// inviting a compiler to fold (z + r) - r away.
fn expf(x: f32) -> f32 {
    let n = round(x * bitcast<f32>(0x3fb8aa3bu));
    if n < -192.0 {
        return 0.0;
    }
    if n > 128.0 {
        return bitcast<f32>(0x7f800000u);
    }
    let b = fma(-n, bitcast<f32>(0x35bfbe8eu), fma(-n, bitcast<f32>(0x3f317200u), x));
    let u = b * b;
    let j = fma(
        fma(fma(bitcast<f32>(0x3c072010u), b, bitcast<f32>(0x3d2b9f17u)), u,
            fma(bitcast<f32>(0x3e2aaf33u), b, bitcast<f32>(0x3efffedbu))),
        u,
        fma(bitcast<f32>(0x3f7ffff6u), b, 1.0));
    return ldexp(j, i32(n));
}
