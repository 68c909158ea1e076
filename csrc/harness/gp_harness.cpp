/*
 * gp_harness.cpp -- the runtime of the concurrency harness (see gp_shim.h for the model).
 *
 * A launch runs every block of the grid on the slots (at most `slots` blocks at once, each a set of
 * OS threads, one per CUDA thread), in blockIdx order as slots free up. Workers are persistent
 * threads, one per (slot, thread index), created on first need. The synchronisation the harness adds
 * is what CUDA guarantees and no more, so ThreadSanitizer sees the kernels' own ordering:
 *   - a launch happens-before each of its threads, which happen-before the launch's return;
 *   - a block barrier orders the block's threads; a warp exchange orders the lanes it names;
 *   - atomics are acquire-release (gp_shim.h). Nothing else orders two blocks. (A block that waits
 *     for a free slot starts after an earlier block ended, an ordering a GPU does not promise: run
 *     grids no larger than the slot count where that matters, as the TSan run does.)
 * Threads sleep on futexes; the handshakes themselves are atomics, which TSan understands.
 *
 * C API (ctypes): gph_configure, gph_launch, gph_error, gph_kernel_count, gph_slots.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "gp_shim.h"

namespace gph {

using Trampoline = void (*)(const unsigned long long*);

thread_local ThreadCtx* self __attribute__((tls_model("initial-exec"))) = nullptr;

struct Abort {};   /* thrown through a kernel when the launch is aborted */

/* ------------------------------------------------------------------ state */
constexpr int kMaxSlots = 64;
constexpr unsigned kMaxBlock = 1024;
constexpr unsigned char kPoison = 0xA5;

struct KernelEntry {
    Trampoline tramp[kMaxSlots] = {};
    int arity = -1;
};

struct Warp {
    std::mutex m;
    std::atomic<uint32_t> gen{0};
    uint32_t present = 0, live = 0, arrived = 0, cur_mask = 0;
    int cur_kind = 0, cur_line = 0;
    unsigned long long vals[32] = {}, res[32] = {};
    int args[32] = {};
};

struct Block {
    std::mutex m;
    std::atomic<uint32_t> gen{0};
    int live = 0, arrived = 0, cur_line = 0, acc = 0, result = 0, cur_kind = 0;
    Warp warps[kMaxBlock / 32];
};

struct Slot;

struct Worker {
    Slot* slot;
    unsigned tid;
    uint32_t seen;        /* dispatch generation already handled (set by the creator, before any dispatch) */
    ThreadCtx ctx;
    uint64_t rng;
    pthread_t thread;
};

struct Slot {
    int index = 0;
    char* sh_begin = nullptr;
    char* sh_end = nullptr;
    Block block;
    std::atomic<uint32_t> warp_go[kMaxBlock / 32];
    std::atomic<int> running{0};
    bool busy = false;
    /* the block being run (written by the launcher before it bumps warp_go) */
    Trampoline tramp = nullptr;
    const unsigned long long* args = nullptr;
    gph_dim3 bid{}, bdim{}, gdim{};
    std::vector<Worker*> workers;
    Slot() {
        for (auto& g : warp_go) g.store(0);
    }
};

struct Runtime {
    std::map<std::string, KernelEntry> kernels;
    int nslots = 0;                           /* slots compiled in */
    Slot* slots[kMaxSlots] = {};
    std::mutex sched_m;
    std::atomic<uint32_t> sched_gen{0};        /* bumped when a block ends */
    std::atomic<bool> abort{false};
    std::atomic<bool> broken{false};
    std::mutex err_m;
    std::string error;
    std::chrono::steady_clock::time_point deadline;
    std::atomic<int> timed_out{0};
    double timeout_s = 120.0;
    unsigned chaos_permille = 0;
    uint64_t chaos_seed = 1;
    size_t stack_bytes = 512 * 1024;
};

Runtime& rt() {
    static Runtime* r = new Runtime();   /* never destroyed: workers may outlive static destructors */
    return *r;
}

