// Combine's fixed-order reduction: every token's contributions, staged in the order the CPU
// protocol sums them (ascending local rank at the forwarder, then ascending node at the
// source), are added in fp32 from zero in that order and stored once, so the GPU's sums
// equal the CPU's bit for bit.

#include "common.cuh"

// out[t] = sum over j in [offsets[t], offsets[t + 1]) of rows[j], per channel. `rows_bf16`
// selects bf16 rows (else fp32); `out_bf16` the result's dtype (bf16 rounded to nearest even).
extern "C" __global__ void dualcomm_combine_reduce(
    const void* __restrict__ rows,
    int rows_bf16,
    const int64_t* __restrict__ offsets,  // [num_tokens + 1]
    int num_tokens,
    int hidden,
    void* __restrict__ out,
    int out_bf16)
{
    const int64_t total = (int64_t)num_tokens * hidden;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / hidden;
        const int c = (int)(i % hidden);
        float acc = 0.f;
        for (int64_t j = offsets[t]; j < offsets[t + 1]; ++j) {
            const int64_t at = j * hidden + c;
            acc += rows_bf16 ? dualcomm::bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(rows)[at])
                             : reinterpret_cast<const float*>(rows)[at];
        }
        if (out_bf16) reinterpret_cast<uint16_t*>(out)[i] = dualcomm::f32_to_bf16_bits(acc);
        else reinterpret_cast<float*>(out)[i] = acc;
    }
}

// The top-k weights travel with the rows and are summed the same way (fp32 throughout).
extern "C" __global__ void dualcomm_combine_reduce_weights(
    const float* __restrict__ weights,    // [num_contributions, num_topk]
    const int64_t* __restrict__ offsets,  // [num_tokens + 1]
    int num_tokens,
    int num_topk,
    float* __restrict__ out)              // [num_tokens, num_topk]
{
    const int64_t total = (int64_t)num_tokens * num_topk;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / num_topk;
        const int k = (int)(i % num_topk);
        float acc = 0.f;
        for (int64_t j = offsets[t]; j < offsets[t + 1]; ++j) acc += weights[j * num_topk + k];
        out[i] = acc;
    }
}
