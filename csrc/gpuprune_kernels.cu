/*
 * gpuprune_kernels.cu -- the CUDA kernels of gpuprune.
 *
 * One self-contained source, compiled two ways:
 *   - by plain nvcc into a fatbin at install time (setup.py), loaded with cupy.RawModule(path=...);
 *   - by NVRTC at run time (cupy.RawModule(code=...)) when no usable fatbin is there.
 * Hence: no #include, only `extern "C"` kernels, builtin integer types.
 *
 * A third build, with any C++ compiler and -DGPUPRUNE_HOST_TEST, turns every kernel into a serial host
 * function with the same arguments (gp_host_<name>), built from the same shared helpers. The test suite
 * uses it to check the launch logic and the arithmetic against the torch reference on machines without
 * a GPU; the kernels' parallel mechanics (atomics, barriers, warp votes) are checked by the GPU tests.
 *
 * What must match the torch reference (gpuprune/select.py, gpuprune/scores.py, gpuprune/policies/) bit
 * for bit is written with explicit round-to-nearest intrinsics (__fadd_rn, __dmul_rn, ...), which the
 * compiler never contracts into FMAs, so the results do not depend on -fmad. Each torch operation rounds
 * once; so does each intrinsic here, in the same order.
 *
 * Kernels (arguments are pointers, `long long`, `unsigned long long` or `double`, so that CuPy can pass
 * Python ints and floats unchanged):
 *   gp_observe_small   fused score update for a batch of <= GP_OBS_SMALL_MAX losses, one block, one launch
 *   gp_observe_sorted  the same for any batch, after torch.sort(indices, stable=True)
 *   gp_score           float score -> the high word of the selection key (orderable bits)
 *   gp_select_init     reset a selection control block
 *   gp_radix_pass      one 10/11-bit digit of an exact-k radix select over 64-bit keys
 *   gp_compact_count   ordered compaction, 1/3: selected count per tile
 *   gp_scan_counts     ordered compaction, 2/3: exclusive scan of the tile counts
 *   gp_compact_write   ordered compaction, 3/3: write the selected indices (int32) in index order
 *   gp_hash_index      keyed hash of sample ids (the shuffle key of the torch reference)
 */

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GP_CUDA 1
#define GP_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define GP_HD static inline
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

/* Launch geometry: gpuprune/kernels/ops.py uses the same values (a test compares them). */
#define GP_SEL_THREADS 256          /* block size of the selection kernels (the bucket scan assumes it) */
#define GP_MAX_BINS 2048            /* 2^11 buckets: the widest radix digit */
#define GP_TILE_ITEMS 16            /* elements per thread in a compaction tile */
#define GP_TILE 4096                /* GP_SEL_THREADS * GP_TILE_ITEMS elements per compaction block */
#define GP_SCAN_THREADS 1024        /* block size of gp_scan_counts */
#define GP_OBS_THREADS 256          /* block size of gp_observe_sorted */
#define GP_OBS_SMALL_MAX 2048       /* largest batch of gp_observe_small (its shared-memory sort) */
#define GP_OBS_SMALL_THREADS 1024   /* block size of gp_observe_small */

/* How a selection key is formed (see GpKeys). */
#define GP_MODE_HI 0        /* key = hi[i] << 32 | hash32(i, seed1) */
#define GP_MODE_HASH 1      /* key = hash32(i, seed1) */

/* ------------------------------------------------------------------------------------------------ */
/* Exact arithmetic: one IEEE round-to-nearest operation each, never fused.                         */
/* ------------------------------------------------------------------------------------------------ */

GP_HD float f_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

GP_HD float f_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

GP_HD float f_sqrt(float a) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(a);
#else
    return sqrtf(a);
#endif
}

GP_HD double d_add(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}

