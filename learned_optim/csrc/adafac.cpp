// The adafac_mlp update rule (learned_optim.nets.adafac_mlp.AdafacMLP) for float32 on CPU: the two passes
// of its inference path, each fused into one sweep over memory.
//
// The tensor is viewed as a (rows, cols) matrix (features.matrix_view), coordinate i = r cols + c. With J
// momentum decays b_j, the second-moment decay b_v and its bias correction k_v = 1 / (1 - b_v^t), and the
// factored preconditioner phi_k(r, c) = a_k[r] e_k[c] (a = rsqrt(row / mean(row)), e = rsqrt(col), from
// the new Adafactor statistics, computed by the caller):
//
//   m_j' = m_j + (1 - b_j)(g - m_j),   v' = b_v v + (1 - b_v) g^2,   s = 1 / sqrt(k_v v' + eps)
//   u = [g, theta, m_j', v', m_j' s, s, g phi_k, m_k' phi_k]                          (F = 4 + 4J raw features)
//
// Pass 1 (state_sumsq) writes m_j', v' (in place allowed) and the sum over the tensor of each
// u_f^2. Pass 2 (direction_pass) recomputes u from the new state and runs the MLP
//
//   h_1 = relu(W_1 u + row_term[:, r] + col_term[:, c]),   h_l = relu(W_l h_{l-1} + b_l),   d = w_o h + b_o
//
// where W_1 (H, F) has the per-tensor feature normalisation folded into its columns and row_term (H, rows),
// col_term (H, cols) carry the first layer's bias and the row and column features (AdafacMLP._first_layer);
// it writes d and returns the sum of d^2 (the caller RMS-normalises and scales d).
//
// L coordinates per vector (vec.h), lanes along a row (along the vector for a one-column matrix): no feature
// or activation matrix is ever written to memory. Sums are taken per block of about BLOCK coordinates (whole
// rows; float lanes flushed into double every FLUSH vectors) and the blocks' sums are added in order, so they
// do not depend on the thread count; a coordinate's outputs do not depend on the coordinates around it.

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "vec.h"

using namespace lo;

namespace {

constexpr int MAX_J = 8;
constexpr int MAX_F = 4 + 4 * MAX_J;
constexpr int MAX_H = 32;
constexpr int64_t BLOCK = 4096;
constexpr int FLUSH = 256;
// Blocks per thread, at least (4 blocks take ~25 us in pass 1 and ~0.1 ms in pass 2; AVX-512, hidden 8). A step
// usually follows torch's own parallel work (forward, backward), whose OpenMP threads spin on the cores for a while
// after it. Built with OpenMP (parallel_tasks) the kernel runs on those very threads, and 4 blocks pay; with threads
// of its own they compete with the spinning ones, and at 4 blocks per thread a transformer's step on two threads
// took up to 2.5x as long as on one, so 16 (measured between Adam steps: benchmarks/train_step.py --step-only).
#if defined(_OPENMP)
constexpr int64_t MIN_BLOCKS_PER_THREAD = 4;
#else
constexpr int64_t MIN_BLOCKS_PER_THREAD = 16;
#endif
// Hidden units computed together: 8 independent FMA chains cover the FMA latency (4 cycles) at 2 FMAs per cycle.
// With 16 registers (AVX2, SSE) the features then stay on the stack and enter the FMAs as memory operands; 4
// chains, which left room for them in registers, ran pass 2 at 1 FMA per cycle (6.8 ms against 5.6-6.0 ms at 8
// over a 1000 x 1000 tensor, AVX2 build, hidden 8).
constexpr int UNITS = 8;

struct Geometry {
    int64_t rows, cols;
    bool column() const { return cols == 1; }  // a vector: lanes run along the rows
    int64_t rows_per_block() const { return column() ? BLOCK : std::max<int64_t>(1, BLOCK / cols); }
    int64_t blocks() const { return (rows + rows_per_block() - 1) / rows_per_block(); }
};

// Up to L coordinates [i, i + count) of one row r, from column c (or, in a column, rows r.. r + count).
struct Span {
    int64_t i;
    int count;
    int64_t r, c;
};

// Whether full spans get a call of fn of their own, where their count is the constant L. Without AVX-512's masked
// moves each partial load and store of a span tests its count (AVX2's masked store is slow), and the full spans' own
// copy of the per-span code has none of these tests (AVX2 build, a 1M step 9.1-9.9 -> 8.5-8.8 ms). With AVX-512
// every load and store is a masked one, the same for all spans, and a second copy only made the step slower
// (7.0-7.1 -> 7.4-7.6 ms; a (131072, 8) tensor, whose spans are all partial, 14 -> 19 ms). Only on the 16-register
// builds, where it was measured: AArch64 (32 registers, the per-span code force-inlined) keeps one call, unmeasured.
constexpr bool FULL_SPANS_APART = !LO_MASKED_MOVES && LO_REGISTERS < 32;

// fn(span) over the coordinates of block `block`, in order.
template <class Fn>
void for_each_span(const Geometry& geo, int64_t block, Fn fn) {
    const int64_t per = geo.rows_per_block(), r0 = block * per, r1 = std::min(geo.rows, r0 + per);
    if constexpr (FULL_SPANS_APART) {
        if (geo.column()) {
            int64_t r = r0;
            for (; r + L <= r1; r += L) fn(Span{r, L, r, 0});
            if (r < r1) fn(Span{r, static_cast<int>(r1 - r), r, 0});
            return;
        }
        for (int64_t r = r0; r < r1; ++r) {
            int64_t c = 0;
            for (; c + L <= geo.cols; c += L) fn(Span{r * geo.cols + c, L, r, c});
            if (c < geo.cols) fn(Span{r * geo.cols + c, static_cast<int>(geo.cols - c), r, c});
        }
        return;
    }
    if (geo.column()) {
        for (int64_t r = r0; r < r1; r += L) fn(Span{r, static_cast<int>(std::min<int64_t>(L, r1 - r)), r, 0});
        return;
    }
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < geo.cols; c += L)
            fn(Span{r * geo.cols + c, static_cast<int>(std::min<int64_t>(L, geo.cols - c)), r, c});
}

