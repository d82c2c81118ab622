// Fused coordinatewise LSTM cell, float32, CPU: the inference fast path of learned_optim.nets.cells.lstm_cell.
//
// Computes, for every row r of a batch (one row per optimized coordinate),
//     a      = sigmoid(W [x_r, h_r] + b)            (W, b already carry the factor 2 on the g-gate rows)
//     c'_r   = a_f * c_r + a_i * (2 a_g - 1)          (2 sigmoid(2u) - 1 = tanh(u))
//     h'_r   = a_o * (2 sigmoid(2 c'_r) - 1)
// i.e. what the in-place ATen branch of lstm_cell computes, in one pass over the rows: the gate GEMM of a
// block of rows stays in registers and goes straight through the activations, so no (rows x 4H) gate
// matrix is ever written to memory and no elementwise kernel is launched per 20-wide gate slice.
//
// Plain C++ with GCC/Clang vector extensions (no torch headers: it compiles in about a second and has no
// ABI tie to torch); loaded by learned_optim.kernels through ctypes. Each row is computed by the same
// sequence of operations whatever the row count, the block it falls in or the thread that runs it, so the
// result does not depend on chunking or on the number of threads, bit for bit.

#include <vector>

#include "vec.h"

namespace {

using namespace lo;

struct Problem {
    int64_t n, in, hidden;       // rows, input width I, hidden width H
    int groups;                  // gate vectors per row: ceil(4H / 16)
    const float *x, *h, *c;      // inputs; rows at the strides below, columns contiguous
    int64_t xs, hs, cs;
    float *h_out, *c_out;
    int64_t hos, cos;
    const vf* wt;                // (I + H) x groups vectors: W transposed, zero-padded columns
    const vf* bias;              // groups vectors
};

// acc[r] = bias + W [x_r, h_r] for R rows at the given row pointers (strides in floats): the first I weight
// rows multiply x, the next H multiply h. The weights of one k are held in registers across the R rows
// where they fit beside the R x G accumulators (LO_REGISTERS vector registers, two kept for the broadcast
// input and the address arithmetic).
template <int G, int R>
inline void gate_gemm(const Problem& p, const float* x, int64_t xs, const float* h, int64_t hs, vf (&acc)[R][G]) {
    constexpr bool pin = (R + 1) * G <= LO_REGISTERS - 2;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) acc[r][g] = p.bias[g];
    const vf* w = p.wt;
    for (int part = 0; part < 2; ++part) {
        const float* src = part == 0 ? x : h;
        const int64_t stride = part == 0 ? xs : hs, width = part == 0 ? p.in : p.hidden;
        for (int64_t k = 0; k < width; ++k, w += G) {
            vf wk[G];
#pragma GCC unroll 16
            for (int g = 0; g < G; ++g) {
                wk[g] = w[g];
#if defined(__AVX512F__)
                if constexpr (pin) asm("" : "+v"(wk[g]));  // not re-read from memory for every row
#elif defined(__x86_64__)
                if constexpr (pin) asm("" : "+x"(wk[g]));
#elif defined(__aarch64__)
                if constexpr (pin) asm("" : "+w"(wk[g]));
#endif
            }
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
                const float v = src[r * stride + k];
#pragma GCC unroll 16
                for (int g = 0; g < G; ++g) acc[r][g] += v * wk[g];
            }
        }
    }
}

