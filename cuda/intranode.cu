// NVLink data path inside a node: a sender packs token records straight into the receiver's
// ring (a peer-mapped pointer from CUDA IPC), then publishes its tail; the receiver unpacks
// the records of its own ring into the receive tensors. Rings, records, credits and order
// are the CPU protocol's (rust/dualcomm-core/src/protocol): a ring holds `capacity` records
// of one size, record `p` of the stream sits at slot `p % capacity`, and a source's tokens
// reach a receiver through one FIFO in increasing index order, so each one's receive slot is
// the source's prefix plus how many of its tokens came before it.

#include "common.cuh"

using dualcomm::RecordLayout;

// One warp per record: header, row, scales, top-k indices and weights of `tokens[i]` go to
// slot `(first_position + i) % capacity` of `ring`.
extern "C" __global__ void dualcomm_pack_records(
    const uint8_t* __restrict__ x,
    const uint8_t* __restrict__ scales,
    const int64_t* __restrict__ topk_idx,
    const float* __restrict__ topk_weights,
    RecordLayout layout,
    const int32_t* __restrict__ tokens,  // [count], increasing
    const uint64_t* __restrict__ masks,  // [count, 2]: each record's local-rank mask (low, high), or null
    int count,
    int src_rank,
    uint8_t* ring,
    int64_t first_position,
    int capacity)
{
    const int lane = threadIdx.x % 32;
    const int warps = (gridDim.x * blockDim.x) / 32;
    const int rb = layout.record_bytes();
    for (int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32; i < count; i += warps) {
        uint8_t* rec = ring + ((first_position + i) % capacity) * (int64_t)rb;
        dualcomm::pack_record(rec, x, scales, topk_idx, topk_weights, layout, tokens[i], masks ? masks + 2 * i : nullptr,
                              src_rank, lane);
    }
}

// Makes the records written so far visible across the fabric before the tail that
// announces them (release), as the CPU transports order bytes before the immediate.
extern "C" __global__ void dualcomm_publish_tail(volatile uint64_t* tail, uint64_t value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        __threadfence_system();
        *tail = value;
    }
}

// The receiver side, one block: thread 0 walks the records in order, checks each as the CPU
// `SourceOrder` does and assigns its receive slot; then the warps copy the records out.
// `state` carries, per source, the next slot offset and the next allowed token index across
// calls (a ring drains in several chunks).
constexpr int kTile = 256;

extern "C" __global__ void dualcomm_unpack_records(
    const uint8_t* __restrict__ ring,
    int64_t first_position,
    int capacity,
    int count,
    RecordLayout layout,
    int num_ranks,
    const uint8_t* __restrict__ allowed,     // [num_ranks]: 1 where this ring may carry that source
    const int64_t* __restrict__ recv_prefix, // [num_ranks]: first receive slot of each source
    const int64_t* __restrict__ source_count,// [num_ranks]: tokens each source sends here
    const int64_t* __restrict__ source_tokens,// [num_ranks]: each source's token count
    int64_t* state,                          // [num_ranks, 2]: delivered so far, next minimum index
    int64_t experts_lo,
    int64_t experts_hi,
    uint8_t* __restrict__ recv_x,
    uint8_t* __restrict__ recv_scales,
    int64_t* __restrict__ recv_idx,
    float* __restrict__ recv_w,
    int32_t* __restrict__ recv_src_rank,
    int32_t* __restrict__ recv_src_idx,
    int* status)
{
    __shared__ int64_t slot_of[kTile];
    __shared__ int failed;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    const int rb = layout.record_bytes();
    for (int base = 0; base < count; base += kTile) {
        const int n = min(kTile, count - base);
        if (threadIdx.x == 0) {
            failed = 0;
            for (int i = 0; i < n && !failed; ++i) {
                const uint8_t* rec = ring + ((first_position + base + i) % capacity) * (int64_t)rb;
                const uint32_t s = rec[0] | rec[1] << 8 | rec[2] << 16 | (uint32_t)rec[3] << 24;
                const uint32_t idx = rec[4] | rec[5] << 8 | rec[6] << 16 | (uint32_t)rec[7] << 24;
                int code = dualcomm::kOk;
                if (s >= (uint32_t)num_ranks || !allowed[s]) code = dualcomm::kUnknownSource;
                else if ((int64_t)idx < state[2 * s + 1] || (int64_t)idx >= source_tokens[s]) code = dualcomm::kOutOfOrder;
                else if (state[2 * s] >= source_count[s]) code = dualcomm::kTooMany;
                if (code != dualcomm::kOk) {
                    atomicCAS(status, 0, code);
                    failed = 1;
                    break;
                }
                slot_of[i] = recv_prefix[s] + state[2 * s];
                state[2 * s] += 1;
                state[2 * s + 1] = (int64_t)idx + 1;
            }
        }
        __syncthreads();
        if (failed) return;
        for (int i = warp; i < n; i += warps) {
            const uint8_t* rec = ring + ((first_position + base + i) % capacity) * (int64_t)rb;
            const int64_t slot = slot_of[i];
            dualcomm::warp_copy(recv_x + slot * layout.x_bytes, rec + layout.x_at(), layout.x_bytes, lane);
            if (layout.scale_bytes)
                dualcomm::warp_copy(recv_scales + slot * layout.scale_bytes, rec + layout.scales_at(), layout.scale_bytes, lane);
            for (int j = lane; j < layout.num_topk; j += 32) {
                const uint8_t* e8 = rec + layout.idx_at() + j * 8;
                const uint8_t* w4 = rec + layout.weights_at() + j * 4;
                int64_t e = 0;
                uint32_t wb = 0;
                for (int b = 7; b >= 0; --b) e = (e << 8) | e8[b];
                for (int b = 3; b >= 0; --b) wb = (wb << 8) | w4[b];
                const bool local = e >= experts_lo && e < experts_hi;
                recv_idx[slot * layout.num_topk + j] = local ? e - experts_lo : -1;
                recv_w[slot * layout.num_topk + j] = local ? __uint_as_float(wb) : 0.f;
            }
            if (lane == 0) {
                recv_src_rank[slot] = rec[0] | rec[1] << 8 | rec[2] << 16 | rec[3] << 24;
                recv_src_idx[slot] = rec[4] | rec[5] << 8 | rec[6] << 16 | rec[7] << 24;
            }
        }
        __syncthreads();
    }
}