/* ------------------------------------------------------------------ helpers */
static long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* ts) {
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

static void wake_all(std::atomic<uint32_t>* a) { futex(a, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr); }

[[noreturn]] static void fail(const std::string& msg) {
    Runtime& r = rt();
    {
        std::lock_guard<std::mutex> g(r.err_m);
        if (r.error.empty()) r.error = msg;
    }
    r.abort.store(true);
    throw Abort{};
}

static std::string where() {
    ThreadCtx* c = self;
    if (!c) return "(no kernel thread)";
    char buf[96];
    std::snprintf(buf, sizeof buf, "block %u thread %u (warp %u lane %u)", c->bid.x, c->tid.x, c->warp, c->lane);
    return buf;
}

static void check_abort() {
    Runtime& r = rt();
    if (r.abort.load(std::memory_order_relaxed)) throw Abort{};
    if (std::chrono::steady_clock::now() > r.deadline) {
        r.timed_out.store(1);
        char buf[160];
        std::snprintf(buf, sizeof buf, "launch did not finish within %.0f s (deadlock or endless wait?), seen at ",
                      r.timeout_s);
        fail(buf + where());
    }
}

/* Sleep until *a != v (checked with acquire), waking every 50 ms to check for an abort. */
static void wait_change(std::atomic<uint32_t>* a, uint32_t v) {
    const timespec ts{0, 50 * 1000 * 1000};
    while (a->load(std::memory_order_acquire) == v) {
        futex(a, FUTEX_WAIT_PRIVATE, v, &ts);
        if (a->load(std::memory_order_acquire) != v) break;
        check_abort();
    }
}

thread_local Worker* tl_worker = nullptr;

/* Perturb the schedule at synchronisation points (chaos_permille in 1000: yield or a short sleep). */
static void chaos() {
    Runtime& r = rt();
    if (!r.chaos_permille || !tl_worker) return;
    uint64_t& x = tl_worker->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const unsigned roll = (unsigned)(x % 1000u);
    if (roll < r.chaos_permille) {
        if (roll & 1u) {
            sched_yield();
        } else {
            const timespec ts{0, (long)(1000 + (x >> 20) % 50000)};
            nanosleep(&ts, nullptr);
        }
    }
}

/* ------------------------------------------------------------------ block barrier */
int sync_block(int line, int kind, int pred) {
    ThreadCtx* c = self;
    if (!c) fail("__syncthreads outside a kernel thread");
    check_abort();
    chaos();
    Block& b = *static_cast<Block*>(c->block);
    std::unique_lock<std::mutex> lk(b.m);
    if (b.arrived == 0) {
        b.cur_line = line;
        b.cur_kind = kind;
        b.acc = kind == BAR_AND ? 1 : 0;
    } else if (b.cur_line != line) {
        lk.unlock();
        fail("barrier divergence: " + where() + " waits at the barrier of line " + std::to_string(line) +
             " while others wait at line " + std::to_string(b.cur_line));
    }
    if (kind == BAR_COUNT) b.acc += pred;
    else if (kind == BAR_OR) b.acc |= pred;
    else if (kind == BAR_AND) b.acc &= pred;
    b.arrived += 1;
    if (b.arrived == b.live) {
        b.result = b.acc;
        b.arrived = 0;
        const int res = b.result;
        b.gen.fetch_add(1, std::memory_order_acq_rel);
        lk.unlock();
        wake_all(&b.gen);
        chaos();
        return res;
    }
    const uint32_t g = b.gen.load(std::memory_order_relaxed);
    lk.unlock();
    wait_change(&b.gen, g);
    const int res = b.result;   /* stable: the next barrier needs this thread to complete */
    chaos();
    return res;
}

/* ------------------------------------------------------------------ warp exchange */
static const char* kind_name(int kind) {
    switch (kind) {
        case W_BALLOT: return "__ballot_sync";
        case W_ALL: return "__all_sync";
        case W_ANY: return "__any_sync";
        case W_SHFL: return "__shfl_sync";
        case W_SHFL_XOR: return "__shfl_xor_sync";
        case W_SHFL_DOWN: return "__shfl_down_sync";
        case W_SHFL_UP: return "__shfl_up_sync";
        default: return "warp operation";
    }
}

static std::string hex(uint32_t m) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", m);
    return buf;
}

