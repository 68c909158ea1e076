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
 * What must match the torch reference (gpuprune/keys.py, gpuprune/update.py, gpuprune/backend.py)
 * bit for bit is written with explicit round-to-nearest operations that the compiler never contracts
 * into FMAs, so the results do not depend on -fmad. Each torch operation rounds once; so does each
 * operation here, in the same order. The float <-> double conversions are inline PTX without .ftz:
 * CuPy appends -ftz=true to NVRTC's options, which would otherwise flush denormal losses, means and
 * variances. (Double-precision arithmetic has no flush-to-zero mode.)
 *
 * Kernels (arguments are pointers, `long long`, `unsigned long long` or `double`, so that CuPy can pass
 * Python ints and floats unchanged; gpuprune/kernels/_spec.py lists them and a test compares):
 *   gp_observe_small   fused statistics update of a batch of <= GP_OBS_SMALL_MAX losses: one launch
 *   gp_observe_sorted  the same for any batch, after torch.sort(ids, stable=True)
 *   gp_plan            an epoch's whole plan in one cooperative launch: the policy's score, an
 *                      exact-k radix selection over unique 64-bit keys (epsilon-greedy: two), the
 *                      keyed shuffle, the selected counts, the overlap with the previous plan
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
#define GP_SEL_THREADS 256          /* block size of gp_plan (the bucket scan assumes it) */
#define GP_MAX_BINS 2048            /* 2^11 buckets: the widest radix digit */
#define GP_MAX_GRID 1024            /* most blocks of a gp_plan launch (per-block slots in GpPlanCtl) */
#define GP_SUM_TILE 2048            /* leaves per shared-memory tile of the fixed-order sum */
#define GP_OBS_THREADS 256          /* block size of gp_observe_sorted */
#define GP_OBS_SMALL_MAX 4096       /* largest batch of gp_observe_small (its shared-memory table/sort) */
#define GP_OBS_SMALL_THREADS 1024   /* block size of gp_observe_small */
#define GP_OBS_TABLE 8192           /* most slots of gp_observe_small's duplicate table (u32, 2x the batch) */

/* How gp_plan scores a sample (gpuprune.keys' Score classes); the key is orderable(score) << 32 | hash. */
#define GP_SCORE_HASH 0             /* no score: key = hash32(i, seed) */
#define GP_SCORE_MEAN 1             /* MeanScore: the mean, unseen +inf */
#define GP_SCORE_UCB_STD 2          /* UCBScore(uncertainty="std"): p0 = c, p1 = drift, p2 = epoch */
#define GP_SCORE_UCB_VAR 3          /* UCBScore(uncertainty="var") */
#define GP_SCORE_BELOW_MEAN 4       /* BelowMeanScore: 0 below the mean of the seen means, else 1 */
#define GP_SCORE_GIVEN 5            /* GivenScore: the `given` array */

/* What gp_plan does (flags). */
#define GP_PLAN_FULL 1              /* every sample (no selection) */
#define GP_PLAN_IDS 2               /* the given ids (no selection) */
#define GP_PLAN_SHUFFLE 4           /* write the keyed order (else index order) */
#define GP_PLAN_COUNT 8             /* sel_out = sel_in + planned */
#define GP_PLAN_PREV 16             /* overlap with the previous plan (its ids, or PREV_FULL) */
#define GP_PLAN_PREV_FULL 32        /* the previous plan held every sample */
#define GP_PLAN_BELOW 64            /* InfoBatch: k from the rank-0 count (p0 = kept share), rescaled bits */

/* The shuffle's odd multipliers (gpuprune.keys.PERM_MULTIPLIERS) and the drift histogram's shift. */
#define GP_PERM_M0 0x9E3779B1u
#define GP_PERM_M1 0x85EBCA77u
#define GP_PERM_M2 0xC2B2AE3Du
#define GP_PERM_M3 0x27D4EB2Fu
#define GP_DRIFT_SHIFT 20           /* bucket of a variance: its top 11 bits below the sign */

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

