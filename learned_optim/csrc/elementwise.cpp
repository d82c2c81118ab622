// Elementwise float32 kernels (in place, contiguous) for the learned_optim nets' inference path.
//
// ELU: ATen's CPU ELU evaluates expm1 one element at a time (about 8 ns per element here, half of an
// RNNProp step); this one is vectorized:
//     elu(z) = z                                     for z > 0
//            = z + z^2 (1/2! + z/3! + ... + z^6/8!)  for -0.5 <= z <= 0  (Taylor: error < z^9/9! ~ 5e-9)
//            = e^z - 1                                for z < -0.5        (no cancellation: e^z - 1 < -0.39)

#include "vec.h"

using namespace lo;

namespace {

inline vf elu_v(vf z) {
    vf p = splat(1.0f / 40320.0f);
    p = p * z + 1.0f / 5040.0f;
    p = p * z + 1.0f / 720.0f;
    p = p * z + 1.0f / 120.0f;
    p = p * z + 1.0f / 24.0f;
    p = p * z + 1.0f / 6.0f;
    p = p * z + 0.5f;
    const vf small = (z * z) * p + z;
    const vf large = exp_neg_v(-z) - 1.0f;
    const vf negative = z < -0.5f ? large : small;
    return z > 0.0f ? z : (z == z ? negative : z);
}

}  // namespace

extern "C" {

void lo_elu_f32(int64_t n, float* z, int threads) {
    parallel_rows(n, threads, [z](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + L <= end; i += L) store(z + i, elu_v(load(z + i)));
        if (i < end) {  // the last < L values through a padded vector (lanes are independent)
            float tail[L] = {};
            std::memcpy(tail, z + i, (end - i) * sizeof(float));
            store(tail, elu_v(load(tail)));
            std::memcpy(z + i, tail, (end - i) * sizeof(float));
        }
    });
}

}  // extern "C"

extern "C" {

// Floats per vector of this build (16 AVX-512, 8 AVX2, 4 portable): what learned_optim.kernels.report() shows.
int lo_vector_lanes() { return L; }

// Whether this build runs its threads on the process's OpenMP runtime (vec.h's parallel_tasks) rather than its own.
int lo_uses_openmp() {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