// Any hidden size: rows [r0, r0 + R) with G gate vectors per row; the gate GEMM accumulates in R x G
// registers, the gates go through a scratch row for the elementwise part.
template <int G, int R>
inline void block(const Problem& p, int64_t r0, float* scratch /* R x (G + hv) x 16 */) {
    const int64_t H = p.hidden;
    const int hv = static_cast<int>((H + L - 1) / L);
    vf acc[R][G];
    gate_gemm<G, R>(p, p.x + r0 * p.xs, p.xs, p.h + r0 * p.hs, p.hs, acc);
    for (int r = 0; r < R; ++r) {
        float* gates = scratch + r * (G + hv) * L;
        float* cell = gates + G * L;
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) store(gates + g * L, sigmoid_v(acc[r][g]));
        const float* c = p.c + (r0 + r) * p.cs;
        float* c_out = p.c_out + (r0 + r) * p.cos;
        for (int64_t j = 0; j < H; ++j) {
            const float cj = gates[H + j] * c[j] + gates[j] * (gates[2 * H + j] * 2.0f - 1.0f);
            c_out[j] = cj;
            cell[j] = cj * 2.0f;
        }
        for (int64_t j = H; j < hv * L; ++j) cell[j] = 0.0f;
        for (int v = 0; v < hv; ++v) store(cell + v * L, sigmoid_v(load(cell + v * L)));
        float* h_out = p.h_out + (r0 + r) * p.hos;
        for (int64_t j = 0; j < H; ++j) h_out[j] = (cell[j] * 2.0f - 1.0f) * gates[3 * H + j];
    }
}

// Rows per block: as many as keep the R x G accumulators (and, for R = 4, the G weight vectors of one k)
// in registers; one row per block beyond that.
template <int G>
constexpr int rows_per_block() {
    return 5 * G <= LO_REGISTERS - 2 ? 4 : (2 * G <= LO_REGISTERS - 4 ? 2 : 1);
}

template <int G>
void rows(const Problem& p, int64_t begin, int64_t end) {
    constexpr int R = rows_per_block<G>();
    const int hv = static_cast<int>((p.hidden + L - 1) / L);
    std::vector<float> scratch(static_cast<size_t>(R) * (G + hv) * L);
    int64_t r = begin;
    for (; r + R <= end; r += R) block<G, R>(p, r, scratch.data());
    for (; r < end; ++r) block<G, 1>(p, r, scratch.data());
}

constexpr int H20 = 20;

#if defined(__AVX512F__)
// Hidden size 20 (the zoo's), AVX-512 build only (16-float vectors; the other builds take the generic path):
// the gate columns are permuted so that vectors 0-3 hold i, f, g, o of units 0-15 and vector 4 holds [i, f, g, o] of units 16-19 (four lanes each). Units 0-15 of a row are then
// updated in registers, lane by lane; the four-lane tails of four rows are transposed into whole vectors
// (one sigmoid for all four tails). Nothing goes through memory between the GEMM and the outputs.
constexpr bool kSpecial20 = true;

inline int permuted_column20(int64_t gate, int64_t unit) {
    return static_cast<int>(unit < 16 ? gate * 16 + unit : 64 + gate * 4 + (unit - 16));
}

#if defined(__clang__)
#define LO_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LO_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