// The lanes' values of a per-row array a (rows) and of a per-column array e (cols).
inline vf row_part(const Geometry& geo, const Span& s, const float* a) {
    return geo.column() ? load_partial(a + s.r, s.count) : splat(a[s.r]);
}

inline vf col_part(const Geometry& geo, const Span& s, const float* e) {
    return geo.column() ? splat(e[0]) : load_partial(e + s.c, s.count);
}

struct Inputs {
    Geometry geo;
    const float *grad, *param;
    const float* const* m;  // J vectors
    const float* v;
    float v_correction, eps;
    const float *row_factor, *col_factor;  // (J, rows), (J, cols)
};

struct StateUpdate {
    float* const* m_out;  // J vectors (may be the m vectors themselves)
    float* v_out;
    const float* beta;  // (J)
    float beta_v;
};

// The raw features of span s into u[4 + 4J]. With `update`, the state is first updated (and written out) and
// the features are those of the new state; without, m and v already are the new state.
template <int J>
inline void features(const Inputs& p, const Span& s, const StateUpdate* update, vf* u) {
    const int n = s.count;
    const vf g = load_partial(p.grad + s.i, n);
    vf v = load_partial(p.v + s.i, n);
    if (update != nullptr) {
        v = v * update->beta_v + (g * g) * (1.0f - update->beta_v);
        store_partial(update->v_out + s.i, v, n);
    }
    const vf rs = 1.0f / sqrt_v(v * p.v_correction + p.eps);
    u[0] = g;
    u[1] = load_partial(p.param + s.i, n);
    u[2 + J] = v;
    u[3 + 2 * J] = rs;
#pragma GCC unroll 8
    for (int k = 0; k < J; ++k) {
        vf m = load_partial(p.m[k] + s.i, n);
        if (update != nullptr) {
            m = m + (g - m) * (1.0f - update->beta[k]);
            store_partial(update->m_out[k] + s.i, m, n);
        }
        const vf phi = row_part(p.geo, s, p.row_factor + k * p.geo.rows) *
                       col_part(p.geo, s, p.col_factor + k * p.geo.cols);
        u[2 + k] = m;
        u[3 + J + k] = m * rs;
        u[4 + 2 * J + k] = g * phi;
        u[4 + 3 * J + k] = m * phi;
    }
}

// out[0..K) = the sums over the tensor of the squares of the K vectors fn(span, x) writes per span (lanes past
// the span's count excluded), deterministic whatever `threads` (see the top of this file). Vector WIDE (if any) is
// squared and summed in double lanes: the second moment v ~ g^2, whose square leaves float's range from |g| ~ 4e9.
template <int K, int WIDE = -1, class Fn>
void sum_squares(const Geometry& geo, double* out, int threads, Fn fn) {
    constexpr int k = K;
    const int64_t blocks = geo.blocks();
    std::vector<double> partial(static_cast<size_t>(blocks * k), 0.0);
    parallel_rows(blocks, threads, [&](int64_t begin, int64_t end) {
        vf x[K], acc[K];
        vd wide{};
        for (int64_t b = begin; b < end; ++b) {
            double* sums = partial.data() + b * k;
            int pending = 0;
            auto flush = [&] {
                for (int f = 0; f < k; ++f) {
                    double total = 0.0;
                    for (int i = 0; i < L; ++i) total += acc[f][i];
                    sums[f] += total;
                    acc[f] = vf{};
                }
                if constexpr (WIDE >= 0) {
                    double total = 0.0;
                    for (int i = 0; i < L; ++i) total += wide[i];
                    sums[WIDE] += total;
                    wide = vd{};
                }
                pending = 0;
            };
            for (int f = 0; f < k; ++f) acc[f] = vf{};
            for_each_span(geo, b, [&](const Span& s) LO_INLINE_SPAN {
                fn(s, x);
                if (s.count < L)
                    for (int f = 0; f < k; ++f) x[f] = keep_first(x[f], s.count);
#pragma GCC unroll 40
                for (int f = 0; f < k; ++f)
                    if (f != WIDE) acc[f] += x[f] * x[f];
                if constexpr (WIDE >= 0) {
                    const vd w = widen(x[WIDE]);
                    wide += w * w;
                }
                if (++pending == FLUSH) flush();
            });
            flush();
        }
    }, MIN_BLOCKS_PER_THREAD);
    for (int f = 0; f < k; ++f) out[f] = 0.0;
    for (int64_t b = 0; b < blocks; ++b)
        for (int f = 0; f < k; ++f) out[f] += partial[b * k + f];
}

