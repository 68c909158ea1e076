/*
 * Test fixture: small kernels that break (or probe) a rule of the CUDA model, to prove that the
 * concurrency harness reports each violation (tests/test_kernel_harness.py). Not part of gpuprune.
 */
typedef unsigned int u32;

/* Two barriers at different lines: threads 0-31 wait at one, the rest at another. */
extern "C" __global__ void k_barrier_divergence(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

/* Lane 5 returns, then the warp votes with a full mask. */
extern "C" __global__ void k_exited_lane(int* out) {
    if ((threadIdx.x & 31u) == 5u) return;
    out[threadIdx.x] = (int)__ballot_sync(0xFFFFFFFFu, 1);
}

/* Lanes 0-15 shuffle among themselves but read lane 20. */
extern "C" __global__ void k_shfl_outside_mask(int* out) {
    const u32 lane = threadIdx.x & 31u;
    if (lane < 16u) out[threadIdx.x] = __shfl_sync(0x0000FFFFu, (int)lane, 20);
}

/* A lane votes with a mask that does not name it. */
extern "C" __global__ void k_not_in_mask(int* out) {
    if ((threadIdx.x & 31u) == 0u) out[0] = (int)__ballot_sync(0x2u, 1);
}

/* Threads 16 and up return; the others count themselves at a barrier: exited threads drop out. */
extern "C" __global__ void k_dropout(int* out) {
    if (threadIdx.x >= 16u) return;
    const int n = __syncthreads_count(1);
    if (threadIdx.x == 0) out[blockIdx.x] = n;
}

/* Reads shared memory before any write: on a GPU its content is undefined; the harness poisons it. */
extern "C" __global__ void k_shared_uninit(unsigned* out) {
    __shared__ unsigned s[64];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
    __syncthreads();
    s[threadIdx.x] = 7u;             /* a later block in the same slot must not see this either */
}

/* Every block waits until all blocks have arrived: completes only when all run at once. */
extern "C" __global__ void k_all_blocks_meet(unsigned* counter, unsigned* out) {
    if (threadIdx.x == 0) {
        atomicAdd(counter, 1u);
        while (atomicAdd(counter, 0u) < gridDim.x) __nanosleep(100);
        out[blockIdx.x] = 1u;
    }
}

/* Warp-level sum with xor shuffles; thread 0 of each warp writes it. */
extern "C" __global__ void k_warp_sum(const unsigned long long* in, unsigned long long* out) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long v = in[i];
    for (u32 off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if ((threadIdx.x & 31u) == 0u) out[i / 32u] = v;
}