// Four rows starting at the given row pointers (strides in floats).
inline void block20(const Problem& p, const float* x, int64_t xs, const float* h, int64_t hs, const float* c,
                    int64_t cs, float* h_out, int64_t hos, float* c_out, int64_t cos) {
    constexpr int R = 4, G = 5;
    vf acc[R][G];
    gate_gemm<G, R>(p, x, xs, h, hs, acc);
    vf tails[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
        const vf i = sigmoid_v(acc[r][0]), f = sigmoid_v(acc[r][1]), g = sigmoid_v(acc[r][2]),
                 o = sigmoid_v(acc[r][3]);
        tails[r] = sigmoid_v(acc[r][4]);
        const vf c_new = f * load(c + r * cs) + i * (g * 2.0f - 1.0f);
        store(c_out + r * cos, c_new);
        store(h_out + r * hos, (sigmoid_v(c_new * 2.0f) * 2.0f - 1.0f) * o);
    }
    // tails[r] = [i(4) f(4) g(4) o(4)] of row r  ->  I = [i of rows 0..3], likewise F, G, O
    const vf p01 = LO_SHUFFLE(tails[0], tails[1], 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const vf q01 = LO_SHUFFLE(tails[0], tails[1], 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const vf p23 = LO_SHUFFLE(tails[2], tails[3], 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const vf q23 = LO_SHUFFLE(tails[2], tails[3], 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const vf ti = LO_SHUFFLE(p01, p23, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const vf tf = LO_SHUFFLE(p01, p23, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vf tg = LO_SHUFFLE(q01, q23, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const vf to = LO_SHUFFLE(q01, q23, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    float c_tail[R * 4];
    for (int r = 0; r < R; ++r) std::memcpy(c_tail + 4 * r, c + r * cs + 16, 4 * sizeof(float));
    const vf c_new = tf * load(c_tail) + ti * (tg * 2.0f - 1.0f);
    float h_tail[R * 4];
    store(c_tail, c_new);
    store(h_tail, (sigmoid_v(c_new * 2.0f) * 2.0f - 1.0f) * to);
    for (int r = 0; r < R; ++r) {
        std::memcpy(c_out + r * cos + 16, c_tail + 4 * r, 4 * sizeof(float));
        std::memcpy(h_out + r * hos + 16, h_tail + 4 * r, 4 * sizeof(float));
    }
}

void rows20(const Problem& p, int64_t begin, int64_t end) {
    int64_t r = begin;
    for (; r + 4 <= end; r += 4)
        block20(p, p.x + r * p.xs, p.xs, p.h + r * p.hs, p.hs, p.c + r * p.cs, p.cs, p.h_out + r * p.hos, p.hos,
                p.c_out + r * p.cos, p.cos);
    if (r == end) return;
    // the last 1-3 rows: through a zero-padded four-row tile (lanes are independent: same result per row)
    const int64_t left = end - r, I = p.in;
    std::vector<float> tile(static_cast<size_t>(4 * (I + 4 * H20)), 0.0f);
    float *tx = tile.data(), *th = tx + 4 * I, *tc = th + 4 * H20, *tho = tc + 4 * H20, *tco = tho + 4 * H20;
    for (int64_t k = 0; k < left; ++k) {
        std::memcpy(tx + k * I, p.x + (r + k) * p.xs, I * sizeof(float));
        std::memcpy(th + k * H20, p.h + (r + k) * p.hs, H20 * sizeof(float));
        std::memcpy(tc + k * H20, p.c + (r + k) * p.cs, H20 * sizeof(float));
    }
    block20(p, tx, I, th, H20, tc, H20, tho, H20, tco, H20);
    for (int64_t k = 0; k < left; ++k) {
        std::memcpy(p.h_out + (r + k) * p.hos, tho + k * H20, H20 * sizeof(float));
        std::memcpy(p.c_out + (r + k) * p.cos, tco + k * H20, H20 * sizeof(float));
    }
}
#elif defined(__AVX2__)
// Hidden size 20, AVX2 build (8-float vectors, 16 registers: one row per block, its 10 gate vectors in
// registers, the weights streamed from L1): vectors 4b + 0..3 hold i, f, g, o of units 8b..8b+7 (b = 0, 1),
// vector 8 holds [i, f] and vector 9 [g, o] of units 16-19 (four lanes each). Units 0-15 are updated in
// registers, the tail in four-float vectors; no scratch memory between the GEMM and the outputs.
constexpr bool kSpecial20 = true;

inline int permuted_column20(int64_t gate, int64_t unit) {
    if (unit < 16) return static_cast<int>(((unit / 8) * 4 + gate) * 8 + unit % 8);
    return static_cast<int>(64 + gate * 4 + (unit - 16));
}

inline vf4 load4(const float* p) {
    vf4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void store4(float* p, vf4 v) { std::memcpy(p, &v, sizeof v); }

#if defined(__clang__)
#define LO_HALF(v, first) __builtin_shufflevector(v, v, first, first + 1, first + 2, first + 3)
#else
#define LO_HALF(v, first) vf4{v[first], v[first + 1], v[first + 2], v[first + 3]}
#endif

inline void block20(const Problem& p, int64_t r) {
    vf acc[1][10];
    gate_gemm<10, 1>(p, p.x + r * p.xs, p.xs, p.h + r * p.hs, p.hs, acc);
    const float* c = p.c + r * p.cs;
    float* c_out = p.c_out + r * p.cos;
    float* h_out = p.h_out + r * p.hos;
    vf a[10];
#pragma GCC unroll 10
    for (int g = 0; g < 10; ++g) a[g] = sigmoid_v(acc[0][g]);
    for (int b = 0; b < 2; ++b) {
        const vf c_new = a[4 * b + 1] * load(c + 8 * b) + a[4 * b] * (a[4 * b + 2] * 2.0f - 1.0f);
        const vf h_new = (sigmoid_v(c_new * 2.0f) * 2.0f - 1.0f) * a[4 * b + 3];
        store(c_out + 8 * b, c_new);
        store(h_out + 8 * b, h_new);
    }
    const vf4 i = LO_HALF(a[8], 0), f = LO_HALF(a[8], 4), g = LO_HALF(a[9], 0), o = LO_HALF(a[9], 4);
    const vf4 c_new = f * load4(c + 16) + i * (g * 2.0f - 1.0f);
    const vf4 h_new = (sigmoid_t<vf4, vi4>(c_new * 2.0f) * 2.0f - 1.0f) * o;
    store4(c_out + 16, c_new);
    store4(h_out + 16, h_new);
}

void rows20(const Problem& p, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) block20(p, r);
}
#else
constexpr bool kSpecial20 = false;
inline int permuted_column20(int64_t, int64_t) { return 0; }
void rows20(const Problem&, int64_t, int64_t) {}
#endif

// Gate vectors per row: 4H <= min(256, 32 L) floats, i.e. H <= 64 (AVX-512, AVX2) or 32 (portable).
constexpr int MAX_GROUPS = std::min(32, 256 / L);

// rows<G> over all rows for the problem's G (one instantiation per G up to MAX_GROUPS); 1 if G is too large.
template <int G>
int run_groups(const Problem& p, int threads) {
    if (p.groups == G) {
        parallel_rows(p.n, threads, [&p](int64_t begin, int64_t end) { rows<G>(p, begin, end); });
        return 0;
    }
    if constexpr (G < MAX_GROUPS) {
        return run_groups<G + 1>(p, threads);
    } else {
        return 1;
    }
}

}  // namespace

extern "C" {

// Returns DONE, UNSUPPORTED if the hidden size is not supported (the caller falls back to ATen), or OUT_OF_MEMORY.
// weight: (4H, I + H) row-major, bias: (4H,), both with the g-gate rows already doubled.
int lo_lstm_cell_f32(int64_t n, int64_t in, int64_t hidden, const float* x, int64_t xs, const float* h, int64_t hs,
                     const float* c, int64_t cs, const float* weight, const float* bias, float* h_out, int64_t hos,
                     float* c_out, int64_t cos, int threads) {
    return guarded([&]() -> int {
        const int groups = static_cast<int>((4 * hidden + L - 1) / L);
        if (hidden < 1 || groups > MAX_GROUPS) return 1;
        const bool h20 = kSpecial20 && hidden == H20;
        const int64_t width = in + hidden;
        std::vector<vf> wt(static_cast<size_t>(width * groups) + 1), b(groups);
        float* wtf = reinterpret_cast<float*>(wt.data());
        float* bf = reinterpret_cast<float*>(b.data());
        std::memset(wtf, 0, wt.size() * sizeof(vf));
        std::memset(bf, 0, b.size() * sizeof(vf));
        for (int64_t j = 0; j < 4 * hidden; ++j) {
            const int64_t col = h20 ? permuted_column20(j / H20, j % H20) : j;
            bf[col] = bias[j];
            for (int64_t k = 0; k < width; ++k) wtf[k * groups * L + col] = weight[j * width + k];
        }
        const Problem p{n, in, hidden, groups, x, h, c, xs, hs, cs, h_out, c_out, hos, cos, wt.data(), b.data()};
        if (h20) {
            parallel_rows(p.n, threads, [&p](int64_t begin, int64_t end) { rows20(p, begin, end); });
            return 0;
        }
        return run_groups<1>(p, threads);
    });
}

}  // extern "C"
