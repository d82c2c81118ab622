// Shared by the learned_optim kernels: float vectors of the width of one register of the instruction set the
// library is compiled for (GCC/Clang vector extensions), and their exp/sigmoid.
//
// The build compiles one library per instruction set (learned_optim.kernels picks one at run time from the
// CPU's flags): AVX-512 (16 floats, 32 registers), AVX2+FMA (8 floats, 16 registers), and a portable build
// (4 floats: SSE2 on x86-64, NEON on ARM; 16 registers assumed, 32 on AArch64). The code is written in L
// and in LO_REGISTERS, so each build keeps its vectors and register blocks the size of the real registers
// instead of wider vectors that the compiler would split (and spill).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace lo {

#if defined(__AVX512F__)
constexpr int L = 16;  // floats per vector
constexpr int LO_REGISTERS = 32;
#elif defined(__AVX2__)
constexpr int L = 8;
constexpr int LO_REGISTERS = 16;
#elif defined(__aarch64__)
constexpr int L = 4;
constexpr int LO_REGISTERS = 32;
#else
constexpr int L = 4;
constexpr int LO_REGISTERS = 16;
#endif
typedef float vf __attribute__((vector_size(4 * L)));

// On a large per-vector function (a lambda called once per L coordinates): inlined into its loop with 32 registers,
// where its working set then stays in registers (the call, its stack frame and vzeroupper per span cost a fifth of
// adafac's step on AVX-512); with 16 GCC decides (forcing it either way made AVX2's adafac step slower).
#if defined(__AVX512F__) || defined(__aarch64__)  // the builds of LO_REGISTERS 32
#define LO_INLINE_SPAN __attribute__((always_inline))
#else
#define LO_INLINE_SPAN
#endif
typedef int32_t vi __attribute__((vector_size(4 * L)));

// a in every lane (a - (+0) is a for every float, -0 included, so the compiler drops the subtraction; vf{} + a would
// keep an add, since it makes a -0 into +0)
inline vf splat(float a) { return a - vf{}; }
// The lanes of a vf in double (two registers): squares and sums past float's range (a square of more than 1.8e19).
typedef double vd __attribute__((vector_size(8 * L)));
inline vd widen(vf x) { return __builtin_convertvector(x, vd); }

// Four-float vectors (one SSE/NEON register), for the AVX2 build's four-unit tails.
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

// Max ? (a > b ? a : b) : (a < b ? a : b), lane by lane: on x86 one max or min instruction, which returns its second
// operand, b, where the compare is false (a NaN on either side, or two zeros), exactly as the select does (GCC had
// compiled the selects to a compare and a blend: the AVX2 LSTM cell's exp clamp took 4.96 -> 4.17 ms over 16k rows
// as max and min). Other targets keep the select.
template <bool Max, class V>
inline V extreme(V a, V b) {
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64)
        return (V)(Max ? _mm512_max_ps((__m512)a, (__m512)b) : _mm512_min_ps((__m512)a, (__m512)b));
#endif
#if defined(__AVX__)
    if constexpr (sizeof(V) == 32)
        return (V)(Max ? _mm256_max_ps((__m256)a, (__m256)b) : _mm256_min_ps((__m256)a, (__m256)b));
#endif
#if defined(__SSE__)
    if constexpr (sizeof(V) == 16) return (V)(Max ? _mm_max_ps((__m128)a, (__m128)b) : _mm_min_ps((__m128)a, (__m128)b));
#endif
    return (Max ? a > b : a < b) ? a : b;
}

// e^-x for float32 vectors (V: vf or vf4, VI its int32 vector): x = -(n ln2 + f) with n = round(-x / ln2),
// |f| <= ln2 / 2, and e^f by the Cephes degree-6 polynomial written in u = -f (signs folded into the
// coefficients). x is clamped to [-88, 87] so that 2^n stays a normal float. One-constant range reduction:
// the error it adds grows with |n| but is then relative to an e^-x that is far from 1, so it is invisible
// in sigmoid(x).
template <class V, class VI>
inline V exp_neg_t(V x) {
    x = extreme<false>(V{} + 87.0f, extreme<true>(V{} - 88.0f, x));  // clamped to [-88, 87], NaN kept
    const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
    const V r = x * -1.44269504088896341f + magic;
    const V n = r - magic;
    const VI ni = (VI)r - (VI)magic;
    const V u = x + n * 0.693147180559945309f;  // = -f
    V q = V{} - 1.9875691500e-4f;
    q = q * u + 1.3981999507e-3f;
    q = q * u + -8.3334519073e-3f;
    q = q * u + 4.1665795894e-2f;
    q = q * u + -1.6666665459e-1f;
    q = q * u + 5.0000001201e-1f;
    const V y = (u * u) * q + (1.0f - u);  // e^f = 1 + f + f^2 P(f)
    return (V)((VI)y + (ni << 23));
}

inline vf exp_neg_v(vf x) { return exp_neg_t<vf, vi>(x); }

// sigmoid(x) = 1 / (1 + e^-x); NaN in, NaN out.
template <class V, class VI>
inline V sigmoid_t(V x) {
    const V s = 1.0f / (1.0f + exp_neg_t<V, VI>(x));
    return x == x ? s : x;
}

inline vf sigmoid_v(vf x) { return sigmoid_t<vf, vi>(x); }

// Correctly rounded square root lane by lane (vectorized by the compiler under -fno-math-errno).
inline vf sqrt_v(vf x) {
    vf r;
    for (int i = 0; i < L; ++i) r[i] = __builtin_sqrtf(x[i]);
    return r;
}

inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// An unaligned vector of floats: a store through it may alias floats only (a memcpy's store may alias anything, so
// that the compiler reloaded every pointer it had read from memory after each store).
typedef float vf_unaligned __attribute__((vector_size(4 * L), aligned(4)));

inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

// The lane indices 0 .. L - 1.
inline vi lane_index() {
    vi index;
    for (int i = 0; i < L; ++i) index[i] = i;
    return index;
}

// Partial vectors are read and written with the instruction set's masked moves (AVX-512, AVX2): a copy through
// a stack buffer costs a library memcpy and a failed store-to-load forward per span, which made a (rows, 10)
// matrix, one partial span per row, 5x slower per coordinate than a wide one. AVX-512's masked moves cost what plain
// ones do, so there every partial load and store is a masked one, full or not (no test of the count: adafac's 1M
// step 7.3-7.4 -> 7.0-7.1 ms, a (131072, 8) tensor 16.3 -> 14 ms); elsewhere a full vector takes a plain move.
#if defined(__AVX512F__)
constexpr bool LO_MASKED_MOVES = true;
inline __mmask16 first_lanes(int count) { return static_cast<__mmask16>((1u << count) - 1u); }
#else
constexpr bool LO_MASKED_MOVES = false;
#endif

// The first `count` (1..L) floats at p, the other lanes zero (nothing past p + count is read).
inline vf load_partial(const float* p, int count) {
    if (!LO_MASKED_MOVES && count == L) return load(p);
#if defined(__AVX512F__)
    return (vf)_mm512_maskz_loadu_ps(first_lanes(count), p);
#elif defined(__AVX2__)
    return (vf)_mm256_maskload_ps(p, (__m256i)(lane_index() < (vi{} + count)));
#else
    vf v{};
    for (int i = 0; i < count; ++i) v[i] = p[i];
    return v;
#endif
}

// v with the lanes from `count` (1..L) on set to zero (padding lanes that must not count in a sum).
inline vf keep_first(vf v, int count) {
    if (!LO_MASKED_MOVES && count == L) return v;
#if defined(__AVX512F__)
    return (vf)_mm512_maskz_mov_ps(first_lanes(count), (__m512)v);
#else
    return lane_index() < (vi{} + count) ? v : vf{};
#endif
}

// Stores the first `count` (1..L) lanes of v at p (nothing past p + count is written).
inline void store_partial(float* p, vf v, int count) {
    if (!LO_MASKED_MOVES && count == L) return store(p, v);
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, first_lanes(count), (__m512)v);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(p, (__m256i)(lane_index() < (vi{} + count)), (__m256)v);
#else
    for (int i = 0; i < count; ++i) p[i] = v[i];
#endif
}

// fn(task) for task in [0, tasks) on up to `tasks` threads at once (the calling thread among them), each task on one
// thread. Built with OpenMP, the threads are those of the process's OpenMP runtime: in a torch process torch's own
// (the library then links the libgomp that torch loaded, by its soname), whose workers, spinning after torch's last
// parallel op, take the tasks at once; a new std::thread per task would compete with them for the cores instead.
// An exception in a task (std::bad_alloc) is caught on its thread and the first one rethrown on the calling thread
// once every task has ended: one leaving an OpenMP region or a std::thread would terminate the process.
template <class Fn>
void parallel_tasks(int tasks, Fn fn) {
    if (tasks <= 1) {
        if (tasks == 1) fn(0);
        return;
    }
    std::exception_ptr error;
    std::mutex error_lock;
    auto task_of = [&](int task) {
        try {
            fn(task);
        } catch (...) {
            const std::lock_guard<std::mutex> hold(error_lock);
            if (!error) error = std::current_exception();
        }
    };
#if defined(_OPENMP)
#pragma omp parallel num_threads(tasks)
    {
        // the runtime may grant fewer threads than asked: each takes every team-size-th task
        for (int task = omp_get_thread_num(); task < tasks; task += omp_get_num_threads()) task_of(task);
    }
#else
    std::vector<std::thread> pool;
    for (int task = 1; task < tasks; ++task) pool.emplace_back(task_of, task);
    task_of(0);
    for (auto& th : pool) th.join();
#endif
    if (error) std::rethrow_exception(error);
}

// The status codes of the library's int functions.
constexpr int DONE = 0;
constexpr int UNSUPPORTED = 1;    // nothing written: the caller takes the ATen path
constexpr int OUT_OF_MEMORY = 2;  // a C++ allocation failed part way: outputs may be partly written

// fn()'s status, or OUT_OF_MEMORY where it threw (std::bad_alloc from a vector or new): an exception must not
// leave a function called through ctypes, which would terminate the process.
template <class Fn>
int guarded(Fn fn) noexcept {
    try {
        return fn();
    } catch (...) {
        return OUT_OF_MEMORY;
    }
}

// fn(begin, end) over [0, n) split into `threads` contiguous ranges, each of at least `min_per_thread` items (fewer
// threads otherwise), on parallel_tasks.
template <class Fn>
void parallel_rows(int64_t n, int threads, Fn fn, int64_t min_per_thread = 256) {
    threads = static_cast<int>(std::min<int64_t>(threads, n / std::max<int64_t>(min_per_thread, 1)));
    const int64_t per = (n + threads - 1) / std::max(threads, 1);
    if (threads <= 1) {
        fn(int64_t{0}, n);
        return;
    }
    const int ranges = static_cast<int>((n + per - 1) / per);
    parallel_tasks(ranges, [&](int t) { fn(t * per, std::min(n, (t + 1) * per)); });
}

}  // namespace lo
