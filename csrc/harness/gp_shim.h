/*
 * gp_shim.h -- compile CUDA kernel source as C++ and run it with real concurrency (tests only).
 *
 * The concurrency harness builds csrc/gpuprune_kernels.cu with this header force-included
 * (g++ -include gp_shim.h -DGP_HARNESS). The model, implemented in gp_harness.cpp:
 *   - every CUDA thread of a launch is an OS thread (a pool of persistent workers);
 *   - a block runs in a "slot": the source is compiled once per slot with the kernels renamed, so each
 *     slot has its own function-local statics = its own __shared__ memory, and several blocks run at
 *     once. Blocks beyond the slots wait for a free one, as blocks wait for an SM. __shared__ memory is
 *     filled with a poison byte before each block (it is uninitialised on a GPU);
 *   - __syncthreads (and _count/_or/_and) is a barrier of the block's live threads; a thread that
 *     returns drops out of later barriers; two barriers at different source lines meeting is an error;
 *   - warp shuffles and votes are an exchange among the 32 lanes of a warp: every lane named in the mask
 *     must arrive with the same operation and mask; a mask naming an exited or absent lane, a lane not in
 *     its own mask or a shuffle from outside the mask is an error;
 *   - atomics are std::atomic_ref operations with acquire-release ordering (they carry the
 *     __threadfence() + atomic hand-offs of the kernels, which is what ThreadSanitizer can see);
 *     everything else is a plain access, so unsynchronised accesses are data races for TSan;
 *   - a launch that does not finish in time (a deadlock) or breaks a rule is aborted with an error.
 */
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#define GP_HARNESS 1

#ifndef GPH_SHARED_SECTION
#error "GPH_SHARED_SECTION (the slot's __shared__ section name) must be defined"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static __attribute__((section(GPH_SHARED_SECTION), aligned(16)))

struct gph_dim3 {
    unsigned int x, y, z;
};

namespace gph {

/* The CUDA thread an OS thread is running (set by the runtime before it calls a kernel). */
struct ThreadCtx {
    gph_dim3 tid, bid, bdim, gdim;
    void* block;          /* gph::Block* */
    unsigned int lane, warp;
};

extern thread_local ThreadCtx* self __attribute__((tls_model("initial-exec")));

int sync_block(int line, int kind, int pred);                       /* kind: 0 plain, 1 count, 2 or, 3 and */
unsigned long long warp_op(int line, int kind, unsigned mask, unsigned long long value, int src);
void fence();
void backoff();

enum { BAR_PLAIN = 0, BAR_COUNT = 1, BAR_OR = 2, BAR_AND = 3 };
enum { W_BALLOT = 1, W_ALL = 2, W_ANY = 3, W_SHFL = 4, W_SHFL_XOR = 5, W_SHFL_DOWN = 6, W_SHFL_UP = 7 };

template <class T>
inline unsigned long long to_word(T v) {
    static_assert(sizeof(T) <= 8, "warp exchange of at most 64 bits");
    unsigned long long w = 0;
    std::memcpy(&w, &v, sizeof v);
    return w;
}

template <class T>
inline T from_word(unsigned long long w) {
    T v;
    std::memcpy(&v, &w, sizeof v);
    return v;
}

template <class T>
inline T atomic_rmw_add(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_acq_rel);
}

}  // namespace gph

#define threadIdx (gph::self->tid)
#define blockIdx (gph::self->bid)
#define blockDim (gph::self->bdim)
#define gridDim (gph::self->gdim)
#define warpSize 32

/* ---- block barriers ---- */
#define __syncthreads() ((void)gph::sync_block(__LINE__, gph::BAR_PLAIN, 0))
#define __syncthreads_count(p) gph::sync_block(__LINE__, gph::BAR_COUNT, (p) ? 1 : 0)
#define __syncthreads_or(p) gph::sync_block(__LINE__, gph::BAR_OR, (p) ? 1 : 0)
#define __syncthreads_and(p) gph::sync_block(__LINE__, gph::BAR_AND, (p) ? 1 : 0)

/* ---- warp exchanges ---- */
#define __ballot_sync(m, p) ((unsigned)gph::warp_op(__LINE__, gph::W_BALLOT, (m), (p) ? 1ull : 0ull, 0))
#define __all_sync(m, p) ((int)gph::warp_op(__LINE__, gph::W_ALL, (m), (p) ? 1ull : 0ull, 0))
#define __any_sync(m, p) ((int)gph::warp_op(__LINE__, gph::W_ANY, (m), (p) ? 1ull : 0ull, 0))