GP_HD double d_sub(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

GP_HD double d_mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

GP_HD double d_div(double a, double b) {
#ifdef __CUDA_ARCH__
    return __ddiv_rn(a, b);
#else
    return a / b;
#endif
}

/* torch.pow(double, double) on CUDA calls the same libdevice pow. */
GP_HD double d_pow(double a, double b) { return pow(a, b); }

GP_HD float d_to_f(double a) {
#ifdef __CUDA_ARCH__
    return __double2float_rn(a);
#else
    return (float)a;
#endif
}

GP_HD u32 f_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    u32 u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

GP_HD float f_from_bits(u32 u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

/* Bit tests: immune to fast-math flags. */
GP_HD bool f_finite(float x) { return (f_bits(x) & 0x7F800000u) != 0x7F800000u; }

#define GP_F32_INF 0x7F800000u
#define GP_F32_NEG_INF 0xFF800000u
#define GP_F32_MAX 3.4028234663852886e+38   /* largest finite float32, exact as a double */

/* ------------------------------------------------------------------------------------------------ */
/* Keys (gpuprune/select.py)                                                                        */
/* ------------------------------------------------------------------------------------------------ */

/* MurmurHash3's 32-bit finaliser: a bijection of uint32. */
GP_HD u32 fmix32(u32 h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

/* select.hash32 for ids < 2^32: fmix32(fmix32(i ^ seed_lo) ^ seed_hi). */
GP_HD u32 hash32(u32 i, u32 seed_lo, u32 seed_hi) { return fmix32(fmix32(i ^ seed_lo) ^ seed_hi); }

/* select.orderable as an unsigned word: unsigned order = float order, NaN -> -inf, -0 -> +0.
 * (The torch reference returns the signed form o; this is o + 2^31.) */
GP_HD u32 orderable_u32(float s) {
    u32 b = f_bits(s);
    if ((b & 0x7FFFFFFFu) > GP_F32_INF) b = GP_F32_NEG_INF;   /* any NaN */
    if (b == 0x80000000u) b = 0u;                              /* -0 */
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}


/* The 64-bit key of sample i. Keys are unique: the low word is a bijection of i. */
struct GpKeys {
    const u32* hi;   /* high words (GP_MODE_HI) */
    int mode;
    u32 s1lo, s1hi;  /* seed of the tie-break hash */
};

GP_HD u64 key_of(const GpKeys& k, i64 i) {
    const u64 h = (u64)hash32((u32)i, k.s1lo, k.s1hi);
    return k.mode == GP_MODE_HASH ? h : (((u64)k.hi[i] << 32) | h);
}

/* Top bits of the key, for passes whose digits all lie in the high word (shift >= 32, GP_MODE_HI). */
GP_HD u64 key_high(const GpKeys& k, i64 i) { return (u64)k.hi[i] << 32; }

GP_HD bool is_selected(const GpKeys& k, i64 i, u64 thresh) { return key_of(k, i) >= thresh; }

GP_HD GpKeys make_keys(const unsigned int* hi, long long mode, long long s1lo, long long s1hi) {
    GpKeys k;
    k.hi = hi;
    k.mode = (int)mode;
    k.s1lo = (u32)s1lo;
    k.s1hi = (u32)s1hi;
    return k;
}

/* ------------------------------------------------------------------------------------------------ */
/* Radix select state                                                                               */
/* ------------------------------------------------------------------------------------------------ */

/* One exact-k selection, in device memory (8224 bytes; ops.py allocates CTL_BYTES per control block).
 * Invariant while !done: the keys whose top `bits` bits equal `prefix` hold the `need` (>= 1) keys still
 * to choose, and every key with a larger top part is chosen. When done, the chosen set is
 * { i : key(i) >= thresh }. */
struct GpSelectCtl {
    u64 prefix;
    u64 thresh;
    u32 bits;
    u32 need;
    u32 done;
    u32 arrivals;             /* blocks finished in the current pass (last-block pattern) */
    u32 hist[GP_MAX_BINS];    /* global histogram of the current pass; zero between passes */
};
static_assert(sizeof(GpSelectCtl) == 32 + 4 * GP_MAX_BINS, "GpSelectCtl layout (ops.py CTL_BYTES)");
static_assert(GP_TILE == GP_SEL_THREADS * GP_TILE_ITEMS, "compaction tile");
static_assert(GP_MAX_BINS % GP_SEL_THREADS == 0 && (GP_MAX_BINS / 2) % GP_SEL_THREADS == 0, "bucket scan");

/* Record the bucket b chosen in a pass; rem of the cnt_b keys in it are still needed. */
GP_HD void ctl_apply(GpSelectCtl* ctl, u64 P, u32 pbits, u32 width, u32 b, u32 rem, u32 cnt_b) {
    const u32 bits = pbits + width;
    const u64 P2 = (pbits == 0u ? 0ull : (P << width)) | (u64)b;
    ctl->prefix = P2;
    ctl->bits = bits;
    ctl->need = rem;
    if (rem == cnt_b) {       /* the whole bucket is in: the set is known */
        ctl->thresh = bits >= 64u ? P2 : (P2 << (64u - bits));
        ctl->done = 1u;
    }
}

/* Does a key match the prefix fixed by earlier passes? */
GP_HD bool prefix_match(u64 key, u64 P, u32 pbits) {
    return pbits == 0u || (key >> (64u - pbits)) == P;
}

/* ------------------------------------------------------------------------------------------------ */
/* Score update (gpuprune/scores.py: ScoreBank._update and merge_groups)                            */
/* ------------------------------------------------------------------------------------------------ */

/* Sums over one sample's new losses, shifted by its old mean, in batch order (as index_add does). */
struct GpAcc {
    double n, s1, s2;
};

GP_HD void acc_init(GpAcc& a) {
    a.n = 0.0;
    a.s1 = 0.0;
    a.s2 = 0.0;
}

GP_HD void acc_add(GpAcc& a, float x, double m64) {
    const bool use = f_finite(x);
    const double d = use ? d_sub((double)x, m64) : 0.0;
    a.n = d_add(a.n, use ? 1.0 : 0.0);
    a.s1 = d_add(a.s1, d);
    a.s2 = d_add(a.s2, d_mul(d, d));
}

/* merge_groups for one sample, then the writes of ScoreBank._update. */
GP_HD void merge_write(i64 id, const GpAcc& a, float* mean, float* var, int* last_epoch,
                       double decay, int epoch) {
    const bool seen = last_epoch[id] >= 0;
    const double m64 = (double)mean[id];
    const double c = a.n < 1.0 ? 1.0 : a.n;
    const double dm = d_div(a.s1, c);
    double within = d_sub(d_div(a.s2, c), d_mul(dm, dm));
    if (within < 0.0) within = 0.0;
    double alpha = d_sub(1.0, d_pow(decay, a.n));
    if (!seen) alpha = 1.0;               /* first visit: take the group as is */
    if (!(a.n > 0.0)) alpha = 0.0;        /* nothing finite: keep the state */
    const double oma = d_sub(1.0, alpha);
    const double new_mean = d_add(m64, d_mul(alpha, dm));
    double new_var = d_add(d_add(d_mul(oma, (double)var[id]), d_mul(alpha, within)),
                           d_mul(d_mul(d_mul(alpha, oma), dm), dm));
    if (new_var > GP_F32_MAX) new_var = GP_F32_MAX;   /* clamp(max=float32 max): saturate, never inf */
    mean[id] = d_to_f(new_mean);
    var[id] = d_to_f(new_var);
    if (a.n > 0.0) last_epoch[id] = epoch;
}

/* One compare-exchange of a bitonic sorting network over P keys (ascending at the end). */
GP_HD void bitonic_step(u64* keys, u32 size, u32 stride, u32 t) {
    const u32 lo = 2u * t - (t & (stride - 1u));
    const u32 hi = lo + stride;
    const bool ascending = (lo & size) == 0u;
    const u64 a = keys[lo], b = keys[hi];
    if ((a > b) == ascending) {
        keys[lo] = b;
        keys[hi] = a;
    }
}

#ifdef GP_CUDA
/* ================================================================================================ */
/* Kernels                                                                                          */
/* ================================================================================================ */

/* Fused update of a batch of B <= GP_OBS_SMALL_MAX losses in one block: range check of the whole batch,
 * bitonic sort of (id, position) in shared memory, then one thread per distinct id sums its losses in
 * batch order and writes the merged state. Launch: grid 1, block GP_OBS_SMALL_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_OBS_SMALL_THREADS)
gp_observe_small(const long long* idx, const float* x, long long B, long long N, float* mean, float* var,
                 int* last_epoch, unsigned long long* nonfinite,
                 unsigned long long* invalid, double decay, long long epoch) {
    __shared__ u64 keys[GP_OBS_SMALL_MAX];
    const u32 tid = threadIdx.x;
    const u32 nb = (u32)B;

    int bad = 0;
    for (u32 j = tid; j < nb; j += blockDim.x) {
        const i64 v = idx[j];
        if (v < 0 || v >= N) bad = 1;
    }
    if (__syncthreads_or(bad)) {           /* the whole batch is ignored */
        if (tid == 0) atomicAdd(invalid, 1ull);
        return;
    }

    u32 P = 1;
    while (P < nb) P <<= 1;
    for (u32 j = tid; j < P; j += blockDim.x)
        keys[j] = j < nb ? (((u64)idx[j] << 32) | (u64)j) : ~0ull;
    u32 nf = 0;
    for (u32 base = 0; base < nb; base += blockDim.x) {          /* same trip count in every thread */
        const u32 j = base + tid;
        nf += (u32)__syncthreads_count(j < nb && !f_finite(x[j]));
    }
    if (tid == 0 && nf) atomicAdd(nonfinite, (u64)nf);
    __syncthreads();

    for (u32 size = 2; size <= P; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 t = tid; t < P / 2; t += blockDim.x) bitonic_step(keys, size, stride, t);
            __syncthreads();
        }
    }

    for (u32 t = tid; t < nb; t += blockDim.x) {
        const u32 id = (u32)(keys[t] >> 32);
        if (t > 0 && (u32)(keys[t - 1] >> 32) == id) continue;   /* not the first of its id */
        const double m64 = (double)mean[id];
        GpAcc a;
        acc_init(a);
        for (u32 u = t; u < nb && (u32)(keys[u] >> 32) == id; ++u)
            acc_add(a, x[(u32)(keys[u] & 0xFFFFFFFFull)], m64);
        merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
    }
}

