// The MLP update rule (Metz et al. 2019; learned_optim.nets.mlp.MLPUpdate) for float32 on CPU, fused.
//
// Per coordinate i, with D EMA decays b_j:
//     m_j' = b_j m_j + (1 - b_j) g,   v_j' = b_j v_j + (1 - b_j) g^2,   r_j = 1 / sqrt(v_j' + eps)
//     u = [g, theta, m', v', m' r, r]                                     (F = 2 + 4D features)
//     h = relu(W1 u + b1),   [d, a] = W2 h + b2,   delta = -d exp(lambda_a a) lambda_s
// where W1 already has each column scaled by the per-tensor 1 / rms of its feature and b1 holds the
// time features' contribution (see MLPUpdate.forward). The statistics pass returns, per feature, the sum
// of u_f^2 over the tensor, from which the caller takes the rms.
//
// L coordinates per vector (vec.h): features, hidden units and outputs are computed lane by lane, so no
// (rows x F) feature matrix or (rows x H) hidden matrix is ever written to memory, and each coordinate's
// result does not depend on the rows around it, the chunking or the thread count.

#include "vec.h"

using namespace lo;

namespace {

constexpr int MAX_D = 8;
constexpr int MAX_F = 2 + 4 * MAX_D;

struct Moments {
    int64_t n;
    int d;
    const float *grad, *param, *m, *v;  // m, v: (n, D) row-major
    const float* decay;
    float eps;
};

// Features of rows [r, r + L) into u[F]; with kMoments, the updated moments into m_new, v_new (L x D,
// row-major). A block past n reads zeros (through a padded copy), so every lane is computed the same way;
// a full block is read in place.
template <bool kMoments>
inline void features(const Moments& p, int64_t r, vf* u, float* m_new, float* v_new) {
    const int D = p.d;
    const int64_t rows = std::min<int64_t>(L, p.n - r);
    float pad_g[L], pad_th[L], pad_m[L * MAX_D], pad_v[L * MAX_D];
    const float *g = p.grad + r, *th = p.param + r, *m = p.m + r * D, *v = p.v + r * D;
    if (rows < L) {
        std::memset(pad_g, 0, sizeof pad_g);
        std::memset(pad_th, 0, sizeof pad_th);
        std::memset(pad_m, 0, sizeof pad_m);
        std::memset(pad_v, 0, sizeof pad_v);
        std::memcpy(pad_g, g, rows * sizeof(float));
        std::memcpy(pad_th, th, rows * sizeof(float));
        std::memcpy(pad_m, m, rows * D * sizeof(float));
        std::memcpy(pad_v, v, rows * D * sizeof(float));
        g = pad_g, th = pad_th, m = pad_m, v = pad_v;
    }
    const vf gv = load(g);
    u[0] = gv;
    u[1] = load(th);
    for (int j = 0; j < D; ++j) {
        float mj[L], vj[L];
        for (int i = 0; i < L; ++i) {
            mj[i] = m[i * D + j];
            vj[i] = v[i * D + j];
        }
        const float b = p.decay[j], one_minus = 1.0f - b;
        const vf mn = load(mj) * b + gv * one_minus;
        const vf vn = load(vj) * b + (gv * gv) * one_minus;
        const vf rs = 1.0f / sqrt_v(vn + p.eps);
        u[2 + j] = mn;
        u[2 + D + j] = vn;
        u[2 + 2 * D + j] = mn * rs;
        u[2 + 3 * D + j] = rs;
        if constexpr (kMoments) {
            store(mj, mn);
            store(vj, vn);
            for (int i = 0; i < L; ++i) {
                m_new[i * D + j] = mj[i];
                v_new[i * D + j] = vj[i];
            }
        }
    }
}

// a[q] = relu(b1[k + q] + sum_f w1[(k + q) F + f] u[f]) for the Q hidden units from k: Q independent FMA chains.
template <int Q>
inline void hidden_units(int k, int F, const float* w1, const float* b1, const vf* u, vf* a) {
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) a[q] = splat(b1[k + q]);
    for (int f = 0; f < F; ++f)
#pragma GCC unroll 8
        for (int q = 0; q < Q; ++q) a[q] += w1[(k + q) * F + f] * u[f];
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) a[q] = a[q] > vf{} ? a[q] : vf{};
}

}  // namespace

