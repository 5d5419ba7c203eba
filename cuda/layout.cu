// Routing tables on the GPU, equal to the Rust core's `routing::dispatch_layout`:
// tokens per rank, per node and per expert, and `is_token_in_rank`, from `topk_idx`.
//
// Experts are owned in contiguous blocks (rank r owns [r * E / W, (r + 1) * E / W)); a token
// counts once per rank, node and expert it names, however often its top-k names them.
// Counts are sums of ones, so atomics give the same integers in any order.

#include "common.cuh"

extern "C" __global__ void dualcomm_layout(
    const int64_t* __restrict__ topk_idx,  // [num_tokens, num_topk]
    int num_tokens,
    int num_topk,
    int num_experts,
    int num_ranks,
    int ranks_per_node,
    int* __restrict__ per_rank,    // [num_ranks], zeroed by the caller
    int* __restrict__ per_node,    // [num_ranks / ranks_per_node], zeroed
    int* __restrict__ per_expert,  // [num_experts], zeroed
    bool* __restrict__ in_rank)    // [num_tokens, num_ranks]
{
    const int experts_per_rank = num_experts / num_ranks;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
        const int64_t* row = topk_idx + (int64_t)t * num_topk;
        bool* flags = in_rank + (int64_t)t * num_ranks;
        for (int r = 0; r < num_ranks; ++r) flags[r] = false;
        for (int k = 0; k < num_topk; ++k) {
            const int64_t e = row[k];
            if (e < 0 || e >= num_experts) continue;  // -1: no expert (the caller checked the range)
            bool repeated = false;
            for (int j = 0; j < k; ++j) repeated |= row[j] == e;
            if (repeated) continue;
            atomicAdd(per_expert + e, 1);
            const int r = (int)(e / experts_per_rank);
            if (!flags[r]) {
                flags[r] = true;
                atomicAdd(per_rank + r, 1);
            }
        }
        const int num_nodes = num_ranks / ranks_per_node;
        for (int n = 0; n < num_nodes; ++n) {
            bool any = false;
            for (int l = 0; l < ranks_per_node; ++l) any |= flags[n * ranks_per_node + l];
            if (any) atomicAdd(per_node + n, 1);
        }
    }
}