/* Fused update of any batch, given the stably sorted ids and their positions (torch.sort(stable=True)).
 * Sorted, the batch's min and max are its ends, so every thread sees the range check at once.
 * Launch: grid ceil(B / GP_OBS_THREADS), block GP_OBS_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_OBS_THREADS)
gp_observe_sorted(const long long* sidx, const long long* perm, const float* x, long long B, long long N,
                  float* mean, float* var, int* last_epoch, unsigned long long* nonfinite,
                  unsigned long long* invalid, double decay, long long epoch) {
    if (sidx[0] < 0 || sidx[B - 1] >= N) {
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(invalid, 1ull);
        return;
    }
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 nf = (u32)__syncthreads_count(t < B && !f_finite(x[t]));
    if (threadIdx.x == 0 && nf) atomicAdd(nonfinite, (u64)nf);
    if (t >= B) return;
    const i64 id = sidx[t];
    if (t > 0 && sidx[t - 1] == id) return;
    const double m64 = (double)mean[id];
    GpAcc a;
    acc_init(a);
    for (i64 u = t; u < B && sidx[u] == id; ++u) acc_add(a, x[perm[u]], m64);
    merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
}

/* hi[i] = orderable bits of score[i] (the high word of the key). Launch: any grid (grid-stride), any block. */
extern "C" __global__ void gp_score(const float* score, long long n, unsigned int* hi) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) hi[i] = orderable_u32(score[i]);
}