// max(x, 0), +0 for a NaN or a -0 (x86: one max instruction).
inline vf relu(vf x) { return extreme<true>(x, vf{}); }

// The MLP's weights as pass 2 reads them. With 16 registers (AVX2, SSE), whose FMAs cannot broadcast a float from
// memory, each weight is stored as a whole vector (its value in every lane), so that an FMA takes it as its memory
// operand: one instruction where a broadcast and an FMA were two. With 32 registers (AVX-512 broadcasts from memory
// inside the FMA; AArch64) a float each.
using Weight = std::conditional_t<(LO_REGISTERS < 32), vf, float>;

inline Weight as_weight(float w) { return w - Weight{}; }  // w - (+0) is w, -0 included

// One dense layer on vectors: y[h] = relu(init(h) + sum_i w[i, h] x[i]) for h < units (a multiple of UNITS;
// w is (inputs, units), transposed and zero-padded), UNITS hidden units (independent FMA chains) at a time;
// N > 0: `inputs` is N, so the loop over the inputs unrolls and x stays in registers; U > 0: `units` is U,
// so the layer's activations stay in registers too (with a run-time width they go through the stack).
template <int N, int U, class Init>
inline void dense_relu(int units_, int inputs_, const Weight* w, const vf* x, vf* y, Init init) {
    const int inputs = N > 0 ? N : inputs_;
    const int units = U > 0 ? U : units_;
    for (int h0 = 0; h0 < units; h0 += UNITS) {
        vf a[UNITS];
#pragma GCC unroll 8
        for (int q = 0; q < UNITS; ++q) a[q] = init(h0 + q);
#pragma GCC unroll 40
        for (int i = 0; i < inputs; ++i) {
            const Weight* wi = w + i * units + h0;
#pragma GCC unroll 8
            for (int q = 0; q < UNITS; ++q) a[q] += wi[q] * x[i];
        }
#pragma GCC unroll 8
        for (int q = 0; q < UNITS; ++q) y[h0 + q] = relu(a[q]);
    }
}

// w . x for `units` vectors x (a multiple of UNITS; U if U > 0), in UNITS independent chains.
template <int U>
inline vf dot(int units_, const Weight* w, const vf* x) {
    const int units = U > 0 ? U : units_;
    vf a[UNITS] = {};
    for (int h0 = 0; h0 < units; h0 += UNITS)
#pragma GCC unroll 8
        for (int q = 0; q < UNITS; ++q) a[q] += w[h0 + q] * x[h0 + q];
    for (int width = UNITS / 2; width > 0; width /= 2)
        for (int q = 0; q < width; ++q) a[q] += a[q + width];
    return a[0];
}

// fn(std::integral_constant<int, J>) for the number of momenta j in 1..MAX_J (the features' loops unrolled
// at compile time); 1 for any other j.
template <class Fn>
int with_momenta(int j, Fn fn) {
    static_assert(MAX_J == 8, "one case per supported J");
    switch (j) {
        case 1: return fn(std::integral_constant<int, 1>{});
        case 2: return fn(std::integral_constant<int, 2>{});
        case 3: return fn(std::integral_constant<int, 3>{});
        case 4: return fn(std::integral_constant<int, 4>{});
        case 5: return fn(std::integral_constant<int, 5>{});
        case 6: return fn(std::integral_constant<int, 6>{});
        case 7: return fn(std::integral_constant<int, 7>{});
        case 8: return fn(std::integral_constant<int, 8>{});
        default: return 1;
    }
}

// fn(std::integral_constant<int, W>) with W the padded hidden width hp when it is 8 or 16 (the MLP's layers
// unrolled at compile time, activations in registers), else W = 0 (the width read at run time).
template <class Fn>
int with_width(int hp, Fn fn) {
    if (hp == 8) return fn(std::integral_constant<int, 8>{});
    if (hp == 16) return fn(std::integral_constant<int, 16>{});
    return fn(std::integral_constant<int, 0>{});
}