extern "C" {

// Sums over the n coordinates of each feature's square, into out[F] (double). Rows are taken in fixed
// blocks whose float partial sums are added in order, so the result does not depend on `threads`.
int lo_mlp_feature_sumsq_f32(int64_t n, int d, const float* grad, const float* param, const float* m, const float* v,
                             const float* decay, float eps, double* out, int threads) {
    return guarded([&]() -> int {
        if (d < 1 || d > MAX_D) return 1;
        const int F = 2 + 4 * d;
        constexpr int64_t BLOCK = 4096;
        const int64_t blocks = (n + BLOCK - 1) / BLOCK;
        std::vector<double> partial(static_cast<size_t>(blocks * F), 0.0);
        const Moments p{n, d, grad, param, m, v, decay, eps};
        parallel_rows(blocks, threads, [&](int64_t begin, int64_t end) {
            vf u[MAX_F];
            for (int64_t b = begin; b < end; ++b) {
                vf acc[MAX_F];
                for (int f = 0; f < F; ++f) acc[f] = vf{};
                for (int64_t r = b * BLOCK; r < std::min(n, (b + 1) * BLOCK); r += L) {
                    features<false>(p, r, u, nullptr, nullptr);
                    if (r + L > n) {  // padded lanes must not count
                        const int valid = static_cast<int>(n - r);
                        for (int f = 0; f < F; ++f)
                            for (int i = valid; i < L; ++i) u[f][i] = 0.0f;
                    }
                    for (int f = 0; f < F; ++f) acc[f] += u[f] * u[f];
                }
                for (int f = 0; f < F; ++f) {
                    double s = 0.0;
                    for (int i = 0; i < L; ++i) s += acc[f][i];
                    partial[b * F + f] = s;
                }
            }
        });
        for (int f = 0; f < F; ++f) out[f] = 0.0;
        for (int64_t b = 0; b < blocks; ++b)
            for (int f = 0; f < F; ++f) out[f] += partial[b * F + f];
        return 0;
    });
}

// delta (n), m_out, v_out (n, D). w1: (H, F) row-major, b1: (H), w2: (2, H), b2: (2).
int lo_mlp_update_f32(int64_t n, int d, int hidden, const float* grad, const float* param, const float* m,
                      const float* v, const float* decay, float eps, const float* w1, const float* b1,
                      const float* w2, const float* b2, float magnitude_scale, float step_scale, float* delta,
                      float* m_out, float* v_out, int threads) {
    return guarded([&]() -> int {
        if (d < 1 || d > MAX_D || hidden < 1) return 1;
        const int F = 2 + 4 * d;
        const Moments p{n, d, grad, param, m, v, decay, eps};
        const int64_t groups = (n + L - 1) / L;
        parallel_rows(groups, threads, [&](int64_t begin, int64_t end) {
            vf u[MAX_F];
            float m_new[L * MAX_D], v_new[L * MAX_D];
            for (int64_t grp = begin; grp < end; ++grp) {
                const int64_t r = grp * L;
                features<true>(p, r, u, m_new, v_new);
                vf dir = splat(b2[0]), mag = splat(b2[1]);
                // the output sums of four hidden units a[0..4), in the order the 4-unit loop below adds them
                auto add_four = [&](int k, const vf* a) {
                    dir += w2[k] * a[0] + w2[k + 1] * a[1] + w2[k + 2] * a[2] + w2[k + 3] * a[3];
                    mag += w2[hidden + k] * a[0] + w2[hidden + k + 1] * a[1] + w2[hidden + k + 2] * a[2] +
                           w2[hidden + k + 3] * a[3];
                };
                int k = 0;
                // eight hidden units at a time: independent FMA chains enough to cover the FMA latency at two FMAs
                // per cycle (four ran an AVX2 core at one per cycle); the features enter as memory operands
                for (; k + 8 <= hidden; k += 8) {
                    vf a[8];
                    hidden_units<8>(k, F, w1, b1, u, a);
                    add_four(k, a);
                    add_four(k + 4, a + 4);
                }
                for (; k + 4 <= hidden; k += 4) {
                    vf a[4];
                    hidden_units<4>(k, F, w1, b1, u, a);
                    add_four(k, a);
                }
                for (; k < hidden; ++k) {
                    vf a;
                    hidden_units<1>(k, F, w1, b1, u, &a);
                    dir += w2[k] * a;
                    mag += w2[hidden + k] * a;
                }
                const vf out = -dir * exp_neg_v(mag * -magnitude_scale) * step_scale;
                const int64_t rows = std::min<int64_t>(L, n - r);
                float tmp[L];
                store(tmp, out);
                std::memcpy(delta + r, tmp, rows * sizeof(float));
                std::memcpy(m_out + r * d, m_new, rows * d * sizeof(float));
                std::memcpy(v_out + r * d, v_new, rows * d * sizeof(float));
            }
        });
        return 0;
    });
}

}  // extern "C"

extern "C" {

// The two functions above over k packed tensors (the optimizer's packed step): segment s holds rows
// [offsets[s], offsets[s + 1]), its own first-layer weight w1s + s H F (the per-tensor feature scaling
// folded in) and its own F sums in out + s F. Each segment is computed exactly as the single-tensor call
// on it would compute it, so the packed step gives the per-tensor step's bits.
int lo_mlp_feature_sumsq_segments_f32(int64_t k, const int64_t* offsets, int d, const float* grad, const float* param,
                                      const float* m, const float* v, const float* decay, float eps, double* out,
                                      int threads) {
    const int F = 2 + 4 * d;
    for (int64_t s = 0; s < k; ++s) {
        const int64_t o = offsets[s], n = offsets[s + 1] - o;
        if (const int code = lo_mlp_feature_sumsq_f32(n, d, grad + o, param + o, m + o * d, v + o * d, decay, eps,
                                                      out + s * F, threads))
            return code;
    }
    return 0;
}

int lo_mlp_update_segments_f32(int64_t k, const int64_t* offsets, int d, int hidden, const float* grad,
                               const float* param, const float* m, const float* v, const float* decay, float eps,
                               const float* w1s, const float* b1, const float* w2, const float* b2,
                               float magnitude_scale, float step_scale, float* delta, float* m_out, float* v_out,
                               int threads) {
    const int F = 2 + 4 * d;
    for (int64_t s = 0; s < k; ++s) {
        const int64_t o = offsets[s], n = offsets[s + 1] - o;
        if (const int code = lo_mlp_update_f32(n, d, hidden, grad + o, param + o, m + o * d, v + o * d, decay, eps,
                                               w1s + s * hidden * F, b1, w2, b2, magnitude_scale, step_scale,
                                               delta + o, m_out + o * d, v_out + o * d, threads))
            return code;
    }
    return 0;
}

}  // extern "C"
