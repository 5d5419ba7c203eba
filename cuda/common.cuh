// Shared by every dualcomm kernel: fixed-width integers under NVRTC and nvcc alike, and the
// token record layout the Rust core's `protocol::record` defines, so that the CPU path stays
// the executable specification of the GPU path (same records, same order, same sums).
#pragma once

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <cstdint>
#endif

#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace dualcomm {

// A record is a 24-byte header (source rank u32, source index u32, the u128 mask of local
// ranks on the destination node that need the token), then the sections back to back:
// the row, the FP8 scales (if any), the top-k indices (int64) and the top-k weights (f32).
constexpr int kHeaderBytes = 24;

struct RecordLayout {
    int x_bytes;
    int scale_bytes;
    int num_topk;
    __device__ __forceinline__ int record_bytes() const {
        return kHeaderBytes + x_bytes + scale_bytes + num_topk * 12;
    }
    __device__ __forceinline__ int x_at() const { return kHeaderBytes; }
    __device__ __forceinline__ int scales_at() const { return kHeaderBytes + x_bytes; }
    __device__ __forceinline__ int idx_at() const { return kHeaderBytes + x_bytes + scale_bytes; }
    __device__ __forceinline__ int weights_at() const { return idx_at() + num_topk * 8; }
};

// Copies `n` bytes with the lanes of a warp; records sit at any alignment (as on the CPU),
// so 16-byte vectors are used only when both ends allow them.
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int n, int lane) {
    const bool vec = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0;
    int done = 0;
    if (vec) {
        const int chunks = n / 16;
        for (int i = lane; i < chunks; i += 32)
            reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
        done = chunks * 16;
    }
    for (int i = done + lane; i < n; i += 32) dst[i] = src[i];
}

// bf16 as the CPU rounds it: to nearest even, NaN kept quiet (see `protocol::reduce`).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float v) {
    const uint32_t bits = __float_as_uint(v);
    if (v != v) return (uint16_t)((bits >> 16) | 0x40);
    const uint32_t round = 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)((bits + round) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) {
    return __uint_as_float(((uint32_t)b) << 16);
}

// Writes token `t`'s record at `rec` with the lanes of one warp: the header (source rank,
// token index, local-rank mask), then its row, scales and top-k sections.
__device__ __forceinline__ void pack_record(uint8_t* rec, const uint8_t* x, const uint8_t* scales,
                                            const int64_t* topk_idx, const float* topk_weights,
                                            RecordLayout layout, int64_t t, const uint64_t* mask, int src_rank,
                                            int lane) {
    if (lane < kHeaderBytes) {
        uint64_t word;
        int shift;
        if (lane < 4) {
            word = (uint32_t)src_rank, shift = lane;
        } else if (lane < 8) {
            word = (uint32_t)t, shift = lane - 4;
        } else if (lane < 16) {
            word = mask ? mask[0] : 0, shift = lane - 8;
        } else {
            word = mask ? mask[1] : 0, shift = lane - 16;
        }
        rec[lane] = (uint8_t)(word >> (8 * shift));
    }
    warp_copy(rec + layout.x_at(), x + t * layout.x_bytes, layout.x_bytes, lane);
    if (layout.scale_bytes) warp_copy(rec + layout.scales_at(), scales + t * layout.scale_bytes, layout.scale_bytes, lane);
    if (layout.num_topk) {
        warp_copy(rec + layout.idx_at(), reinterpret_cast<const uint8_t*>(topk_idx + t * layout.num_topk),
                  layout.num_topk * 8, lane);
        warp_copy(rec + layout.weights_at(), reinterpret_cast<const uint8_t*>(topk_weights + t * layout.num_topk),
                  layout.num_topk * 4, lane);
    }
}

// Error codes a kernel leaves in its status word (0: fine); the control plane turns them
// into the same typed errors the CPU protocol raises.
enum Status : int {
    kOk = 0,
    kUnknownSource = 1,   // a record from a rank this ring does not carry
    kOutOfOrder = 2,      // a source's token index not strictly increasing, or past its count
    kTooMany = 3,         // more records of a source than it announced
};

}  // namespace dualcomm