// Pass 1: the new state into m_out[j], v_out and the F sums of squares into out (double). row_factor (J, rows)
// and col_factor (J, cols) row-major. Returns nonzero (and does nothing) for sizes it does not handle.
int state_sumsq(int64_t rows, int64_t cols, int j, const float* grad, const float* param,
                const float* const* m, const float* v, float* const* m_out, float* v_out,
                const float* beta, float beta_v, float v_correction, float eps, const float* row_factor,
                const float* col_factor, double* out, int threads) {
    if (rows < 1 || cols < 1) return 1;
    const Inputs p{{rows, cols}, grad, param, m, v, v_correction, eps, row_factor, col_factor};
    const StateUpdate update{m_out, v_out, beta, beta_v};
    return with_momenta(j, [&](auto momenta) {
        constexpr int J = decltype(momenta)::value;
        sum_squares<4 + 4 * J, 2 + J>(p.geo, out, threads,
                               [&](const Span& s, vf* u) LO_INLINE_SPAN { features<J>(p, s, &update, u); });
        return 0;
    });
}

// The hidden width padded to a multiple of UNITS (padded units compute relu(0) = 0 and have zero outgoing weights).
inline int padded_width(int hidden) { return (hidden + UNITS - 1) / UNITS * UNITS; }
// Whether pass 2 tests h < H before it reads a unit's row and column terms, although a padded unit's are zero: the
// test costs AVX-512 ~5% of the step, but without it GCC's code for the 16-register builds ran 15% slower (AVX2,
// a 1M step 10.9 -> 12.5 ms).
constexpr bool TEST_PADDED_UNITS = LO_REGISTERS < 32;

// Pass 2: the raw direction into `direction` (rows * cols) and the sum of its squares into *sumsq. m, v: the
// new state. w1 (H, F); row_term (HP, rows), col_term (HP, cols) with HP = padded_width(H) and the rows of the
// padded units zero (so that a unit's first-layer term needs no test of h < H); `layers` ReLU layers in all, so
// layers - 1 hidden ones: w (layers - 1, H, H), b (layers - 1, H); the output layer w_out (H), b_out.
int direction_pass(int64_t rows, int64_t cols, int j, const float* grad, const float* param,
                   const float* const* m, const float* v, float v_correction, float eps,
                   const float* row_factor, const float* col_factor, int hidden, int layers, const float* w1,
                   const float* row_term, const float* col_term, const float* w, const float* b,
                   const float* w_out, float b_out, float* direction, double* sumsq, int threads) {
    if (rows < 1 || cols < 1 || j < 1 || j > MAX_J || hidden < 1 || hidden > MAX_H || layers < 1) return 1;
    const Inputs p{{rows, cols}, grad, param, m, v, v_correction, eps, row_factor, col_factor};
    const int F = 4 + 4 * j, H = hidden, HP = padded_width(hidden);
    // the weights transposed to (inputs, units), with the hidden units zero-padded to a multiple of UNITS (a
    // padded unit is relu(0) = 0 and its outgoing weights are zero)
    std::vector<Weight> w1p(static_cast<size_t>(F * HP)), wp(static_cast<size_t>((layers - 1) * HP * HP)),
        wop(static_cast<size_t>(HP));  // zeros
    std::vector<float> bp(static_cast<size_t>((layers - 1) * HP), 0.0f);
    for (int h = 0; h < H; ++h) {
        for (int f = 0; f < F; ++f) w1p[f * HP + h] = as_weight(w1[h * F + f]);
        wop[h] = as_weight(w_out[h]);
        for (int l = 0; l < layers - 1; ++l) {
            for (int i = 0; i < H; ++i) wp[(l * HP + i) * HP + h] = as_weight(w[(l * H + h) * H + i]);
            bp[l * HP + h] = b[l * H + h];
        }
    }
    return with_momenta(j, [&](auto momenta) {
        return with_width(HP, [&](auto width) {
            constexpr int J = decltype(momenta)::value, W = decltype(width)::value;
            sum_squares<1>(p.geo, sumsq, threads, [&](const Span& s, vf* out) LO_INLINE_SPAN {
                vf u[4 + 4 * J], acts[2][W > 0 ? W : MAX_H];
                vf *x = acts[0], *y = acts[1];
                features<J>(p, s, nullptr, u);
                dense_relu<4 + 4 * J, W>(HP, F, w1p.data(), u, x, [&](int h) {
                    return (!TEST_PADDED_UNITS || h < H)
                               ? row_part(p.geo, s, row_term + h * rows) + col_part(p.geo, s, col_term + h * cols)
                               : vf{};
                });
                for (int l = 0; l < layers - 1; ++l) {
                    const float* bias = bp.data() + l * HP;
                    dense_relu<W, W>(HP, HP, wp.data() + l * HP * HP, x, y, [&](int h) { return splat(bias[h]); });
                    std::swap(x, y);
                }
                const vf d = dot<W>(HP, wop.data(), x) + b_out;
                store_partial(direction + s.i, d, s.count);
                out[0] = d;
            });
            return 0;
        });
    });
}