unsigned long long warp_op(int line, int kind, unsigned mask, unsigned long long value, int arg) {
    ThreadCtx* c = self;
    if (!c) fail("warp operation outside a kernel thread");
    check_abort();
    chaos();
    const std::string at = " at line " + std::to_string(line) + " in " + where();
    if (kind < 0) fail("only full-warp shuffles (width 32) are modelled, got width " + std::to_string(arg) + at);
    Block& b = *static_cast<Block*>(c->block);
    Warp& w = b.warps[c->warp];
    const uint32_t bit = 1u << c->lane;
    std::unique_lock<std::mutex> lk(w.m);
    if (!(mask & bit)) fail(std::string(kind_name(kind)) + " with mask " + hex(mask) + " not naming the calling lane" + at);
    if (mask & ~w.present)
        fail(std::string(kind_name(kind)) + " mask " + hex(mask) + " names lanes that do not exist (" + hex(mask & ~w.present) + ")" + at);
    if (mask & ~w.live)
        fail(std::string(kind_name(kind)) + " mask " + hex(mask) + " names lanes that have exited (" + hex(mask & ~w.live) + ")" + at);
    if (w.arrived == 0) {
        w.cur_mask = mask;
        w.cur_kind = kind;
        w.cur_line = line;
    } else if (w.cur_mask != mask || w.cur_kind != kind) {
        fail(std::string("divergent warp operations: ") + kind_name(kind) + " mask " + hex(mask) + at + " meets " +
             kind_name(w.cur_kind) + " mask " + hex(w.cur_mask) + " of line " + std::to_string(w.cur_line));
    }
    w.vals[c->lane] = value;
    w.args[c->lane] = arg;
    w.arrived |= bit;
    if (w.arrived == w.cur_mask) {
        const uint32_t m = w.cur_mask;
        unsigned long long vote = 0;
        bool all = true, any = false;
        for (int l = 0; l < 32; ++l) {
            if (!(m >> l & 1u)) continue;
            const bool p = w.vals[l] != 0;
            vote |= (unsigned long long)p << l;
            all = all && p;
            any = any || p;
        }
        for (int l = 0; l < 32; ++l) {
            if (!(m >> l & 1u)) continue;
            int src = l;
            switch (kind) {
                case W_BALLOT: w.res[l] = vote; continue;
                case W_ALL: w.res[l] = all; continue;
                case W_ANY: w.res[l] = any; continue;
                case W_SHFL: src = w.args[l] & 31; break;
                case W_SHFL_XOR: src = l ^ (w.args[l] & 31); break;
                case W_SHFL_DOWN: src = l + w.args[l] <= 31 ? l + w.args[l] : l; break;
                case W_SHFL_UP: src = l - w.args[l] >= 0 ? l - w.args[l] : l; break;
                default: fail("unknown warp operation" + at);
            }
            if (!(m >> src & 1u))
                fail(std::string(kind_name(kind)) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                     ", outside the mask " + hex(m) + at);
            w.res[l] = w.vals[src];
        }
        w.arrived = 0;
        const unsigned long long out = w.res[c->lane];
        w.gen.fetch_add(1, std::memory_order_acq_rel);
        lk.unlock();
        wake_all(&w.gen);
        chaos();
        return out;
    }
    const uint32_t g = w.gen.load(std::memory_order_relaxed);
    lk.unlock();
    wait_change(&w.gen, g);
    const unsigned long long out = w.res[c->lane];   /* only this op's mask lanes rewrite their own entry */
    chaos();
    return out;
}

void fence() { chaos(); }

void backoff() {
    check_abort();
    chaos();
    sched_yield();
}

/* A thread leaves its block: it drops out of later barriers and of its warp. */
static void thread_exit(ThreadCtx* c, bool aborted) {
    Block& b = *static_cast<Block*>(c->block);
    {
        std::unique_lock<std::mutex> lk(b.m);
        b.live -= 1;
        if (b.arrived > 0 && b.arrived == b.live) {     /* the rest were waiting for this thread */
            b.result = b.acc;
            b.arrived = 0;
            b.gen.fetch_add(1, std::memory_order_acq_rel);
            lk.unlock();
            wake_all(&b.gen);
        }
    }
    Warp& w = b.warps[c->warp];
    std::lock_guard<std::mutex> lk(w.m);
    const uint32_t bit = 1u << c->lane;
    w.live &= ~bit;
    if (!aborted && w.arrived && (w.cur_mask & bit) && !(w.arrived & bit)) {
        Runtime& r = rt();
        {
            std::lock_guard<std::mutex> g(r.err_m);
            if (r.error.empty())
                r.error = "lane " + std::to_string(c->lane) + " exited while lanes " + hex(w.arrived) +
                          " wait for it in " + kind_name(w.cur_kind) + " (line " + std::to_string(w.cur_line) +
                          ", mask " + hex(w.cur_mask) + ") in " + where();
        }
        r.abort.store(true);
    }
}

