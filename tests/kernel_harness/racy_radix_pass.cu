/*
 * Test fixture: gp_radix_pass as it was before the fix of issue 12 (kept to prove that the
 * concurrency harness finds the race). Every thread of the last block reads ctl->need after the
 * bucket scan's last barrier, while the one thread owning the chosen bucket writes need, prefix,
 * thresh and done through ctl_apply with no barrier in between. A warp that reads late sees the new
 * need and may own a second bucket: the selection then has the wrong count. The fix reads need
 * before the barriers (csrc/gpuprune_kernels.cu). tests/test_kernel_harness.py substitutes this
 * function for the fixed one.
 */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_radix_pass(const float* score, unsigned int* hi, long long mode, long long n, long long s1lo,
              long long s1hi, GpSelectCtl* ctl, long long shift, long long width, long long k,
              long long first) {
    __shared__ u32 hist[GP_MAX_BINS];
    __shared__ u32 part[GP_SEL_THREADS];
    __shared__ int is_last;
    if (!first && ctl->done) return;
    const u32 sh = (u32)shift, wd = (u32)width, nbins = 1u << wd;
    const u32 pbits = 64u - sh - wd;
    const u64 P = first ? 0ull : ctl->prefix;
    const GpKeys keys = make_keys(hi, mode, s1lo, s1hi);
    const bool high_only = (keys.mode == GP_MODE_HI) && sh >= 32u;
    const u32 tid = threadIdx.x, lane = tid & 31u;

    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) hist[b] = 0u;
    __syncthreads();

    const i64 stride = (i64)gridDim.x * GP_SEL_THREADS;
    for (i64 base = (i64)blockIdx.x * GP_SEL_THREADS + (tid & ~31u); base < n; base += stride) {
        const i64 i = base + lane;           /* the whole warp runs the same iterations */
        bool valid = i < n;
        u32 digit = 0;
        if (valid) {
            u64 key;
            if (score != 0) {
                const u32 u = orderable_u32(score[i]);
                hi[i] = u;
                key = (u64)u << 32;
            } else {
                key = high_only ? ((u64)hi[i] << 32) : key_of(keys, i);
            }
            valid = prefix_match(key, P, pbits);
            digit = (u32)(key >> sh) & (nbins - 1u);
        }
        const u32 active = __ballot_sync(0xFFFFFFFFu, valid);
        if (active) {                                 /* warp-uniform */
            /* ties put a whole warp in one bucket: then one increment instead of 32 conflicting */
            const u32 src = (u32)(__ffs(active) - 1);
            const u32 d0 = __shfl_sync(0xFFFFFFFFu, digit, src);
            if (__all_sync(0xFFFFFFFFu, !valid || digit == d0)) {
                if (lane == src) atomicAdd(&hist[d0], (u32)__popc(active));
            } else if (valid) {
                atomicAdd(&hist[digit], 1u);
            }
        }
    }
    __syncthreads();
    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) {
        const u32 c = hist[b];
        if (c) atomicAdd(&ctl->hist[b], c);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = (atomicAdd(&ctl->arrivals, 1u) == gridDim.x - 1u);
    __syncthreads();
    if (!is_last) return;

    /* Last block: every other block's histogram is in (each fenced before arriving). */
    __threadfence();
    volatile u32* gh = ctl->hist;
    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) {
        hist[b] = gh[b];
        gh[b] = 0u;
    }
    __syncthreads();
    /* Thread t owns the `per` buckets just below nbins - per * t: thread 0 the highest. */
    const u32 per = nbins / GP_SEL_THREADS;
    const u32 top = nbins - per * tid;
    u32 s = 0;
    for (u32 j = 1; j <= per; ++j) s += hist[top - j];
    part[tid] = s;
    __syncthreads();
    for (u32 off = 1; off < GP_SEL_THREADS; off <<= 1) {     /* inclusive scan, highest buckets first */
        const u32 v = tid >= off ? part[tid - off] : 0u;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    /* THE RACE: `need` is read after the scan's last barrier, while the owning thread below may
     * already have rewritten it through ctl_apply; a late reader can then "own" a second bucket. */
    const u32 incl = part[tid], excl = incl - s, need = first ? (u32)k : ctl->need;
    if (excl < need && need <= incl) {                       /* exactly one thread */
        u32 acc = excl;
        for (u32 j = 1; j <= per; ++j) {
            const u32 b = top - j, c = hist[b];
            if (acc + c >= need) {
                ctl_apply(ctl, P, pbits, wd, b, need - acc, c);
                break;
            }
            acc += c;
        }
    }
    if (tid == 0) ctl->arrivals = 0u;
}
