/*
 * gp_slot.cpp -- one slot of the concurrency harness: the kernel source compiled as C++ (through
 * gp_shim.h) with every kernel renamed for this slot, and registered with the runtime.
 *
 * Built once per slot by tests/kernel_harness with:
 *   -include gp_shim.h -DGPH_SLOT=<s> -DGPH_SHARED_SECTION='"gph_sh<s>"'
 *   -DGPH_START=__start_gph_sh<s> -DGPH_STOP=__stop_gph_sh<s> -DGPH_SOURCE='"<kernel source>"'
 *   -DGPH_KERNELS='X(gp_a) X(gp_b) ...' -Dgp_a=gp_a__s<s> -Dgp_b=gp_b__s<s> ...
 * Each slot's function-local statics (the kernels' __shared__ arrays) are its own, in its own
 * section, which the runtime poisons before every block.
 */
#include "gp_shim.h"

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include GPH_SOURCE

namespace gph {
using Trampoline = void (*)(const unsigned long long*);
void register_kernel(int slot, const char* name, Trampoline tramp, int arity);
void register_shared(int slot, char* begin, char* end);
}  // namespace gph

/* Linker-made bounds of this slot's __shared__ section (weak: a source without __shared__ has none). */
extern "C" char GPH_START[] __attribute__((weak));
extern "C" char GPH_STOP[] __attribute__((weak));

namespace {

template <class T>
T arg_of(unsigned long long w) {
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<std::uintptr_t>(w));
    } else if constexpr (std::is_floating_point_v<T>) {
        return gph::from_word<T>(w);
    } else {
        return static_cast<T>(w);
    }
}

template <class... P, std::size_t... I>
void call(void (*f)(P...), const unsigned long long* a, std::index_sequence<I...>) {
    f(arg_of<P>(a[I])...);
}

template <class... P>
void invoke(void (*f)(P...), const unsigned long long* a) {
    call(f, a, std::index_sequence_for<P...>{});
}

template <class... P>
constexpr int arity(void (*)(P...)) {
    return (int)sizeof...(P);
}

#define X(name) \
    void tramp_##name(const unsigned long long* a) { invoke(&name, a); }
GPH_KERNELS
#undef X

struct Registrar {
    Registrar() {
#define X(name) gph::register_kernel(GPH_SLOT, #name, &tramp_##name, arity(&name));
        GPH_KERNELS
#undef X
        gph::register_shared(GPH_SLOT, GPH_START, GPH_STOP);
    }
} registrar;

}  // namespace