namespace gph {
template <class T>
inline T shfl(int line, int kind, unsigned mask, T v, int arg, int width) {
    if (width != 32) warp_op(line, -1, mask, 0, width);     /* reports: only full-warp shuffles */
    return from_word<T>(warp_op(line, kind, mask, to_word(v), arg));
}
}  // namespace gph

#define __shfl_sync(m, v, s, ...) gph::shfl(__LINE__, gph::W_SHFL, (m), (v), (int)(s), gph_width(__VA_ARGS__ + 0))
#define __shfl_xor_sync(m, v, s, ...) \
    gph::shfl(__LINE__, gph::W_SHFL_XOR, (m), (v), (int)(s), gph_width(__VA_ARGS__ + 0))
#define __shfl_down_sync(m, v, s, ...) \
    gph::shfl(__LINE__, gph::W_SHFL_DOWN, (m), (v), (int)(s), gph_width(__VA_ARGS__ + 0))
#define __shfl_up_sync(m, v, s, ...) \
    gph::shfl(__LINE__, gph::W_SHFL_UP, (m), (v), (int)(s), gph_width(__VA_ARGS__ + 0))
static inline int gph_width(int w) { return w == 0 ? 32 : w; }

/* ---- fences and waiting ---- */
static inline void __threadfence() { gph::fence(); }
static inline void __threadfence_block() { gph::fence(); }
static inline void __nanosleep(unsigned) { gph::backoff(); }

/* ---- bit operations ---- */
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }

/* ---- atomics: std::atomic_ref, acquire-release ---- */
#define GPH_ACQ_REL std::memory_order_acq_rel
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return gph::atomic_rmw_add(p, v); }
static inline int atomicAdd(int* p, int v) { return gph::atomic_rmw_add(p, v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return gph::atomic_rmw_add(p, v);
}
static inline float atomicAdd(float* p, float v) { return gph::atomic_rmw_add(p, v); }
static inline double atomicAdd(double* p, double v) { return gph::atomic_rmw_add(p, v); }
static inline unsigned atomicSub(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_sub(v, GPH_ACQ_REL);
}
static inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v, GPH_ACQ_REL); }

template <class T>
static inline T gph_cas(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, GPH_ACQ_REL, std::memory_order_acquire);
    return expected;   /* the old value, as CUDA's atomicCAS returns */
}
static inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return gph_cas(p, c, v); }
static inline int atomicCAS(int* p, int c, int v) { return gph_cas(p, c, v); }
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
    return gph_cas(p, c, v);
}

template <class T>
static inline T gph_exch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v, GPH_ACQ_REL); }
static inline unsigned atomicExch(unsigned* p, unsigned v) { return gph_exch(p, v); }
static inline int atomicExch(int* p, int v) { return gph_exch(p, v); }
static inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return gph_exch(p, v); }
static inline float atomicExch(float* p, float v) { return gph_exch(p, v); }

#define GPH_BITOP(NAME, OP, T) \
    static inline T NAME(T* p, T v) { return std::atomic_ref<T>(*p).OP(v, GPH_ACQ_REL); }
GPH_BITOP(atomicOr, fetch_or, unsigned)
GPH_BITOP(atomicOr, fetch_or, int)
GPH_BITOP(atomicOr, fetch_or, unsigned long long)
GPH_BITOP(atomicAnd, fetch_and, unsigned)
GPH_BITOP(atomicAnd, fetch_and, int)
GPH_BITOP(atomicAnd, fetch_and, unsigned long long)
GPH_BITOP(atomicXor, fetch_xor, unsigned)
GPH_BITOP(atomicXor, fetch_xor, int)
GPH_BITOP(atomicXor, fetch_xor, unsigned long long)
#undef GPH_BITOP

template <class T>
static inline T gph_minmax(T* p, T v, bool want_max) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_acquire);
    while ((want_max ? v > old : v < old) &&
           !a.compare_exchange_weak(old, v, GPH_ACQ_REL, std::memory_order_acquire)) {
    }
    return old;
}
static inline unsigned atomicMax(unsigned* p, unsigned v) { return gph_minmax(p, v, true); }
static inline int atomicMax(int* p, int v) { return gph_minmax(p, v, true); }
static inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    return gph_minmax(p, v, true);
}
static inline unsigned atomicMin(unsigned* p, unsigned v) { return gph_minmax(p, v, false); }
static inline int atomicMin(int* p, int v) { return gph_minmax(p, v, false); }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    return gph_minmax(p, v, false);
}
static inline unsigned atomicInc(unsigned* p, unsigned limit) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load(std::memory_order_acquire);
    while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u, GPH_ACQ_REL, std::memory_order_acquire)) {
    }
    return old;
}