/* Reset a control block: `bits` top bits fixed to `prefix`, `need` keys to choose among them; or, with
 * done != 0, the answer { key >= thresh } is known already. Launch: grid 1, block GP_SEL_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_select_init(GpSelectCtl* ctl, unsigned long long prefix, long long bits, long long need, long long done,
               unsigned long long thresh) {
    for (u32 b = threadIdx.x; b < GP_MAX_BINS; b += blockDim.x) ctl->hist[b] = 0u;
    if (threadIdx.x == 0) {
        ctl->prefix = prefix;
        ctl->thresh = thresh;
        ctl->bits = (u32)bits;
        ctl->need = (u32)need;
        ctl->done = done ? 1u : 0u;
        ctl->arrivals = 0u;
    }
}

/* One radix pass over the digit key[shift, shift + width) of the keys matching the current prefix:
 * shared-memory histogram (one increment per warp when the warp's keys share a bucket, as ties do),
 * flushed to the global one; the last block to finish picks the bucket holding the need-th largest key
 * and resets the histogram. Exits at once when the selection is already done. The keys are unique, so
 * after the six passes (64 bits) the set is always determined.
 * Launch: any grid (grid-stride), block GP_SEL_THREADS (required by the bucket scan). */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_radix_pass(const unsigned int* hi, long long mode, long long n, long long s1lo, long long s1hi,
              GpSelectCtl* ctl, long long shift,
              long long width) {
    __shared__ u32 hist[GP_MAX_BINS];
    __shared__ u32 part[GP_SEL_THREADS];
    __shared__ int is_last;
    if (ctl->done) return;
    const u32 sh = (u32)shift, wd = (u32)width, nbins = 1u << wd;
    const u32 pbits = 64u - sh - wd;
    const u64 P = ctl->prefix;
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    const bool high_only = (k.mode == GP_MODE_HI) && sh >= 32u;
    const u32 tid = threadIdx.x, lane = tid & 31u;

    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) hist[b] = 0u;
    __syncthreads();

    const i64 stride = (i64)gridDim.x * GP_SEL_THREADS;
    for (i64 base = (i64)blockIdx.x * GP_SEL_THREADS + (tid & ~31u); base < n; base += stride) {
        const i64 i = base + lane;           /* the whole warp runs the same iterations */
        bool valid = i < n;
        u32 digit = 0;
        if (valid) {
            const u64 key = high_only ? key_high(k, i) : key_of(k, i);
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
    const u32 incl = part[tid], excl = incl - s, need = ctl->need;
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

/* Ordered compaction 1/3: counts[b] = number of selected i in tile b ([b * GP_TILE, (b + 1) * GP_TILE)).
 * Launch: grid ceil(n / GP_TILE), block GP_SEL_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_compact_count(const unsigned int* hi, long long mode, long long n, long long s1lo, long long s1hi,
                 const GpSelectCtl* ctl, unsigned int* counts) {
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    const u64 T = ctl->thresh;
    const i64 start = (i64)blockIdx.x * GP_TILE;
    u32 total = 0;
    for (u32 r = 0; r < GP_TILE_ITEMS; ++r) {
        const i64 i = start + (i64)r * GP_SEL_THREADS + threadIdx.x;
        total += (u32)__syncthreads_count(i < n && is_selected(k, i, T));
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

/* Ordered compaction 2/3: in-place exclusive scan of g tile counts. Launch: grid 1, block GP_SCAN_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_SCAN_THREADS)
gp_scan_counts(unsigned int* counts, long long g) {
    __shared__ u32 part[GP_SCAN_THREADS];
    const u32 tid = threadIdx.x;
    const i64 per = (g + GP_SCAN_THREADS - 1) / GP_SCAN_THREADS;
    const i64 lo = (i64)tid * per;
    const i64 hi = lo + per < g ? lo + per : g;
    u32 s = 0;
    for (i64 j = lo; j < hi; ++j) s += counts[j];
    part[tid] = s;
    __syncthreads();
    for (u32 off = 1; off < GP_SCAN_THREADS; off <<= 1) {
        const u32 v = tid >= off ? part[tid - off] : 0u;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    u32 run = part[tid] - s;
    for (i64 j = lo; j < hi; ++j) {
        const u32 c = counts[j];
        counts[j] = run;
        run += c;
    }
}

/* Ordered compaction 3/3: out[offsets[b] + rank] = i for the selected i of tile b, in index order.
 * Launch: grid ceil(n / GP_TILE), block GP_SEL_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_compact_write(const unsigned int* hi, long long mode, long long n, long long s1lo, long long s1hi,
                 const GpSelectCtl* ctl, const unsigned int* offsets, int* out) {
    __shared__ u32 warp_count[GP_SEL_THREADS / 32];
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    const u64 T = ctl->thresh;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const i64 start = (i64)blockIdx.x * GP_TILE;
    i64 base = (i64)offsets[blockIdx.x];
    for (u32 r = 0; r < GP_TILE_ITEMS; ++r) {
        const i64 i = start + (i64)r * GP_SEL_THREADS + tid;
        const bool sel = i < n && is_selected(k, i, T);
        const u32 ballot = __ballot_sync(0xFFFFFFFFu, sel);
        if (lane == 0) warp_count[warp] = (u32)__popc(ballot);
        __syncthreads();
        u32 before = 0, round = 0;
        for (u32 w = 0; w < GP_SEL_THREADS / 32; ++w) {
            const u32 c = warp_count[w];
            before += w < warp ? c : 0u;
            round += c;
        }
        if (sel) {
            const i64 pos = base + before + (u32)__popc(ballot & ((1u << lane) - 1u));
            out[pos] = (int)i;
        }
        base += round;
        __syncthreads();                  /* warp_count is rewritten next round */
    }
}

