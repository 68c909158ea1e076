/*
 * Test fixture: the bucket scan of a radix pass as it was before the fix of issue 12 (kept to prove
 * that the concurrency harness finds the race). Thread 0 publishes the pass's need in the control
 * block; after the scan's last barrier every thread of the last block reads ctl->need again, while
 * the one thread owning the chosen bucket rewrites need, prefix, thresh and done through ctl_apply,
 * with no barrier in between. A warp that reads late sees the new need and may own a second bucket:
 * the selection then has the wrong count. The fix passes need in a register, read before the pass
 * (csrc/gpuprune_kernels.cu). tests/test_kernel_harness.py substitutes this function for the fixed
 * one.
 */
GP_HD void pick_bucket(GpPlanCtl* ctl, GpShared& s, u32 nbins, u64 P, u32 pbits, u32 width, u32 need_arg) {
    const u32 tid = threadIdx.x;
    volatile u32* gh = ctl->hist;
    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) {
        s.hist[b] = gh[b];
        gh[b] = 0u;
    }
    if (tid == 0) ctl->need = need_arg;
    __syncthreads();
    if (need_arg == 0u) {
        if (tid == 0) {
            ctl->done = 1u;
            ctl->thresh = ~0ull;
        }
        return;
    }
    const u32 per = nbins / GP_SEL_THREADS;
    const u32 top = nbins - per * tid;
    u32 c = 0;
    for (u32 j = 1; j <= per; ++j) c += s.hist[top - j];
    s.part[tid] = c;
    __syncthreads();
    for (u32 off = 1; off < GP_SEL_THREADS; off <<= 1) {
        const u32 v = tid >= off ? s.part[tid - off] : 0u;
        __syncthreads();
        s.part[tid] += v;
        __syncthreads();
    }
    const u32 need = ctl->need;                 /* the race: read late, while the owner rewrites it */
    const u32 incl = s.part[tid], excl = incl - c;
    if (excl < need && need <= incl) {
        u32 acc = excl;
        for (u32 j = 1; j <= per; ++j) {
            const u32 b = top - j, cb = s.hist[b];
            if (acc + cb >= need) {
                ctl_apply(ctl, P, pbits, width, b, need - acc, cb);
                break;
            }
            acc += cb;
        }
    }
}