/* ------------------------------------------------------------------ workers */
static void* worker_main(void* p) {
    Worker* wk = static_cast<Worker*>(p);
    tl_worker = wk;
    Slot& s = *wk->slot;
    const unsigned warp = wk->tid / 32;
    uint32_t seen = wk->seen;
    for (;;) {
        while (s.warp_go[warp].load(std::memory_order_acquire) == seen)
            futex(&s.warp_go[warp], FUTEX_WAIT_PRIVATE, seen, nullptr);
        seen = s.warp_go[warp].load(std::memory_order_acquire);
        if (wk->tid >= s.bdim.x) continue;            /* not part of this block (partial last warp) */
        ThreadCtx& c = wk->ctx;
        c.tid = {wk->tid, 0, 0};
        c.bid = s.bid;
        c.bdim = s.bdim;
        c.gdim = s.gdim;
        c.block = &s.block;
        c.lane = wk->tid & 31u;
        c.warp = wk->tid >> 5;
        self = &c;
        bool aborted = false;
        try {
            chaos();
            s.tramp(s.args);
        } catch (const Abort&) {
            aborted = true;
        }
        thread_exit(&c, aborted || rt().abort.load());
        self = nullptr;
        if (s.running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            Runtime& r = rt();
            {
                std::lock_guard<std::mutex> g(r.sched_m);
                s.busy = false;
            }
            r.sched_gen.fetch_add(1, std::memory_order_acq_rel);
            wake_all(&r.sched_gen);
        }
    }
    return nullptr;
}

static bool ensure_workers(Slot& s, unsigned n) {
    Runtime& r = rt();
    while (s.workers.size() < n) {
        Worker* wk = new Worker();
        wk->slot = &s;
        wk->tid = (unsigned)s.workers.size();
        /* read here, not in the new thread: a thread that starts after the next dispatch must run it */
        wk->seen = s.warp_go[wk->tid / 32].load(std::memory_order_acquire);
        wk->rng = (r.chaos_seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)s.index << 32) ^ (wk->tid + 1);
        if (!wk->rng) wk->rng = 1;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, r.stack_bytes);
        const int rc = pthread_create(&wk->thread, &attr, worker_main, wk);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            delete wk;
            return false;
        }
        pthread_detach(wk->thread);
        s.workers.push_back(wk);
    }
    return true;
}

void register_kernel(int slot, const char* name, Trampoline tramp, int arity) {
    Runtime& r = rt();
    if (slot < 0 || slot >= kMaxSlots) return;
    KernelEntry& e = r.kernels[name];
    e.tramp[slot] = tramp;
    e.arity = arity;
    if (!r.slots[slot]) {
        r.slots[slot] = new Slot();
        r.slots[slot]->index = slot;
    }
    if (slot + 1 > r.nslots) r.nslots = slot + 1;
}

void register_shared(int slot, char* begin, char* end) {
    Runtime& r = rt();
    if (slot < 0 || slot >= kMaxSlots) return;
    if (!r.slots[slot]) {
        r.slots[slot] = new Slot();
        r.slots[slot]->index = slot;
    }
    r.slots[slot]->sh_begin = begin;
    r.slots[slot]->sh_end = end;
}

}  // namespace gph

using namespace gph;

static void set_error(const std::string& msg) {
    Runtime& r = rt();
    std::lock_guard<std::mutex> g(r.err_m);
    if (r.error.empty()) r.error = msg;
}

extern "C" {

/* Settings: seconds before a launch counts as deadlocked; chaos (yields/sleeps per 1000 sync points). */
void gph_configure(double timeout_s, unsigned chaos_permille, unsigned long long chaos_seed) {
    Runtime& r = rt();
    r.timeout_s = timeout_s;
    r.chaos_permille = chaos_permille > 1000u ? 1000u : chaos_permille;
    r.chaos_seed = chaos_seed;
    for (int s = 0; s < r.nslots; ++s)
        if (r.slots[s])
            for (Worker* wk : r.slots[s]->workers) {
                wk->rng = (chaos_seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)s << 32) ^ (wk->tid + 1);
                if (!wk->rng) wk->rng = 1;
            }
}

int gph_slots(void) { return rt().nslots; }

/* Arity of a kernel (-1 when unknown). */
int gph_kernel_arity(const char* name) {
    auto it = rt().kernels.find(name);
    return it == rt().kernels.end() ? -1 : it->second.arity;
}