/* out[j] = hash32(ids[j], seed): the shuffle key of select.shuffle_order. Launch: any grid, any block. */
extern "C" __global__ void gp_hash_index(const long long* ids, long long k, long long slo, long long shi,
                                         long long* out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += stride)
        out[j] = (i64)hash32((u32)ids[j], (u32)slo, (u32)shi);
}

#endif /* GP_CUDA */

#ifdef GPUPRUNE_HOST_TEST
/* ================================================================================================ */
/* Serial host versions of the kernels: same arguments, same helpers (tests only).                 */
/* ================================================================================================ */

extern "C" void gp_host_observe_small(const long long* idx, const float* x, long long B, long long N,
                                      float* mean, float* var, int* last_epoch,
                                      unsigned long long* nonfinite, unsigned long long* invalid,
                                      double decay, long long epoch) {
    static u64 keys[GP_OBS_SMALL_MAX];
    const u32 nb = (u32)B;
    for (u32 j = 0; j < nb; ++j)
        if (idx[j] < 0 || idx[j] >= N) {
            *invalid += 1ull;
            return;
        }
    u32 P = 1;
    while (P < nb) P <<= 1;
    for (u32 j = 0; j < P; ++j) keys[j] = j < nb ? (((u64)idx[j] << 32) | (u64)j) : ~0ull;
    for (u32 j = 0; j < nb; ++j) *nonfinite += !f_finite(x[j]);
    for (u32 size = 2; size <= P; size <<= 1)
        for (u32 stride = size >> 1; stride > 0; stride >>= 1)
            for (u32 t = 0; t < P / 2; ++t) bitonic_step(keys, size, stride, t);
    for (u32 t = 0; t < nb; ++t) {
        const u32 id = (u32)(keys[t] >> 32);
        if (t > 0 && (u32)(keys[t - 1] >> 32) == id) continue;
        const double m64 = (double)mean[id];
        GpAcc a;
        acc_init(a);
        for (u32 u = t; u < nb && (u32)(keys[u] >> 32) == id; ++u)
            acc_add(a, x[(u32)(keys[u] & 0xFFFFFFFFull)], m64);
        merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
    }
}

