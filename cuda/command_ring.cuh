// The device side of the proxy's command ring (rust/dualcomm-core/src/proxy): one GPU thread
// pushes 64-byte commands into pinned host memory; the CPU proxy turns each one into a
// transport write with immediate (or a flush). Layout: tail u64 at 0, head u64 at 64, status
// u32 at 128, flushed u64 at 136, slots from 192; a command is seq u64 | kind u32 | peer u32 |
// region u32 | imm u32 | len u32 | 4 reserved | src offset u64 | dst offset u64 | 16 reserved.
#pragma once

#include "common.cuh"

namespace dualcomm {

constexpr int kCommandBytes = 64;
constexpr int kCommandRingHeaderBytes = 192;
constexpr uint32_t kCommandWrite = 1;
constexpr uint32_t kCommandFlush = 2;
// The rings' region ids (`transport::RegionId`).
constexpr uint32_t kRdmaRings = 1;

struct CommandRing {
    uint8_t* base;  // mapped pinned host memory
    uint64_t capacity;
};

// Pushes one command; false if the proxy stopped (its status word) or no slot freed within
// `timeout_cycles`, so a kernel never waits forever on a dead proxy. One thread only.
__device__ __forceinline__ bool push_command(CommandRing ring, uint32_t kind, uint32_t peer, uint32_t region,
                                             uint32_t imm, uint32_t len, uint64_t src_offset, uint64_t dst_offset,
                                             long long timeout_cycles) {
    volatile uint64_t* tail = reinterpret_cast<volatile uint64_t*>(ring.base);
    volatile uint64_t* head = reinterpret_cast<volatile uint64_t*>(ring.base + 64);
    volatile uint32_t* status = reinterpret_cast<volatile uint32_t*>(ring.base + 128);
    const uint64_t t = *tail;
    const long long start = clock64();
    while (t - *head >= ring.capacity) {
        if (*status != 0 || clock64() - start > timeout_cycles) return false;
        __nanosleep(256);
    }
    volatile uint64_t* slot =
        reinterpret_cast<volatile uint64_t*>(ring.base + kCommandRingHeaderBytes + (t % ring.capacity) * kCommandBytes);
    slot[0] = t;
    slot[1] = kind | (uint64_t)peer << 32;
    slot[2] = region | (uint64_t)imm << 32;
    slot[3] = len;
    slot[4] = src_offset;
    slot[5] = dst_offset;
    slot[6] = 0;
    slot[7] = 0;
    // The slot, and the records it points at, are visible to the host before the tail is.
    __threadfence_system();
    *tail = t + 1;
    return true;
}

}  // namespace dualcomm
