/*
 * gpuprune_kernels.cu -- the CUDA kernels of gpuprune.
 *
 * One source, built three ways:
 *   - by plain nvcc into a fatbin at install time (setup.py), loaded with cupy.RawModule(path=...);
 *   - by NVRTC at run time (cupy.RawModule(code=...)) when no usable fatbin is there;
 *   - as C++ by the concurrency harness (csrc/harness/, tests only): every CUDA thread an OS thread,
 *     with real barriers, warp exchanges and atomics, so the CPU test suite runs these very kernels.
 * Hence: no #include, only `extern "C"` kernels, builtin integer types, and nothing the harness shim
 * (csrc/harness/gp_shim.h) does not model.
 *
 * What must match the torch reference (gpuprune/keys.py, gpuprune/update.py) bit for bit is written
 * with explicit round-to-nearest operations that the compiler never contracts into FMAs, so the
 * results do not depend on -fmad. Each torch operation rounds once; so does each operation here, in
 * the same order. The float <-> double conversions are inline PTX without .ftz: CuPy appends
 * -ftz=true to NVRTC's options, which would otherwise flush denormal losses, means and variances.
 * (Double-precision arithmetic has no flush-to-zero mode.)
 *
 * Kernels (arguments are pointers, `long long`, `unsigned long long` or `double`, so that CuPy can pass
 * Python ints and floats unchanged; gpuprune/kernels/_spec.py lists them and a test compares):
 *   gp_observe_small   fused statistics update of a batch of <= GP_OBS_SMALL_MAX losses: one launch
 *   gp_observe_sorted  the same for any batch, after torch.sort(ids, stable=True)
 *   gp_radix_pass      one 10/11-bit digit of an exact-k radix select over unique 64-bit keys; the
 *                      first pass of a score selection also converts the scores to key words
 *   gp_compact         one-pass ordered compaction of the selected ids (int32, index order)
 *   gp_hash_index      keyed hash of sample ids (the shuffle key of gpuprune.backend)
 */

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GP_HD __host__ __device__ __forceinline__
#elif defined(GP_HARNESS)
#define GP_HD static inline
#else
#error "build with nvcc, NVRTC, or the concurrency harness (csrc/harness/gp_shim.h)"
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

/* Launch geometry: gpuprune/kernels/_spec.py holds the same values (a test compares them). */
#define GP_SEL_THREADS 256          /* block size of the selection kernels (the bucket scan assumes it) */
#define GP_MAX_BINS 2048            /* 2^11 buckets: the widest radix digit */
#define GP_TILE_ITEMS 16            /* elements per thread in a compaction tile */
#define GP_TILE 4096                /* GP_SEL_THREADS * GP_TILE_ITEMS elements per compaction block */
#define GP_OBS_THREADS 256          /* block size of gp_observe_sorted */
#define GP_OBS_SMALL_MAX 4096       /* largest batch of gp_observe_small (its shared-memory table/sort) */
#define GP_OBS_SMALL_THREADS 1024   /* block size of gp_observe_small */
#define GP_OBS_TABLE 8192           /* slots of gp_observe_small's duplicate table (u32, 2x the batch) */

/* How a selection key is formed (see GpKeys). */
#define GP_MODE_HI 0        /* key = hi[i] << 32 | hash32(i, seed) */
#define GP_MODE_HASH 1      /* key = hash32(i, seed) */

/* A compaction tile's published state (gp_compact): flag << 32 | count. */
#define GP_TILE_AGGREGATE 1ull      /* the tile's own count is known */
#define GP_TILE_PREFIX 2ull         /* the count of this and every earlier tile is known */

/* ------------------------------------------------------------------------------------------------ */
/* Exact arithmetic: one IEEE round-to-nearest operation each, never fused, never flushed.          */
/* ------------------------------------------------------------------------------------------------ */

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

/* base**n for a whole n >= 0 by binary exponentiation: the same round-to-nearest multiplies, in the
 * same order, as gpuprune/update.py's int_pow, so the result does not depend on a pow library
 * (libdevice's pow and torch's CPU pow differ in the last bit for some inputs). */
