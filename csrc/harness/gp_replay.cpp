/*
 * gp_replay.cpp -- replay a recorded launch trace through the harness (the ThreadSanitizer and
 * AddressSanitizer runs).
 *
 * Python cannot host a sanitizer-instrumented library (the runtime must start with the process), so
 * tests/kernel_harness records the launches that gpuprune/kernels/ops.py makes -- each launch with its
 * arguments, the bytes of every buffer it gets before it runs and after -- and this program, linked
 * with a TSan build of the harness, replays them: same kernels, same geometry, same inputs, and every
 * buffer must come out bit for bit as recorded. Every buffer is allocated with its exact size.
 *
 *   gp_replay TRACE [slots] [timeout_s] [chaos_permille]
 * Exit status: 0 all launches matched; 1 some buffer differed; 2 a launch failed in the harness;
 * 3 unreadable trace. The sanitizers' own reports go to stderr (their exit codes are set by
 * TSAN_OPTIONS / ASAN_OPTIONS).
 */
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
void gph_configure(double timeout_s, unsigned chaos_permille, unsigned long long chaos_seed);
int gph_launch(const char* name, unsigned grid, unsigned block, const unsigned long long* args, int nargs,
               int slots);
const char* gph_error(void);
}

namespace {

struct Reader {
    FILE* f;
    bool ok = true;
    template <class T>
    T get() {
        T v{};
        if (std::fread(&v, sizeof v, 1, f) != 1) ok = false;
        return v;
    }
    void bytes(void* p, size_t n) {
        if (n && std::fread(p, 1, n, f) != n) ok = false;
    }
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s TRACE [slots] [timeout_s] [chaos_permille]\n", argv[0]);
        return 3;
    }
    const int slots = argc > 2 ? std::atoi(argv[2]) : 0;
    const double timeout_s = argc > 3 ? std::atof(argv[3]) : 300.0;
    const unsigned chaos = argc > 4 ? (unsigned)std::atoi(argv[4]) : 0u;
    gph_configure(timeout_s, chaos, 12345);
    const bool verbose = std::getenv("GPH_REPLAY_VERBOSE") != nullptr;
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) {
        std::perror(argv[1]);
        return 3;
    }
    Reader rd{f};
    char magic[8];
    rd.bytes(magic, 8);
    if (!rd.ok || std::memcmp(magic, "GPHTRC01", 8) != 0) {
        std::fprintf(stderr, "not a harness trace\n");
        return 3;
    }
    const uint32_t nbuf = rd.get<uint32_t>();
    std::vector<std::vector<unsigned char>> buf(nbuf);
    /* exact sizes (at least one byte), each buffer its own heap block: AddressSanitizer's redzones
     * then sit right after every buffer, so a kernel reading one element past its end is caught */
    std::vector<size_t> sizes(nbuf);
    for (uint32_t i = 0; i < nbuf; ++i) {
        sizes[i] = (size_t)rd.get<uint64_t>();
        buf[i].assign(sizes[i] ? sizes[i] : 1, 0);
    }
    const uint32_t nlaunch = rd.get<uint32_t>();
    int mismatches = 0;
    std::vector<unsigned char> expect;
    for (uint32_t l = 0; l < nlaunch && rd.ok; ++l) {
        std::string name(rd.get<uint16_t>(), '\0');
        rd.bytes(name.data(), name.size());
        const uint32_t grid = rd.get<uint32_t>(), block = rd.get<uint32_t>(), nargs = rd.get<uint32_t>();
        std::vector<unsigned long long> words(nargs);
        for (auto& w : words) {
            const uint8_t kind = rd.get<uint8_t>();
            const uint64_t v = rd.get<uint64_t>();
            if (kind == 'p') {
                if (v == UINT64_MAX) w = 0;
                else if (v < nbuf) w = (unsigned long long)(uintptr_t)buf[v].data();
                else rd.ok = false;
            } else {
                w = v;
            }
        }
        const uint32_t npre = rd.get<uint32_t>();
        for (uint32_t i = 0; i < npre && rd.ok; ++i) {
            const uint32_t id = rd.get<uint32_t>();
            if (id >= nbuf) { rd.ok = false; break; }
            rd.bytes(buf[id].data(), sizes[id]);
        }
        if (!rd.ok) break;
        const auto t0 = std::chrono::steady_clock::now();
        const int rc = gph_launch(name.c_str(), grid, block, words.data(), (int)nargs, slots);
        if (verbose)
            std::printf("launch %u %s (grid %u, block %u): %.3f s\n", l, name.c_str(), grid, block,
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        if (rc != 0) {
            std::printf("launch %u %s (grid %u, block %u): harness error: %s\n", l, name.c_str(), grid, block,
                        gph_error());
            std::fflush(stdout);
            return 2;
        }
        const uint32_t npost = rd.get<uint32_t>();
        for (uint32_t i = 0; i < npost && rd.ok; ++i) {
            const uint32_t id = rd.get<uint32_t>();
            if (id >= nbuf) { rd.ok = false; break; }
            const size_t n = sizes[id];
            expect.resize(n);
            rd.bytes(expect.data(), n);
            size_t first = n, count = 0;
            for (size_t j = 0; j < n; ++j)
                if (expect[j] != buf[id][j]) {
                    if (first == n) first = j;
                    count += 1;
                }
            if (count) {
                mismatches += 1;
                std::printf("launch %u %s (grid %u, block %u): buffer %u differs in %zu of %zu bytes, first at %zu\n",
                            l, name.c_str(), grid, block, id, count, n, first);
            }
        }
    }
    std::fclose(f);
    if (!rd.ok) {
        std::fprintf(stderr, "truncated or malformed trace\n");
        return 3;
    }
    std::printf("replayed %u launches: %d buffer mismatches\n", nlaunch, mismatches);
    return mismatches ? 1 : 0;
}