// sums[k], sums[K + k], sums[2K + k] = the sums over the rows of x, x^2 and 1/(x + eps) (a row statistic, its
// square and the square of its feature rsqrt(x + eps)) for x = stats[r K + k], the (rows, K) statistics
// row-major. K vectors cover K L consecutive floats, lane i of vector q always holding statistic (q L + i) mod K:
// float lanes flushed into double every FLUSH groups, one thread (deterministic); x^2 (x ~ g^2) in double lanes.
void row_feature_sums(const float* stats, int64_t rows, int K, float eps, double* sums) {
    vf values[MAX_J] = {}, rsqrt_squares[MAX_J] = {};
    vd squares[MAX_J] = {};
    const int64_t total = rows * K, group = static_cast<int64_t>(K) * L;
    std::fill(sums, sums + 3 * K, 0.0);
    int pending = 0;
    auto flush = [&] {
        for (int q = 0; q < K; ++q) {
            for (int i = 0; i < L; ++i) {
                const int k = (q * L + i) % K;
                sums[k] += values[q][i];
                sums[K + k] += squares[q][i];
                sums[2 * K + k] += rsqrt_squares[q][i];
            }
            values[q] = rsqrt_squares[q] = vf{};
            squares[q] = vd{};
        }
        pending = 0;
    };
    int64_t p = 0;
    for (; p + group <= total; p += group) {
        for (int q = 0; q < K; ++q) {
            const vf x = load(stats + p + q * L), y = 1.0f / sqrt_v(x + eps);
            const vd w = widen(x);
            values[q] += x;
            squares[q] += w * w;
            rsqrt_squares[q] += y * y;
        }
        if (++pending == FLUSH) flush();
    }
    flush();
    for (; p < total; ++p) {
        const float x = stats[p], y = 1.0f / std::sqrt(x + eps);
        const int k = static_cast<int>(p % K);
        sums[k] += x;
        sums[K + k] += static_cast<double>(x) * x;
        sums[2 * K + k] += y * y;
    }
}

// The factor q / sqrt(q^2 ms + eps) that normalises a feature of scale q and mean square ms over its tensor, in
// double (ms of a feature ~ g^2 is past float's range where the factor is not), rounded to float.
inline float normaliser(float q, double ms, float eps) {
    const double scale = q;
    return static_cast<float>(scale / std::sqrt(scale * scale * ms + static_cast<double>(eps)));
}

// a + alpha b rounded as ATen's add_(b, alpha=alpha) rounds it: one fused multiply-add where the build has them (ATen's
// CPU kernels use FMA there), else two roundings. Explicit, so that the compiler's contraction cannot fuse the product
// inside a instead (a bf16 parameter updated here and by the Python update then rounded differently).
inline float add_scaled(float a, float alpha, float b) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    return std::fma(alpha, b, a);
#else
    return a + alpha * b;
#endif
}

// A growable float buffer whose contents start undefined (std::vector would zero every float on each resize).
class Scratch {
   public:
    float* get(int64_t n) {
        if (n > size_) {
            data_.reset(new float[static_cast<size_t>(n)]);
            size_ = n;
        }
        return data_.get();
    }

   private:
    std::unique_ptr<float[]> data_;
    int64_t size_ = 0;
};

}  // namespace

