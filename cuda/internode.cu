// The rdma tier from the GPU: records for another node are packed into the registered send
// buffer, and one command per chunk goes to the CPU proxy, which posts the write with
// immediate on the transport (tcp now, verbs from device memory later): the UCCL-EP pattern,
// with the CPU protocol's records, ring slots and immediates.

#include "command_ring.cuh"

using dualcomm::RecordLayout;

// The blocks pack `count` records of `tokens` into the send buffer at `send_offset`; the last
// block to finish (`arrived` counts them; zero before the launch, zero again after) pushes one
// write command for the chunk, so the ring keeps its single producer: `count` records to
// `peer`'s rdma ring at `dst_offset`, announced by `imm`. `status` gets 1 if the proxy could
// not take it.
extern "C" __global__ void dualcomm_post_rdma_chunk(
    const uint8_t* __restrict__ x,
    const uint8_t* __restrict__ scales,
    const int64_t* __restrict__ topk_idx,
    const float* __restrict__ topk_weights,
    RecordLayout layout,
    const int32_t* __restrict__ tokens,
    const uint64_t* __restrict__ masks,
    int count,
    int src_rank,
    uint8_t* send,
    uint64_t send_offset,
    dualcomm::CommandRing ring,
    uint32_t peer,
    uint64_t dst_offset,
    uint32_t imm,
    long long timeout_cycles,
    unsigned int* arrived,
    int* status)
{
    const int lane = threadIdx.x % 32;
    const int rb = layout.record_bytes();
    const int warps = (gridDim.x * blockDim.x) / 32;
    for (int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32; i < count; i += warps)
        dualcomm::pack_record(send + send_offset + (int64_t)i * rb, x, scales, topk_idx, topk_weights, layout,
                              tokens[i], masks ? masks + 2 * i : nullptr, src_rank, lane);
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // this block's records before its arrival
        if (atomicAdd(arrived, 1u) == gridDim.x - 1) {
            __threadfence();  // every block's records before the command
            const bool taken = dualcomm::push_command(ring, dualcomm::kCommandWrite, peer, dualcomm::kRdmaRings, imm,
                                                      (uint32_t)(count * rb), send_offset, dst_offset, timeout_cycles);
            if (!taken) atomicCAS(status, 0, 1);
            *arrived = 0;
        }
    }
}

// Asks the proxy to reap send completions; the kernel that reuses the send buffer waits for
// the acknowledgement (the ring's flushed word) before it packs over it.
extern "C" __global__ void dualcomm_post_flush(dualcomm::CommandRing ring, long long timeout_cycles, int* status) {
    if (blockIdx.x == 0 && threadIdx.x == 0 &&
        !dualcomm::push_command(ring, dualcomm::kCommandFlush, 0, dualcomm::kRdmaRings, 0, 0, 0, 0, timeout_cycles))
        atomicCAS(status, 0, 1);
}