GP_HD double d_ipow(double base, double n) {
    unsigned long long e = (unsigned long long)n;
    double r = 1.0;
    while (e) {
        if (e & 1ull) r = d_mul(r, base);
        base = d_mul(base, base);
        e >>= 1;
    }
    return r;
}

/* float -> double, exact; a denormal stays a denormal whatever -ftz says. */
GP_HD double f_to_d(float a) {
#ifdef __CUDA_ARCH__
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
    return r;
#else
    return (double)a;
#endif
}

/* double -> float, round to nearest even; denormal results kept whatever -ftz says. */
GP_HD float d_to_f(double a) {
#ifdef __CUDA_ARCH__
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
    return r;
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

/* Bit tests: immune to fast-math and flush-to-zero flags. */
GP_HD bool f_finite(float x) { return (f_bits(x) & 0x7F800000u) != 0x7F800000u; }

#define GP_F32_INF 0x7F800000u
#define GP_F32_NEG_INF 0xFF800000u
#define GP_F32_MAX 3.4028234663852886e+38   /* largest finite float32, exact as a double */

/* ------------------------------------------------------------------------------------------------ */
/* Keys (gpuprune/keys.py)                                                                          */
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

/* keys.hash32 for ids < 2^32: fmix32(fmix32(i ^ seed_lo) ^ seed_hi). */
GP_HD u32 hash32(u32 i, u32 seed_lo, u32 seed_hi) { return fmix32(fmix32(i ^ seed_lo) ^ seed_hi); }

/* keys.orderable as an unsigned word: unsigned order = float order, NaN -> -inf, -0 -> +0.
 * (The torch reference returns the signed form o; this is o + 2^31.) Bit operations only. */
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
/* Selection state                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

/* One exact-k selection, in device memory (ops.py allocates CTL_BYTES per control block, zeroed once).
 * Invariant while !done: the keys whose top `bits` bits equal `prefix` hold the `need` (>= 1) keys still
 * to choose, and every key with a larger top part is chosen. When done, the chosen set is
 * { i : key(i) >= thresh }. The kernels leave `arrivals`, `tiles`, `tiles_done` and `hist` at zero after
 * every launch, so the block is reused without a reset launch (and replays in a CUDA graph). */
struct GpSelectCtl {
    u64 prefix;
    u64 thresh;
    u32 bits;
    u32 need;
    u32 done;
    u32 arrivals;             /* blocks finished in the current radix pass (last-block pattern) */
    u32 tiles;                /* compaction tiles handed out (dynamic tile ids) */
    u32 tiles_done;           /* compaction blocks finished */
    u32 total;                /* ids the last compaction selected (== k unless something is wrong) */
    u32 pad;
    u32 hist[GP_MAX_BINS];    /* global histogram of the current pass; zero between passes */
};
static_assert(sizeof(GpSelectCtl) == 48 + 4 * GP_MAX_BINS, "GpSelectCtl layout (ops.py CTL_BYTES)");
static_assert(GP_TILE == GP_SEL_THREADS * GP_TILE_ITEMS, "compaction tile");
static_assert(GP_TILE_ITEMS <= 32, "compaction keeps one selection bit per item in a u32");
static_assert(GP_MAX_BINS % GP_SEL_THREADS == 0 && (GP_MAX_BINS / 2) % GP_SEL_THREADS == 0, "bucket scan");
static_assert(GP_OBS_TABLE == 2 * GP_OBS_SMALL_MAX, "the table shares gp_observe_small's sort buffer");

/* Record the bucket b chosen in a pass; rem of the cnt_b keys in it are still needed. */
GP_HD void ctl_apply(GpSelectCtl* ctl, u64 P, u32 pbits, u32 width, u32 b, u32 rem, u32 cnt_b) {
    const u32 bits = pbits + width;
    const u64 P2 = (pbits == 0u ? 0ull : (P << width)) | (u64)b;
    ctl->prefix = P2;
    ctl->bits = bits;
    ctl->need = rem;
    ctl->done = rem == cnt_b ? 1u : 0u;     /* the whole bucket is in: the set is known */
    if (rem == cnt_b) ctl->thresh = bits >= 64u ? P2 : (P2 << (64u - bits));
}

/* Does a key match the prefix fixed by earlier passes? */
GP_HD bool prefix_match(u64 key, u64 P, u32 pbits) {
    return pbits == 0u || (key >> (64u - pbits)) == P;
}

/* ------------------------------------------------------------------------------------------------ */
/* Statistics update (gpuprune/update.py: observe_torch and merge_groups)                           */
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
    const double d = use ? d_sub(f_to_d(x), m64) : 0.0;
    a.n = d_add(a.n, use ? 1.0 : 0.0);
    a.s1 = d_add(a.s1, d);
    a.s2 = d_add(a.s2, d_mul(d, d));
}

