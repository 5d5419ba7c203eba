// Per-token FP8 cast with DeepEP's semantics (and `dualcomm.fp8.per_token_cast_to_fp8`'s):
// per 128-channel block, scale = max(|x|, 1e-4) / 448, optionally rounded up to a power of
// two; data = x / scale, saturated to e4m3's finite range. One warp per (token, block):
// each lane holds 4 channels.

#include "common.cuh"

extern "C" __global__ void dualcomm_per_token_cast_to_fp8(
    const __nv_bfloat16* __restrict__ x,  // [num_tokens, hidden]
    int num_tokens,
    int hidden,  // a multiple of 128
    int round_scale,
    __nv_fp8_e4m3* __restrict__ data,  // [num_tokens, hidden]
    float* __restrict__ scales)        // [num_tokens, hidden / 128]
{
    const int lane = threadIdx.x % 32;
    const int blocks_per_token = hidden / 128;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t total = (int64_t)num_tokens * blocks_per_token;
    const int64_t warps = ((int64_t)gridDim.x * blockDim.x) / 32;
    for (int64_t w = warp; w < total; w += warps) {
        const int64_t t = w / blocks_per_token;
        const int b = (int)(w % blocks_per_token);
        const __nv_bfloat16* src = x + t * hidden + b * 128 + lane * 4;
        float v[4];
        float amax = 0.f;
        for (int i = 0; i < 4; ++i) {
            v[i] = __bfloat162float(src[i]);
            amax = fmaxf(amax, fabsf(v[i]));
        }
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        float scale = fmaxf(amax, 1e-4f) / 448.f;
        if (round_scale) scale = exp2f(ceilf(log2f(scale)));
        __nv_fp8_e4m3* dst = data + t * hidden + b * 128 + lane * 4;
        for (int i = 0; i < 4; ++i) dst[i] = __nv_fp8_e4m3(fminf(fmaxf(v[i] / scale, -448.f), 448.f));
        if (lane == 0) scales[t * blocks_per_token + b] = scale;
    }
}