const char* gph_error(void) { return rt().error.c_str(); }

/* Run one launch: `grid` blocks of `block` threads, at most `slots` blocks at once. Returns 0, or -1
 * with gph_error() saying why (a rule broken, a deadlock, a bad launch). */
int gph_launch(const char* name, unsigned grid, unsigned block, const unsigned long long* args, int nargs,
               int slots) {
    Runtime& r = rt();
    {
        std::lock_guard<std::mutex> g(r.err_m);
        r.error.clear();
    }
    if (r.broken.load()) {
        set_error("the harness is unusable after an earlier launch left threads running");
        return -1;
    }
    auto it = r.kernels.find(name);
    if (it == r.kernels.end()) {
        set_error(std::string("no kernel named ") + name);
        return -1;
    }
    if (it->second.arity != nargs) {
        set_error(std::string(name) + " takes " + std::to_string(it->second.arity) + " arguments, got " +
                  std::to_string(nargs));
        return -1;
    }
    if (grid < 1 || block < 1 || block > kMaxBlock) {
        set_error("invalid launch geometry: grid " + std::to_string(grid) + ", block " + std::to_string(block));
        return -1;
    }
    if (slots < 1 || slots > r.nslots) slots = r.nslots;
    for (int s = 0; s < slots; ++s)
        if (!ensure_workers(*r.slots[s], (block + 31u) / 32u * 32u)) {
            set_error("could not create worker threads");
            return -1;
        }
    r.abort.store(false);
    r.timed_out.store(0);
    r.deadline = std::chrono::steady_clock::now() +
                 std::chrono::milliseconds((long long)(r.timeout_s * 1000.0));
    const unsigned nwarps = (block + 31u) / 32u;
    unsigned next = 0;
    int in_flight = 0;
    const timespec ts{0, 50 * 1000 * 1000};
    bool stop_dispatch = false;
    while (next < grid || in_flight > 0) {
        int free_slot = -1;
        uint32_t g = r.sched_gen.load(std::memory_order_acquire);
        {
            std::lock_guard<std::mutex> lk(r.sched_m);
            in_flight = 0;
            for (int s = 0; s < slots; ++s) {
                if (r.slots[s]->busy) in_flight += 1;
                else if (free_slot < 0) free_slot = s;
            }
        }
        if (r.abort.load()) stop_dispatch = true;
        if (!stop_dispatch && next < grid && free_slot >= 0) {
            Slot& s = *r.slots[free_slot];
            Block& b = s.block;
            b.live = (int)block;
            b.arrived = 0;
            for (unsigned w = 0; w < nwarps; ++w) {
                const unsigned lanes = block - 32u * w >= 32u ? 32u : block - 32u * w;
                const uint32_t m = lanes == 32u ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
                b.warps[w].present = m;
                b.warps[w].live = m;
                b.warps[w].arrived = 0;
            }
            if (s.sh_begin && s.sh_end > s.sh_begin) std::memset(s.sh_begin, kPoison, (size_t)(s.sh_end - s.sh_begin));
            s.tramp = it->second.tramp[free_slot];
            s.args = args;
            s.bid = {next, 0, 0};
            s.bdim = {block, 1, 1};
            s.gdim = {grid, 1, 1};
            {
                std::lock_guard<std::mutex> lk(r.sched_m);
                s.busy = true;
            }
            s.running.store((int)block, std::memory_order_release);
            for (unsigned w = 0; w < nwarps; ++w) {
                s.warp_go[w].fetch_add(1, std::memory_order_acq_rel);
                wake_all(&s.warp_go[w]);
            }
            next += 1;
            in_flight += 1;
            continue;
        }
        if (stop_dispatch && in_flight == 0) break;
        if (in_flight == 0 && next >= grid) break;
        futex(&r.sched_gen, FUTEX_WAIT_PRIVATE, g, &ts);
        if (std::chrono::steady_clock::now() > r.deadline + std::chrono::seconds(120)) {
            /* threads that neither finish nor reach a synchronisation point cannot be stopped */
            r.abort.store(true);
            r.broken.store(true);
            set_error("launch of " + std::string(name) + " did not finish and could not be aborted (a thread spins "
                      "without a synchronisation point?)");
            return -1;
        }
    }
    if (r.abort.load()) {
        if (r.error.empty()) set_error("launch aborted");
        return -1;
    }
    return 0;
}

}  // extern "C"