/* merge_groups for one sample, then the writes of observe_torch. */
GP_HD void merge_write(i64 id, const GpAcc& a, float* mean, float* var, int* last_epoch,
                       double decay, int epoch) {
    const bool seen = last_epoch[id] >= 0;
    const double m64 = f_to_d(mean[id]);
    const double c = a.n < 1.0 ? 1.0 : a.n;
    const double dm = d_div(a.s1, c);
    double within = d_sub(d_div(a.s2, c), d_mul(dm, dm));
    if (within < 0.0) within = 0.0;
    double alpha = d_sub(1.0, d_ipow(decay, a.n));
    if (!seen) alpha = 1.0;               /* first visit: take the group as is */
    if (!(a.n > 0.0)) alpha = 0.0;        /* nothing finite: keep the state */
    const double oma = d_sub(1.0, alpha);
    const double new_mean = d_add(m64, d_mul(alpha, dm));
    double new_var = d_add(d_add(d_mul(oma, f_to_d(var[id])), d_mul(alpha, within)),
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

/* ================================================================================================ */
/* Kernels                                                                                          */
/* ================================================================================================ */

/* Fused update of a batch of B <= GP_OBS_SMALL_MAX losses in one block, without a sort when the ids are
 * distinct (the usual case: a sampler without replacement). Range check of the whole batch; count of
 * non-finite losses; the ids go into a shared-memory hash table of `slots` entries (a power of two,
 * >= 2B and <= GP_OBS_TABLE: sized to the batch, so a batch of 256 clears 512 slots, not 8192), which
 * finds any duplicate. No duplicate: each thread updates its samples directly. Duplicates: bitonic
 * sort of (id, position) in the same shared memory, then one thread per distinct id sums its losses
 * in batch order and writes the merged state. The ids are int64 (idx64) or int32 (idx32; the other
 * pointer is null), so int32 ids need no conversion launch. Launch: grid 1, block any multiple of 32
 * up to GP_OBS_SMALL_THREADS (ops.py gives about 4 ids per thread). */
extern "C" __global__ void __launch_bounds__(GP_OBS_SMALL_THREADS)
gp_observe_small(const long long* idx64, const int* idx32, const float* x, long long B, long long N,
                 float* mean, float* var, int* last_epoch, unsigned long long* nonfinite,
                 unsigned long long* invalid, double decay, long long epoch, long long slots) {
    __shared__ u64 keys[GP_OBS_SMALL_MAX];         /* the duplicate table (as u32), then the sort keys */
    u32* table = (u32*)keys;
    const u32 tid = threadIdx.x, nt = blockDim.x;
    const u32 nb = (u32)B, nslots = (u32)slots;
#define GP_ID(j) (idx32 != 0 ? (i64)idx32[j] : idx64[j])

    for (u32 s = tid; s < nslots; s += nt) table[s] = 0u;
    int bad = 0;
    for (u32 j = tid; j < nb; j += nt) {
        const i64 v = GP_ID(j);
        if (v < 0 || v >= N) bad = 1;
    }
    if (__syncthreads_or(bad)) {           /* the whole batch is ignored */
        if (tid == 0) atomicAdd(invalid, 1ull);
        return;
    }
    u32 nf = 0;
    for (u32 base = 0; base < nb; base += nt) {          /* same trip count in every thread */
        const u32 j = base + tid;
        nf += (u32)__syncthreads_count(j < nb && !f_finite(x[j]));
    }
    if (tid == 0 && nf) atomicAdd(nonfinite, (u64)nf);

    /* open addressing on id + 1 (ids < 2^31, so never the empty value 0); the table is half full at most */
    int dup = 0;
    for (u32 j = tid; j < nb; j += nt) {
        const u32 key = (u32)GP_ID(j) + 1u;
        u32 s = fmix32(key) & (nslots - 1u);
        for (;;) {
            const u32 prev = atomicCAS(&table[s], 0u, key);
            if (prev == 0u) break;
            if (prev == key) {
                dup = 1;
                break;
            }
            s = (s + 1u) & (nslots - 1u);
        }
    }
    if (!__syncthreads_or(dup)) {          /* distinct ids: one observation per sample, no sort */
        for (u32 j = tid; j < nb; j += nt) {
            const i64 id = GP_ID(j);
            GpAcc a;
            acc_init(a);
            acc_add(a, x[j], f_to_d(mean[id]));
            merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
        }
        return;
    }

    u32 P = 1;
    while (P < nb) P <<= 1;
    for (u32 j = tid; j < P; j += nt)
        keys[j] = j < nb ? (((u64)GP_ID(j) << 32) | (u64)j) : ~0ull;
    __syncthreads();
    for (u32 size = 2; size <= P; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 t = tid; t < P / 2; t += nt) bitonic_step(keys, size, stride, t);
            __syncthreads();
        }
    }
    for (u32 t = tid; t < nb; t += nt) {
        const u32 id = (u32)(keys[t] >> 32);
        if (t > 0 && (u32)(keys[t - 1] >> 32) == id) continue;   /* not the first of its id */
        const double m64 = f_to_d(mean[id]);
        GpAcc a;
        acc_init(a);
        for (u32 u = t; u < nb && (u32)(keys[u] >> 32) == id; ++u)
            acc_add(a, x[(u32)(keys[u] & 0xFFFFFFFFull)], m64);
        merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
    }
#undef GP_ID
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
    const double m64 = f_to_d(mean[id]);
    GpAcc a;
    acc_init(a);
    for (i64 u = t; u < B && sidx[u] == id; ++u) acc_add(a, x[perm[u]], m64);
    merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
}