extern "C" void gp_host_observe_sorted(const long long* sidx, const long long* perm, const float* x,
                                       long long B, long long N, float* mean, float* var,
                                       int* last_epoch, unsigned long long* nonfinite,
                                       unsigned long long* invalid, double decay, long long epoch) {
    if (sidx[0] < 0 || sidx[B - 1] >= N) {
        *invalid += 1ull;
        return;
    }
    for (i64 t = 0; t < B; ++t) *nonfinite += !f_finite(x[t]);
    for (i64 t = 0; t < B; ++t) {
        const i64 id = sidx[t];
        if (t > 0 && sidx[t - 1] == id) continue;
        const double m64 = (double)mean[id];
        GpAcc a;
        acc_init(a);
        for (i64 u = t; u < B && sidx[u] == id; ++u) acc_add(a, x[perm[u]], m64);
        merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
    }
}

extern "C" void gp_host_score(const float* score, long long n, unsigned int* hi) {
    for (i64 i = 0; i < n; ++i) hi[i] = orderable_u32(score[i]);
}

extern "C" void gp_host_select_init(GpSelectCtl* ctl, unsigned long long prefix, long long bits,
                                    long long need, long long done, unsigned long long thresh) {
    for (u32 b = 0; b < GP_MAX_BINS; ++b) ctl->hist[b] = 0u;
    ctl->prefix = prefix;
    ctl->thresh = thresh;
    ctl->bits = (u32)bits;
    ctl->need = (u32)need;
    ctl->done = done ? 1u : 0u;
    ctl->arrivals = 0u;
}