GP_HD double d_sqrt(double a) {
#ifdef __CUDA_ARCH__
    return __dsqrt_rn(a);
#else
    return __builtin_sqrt(a);
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

/* ------------------------------------------------------------------------------------------------ */
/* Bit casts and memory ordering                                                                    */
/* ------------------------------------------------------------------------------------------------ */

GP_HD u64 d_bits(double x) {
#ifdef __CUDA_ARCH__
    return (u64)__double_as_longlong(x);
#else
    u64 u;
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

GP_HD double bits_d(u64 u) {
#ifdef __CUDA_ARCH__
    return __longlong_as_double((long long)u);
#else
    double x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* The plan's state in device memory                                                                */
/* ------------------------------------------------------------------------------------------------ */

/* One plan's control block (ops.py allocates CTL_BYTES per stream, zeroed once). Invariant of a
 * selection while !done: the keys whose top `bits` bits equal `prefix` hold the `need` (>= 1) keys
 * still to choose, and every key with a larger top part is chosen. When done, the chosen set is
 * { key >= thresh }. gp_plan leaves hist, bar_count, inter, nseen and nbelow at zero after every
 * launch, so the block is reused without a reset launch (and replays in a CUDA graph). Blocks read
 * what another block wrote only through atomics or volatile loads, after a grid barrier. */
struct GpPlanCtl {
    u64 prefix;
    u64 thresh;
    u64 thresh1;                /* the first selection's threshold (epsilon-greedy) */
    u64 inter;                  /* planned ids that the previous plan holds too */
    u64 scale;                  /* UCB's drift scale (double bits) */
    u64 mu;                     /* InfoBatch's mean of the seen means (double bits) */
    u32 bits;
    u32 need;
    u32 done;
    u32 k;                      /* the first selection's budget (InfoBatch: computed by pass 1) */
    u32 nseen;
    u32 nbelow;
    u32 total;                  /* ids planned by the last launch (== k unless something is wrong) */
    u32 bar_count;              /* grid barrier: blocks arrived */
    u32 bar_gen;                /* grid barrier: generation */
    u32 pad[3];
    u32 counts[GP_MAX_GRID];    /* per-block counts of the compaction */
    u64 partials[GP_MAX_GRID];  /* per-unit fixed-order sums of InfoBatch's mean (double bits) */
    u32 hist[GP_MAX_BINS];      /* global histogram of the current pass; zero between passes */
};
static_assert(sizeof(GpPlanCtl) == 96 + 12 * GP_MAX_GRID + 4 * GP_MAX_BINS, "GpPlanCtl layout (ops.py CTL_BYTES)");
static_assert(GP_MAX_BINS % GP_SEL_THREADS == 0 && (GP_MAX_BINS / 2) % GP_SEL_THREADS == 0, "bucket scan");
static_assert(GP_SEL_THREADS % 32 == 0 && GP_SUM_TILE == GP_MAX_BINS, "tiles");
static_assert(GP_OBS_TABLE == 2 * GP_OBS_SMALL_MAX, "the table shares gp_observe_small's sort buffer");

/* The shared memory of gp_plan (one per block). */
struct GpShared {
    u32 hist[GP_MAX_BINS];      /* this block's histogram of a pass */
    double sum[GP_SUM_TILE];    /* fixed-order sums (InfoBatch's mean, UCB's drift scale) */
    double stack[32];           /* partial sums of whole subtrees, one per level */
    u32 part[GP_SEL_THREADS];   /* the bucket scan */
    u32 warps[GP_SEL_THREADS / 32];
    u32 ncand;                  /* this block's candidate list length */
    u32 cap;                    /* the drift scale's cap bucket */
    u32 gen;                    /* grid barrier generation seen on arrival */
    int last;                   /* this block arrived last */
};

/* ---- grid barrier (every block of the launch is resident: a cooperative launch, grid <= the
 * blocks that fit; in the harness, grid <= slots). The last block to arrive can work before the
 * others go on: grid_arrive() returns true there, and grid_release() lets everyone continue. ---- */
GP_HD int grid_arrive(GpPlanCtl* ctl, GpShared& s) {
    __syncthreads();
    if (threadIdx.x == 0) {
        s.gen = atomicAdd(&ctl->bar_gen, 0u);              /* read before arriving */
        __threadfence();                                   /* this block's writes before the arrival */
        s.last = atomicAdd(&ctl->bar_count, 1u) == gridDim.x - 1u;
        if (s.last) __threadfence();                       /* everyone's writes before the work */
    }
    __syncthreads();
    return s.last;
}

GP_HD void grid_release(GpPlanCtl* ctl, GpShared& s) {
    __syncthreads();                                       /* the last block's work is done */
    if (threadIdx.x == 0) {
        if (s.last) {
            atomicExch(&ctl->bar_count, 0u);
            __threadfence();
            atomicAdd(&ctl->bar_gen, 1u);
        } else {
            while (atomicAdd(&ctl->bar_gen, 0u) == s.gen) __nanosleep(100);
            __threadfence();
        }
    }
    __syncthreads();
}

/* Exclusive rank of this thread's flag in the block, and the block's count in *total. */
GP_HD u32 block_rank(bool flag, GpShared& s, u32* total) {
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 ballot = __ballot_sync(0xFFFFFFFFu, flag);
    if (lane == 0) s.warps[warp] = (u32)__popc(ballot);
    __syncthreads();
    u32 before = 0, all = 0;
    for (u32 w = 0; w < GP_SEL_THREADS / 32; ++w) {
        const u32 c = s.warps[w];
        before += w < warp ? c : 0u;
        all += c;
    }
    __syncthreads();                                       /* s.warps is reused next round */
    *total = all;
    return before + (u32)__popc(ballot & ((1u << lane) - 1u));
}

/* Add 1 to bucket `digit` for every valid lane: one increment per warp when the warp's valid keys
 * share a bucket (ties put a whole warp in one bucket), else one each. */
GP_HD void hist_add(u32* hist, bool valid, u32 digit) {
    const u32 lane = threadIdx.x & 31u;
    const u32 active = __ballot_sync(0xFFFFFFFFu, valid);
    if (!active) return;                                   /* warp-uniform */
    const u32 src = (u32)(__ffs(active) - 1);
    const u32 d0 = __shfl_sync(0xFFFFFFFFu, digit, src);
    if (__all_sync(0xFFFFFFFFu, !valid || digit == d0)) {
        if (lane == src) atomicAdd(&hist[d0], (u32)__popc(active));
    } else if (valid) {
        atomicAdd(&hist[digit], 1u);
    }
}

/* Sum of s.sum[0, len) (len a power of two) as a pairwise tree of neighbours, the order of
 * gpuprune.stats.tree_sum; the result is in s.sum[0]. */
GP_HD double tree_sum_shared(GpShared& s, u32 len) {
    __syncthreads();
    for (u32 step = 1; step < len; step <<= 1) {
        for (u32 i = threadIdx.x * 2u * step; i < len; i += GP_SEL_THREADS * 2u * step)
            s.sum[i] = d_add(s.sum[i], s.sum[i + step]);
        __syncthreads();
    }
    const double r = s.sum[0];
    __syncthreads();
    return r;
}

/* Record the bucket b chosen in a pass; rem of the cnt_b keys in it are still needed. */
GP_HD void ctl_apply(GpPlanCtl* ctl, u64 P, u32 pbits, u32 width, u32 b, u32 rem, u32 cnt_b) {
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

/* Last block of a pass: take the global histogram (leaving it zero), find the bucket that holds the
 * need-th largest key (scanning from the highest) and record it. `need` is this pass's, read before
 * the pass: ctl->need is rewritten here by the one thread that owns the chosen bucket. */
GP_HD void pick_bucket(GpPlanCtl* ctl, GpShared& s, u32 nbins, u64 P, u32 pbits, u32 width, u32 need) {
    const u32 tid = threadIdx.x;
    volatile u32* gh = ctl->hist;
    for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) {
        s.hist[b] = gh[b];
        gh[b] = 0u;
    }
    __syncthreads();
    if (need == 0u) {                                      /* nothing to choose (block-uniform) */
        if (tid == 0) {
            ctl->done = 1u;
            ctl->thresh = ~0ull;                           /* no key reaches it */
        }
        return;
    }
    /* Thread t owns the `per` buckets just below nbins - per * t: thread 0 the highest. */
    const u32 per = nbins / GP_SEL_THREADS;
    const u32 top = nbins - per * tid;
    u32 c = 0;
    for (u32 j = 1; j <= per; ++j) c += s.hist[top - j];
    s.part[tid] = c;
    __syncthreads();
    for (u32 off = 1; off < GP_SEL_THREADS; off <<= 1) {     /* inclusive scan, highest buckets first */
        const u32 v = tid >= off ? s.part[tid - off] : 0u;
        __syncthreads();
        s.part[tid] += v;
        __syncthreads();
    }
    const u32 incl = s.part[tid], excl = incl - c;
    if (excl < need && need <= incl) {                       /* exactly one thread */
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

/* ------------------------------------------------------------------------------------------------ */
/* Scores (gpuprune/keys.py: MeanScore, UCBScore, BelowMeanScore, GivenScore)                       */
/* ------------------------------------------------------------------------------------------------ */

/* Everything gp_plan reads, one struct per launch. */
struct GpPlan {
    const float* mean;
    const float* var;
    const int* last;
    const float* given;
    u32* hi;                    /* key words: orderable(score), written by the first pass */
    u32* cand;                  /* candidate ids; block b's list starts at its first sample */
    i64 n;
    int mode;
    u32 s1lo, s1hi, s2lo, s2hi; /* hash seeds of the selection and of the exploration */
    double p0, p1, p2;          /* score settings (UCB: c, drift, epoch; InfoBatch: kept share) */
    double step;                /* UCB: drift * scale */
    double mu;                  /* InfoBatch: the mean of the seen means */
};

/* UCB's float64 score, rounded once (keys.upper_bound_score). */
GP_HD float ucb_score(const GpPlan& a, i64 i) {
    double g = f_to_d(a.var[i]);
    if (g < 0.0) g = 0.0;
    if (a.p1 > 0.0) {
        double age = (double)((i64)a.p2 - (i64)a.last[i]);
        if (age < 0.0) age = 0.0;
        g = d_add(g, d_mul(a.step, age));
    }
    if (g > GP_F32_MAX) g = GP_F32_MAX;
    const double spread = a.mode == GP_SCORE_UCB_STD ? d_sqrt(g) : g;
    double sc = d_add(f_to_d(a.mean[i]), d_mul(a.p0, spread));
    if (sc > GP_F32_MAX) sc = GP_F32_MAX;
    if (sc < -GP_F32_MAX) sc = -GP_F32_MAX;
    return d_to_f(sc);
}

GP_HD u32 score_word(const GpPlan& a, i64 i) {
    if (a.mode == GP_SCORE_GIVEN) return orderable_u32(a.given[i]);   /* no statistics given */
    const bool seen = a.last[i] >= 0;
    switch (a.mode) {
        case GP_SCORE_MEAN:
            return seen ? orderable_u32(a.mean[i]) : orderable_u32(f_from_bits(GP_F32_INF));
        case GP_SCORE_BELOW_MEAN:
            return orderable_u32(seen && f_to_d(a.mean[i]) < a.mu ? 0.0f : 1.0f);
        default:                                           /* GP_SCORE_UCB_STD, GP_SCORE_UCB_VAR */
            return seen ? orderable_u32(ucb_score(a, i)) : orderable_u32(f_from_bits(GP_F32_INF));
    }
}

#define GP_WORD_ZERO 0x80000000u    /* orderable_u32(0.0f): InfoBatch's rank 0 (below the mean) */

GP_HD u64 key_a(const GpPlan& a, i64 i) {
    const u64 h = (u64)hash32((u32)i, a.s1lo, a.s1hi);
    return a.mode == GP_SCORE_HASH ? h : (((u64)a.hi[i] << 32) | h);
}

GP_HD u64 key_b(const GpPlan& a, i64 i) { return (u64)hash32((u32)i, a.s2lo, a.s2hi); }

/* The six radix digits of a 64-bit key, most significant first (shift, width): 0-2 cover the score
 * word, 3-5 the hash word (where a hash-only selection starts). gpuprune/kernels/_spec.py PASSES. */
GP_HD u32 pass_shift(u32 p) { return p == 0 ? 53u : p == 1 ? 42u : p == 2 ? 32u : p == 3 ? 21u : p == 4 ? 10u : 0u; }
GP_HD u32 pass_width(u32 p) { return (p == 2 || p == 5) ? 10u : 11u; }

/* One exact-k selection over this block's samples [lo, hi): radix digits, most significant first.
 * Each pass histograms its digit over the block's candidates and the last block to finish picks the
 * bucket; from the second pass on, the candidates that still match the prefix are kept in a
 * per-block list (cand[lo...]), filtered in place while the next digit is counted (AIR top-k's
 * filter with the next histogram fused), so later passes read only those. which = 0: the score
 * selection (the first pass computes the score words), 1: the exploration (hash only, among the keys
 * below thresh1). Returns the threshold: the selection is { key >= thresh }. */
GP_HD u64 run_select(const GpPlan& a, GpPlanCtl* ctl, GpShared& s, i64 lo, i64 hi, int which, u32 k,
                     bool below, u64 thresh1) {
    volatile GpPlanCtl* vc = ctl;
    const u32 tid = threadIdx.x;
    const bool score_pass = which == 0 && a.mode != GP_SCORE_HASH;
    const u32 first = score_pass ? 0u : 3u;
    for (u32 p = first; p < 6u; ++p) {
        if (p > first && vc->done) break;                  /* read after a barrier: grid-uniform */
        const u64 P = p == first ? 0ull : vc->prefix;
        const u32 need = p == first ? k : vc->need;
        const u32 sh = pass_shift(p), wd = pass_width(p), nbins = 1u << wd;
        const u32 pbits = 64u - sh - wd;
        const bool from_list = p >= first + 2u, to_list = p >= first + 1u;
        const bool count_below = below && p == first;
        const u32 len = from_list ? s.ncand : (u32)(hi - lo);
        for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) s.hist[b] = 0u;
        __syncthreads();
        u32 kept = 0, nbelow = 0;
        for (u32 base = 0; base < len; base += GP_SEL_THREADS) {   /* the same trip count in every thread */
            const u32 j = base + tid;
            bool valid = j < len, is_below = false;
            u32 digit = 0;
            i64 i = 0;
            if (valid) {
                i = from_list ? (i64)a.cand[lo + j] : lo + (i64)j;
                u64 key;
                if (which == 0) {
                    if (score_pass && p == first) {
                        const u32 w = score_word(a, i);
                        a.hi[i] = w;
                        is_below = w == GP_WORD_ZERO;
                        key = ((u64)w << 32) | (u64)hash32((u32)i, a.s1lo, a.s1hi);
                    } else {
                        key = key_a(a, i);
                    }
                } else {
                    if (!from_list && key_a(a, i) >= thresh1) valid = false;   /* taken already */
                    key = key_b(a, i);
                }
                valid = valid && prefix_match(key, P, pbits);
                digit = (u32)(key >> sh) & (nbins - 1u);
            }
            if (count_below) nbelow += (u32)__syncthreads_count(is_below);
            hist_add(s.hist, valid, digit);
            if (to_list) {
                u32 round;
                const u32 r = block_rank(valid, s, &round);
                if (valid) a.cand[lo + kept + r] = (u32)i;   /* in place: never past what was read */
                kept += round;
            }
        }
        __syncthreads();
        for (u32 b = tid; b < nbins; b += GP_SEL_THREADS) {
            const u32 c = s.hist[b];
            if (c) atomicAdd(&ctl->hist[b], c);
        }
        if (tid == 0) {
            if (to_list) s.ncand = kept;
            if (count_below && nbelow) atomicAdd(&ctl->nbelow, nbelow);
        }
        u32 need_now = need;
        if (grid_arrive(ctl, s)) {
            if (count_below) {                             /* InfoBatch: k from the rank-0 count */
                const u32 nb = vc->nbelow;
                need_now = (u32)a.n - nb + (u32)(u64)d_mul(a.p0, (double)nb);
                if (tid == 0) ctl->k = need_now;
            }
            pick_bucket(ctl, s, nbins, P, pbits, wd, need_now);
        }
        grid_release(ctl, s);
    }
    return vc->thresh;
}

/* ------------------------------------------------------------------------------------------------ */
/* Fixed-order sums (gpuprune.stats.tree_sum) and UCB's drift scale (keys.drift_scale)              */
/* ------------------------------------------------------------------------------------------------ */

/* Sum of the leaves [start, start + len) (len a power of two) in the pairwise order of tree_sum:
 * tiles of GP_SUM_TILE leaves summed in shared memory, whole tiles combined on a stack (by thread 0)
 * as the levels of the same tree. Leaf i: the mean of a seen sample i < n, else 0. */
GP_HD double subtree_sum(const GpPlan& a, GpShared& s, i64 start, i64 len, u32* seen) {
    const u32 tid = threadIdx.x;
    const u32 tile = len < GP_SUM_TILE ? (u32)len : (u32)GP_SUM_TILE;
    u32 depth = 0, nseen = 0;
    for (i64 t = 0; t * tile < len; ++t) {
        for (u32 j0 = 0; j0 < tile; j0 += GP_SEL_THREADS) {      /* the same trip count everywhere */
            const u32 j = j0 + tid;
            const i64 i = start + t * tile + j;
            const bool use = j < tile && i < a.n && a.last[i] >= 0;
            if (j < tile) s.sum[j] = use ? f_to_d(a.mean[i]) : 0.0;
            nseen += (u32)__syncthreads_count(use);
        }
        double v = tree_sum_shared(s, tile);
        if (tid == 0) {                                    /* tile t closes a subtree per trailing 1 bit */
            for (i64 q = t; q & 1; q >>= 1) v = d_add(s.stack[--depth], v);
            s.stack[depth++] = v;
        }
    }
    __syncthreads();
    const double r = s.stack[0];
    *seen = nseen;
    __syncthreads();
    return r;
}

/* The last block: UCB's drift scale from the global histogram of the seen variances' buckets. */
GP_HD double drift_scale_last(GpPlanCtl* ctl, GpShared& s) {
    const u32 tid = threadIdx.x, per = GP_MAX_BINS / GP_SEL_THREADS;
    volatile u32* gh = ctl->hist;
    u32 mine = 0;
    for (u32 j = 0; j < per; ++j) {                        /* thread t owns buckets [per t, per t + per) */
        const u32 b = tid * per + j;
        s.hist[b] = gh[b];
        gh[b] = 0u;
        mine += s.hist[b];
    }
    s.part[tid] = mine;
    __syncthreads();
    for (u32 off = 1; off < GP_SEL_THREADS; off <<= 1) {  /* inclusive scan from the lowest bucket */
        const u32 v = tid >= off ? s.part[tid - off] : 0u;
        __syncthreads();
        s.part[tid] += v;
        __syncthreads();
    }
    const u64 m = s.part[GP_SEL_THREADS - 1];
    const u64 rank = (9ull * m + 9ull) / 10ull;            /* ceil(0.9 m) */
    if (tid == 0) s.cap = 0u;
    __syncthreads();
    u32 acc = s.part[tid] - mine;                          /* the cap: first bucket with count >= rank */
    for (u32 j = 0; j < per; ++j) {
        const u32 b = tid * per + j;
        const u32 before = acc;
        acc += s.hist[b];
        if (before < rank && (u64)acc >= rank) s.cap = b;     /* exactly one bucket (if m > 0) */
    }
    __syncthreads();
    const u32 cap = s.cap;
    const double cap_edge = f_to_d(f_from_bits(cap << GP_DRIFT_SHIFT));
    for (u32 j = 0; j < per; ++j) {
        const u32 b = tid * per + j;
        const double edge = b < cap ? f_to_d(f_from_bits(b << GP_DRIFT_SHIFT)) : cap_edge;
        s.sum[b] = d_mul((double)s.hist[b], edge);
    }
    const double total = tree_sum_shared(s, GP_MAX_BINS);
    return d_div(total, (double)(m > 0 ? m : 1));
}

/* ------------------------------------------------------------------------------------------------ */
/* The shuffle (keys.permute_ranks)                                                                 */
/* ------------------------------------------------------------------------------------------------ */

struct GpPerm {
    u32 k, mask, shift;
    u32 key[4];
};

GP_HD GpPerm make_perm(u32 k, u32 slo, u32 shi) {
    GpPerm p;
    const u32 bits = k <= 1u ? 0u : 32u - (u32)__clz((int)(k - 1u));
    p.k = k;
    p.mask = bits >= 32u ? 0xFFFFFFFFu : (1u << bits) - 1u;
    p.shift = (bits + 1u) / 2u;
    for (u32 r = 0; r < 4u; ++r) p.key[r] = hash32(r, slo, shi) & p.mask;
    return p;
}

GP_HD u32 perm_rounds(const GpPerm& p, u32 x) {
    const u32 mult[4] = {GP_PERM_M0, GP_PERM_M1, GP_PERM_M2, GP_PERM_M3};
    for (u32 r = 0; r < 4u; ++r) {
        x = ((x ^ p.key[r]) * mult[r]) & p.mask;
        x ^= x >> p.shift;
    }
    return x;
}

/* The position of rank r: the rounds, repeated until the value falls below k (cycle walking). */
GP_HD u32 permute(const GpPerm& p, u32 r) {
    if (p.k <= 1u) return r;
    u32 x = perm_rounds(p, r);
    while (x >= p.k) x = perm_rounds(p, x);
    return x;
}

/* ================================================================================================ */
/* The plan                                                                                         */
/* ================================================================================================ */

/* An epoch's whole plan in one launch (gpuprune/kernels/ops.py KernelOps.plan; the torch reference
 * is gpuprune/backend.py TorchBackend._plan). Block b owns the samples [lo, hi) of a contiguous
 * chunk (a multiple of GP_SEL_THREADS); blocks meet at grid barriers, so the launch must be
 * cooperative (every block resident). Phases, each ended by a barrier:
 *   0. (if needed) the given ids and the previous plan's ids set bits in `marks` (two bitmaps of
 *      ceil(n / 32) words: selection, previous plan); UCB with drift: histogram of the seen
 *      variances' buckets, and the last block computes the drift scale; InfoBatch: fixed-order
 *      sums of the seen means over power-of-two units, combined by the last block into their mean;
 *   1. the selection (run_select): the first pass computes each sample's score word; epsilon-greedy
 *      runs a second, hash-only selection among the others;
 *   2. compaction: every block counts its planned samples; the last block totals them;
 *   3. every block writes its planned ids at their ranks (base = the counts of the blocks before):
 *      out[permute(rank)] = id with GP_PLAN_SHUFFLE, else out[rank] = id (index order); sel_out for
 *      its samples; the bits of the previous plan (read and cleared) for the overlap; InfoBatch's
 *      rescaled bits (32-bit words of the packed mask). The last block writes the overlap and
 *      leaves the control block clean.
 * k is the selection's budget, and in every mode the capacity of `out`: a position past it is never
 * written (a bound guard; ctl->total then shows the overflow).
 * Launch: grid <= min(GP_MAX_GRID, resident blocks), block GP_SEL_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_SEL_THREADS)
gp_plan(const float* mean, const float* var, const int* last, const float* given, const int* ids,
        long long nids, const int* prev, long long prev_size, const int* sel_in, int* sel_out,
        int* out, unsigned int* rescaled, double* overlap, unsigned int* hi, unsigned int* cand,
        unsigned int* marks, GpPlanCtl* ctl, long long n, long long k, long long mode,
        long long flags, long long s1lo, long long s1hi, long long explore, long long s2lo,
        long long s2hi, long long plo, long long phi, double p0, double p1, double p2) {
    __shared__ GpShared s;
    volatile GpPlanCtl* vc = ctl;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 G = gridDim.x;
    const i64 chunk = ((n + G - 1) / G + GP_SEL_THREADS - 1) / GP_SEL_THREADS * GP_SEL_THREADS;
    const i64 lo = (i64)blockIdx.x * chunk < n ? (i64)blockIdx.x * chunk : n;
    const i64 hi_ = lo + chunk < n ? lo + chunk : n;
    const i64 nwords = (n + 31) / 32;
    const bool full = flags & GP_PLAN_FULL, by_ids = flags & GP_PLAN_IDS;
    const bool below = flags & GP_PLAN_BELOW, has_prev = flags & GP_PLAN_PREV;
    const bool prev_full = flags & GP_PLAN_PREV_FULL;
    unsigned int* sel_marks = marks;
    unsigned int* prev_marks = marks + nwords;

    GpPlan a;
    a.mean = mean; a.var = var; a.last = last; a.given = given; a.hi = hi; a.cand = cand;
    a.n = n; a.mode = (int)mode;
    a.s1lo = (u32)s1lo; a.s1hi = (u32)s1hi; a.s2lo = (u32)s2lo; a.s2hi = (u32)s2hi;
    a.p0 = p0; a.p1 = p1; a.p2 = p2; a.step = 0.0; a.mu = 0.0;
    const bool select = !full && !by_ids;
    const bool drift = select && (a.mode == GP_SCORE_UCB_STD || a.mode == GP_SCORE_UCB_VAR) && p1 > 0.0;
    const bool mean_of_seen = select && a.mode == GP_SCORE_BELOW_MEAN;

    /* ---- 0. marks, UCB's drift scale, InfoBatch's mean ---- */
    if (by_ids || drift || mean_of_seen || (has_prev && !prev_full)) {
        const i64 stride = (i64)G * GP_SEL_THREADS;
        for (i64 t = (i64)blockIdx.x * GP_SEL_THREADS + tid; t < nids; t += stride) {
            const i64 id = ids[t];
            if (id >= 0 && id < n) atomicOr(&sel_marks[id >> 5], 1u << (id & 31));
        }
        if (has_prev && !prev_full)
            for (i64 t = (i64)blockIdx.x * GP_SEL_THREADS + tid; t < prev_size; t += stride) {
                const i64 id = prev[t];
                if (id >= 0 && id < n) atomicOr(&prev_marks[id >> 5], 1u << (id & 31));
            }
        if (drift) {
            for (u32 b = tid; b < GP_MAX_BINS; b += GP_SEL_THREADS) s.hist[b] = 0u;
            __syncthreads();
            for (i64 base = lo; base < hi_; base += GP_SEL_THREADS) {
                const i64 i = base + tid;
                const bool use = i < hi_ && last[i] >= 0;
                hist_add(s.hist, use, use ? (f_bits(var[i]) & 0x7FFFFFFFu) >> GP_DRIFT_SHIFT : 0u);
            }
            __syncthreads();
            for (u32 b = tid; b < GP_MAX_BINS; b += GP_SEL_THREADS) {
                const u32 c = s.hist[b];
                if (c) atomicAdd(&ctl->hist[b], c);
            }
        }
        i64 span = 1, unit = 1;
        if (mean_of_seen) {                  /* units: aligned power-of-two subtrees of tree_sum */
            while (span < n) span <<= 1;
            unit = span < GP_SUM_TILE ? span : GP_SUM_TILE;
            while (unit * G < span) unit <<= 1;
            for (i64 u = blockIdx.x; u * unit < span; u += G) {
                u32 seen_here;
                const double v = subtree_sum(a, s, u * unit, unit, &seen_here);
                if (tid == 0) {
                    ctl->partials[u] = d_bits(v);
                    if (seen_here) atomicAdd(&ctl->nseen, seen_here);
                }
            }
        }
        if (grid_arrive(ctl, s)) {
            if (drift) {
                const double scale = drift_scale_last(ctl, s);
                if (tid == 0) ctl->scale = d_bits(scale);
            }
            if (mean_of_seen) {
                const u32 units = (u32)(span / unit);
                for (u32 u = tid; u < units; u += GP_SEL_THREADS) s.sum[u] = bits_d(vc->partials[u]);
                const double total = tree_sum_shared(s, units);
                const u32 m = vc->nseen;
                if (tid == 0) ctl->mu = d_bits(d_div(total, (double)(m > 0 ? m : 1u)));
            }
        }
        grid_release(ctl, s);
        a.step = d_mul(p1, bits_d(vc->scale));
        a.mu = bits_d(vc->mu);
    }

    /* ---- 1. the selection ---- */
    u64 t1 = 0, t2 = ~0ull;
    if (select) {
        t1 = run_select(a, ctl, s, lo, hi_, 0, (u32)(k - explore), below, 0ull);
        if (explore > 0) t2 = run_select(a, ctl, s, lo, hi_, 1, (u32)explore, false, t1);
    }

    /* ---- 2. count ---- */
    u32 count = 0;
    for (i64 base = lo; base < hi_; base += GP_SEL_THREADS) {
        const i64 i = base + tid;
        const bool valid = i < hi_;
        u32 word = 0;
        if (by_ids) {                                      /* the warp's 32 ids share one word */
            const i64 w = (base >> 5) + warp;
            if (lane == 0 && w < nwords) word = atomicOr(&sel_marks[w], 0u);
            word = __shfl_sync(0xFFFFFFFFu, word, 0);
        }
        bool take = valid;
        if (valid && select) take = key_a(a, i) >= t1 || (explore > 0 && key_b(a, i) >= t2);
        if (valid && by_ids) take = (word >> lane) & 1u;
        count += (u32)__syncthreads_count(take);
    }
    if (tid == 0) atomicExch(&ctl->counts[blockIdx.x], count);
    if (grid_arrive(ctl, s)) {
        u32 mine = 0;
        for (u32 b = tid; b < G; b += GP_SEL_THREADS) mine += vc->counts[b];
        s.part[tid] = mine;
        __syncthreads();
        if (tid == 0) {
            u32 total = 0;
            for (u32 t = 0; t < GP_SEL_THREADS; ++t) total += s.part[t];
            ctl->total = total;
        }
    }
    grid_release(ctl, s);

    /* ---- 3. write ---- */
    const u32 total = vc->total;
    u32 mine = 0;
    for (u32 b = tid; b < blockIdx.x; b += GP_SEL_THREADS) mine += vc->counts[b];
    s.part[tid] = mine;
    __syncthreads();
    u32 rank = 0;
    for (u32 t = 0; t < GP_SEL_THREADS; ++t) rank += s.part[t];
    __syncthreads();
    const GpPerm perm = make_perm(total, (u32)plo, (u32)phi);
    const bool shuffle = flags & GP_PLAN_SHUFFLE, counted = flags & GP_PLAN_COUNT;
    u32 inter = 0;
    for (i64 base = lo; base < hi_; base += GP_SEL_THREADS) {
        const i64 i = base + tid;
        const bool valid = i < hi_;
        const i64 w = (base >> 5) + warp;
        u32 word = 0, pword = 0;
        if (lane == 0 && w < nwords) {                     /* read and clear: the bitmaps end zero */
            if (by_ids) word = atomicExch(&sel_marks[w], 0u);
            if (has_prev && !prev_full) pword = atomicExch(&prev_marks[w], 0u);
        }
        word = __shfl_sync(0xFFFFFFFFu, word, 0);
        pword = __shfl_sync(0xFFFFFFFFu, pword, 0);
        bool take = valid;
        if (valid && select) take = key_a(a, i) >= t1 || (explore > 0 && key_b(a, i) >= t2);
        if (valid && by_ids) take = (word >> lane) & 1u;
        u32 round;
        const u32 r = rank + block_rank(take, s, &round);
        if (take) {
            const u32 pos = shuffle ? permute(perm, r) : r;
            if (pos < (u64)k) out[pos] = (int)i;           /* bound guard: out holds k ids */
        }
        if (valid && counted) sel_out[i] = sel_in[i] + (take ? 1 : 0);
        if (has_prev) {
            const bool in_prev = prev_full || ((pword >> lane) & 1u);
            inter += (u32)__syncthreads_count(take && in_prev);
        }
        if (below) {
            const u32 bits = __ballot_sync(0xFFFFFFFFu, valid && hi[i] == GP_WORD_ZERO);
            if (lane == 0 && w < nwords) rescaled[w] = bits;
        }
        rank += round;
    }
    if (tid == 0 && inter) atomicAdd(&ctl->inter, (u64)inter);
    if (grid_arrive(ctl, s) && tid == 0) {                 /* the last block: no one waits for it */
        const double both = (double)vc->inter;
        if (has_prev) *overlap = d_div(both, d_sub((double)((u64)prev_size + total), both));
        ctl->inter = 0ull;
        ctl->nseen = 0u;
        ctl->nbelow = 0u;
        atomicExch(&ctl->bar_count, 0u);
    }
}
/* ------------------------------------------------------------------------------------------------ */
/* Statistics update (gpuprune/update.py: observe_groups and merge_groups)                          */
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
/* Statistics kernels                                                                               */
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

/* Fused update of any batch, given the stably sorted ids (int64 sidx64 or int32 sidx32; the other
 * pointer is null) and their positions (torch.sort(stable=True)). Sorted, the batch's min and max are
 * its ends, so every thread sees the range check at once.
 * Launch: grid ceil(B / GP_OBS_THREADS), block GP_OBS_THREADS. */
extern "C" __global__ void __launch_bounds__(GP_OBS_THREADS)
gp_observe_sorted(const long long* sidx64, const int* sidx32, const long long* perm, const float* x,
                  long long B, long long N, float* mean, float* var, int* last_epoch,
                  unsigned long long* nonfinite, unsigned long long* invalid, double decay,
                  long long epoch) {
#define GP_SID(j) (sidx32 != 0 ? (i64)sidx32[j] : sidx64[j])
    if (GP_SID(0) < 0 || GP_SID(B - 1) >= N) {
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(invalid, 1ull);
        return;
    }
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 nf = (u32)__syncthreads_count(t < B && !f_finite(x[t]));
    if (threadIdx.x == 0 && nf) atomicAdd(nonfinite, (u64)nf);
    if (t >= B) return;
    const i64 id = GP_SID(t);
    if (t > 0 && GP_SID(t - 1) == id) return;
    const double m64 = f_to_d(mean[id]);
    GpAcc a;
    acc_init(a);
    for (i64 u = t; u < B && GP_SID(u) == id; ++u) acc_add(a, x[perm[u]], m64);
    merge_write(id, a, mean, var, last_epoch, decay, (int)epoch);
#undef GP_SID
}