/* One radix pass over the digit key[shift, shift + width) of the keys matching the current prefix:
 * shared-memory histogram (one increment per warp when the warp's keys share a bucket, as ties do),
 * flushed to the global one; the last block to finish picks the bucket holding the need-th largest key
 * and resets the histogram. A pass exits at once when the selection is already done; the keys are
 * unique, so after the six digits (64 bits) the set is always determined.
 * first != 0 starts a selection of k keys (no prefix yet; the control block's old state is ignored).
 * score != 0 (first pass of a score selection) also converts the scores into the key words `hi`, so
 * the scores are read once. Launch: any grid (grid-stride), block GP_SEL_THREADS. */
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
    /* Read before any barrier: the last block's owning thread rewrites them at the end of the pass. */
    const u64 P = first ? 0ull : ctl->prefix;
    const u32 need = first ? (u32)k : ctl->need;
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
    const u32 incl = part[tid], excl = incl - s;
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

/* Ordered compaction in one pass: out[j] = the j-th selected id ({ i : key(i) >= thresh }) in index
 * order, for j < k. Each block takes the next tile of GP_TILE ids (dynamic tile ids: a tile's
 * predecessors were all taken by blocks already running, so waiting for them always ends), counts its
 * selected ids, publishes the count, and finds its output offset by decoupled look-back (warp 0 reads
 * the states of the 32 preceding tiles at a time, back to the first tile that published a prefix).
 * Writes past k are dropped (a bound guard; with a correct threshold there are exactly k) and the
 * total is left in ctl->total. The last block to finish clears the tile states for the next call.
 * Launch: grid ceil(n / GP_TILE), block GP_SEL_THREADS; `status` has >= grid entries, all zero. */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_compact(const unsigned int* hi, long long mode, long long n, long long s1lo, long long s1hi,
           GpSelectCtl* ctl, unsigned long long* status, int* out, long long k) {
    __shared__ u32 ballots[GP_TILE_ITEMS][GP_SEL_THREADS / 32];
    __shared__ u32 round_start[GP_TILE_ITEMS];
    __shared__ u32 s_tile, s_total, s_base;
    __shared__ int s_last;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 nwarps = GP_SEL_THREADS / 32;
    if (tid == 0) s_tile = atomicAdd(&ctl->tiles, 1u);
    __syncthreads();
    const u32 tile = s_tile;
    const GpKeys keys = make_keys(hi, mode, s1lo, s1hi);
    const u64 T = ctl->thresh;
    const i64 start = (i64)tile * GP_TILE;

    u32 mine = 0;                               /* bit r: this thread's item of round r is selected */
    for (u32 r = 0; r < GP_TILE_ITEMS; ++r) {
        const i64 i = start + (i64)r * GP_SEL_THREADS + tid;
        const bool sel = i < n && is_selected(keys, i, T);
        const u32 ballot = __ballot_sync(0xFFFFFFFFu, sel);
        if (lane == 0) ballots[r][warp] = ballot;
        mine |= (sel ? 1u : 0u) << r;
    }
    __syncthreads();
    if (tid == 0) {                             /* offsets of the rounds within the tile */
        u32 run = 0;
        for (u32 r = 0; r < GP_TILE_ITEMS; ++r) {
            round_start[r] = run;
            for (u32 w = 0; w < nwarps; ++w) run += (u32)__popc(ballots[r][w]);
        }
        s_total = run;
    }
    __syncthreads();

    if (warp == 0) {                            /* decoupled look-back */
        const u32 aggregate = s_total;
        u64 before = 0;
        if (tile > 0) {
            if (lane == 0) atomicExch(&status[tile], (GP_TILE_AGGREGATE << 32) | aggregate);
            for (i64 p = (i64)tile - 1 - lane;; p -= 32) {
                /* lane l looks at tile p = (window end) - l; tiles before 0 count as a prefix of 0 */
                u64 st = p >= 0 ? atomicAdd(&status[p], 0ull) : (GP_TILE_PREFIX << 32);
                while (!__all_sync(0xFFFFFFFFu, (st >> 32) != 0ull)) {
                    if ((st >> 32) == 0ull) st = atomicAdd(&status[p], 0ull);
                    __nanosleep(32);
                }
                const u32 prefixed = __ballot_sync(0xFFFFFFFFu, (st >> 32) == GP_TILE_PREFIX);
                const u32 last = prefixed ? (u32)(__ffs(prefixed) - 1) : 31u;   /* nearest prefix */
                u64 v = lane <= last ? (st & 0xFFFFFFFFull) : 0ull;
                for (u32 off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
                before += v;
                if (prefixed) break;
            }
        }
        if (lane == 0) {
            atomicExch(&status[tile], (GP_TILE_PREFIX << 32) | (before + aggregate));
            s_base = (u32)before;
        }
    }
    __syncthreads();

    const u64 base = s_base;
    for (u32 r = 0; r < GP_TILE_ITEMS; ++r) {
        if (!((mine >> r) & 1u)) continue;
        u32 pos = round_start[r] + (u32)__popc(ballots[r][warp] & ((1u << lane) - 1u));
        for (u32 w = 0; w < warp; ++w) pos += (u32)__popc(ballots[r][w]);
        const u64 j = base + pos;
        if (j < (u64)k) out[j] = (int)(start + (i64)r * GP_SEL_THREADS + tid);   /* bound guard */
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = (atomicAdd(&ctl->tiles_done, 1u) == gridDim.x - 1u);
    __syncthreads();
    if (!s_last) return;
    /* Last block: every tile has published its prefix and finished its look-back. */
    __threadfence();
    if (tid == 0) {
        ctl->total = (u32)(atomicAdd(&status[gridDim.x - 1u], 0ull) & 0xFFFFFFFFull);
        ctl->tiles = 0u;
        ctl->tiles_done = 0u;
    }
    __syncthreads();                            /* the total is read before the states are cleared */
    for (u32 t = tid; t < gridDim.x; t += GP_SEL_THREADS) status[t] = 0ull;
}

/* out[j] = hash32(ids[j], seed): the shuffle key of gpuprune.backend. Launch: any grid, any block. */
extern "C" __global__ void gp_hash_index(const long long* ids, long long k, long long slo, long long shi,
                                         long long* out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < k; j += stride)
        out[j] = (i64)hash32((u32)ids[j], (u32)slo, (u32)shi);
}