extern "C" {

// The whole inference step of S tensors, tensor s being the (rows_s, cols_s) matrix view views[2s], views[2s + 1]
// whose arrays are grad[s], param[s], m[k S + s] (k < J), v[s] (n_s floats each), row[s] ((rows_s, K)) and col[s]
// ((cols_s, K)), and likewise the outputs (which may be the inputs): the tensors' own storage (the optimizer's
// in-place step, AdafacMLP.step_in_place) or places in pack buffers (its packed step, AdafacMLP._packed_forward).
// Per tensor, with the K = J factored decays d_k and the step-count terms: the second moment's bias correction
// k_v = v_correction[c], the feature factors q = feature_scale[c F ..] (F = 4 + 4J) and the first layer's bias
// b1[c H ..] (which carries the time features), where c = s with per_tensor_counts (the tensors' step counts differ)
// and c = 0 without (one count, one set of terms for every tensor):
//
//   r_k' = d_k r_k + (1 - d_k)(mean_c g^2 + eps_f),  c_k' = d_k c_k + (1 - d_k)(mean_r g^2 + eps_f)
//   (written into row_out, col_out);  a_k = rsqrt(r_k' / mean_r r_k'),  e_k = rsqrt(c_k')  (passes 1 and 2's factors);
//   row features [r_k', rsqrt(r_k' + eps_r)] (2K, rows), column features likewise, each scaled by the
//   rsqrt of its mean square over the tensor plus eps_u; pass 1 (new m, v; the dense features' sums of
//   squares S_f), so that dense feature f enters as z_f u_f with z_f = q_f / sqrt(q_f^2 S_f / n + eps_u)
//   (q: feature_scale, the bias corrections of the ratio rows); the first layer's bias b1 and its row and
//   column features become row_term and col_term; pass 2 (the raw direction d and sum d^2); then
//
//   delta = -step_scales[s] * [q_a sqrt(S_a / n)] * clip([rsqrt(sum d^2 / n + eps_d)] * d)
//
// the first bracket for an Adam magnitude (adam_index >= 0), the second with `normalize`; clip bounds each
// coordinate of the normalised direction at +-direction_clip where that is above 0 (else clips nothing). w1 is the first
// layer's whole weight (H, 4 + 4J + 4J): dense, row, then column features. Writes delta into direction[s]; or,
// with param_out (param_out[s]: the parameters themselves, or a copy of them), applies the decoupled update there
// in the same sweep, param_out = param (1 - lr wd) + lr delta, and leaves `direction` alone (d goes to a scratch
// vector per thread). With several threads, the tensors too small to be split go to the threads whole.
int lo_adafac_pack_step_f32(int64_t tensors, const int64_t* views, int j, const float* const* grad,
                            const float* const* param, const float* const* m, const float* const* v,
                            float* const* m_out, float* const* v_out, const float* const* row,
                            const float* const* col, float* const* row_out, float* const* col_out, const float* beta,
                            float beta_v, const float* v_correction, float moment_eps, const float* factored_decay,
                            float factored_eps, float factored_rsqrt_eps, const float* feature_scale,
                            int per_tensor_counts, float feature_rms_eps, int hidden, int layers, const float* w1,
                            const float* b1,
                            const float* w, const float* b, const float* w_out, float b_out, int adam_index,
                            int normalize, float direction_rms_eps, float direction_clip, const float* step_scales,
                            float* const* direction,
                            float* const* param_out, double lr, double weight_decay, int threads) {
    return guarded([&]() -> int {
        if (tensors < 1 || j < 1 || j > MAX_J || hidden < 1 || hidden > MAX_H || layers < 1) return 1;
        for (int64_t s = 0; s < tensors; ++s)
            if (views[2 * s] < 1 || views[2 * s + 1] < 1) return 1;  // before anything is written
        const int H = hidden, HP = padded_width(hidden);
        // tensor s alone, its blocks over `inner` threads; `scratch`: the raw direction's storage when the update is
        // applied (the direction itself is not returned then)
        auto step_tensor = [&](int64_t s, int inner, Scratch& scratch) -> int {
            const int64_t rows = views[2 * s], cols = views[2 * s + 1], n = rows * cols;
            const int64_t c = per_tensor_counts ? s : 0;  // this tensor's step-count terms
            const float *g = grad[s], *theta = param[s], *bias = b1 + c * H, correction = v_correction[c];
            // one instance per number of decays K (= J): its loops over the K row statistics unroll
            return with_momenta(j, [&](auto momenta) {
                constexpr int K = decltype(momenta)::value, F = 4 + 4 * K, NR = 2 * K, KIN = F + 2 * NR;
                const float* q = feature_scale + c * F;
                // Adafactor's row and column means of g^2 and their EMAs (row_out, col_out)
                std::vector<double> col_sum(static_cast<size_t>(cols), 0.0);
                double column_lanes[8] = {};  // a vector's one column, summed in eight chains
                const float *row_in = row[s], *col_in = col[s];
                float *row_new = row_out[s], *col_new = col_out[s];
                // a vector (one column): a row per coordinate, its mean of g^2 the coordinate's own (the general loop's
                // sum of one float in double, divided by one, is that float); its column sum in eight chains
                for (int64_t r = 0; cols == 1 && r < rows; r += 8) {
                    const int count = static_cast<int>(std::min<int64_t>(8, rows - r));
                    for (int q = 0; q < count; ++q) {
                        const float g2 = g[r + q] * g[r + q], mean = g2 + factored_eps;
                        column_lanes[q] += g2;
    #pragma GCC unroll 8
                        for (int k = 0; k < K; ++k)
                            row_new[(r + q) * K + k] =
                                row_in[(r + q) * K + k] * factored_decay[k] + mean * (1.0f - factored_decay[k]);
                    }
                }
                for (int64_t r = 0; cols > 1 && r < rows; ++r) {
                    const float* gr = g + r * cols;
                    // eight partial sums of the row (one dependency chain would cost an add's latency per coordinate)
                    double lanes[8] = {}, total = 0.0;
                    int64_t c = 0;
                    for (; c + 8 <= cols; c += 8)
    #pragma GCC unroll 8
                        for (int k = 0; k < 8; ++k) {
                            const float g2 = gr[c + k] * gr[c + k];
                            lanes[k] += g2;
                            col_sum[c + k] += g2;
                        }
                    for (; c < cols; ++c) {
                        const float g2 = gr[c] * gr[c];
                        total += g2;
                        col_sum[c] += g2;
                    }
                    for (int k = 0; k < 8; ++k) total += lanes[k];
                    const float mean = static_cast<float>(total / cols) + factored_eps;
                    for (int k = 0; k < K; ++k)
                        row_new[r * K + k] = row_in[r * K + k] * factored_decay[k] + mean * (1.0f - factored_decay[k]);
                }
                if (cols == 1)
                    for (int k = 0; k < 8; ++k) col_sum[0] += column_lanes[k];
                for (int64_t c = 0; c < cols; ++c) {
                    const float mean = static_cast<float>(col_sum[c] / rows) + factored_eps;
                    for (int k = 0; k < K; ++k)
                        col_new[c * K + k] = col_in[c * K + k] * factored_decay[k] + mean * (1.0f - factored_decay[k]);
                }
                // the factors a (K, rows), e (K, cols); the column features (2K, cols): c_k', rsqrt(c_k' + eps_r); each
                // row or column feature's normaliser, the rsqrt of its mean square over the tensor plus eps_u
                std::vector<float> row_factor(static_cast<size_t>(K * rows)), col_factor(static_cast<size_t>(K * cols));
                std::vector<float> col_features(static_cast<size_t>(NR * cols));
                float row_norm[2 * MAX_J], col_norm[2 * MAX_J];
                double row_sums[3 * MAX_J];
                row_feature_sums(row_new, rows, K, factored_rsqrt_eps, row_sums);
                for (int f = 0; f < NR; ++f) row_norm[f] = normaliser(1.0f, row_sums[K + f] / rows, feature_rms_eps);
                for (int k = 0; k < K; ++k) {
                    const float mean = static_cast<float>(row_sums[k] / rows);
                    for (int64_t r = 0; r < rows; ++r) row_factor[k * rows + r] = 1.0f / std::sqrt(row_new[r * K + k] / mean);
                    float *x = col_features.data() + k * cols, *y = col_features.data() + (K + k) * cols;
                    for (int64_t c = 0; c < cols; ++c) {
                        x[c] = col_new[c * K + k];
                        y[c] = 1.0f / std::sqrt(x[c] + factored_rsqrt_eps);
                        col_factor[k * cols + c] = 1.0f / std::sqrt(x[c]);
                    }
                }
                for (int f = 0; f < NR; ++f) {
                    const float* x = col_features.data() + f * cols;
                    double squares = 0.0;
                    for (int64_t c = 0; c < cols; ++c) squares += static_cast<double>(x[c]) * x[c];
                    col_norm[f] = normaliser(1.0f, squares / cols, feature_rms_eps);
                }
                const float* ms_[MAX_J];
                float* ms_out[MAX_J];
                for (int k = 0; k < j; ++k) ms_[k] = m[k * tensors + s], ms_out[k] = m_out[k * tensors + s];
                double sums[4 + 4 * MAX_J];
                int status = state_sumsq(rows, cols, j, g, theta, ms_, v[s], ms_out, v_out[s], beta, beta_v,
                                         correction, moment_eps, row_factor.data(), col_factor.data(), sums,
                                         inner);
                if (status) return status;
                // the first layer with the per-tensor normalisation folded in: the dense features' weights (H, F), the
                // row features' weights (H, 2K) and the column term (H, cols)
                float dense_norm[4 + 4 * MAX_J], w_rows[MAX_H][2 * MAX_J];
                std::vector<float> w1_dense(static_cast<size_t>(H * F)), col_term(static_cast<size_t>(HP * cols), 0.0f);
                for (int f = 0; f < F; ++f) dense_norm[f] = normaliser(q[f], sums[f] / static_cast<double>(n), feature_rms_eps);
                for (int h = 0; h < H; ++h) {
                    const float* wh = w1 + h * KIN;
                    for (int f = 0; f < F; ++f) w1_dense[h * F + f] = wh[f] * dense_norm[f];
                    float* ct = col_term.data() + h * cols;
                    for (int f = 0; f < NR; ++f) {
                        w_rows[h][f] = wh[F + f] * row_norm[f];
                        const float wc = wh[F + NR + f] * col_norm[f], *y = col_features.data() + f * cols;
                        for (int64_t c = 0; c < cols; ++c) ct[c] += wc * y[c];
                    }
                }
                // pass 2 over spans of whole rows, at most 16 BLOCK rows each (the span's row terms are H floats per row:
                // a long vector's would be H floats per coordinate); a matrix's rows in one span, its blocks over the
                // threads
                const int64_t block_rows = BLOCK * 16;
                std::vector<float> block_factor(static_cast<size_t>(K * std::min(rows, block_rows)));
                std::vector<float> row_term(static_cast<size_t>(HP * std::min(rows, block_rows)));
                std::vector<float> block_features(static_cast<size_t>(NR * std::min(rows, block_rows)));
                double sumsq = 0.0;
                float* d = param_out != nullptr ? scratch.get(n) : direction[s];
                for (int64_t rb = 0; rb < rows; rb += block_rows) {
                    const int64_t br = std::min(block_rows, rows - rb), offset = rb * cols;
                    for (int k = 0; k < K; ++k)
                        std::copy(row_factor.data() + k * rows + rb, row_factor.data() + k * rows + rb + br,
                                  block_factor.data() + k * br);
                    for (int64_t r = 0; r < br; ++r)  // the (br, K) statistics read once, transposed
    #pragma GCC unroll 8
                        for (int k = 0; k < K; ++k) block_features[k * br + r] = row_new[(rb + r) * K + k];
                    for (int k = 0; k < K; ++k) {
                        float *x = block_features.data() + k * br, *y = block_features.data() + (K + k) * br;
                        for (int64_t r = 0; r < br; ++r) y[r] = 1.0f / std::sqrt(x[r] + factored_rsqrt_eps);
                    }
                    for (int64_t r = 0; r < br; r += L) {  // each feature read once, each term written once
                        const int count = static_cast<int>(std::min<int64_t>(L, br - r));
                        vf x[2 * MAX_J];
                        for (int f = 0; f < NR; ++f) x[f] = load_partial(block_features.data() + f * br + r, count);
                        for (int h = 0; h < H; ++h) {
                            vf t = splat(bias[h]);
                            for (int f = 0; f < NR; ++f) t += w_rows[h][f] * x[f];
                            store_partial(row_term.data() + h * br + r, t, count);
                        }
                    }
                    std::fill(row_term.data() + H * br, row_term.data() + HP * br, 0.0f);  // the padded units' rows
                    const float* block_m[MAX_J];
                    for (int k = 0; k < j; ++k) block_m[k] = ms_out[k] + offset;
                    double block_sumsq = 0.0;
                    status = direction_pass(br, cols, j, g + offset, theta + offset, block_m, v_out[s] + offset,
                                            correction, moment_eps, block_factor.data(), col_factor.data(), H,
                                            layers, w1_dense.data(), row_term.data(), col_term.data(), w, b, w_out,
                                            b_out, d + offset, &block_sumsq, inner);
                    if (status) return status;
                    sumsq += block_sumsq;
                }
                float scale = -step_scales[s];
                if (adam_index >= 0)
                    scale *= q[adam_index] * static_cast<float>(std::sqrt(sums[adam_index] / static_cast<double>(n)));
                const bool clip = normalize && direction_clip > 0.0f;
                float unit = 1.0f;  // the direction's normaliser: before the clip, else folded into the scale
                if (normalize) {
                    unit = 1.0f / std::sqrt(static_cast<float>(sumsq / static_cast<double>(n)) + direction_rms_eps);
                    if (!clip) scale *= unit;
                }
                if (clip) {  // normalised, clipped, then scaled, as the ATen steps
                    for (int64_t i = 0; i < n; ++i) d[i] = std::clamp(d[i] * unit, -direction_clip, direction_clip);
                }
                if (param_out != nullptr) {
                    // the factors rounded to float once, as ATen's in-place mul_ and add_ of the Python update round them
                    const float keep = static_cast<float>(1.0 - lr * weight_decay), rate = static_cast<float>(lr);
                    float* out = param_out[s];
                    for (int64_t i = 0; i < n; ++i) out[i] = add_scaled(theta[i] * keep, rate, scale * d[i]);
                } else {
                    for (int64_t i = 0; i < n; ++i) d[i] *= scale;
                }
                return 0;
            });
        };
        // Tensors of fewer than 2 MIN_BLOCKS_PER_THREAD blocks are never split: with several threads they go to the
        // threads whole (contiguous runs of about equal coordinates), then the others one by one, split by blocks.
        // Each tensor's result is the same whichever thread computes it.
        std::vector<int64_t> whole, split;
        int64_t whole_coordinates = 0;
        for (int64_t s = 0; s < tensors; ++s) {
            const Geometry geo{views[2 * s], views[2 * s + 1]};
            if (threads > 1 && geo.blocks() < 2 * MIN_BLOCKS_PER_THREAD) {
                whole.push_back(s);
                whole_coordinates += geo.rows * geo.cols;
            } else {
                split.push_back(s);
            }
        }
        const int runs = static_cast<int>(
            std::max<int64_t>(1, std::min<int64_t>(threads, whole_coordinates / (MIN_BLOCKS_PER_THREAD * BLOCK))));
        std::vector<int64_t> cuts{0};  // run t: whole[cuts[t] .. cuts[t + 1])
        for (int64_t i = 0, done = 0; i < static_cast<int64_t>(whole.size()); ++i) {
            done += views[2 * whole[i]] * views[2 * whole[i] + 1];
            if (static_cast<int>(cuts.size()) < runs && done * runs >= whole_coordinates * static_cast<int64_t>(cuts.size()))
                cuts.push_back(i + 1);
        }
        cuts.push_back(static_cast<int64_t>(whole.size()));
        std::vector<int> status(cuts.size() - 1, 0);
        auto run = [&](size_t t) {
            Scratch scratch;
            for (int64_t i = cuts[t]; i < cuts[t + 1] && status[t] == 0; ++i) status[t] = step_tensor(whole[i], 1, scratch);
        };
        parallel_tasks(static_cast<int>(cuts.size()) - 1, [&](int t) { run(static_cast<size_t>(t)); });
        for (int code : status)
            if (code) return code;
        Scratch scratch;
        for (int64_t s : split)
            if (const int code = step_tensor(s, threads, scratch)) return code;
        return 0;
    });
}

}  // extern "C"