extern "C" void gp_host_radix_pass(const unsigned int* hi, long long mode, long long n, long long s1lo,
                                   long long s1hi,
                                   GpSelectCtl* ctl, long long shift, long long width) {
    static u32 hist[GP_MAX_BINS];
    if (ctl->done) return;
    const u32 sh = (u32)shift, wd = (u32)width, nbins = 1u << wd, pbits = 64u - sh - wd;
    const u64 P = ctl->prefix;
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    const bool high_only = (k.mode == GP_MODE_HI) && sh >= 32u;
    for (u32 b = 0; b < nbins; ++b) hist[b] = 0u;
    for (i64 i = 0; i < n; ++i) {
        const u64 key = high_only ? key_high(k, i) : key_of(k, i);
        if (prefix_match(key, P, pbits)) hist[(u32)(key >> sh) & (nbins - 1u)] += 1u;
    }
    u32 acc = 0;
    for (u32 b = nbins; b-- > 0;) {
        if (acc + hist[b] >= ctl->need) {
            ctl_apply(ctl, P, pbits, wd, b, ctl->need - acc, hist[b]);
            return;
        }
        acc += hist[b];
    }
}

extern "C" void gp_host_compact_count(const unsigned int* hi, long long mode, long long n, long long s1lo,
                                      long long s1hi, const GpSelectCtl* ctl, unsigned int* counts) {
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    for (i64 i = 0; i < n; ++i) {
        if (i % GP_TILE == 0) counts[i / GP_TILE] = 0u;
        counts[i / GP_TILE] += is_selected(k, i, ctl->thresh);
    }
}

extern "C" void gp_host_scan_counts(unsigned int* counts, long long g) {
    u32 run = 0;
    for (i64 j = 0; j < g; ++j) {
        const u32 c = counts[j];
        counts[j] = run;
        run += c;
    }
}

extern "C" void gp_host_compact_write(const unsigned int* hi, long long mode, long long n, long long s1lo,
                                      long long s1hi, const GpSelectCtl* ctl,
                                      const unsigned int* offsets, int* out) {
    const GpKeys k = make_keys(hi, mode, s1lo, s1hi);
    i64 pos = 0;
    for (i64 i = 0; i < n; ++i) {
        if (i % GP_TILE == 0) pos = offsets[i / GP_TILE];
        if (!is_selected(k, i, ctl->thresh)) continue;
        out[pos] = (int)i;
        ++pos;
    }
}

extern "C" void gp_host_hash_index(const long long* ids, long long k, long long slo, long long shi,
                                   long long* out) {
    for (i64 j = 0; j < k; ++j) out[j] = (i64)hash32((u32)ids[j], (u32)slo, (u32)shi);
}

#endif /* GPUPRUNE_HOST_TEST */
