// The engine's own CPU kernels (AVX2, and AVX-512 for the block GEMMs where the build has it; float32; kernels.py
// builds and loads them).
//
// 1. Block GEMMs: y = x W^T with W held as the GGUF's own blocks of 32 weights per row (blocks.py says why).
//   Q4_1: w = d * q + m, q in 0..15; byte j of a block holds q[j] (low nibble) and q[j + 16] (high nibble).
//   Q8_0: w = d * q, q int8.
// d and m are fp16 values held as float, so d * q is exact in float and every weight equals the loaded
// fp32 weight bit for bit. Sums are fp32, in the same order for every row whatever the number of rows
// M: a row's output does not depend on the rows beside it (one-token steps and verify steps agree).
//
// 2. A decoder layer's glue for the lean forward (lean.py): RMSNorm, residual add + RMSNorm, rotary
// embedding in place, SiLU(gate) * up, attention. Each is row-wise, so a row's output never depends on M either;
// they replace ~40 small torch ops a layer (~3 us of dispatch each on this CPU). Rounding: close to
// torch's, not bit-equal (sums of squares in 8 lanes; exp by polynomial).
//
// Threads: OpenMP (over output channels, or rows); the library links libgomp.so.1, which resolves to
// the runtime torch has loaded already, so the kernels share torch's threads.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <cstring>
#include <vector>

// The block GEMMs' helpers must vanish into their loops.
#define ALWAYS inline __attribute__((always_inline))

static ALWAYS void dequant_q4(const uint8_t* q, float d, float m, __m256 w[4]) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)q), nibble = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, nibble), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv);
}

static ALWAYS void dequant_q8(const int8_t* q, float d, __m256 w[4]) {
    const __m256 dv = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * i)))), dv);
}

// Block b of one output channel's row (q, d, m point at that row).
template <bool Q4>
static ALWAYS void dequant(const uint8_t* q, const float* d, const float* m, int64_t b, __m256 w[4]) {
    if (Q4) dequant_q4(q + b * 16, d[b], m[b], w);
    else dequant_q8((const int8_t*)q + b * 32, d[b], w);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if defined(__AVX512F__)
// AVX-512 (built where the CPU has it, kernels.py): a server core's two 512-bit FMA units double AVX2's fp32 roof.
static ALWAYS void dequant_q4_16(const uint8_t* q, float d, float m, __m512 w[2]) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)q), nibble = _mm_set1_epi8(0x0F);
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, nibble))), dv, mv);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble))), dv, mv);
}

static ALWAYS void dequant_q8_16(const int8_t* q, float d, __m512 w[2]) {
    const __m512 dv = _mm512_set1_ps(d);
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), dv);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))), dv);
}
#endif

// The block GEMMs are written once over a register type: Lanes8 (AVX2) or Lanes16 (AVX-512). The order of every
// output's sum, whatever the number of rows: one accumulator over the L-lane groups of k in order, then the L lanes
// added (sum). So a row's output never depends on the rows beside it; the two register types sum in different
// orders, so an AVX2 build's bits differ from an AVX-512 build's. Weights are dequantised into registers for a few
// rows (several channels at once, for independent chains), into an L1 buffer otherwise (tiles of TILE rows).
struct Lanes8 {
    typedef __m256 V;
    static constexpr int L = 8, TILE = 3;  // tile: 3 rows x T channels = 12 accumulators + 3 inputs + 1 weight of 16 registers
    // 1-7 rows in registers, as many chains (rows x channels) as 16 registers hold; from 8 rows the buffer wins
    // (one channel a pass measured 22.2 vs 20.0 ms at 8)
    static constexpr int FEW = 7;
    static constexpr int channels(int rows) { return rows <= 3 ? 4 : rows == 4 ? 3 : rows <= 6 ? 2 : 1; }
    static ALWAYS V zero() { return _mm256_setzero_ps(); }
    static ALWAYS V load(const float* p) { return _mm256_loadu_ps(p); }
    static ALWAYS V load_aligned(const float* p) { return _mm256_load_ps(p); }
    static ALWAYS void store_aligned(float* p, V v) { _mm256_store_ps(p, v); }
    static ALWAYS V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static ALWAYS float sum(V v) { return hsum(v); }
    template <bool Q4>
    static ALWAYS void dequant(const uint8_t* q, const float* d, const float* m, int64_t b, V w[32 / L]) { ::dequant<Q4>(q, d, m, b, w); }
};

#if defined(__AVX512F__)
struct Lanes16 {
    typedef __m512 V;
    // tile: 6 rows x T channels = 24 accumulators + 6 inputs + 1 weight of 32 registers (4 x 6 measured alike;
    // 3 x 8, 5 x 4, 7 x 3, 2 x 12 slower)
    static constexpr int L = 16, TILE = 6;
    // 1-9 rows in registers (8 and 9 rows: 1.1x the buffer; 10 and more: not)
    static constexpr int FEW = 9;
    static constexpr int channels(int rows) { return rows <= 2 ? 8 : rows <= 4 ? 6 : rows <= 6 ? 4 : rows <= 8 ? 3 : 2; }
    static ALWAYS V zero() { return _mm512_setzero_ps(); }
    static ALWAYS V load(const float* p) { return _mm512_loadu_ps(p); }
    static ALWAYS V load_aligned(const float* p) { return _mm512_load_ps(p); }
    static ALWAYS void store_aligned(float* p, V v) { _mm512_store_ps(p, v); }
    static ALWAYS V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static ALWAYS float sum(V v) { return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
    template <bool Q4>
    static ALWAYS void dequant(const uint8_t* q, const float* d, const float* m, int64_t b, V w[32 / L]) {
        if (Q4) dequant_q4_16(q + b * 16, d[b], m[b], w);
        else dequant_q8_16((const int8_t*)q + b * 32, d[b], w);
    }
};
typedef Lanes16 GemmLanes;
#else
typedef Lanes8 GemmLanes;
#endif

constexpr int T = 4;  // output channels per pass of the buffer path

// R rows (x: R x K), TC channels (q, d, m: the first channel's row; rows of the weights are `stride` bytes apart):
// each block of weights dequantised once, in registers, and used for the R rows. Not inlined: inside its caller's
// loop g++ spilled the chains to the stack on AVX2 (0.8x at 5-6 rows).
template <class X, bool Q4, int R, int TC>
static __attribute__((noinline)) void dot_rows(const float* x, int64_t K, const uint8_t* q, const float* d, const float* m,
                                               int64_t stride, int valid, float* y, int64_t ldy) {
    const int64_t nb = K / 32;
    typename X::V acc[R][TC];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TC; t++) acc[r][t] = X::zero();
    constexpr int64_t block_bytes = Q4 ? 16 : 32;
    for (int64_t b = 0; b < nb; b++) {
        if (b * block_bytes % 64 == 0)  // the same line of the next TC channels (this thread's next pass; past the end, a prefetch never faults)
            for (int t = 0; t < TC; t++) _mm_prefetch((const char*)(q + (TC + t) * stride + b * block_bytes), _MM_HINT_T0);
        for (int t = 0; t < TC; t++) {
            const int c = t < valid ? t : 0;  // past the last channel: repeat the first, discarded
            typename X::V w[32 / X::L];
            X::template dequant<Q4>(q + c * stride, d + c * nb, Q4 ? m + c * nb : nullptr, b, w);
            for (int r = 0; r < R; r++) {
                const float* xb = x + r * K + b * 32;
                acc[r][t] = X::fma(w[0], X::load(xb), acc[r][t]);
                acc[r][t] = X::fma(w[1], X::load(xb + X::L), acc[r][t]);
                if constexpr (X::L == 8) {
                    acc[r][t] = X::fma(w[2], X::load(xb + 16), acc[r][t]);
                    acc[r][t] = X::fma(w[3], X::load(xb + 24), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < valid; t++) y[r * ldy + t] = X::sum(acc[r][t]);
}

// R rows x T channels from T rows of dequantised weights w (T x K).
template <class X, int R>
static ALWAYS void tile(const float* x, int64_t K, const float* w, int valid, float* y, int64_t ldy) {
    typename X::V a[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) a[r][t] = X::zero();
    for (int64_t k = 0; k < K; k += X::L) {
        typename X::V xs[R];
        for (int r = 0; r < R; r++) xs[r] = X::load(x + r * K + k);
        for (int t = 0; t < T; t++) {
            const typename X::V wt = X::load_aligned(w + t * K + k);
            for (int r = 0; r < R; r++) a[r][t] = X::fma(wt, xs[r], a[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < valid; t++) y[r * ldy + t] = X::sum(a[r][t]);
}

// The last rows of a chunk (fewer than a tile): one tile of `rows` rows.
template <class X, int R>
static ALWAYS void tile_rest(int64_t rows, const float* x, int64_t K, const float* w, int valid, float* y, int64_t ldy) {
    if constexpr (R > 0) {
        if (rows == R) tile<X, R>(x, K, w, valid, y, ldy);
        else tile_rest<X, R - 1>(rows, x, K, w, valid, y, ldy);
    }
}

constexpr int64_t ROW_CHUNK_BYTES = 192 * 1024;  // inputs per chunk of rows: within a core's L2 (512 KiB on Zen 3)
constexpr int64_t ROW_CHUNK_MIN = 48;             // fewer rows: one chunk

// R rows, TC channels a pass (R x TC chains: as many as the registers hold), the passes shared among the threads.
template <class X, bool Q4, int R, int TC>
static void gemm_small(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N, float* y) {
    const int64_t nb = K / 32, row_bytes = Q4 ? K / 2 : K;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += TC) {
        const int valid = N - n < TC ? (int)(N - n) : TC;
        dot_rows<X, Q4, R, TC>(x, K, qs + n * row_bytes, d + n * nb, Q4 ? m + n * nb : nullptr, row_bytes, valid, y + n, N);
    }
}

// Few rows (up to X::FEW): each weight used M times, dequantised in registers, X::channels(M) channels a pass.
// False: M rows go through the buffer.
template <class X, bool Q4, int R = 1>
static bool few_rows(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N, float* y) {
    if constexpr (R > X::FEW) return false;
    else if (M == R) {
        gemm_small<X, Q4, R, X::channels(R)>(x, K, qs, d, m, N, y);
        return true;
    } else return few_rows<X, Q4, R + 1>(x, M, K, qs, d, m, N, y);
}

// x: M x K (row-major), y: M x N; K a multiple of 32.
template <class X, bool Q4>
static void gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N, float* y) {
    if (few_rows<X, Q4>(x, M, K, qs, d, m, N, y)) return;
    const int64_t nb = K / 32, row_bytes = Q4 ? K / 2 : K;
    // Rows in chunks whose inputs stay in a core's L2 (every channel group reads all of them); each
    // chunk de-quantises the weights again, which costs less than streaming the inputs from L3.
    const int64_t chunk = M <= ROW_CHUNK_MIN ? M : (ROW_CHUNK_BYTES / (K * (int64_t)sizeof(float))) / X::TILE * X::TILE + X::TILE;
#pragma omp parallel
    {
        float* w = (float*)aligned_alloc(sizeof(typename X::V), T * K * sizeof(float));
        for (int64_t r0 = 0; r0 < M; r0 += chunk) {
            const int64_t rows = M - r0 < chunk ? M - r0 : chunk;
            const float* xc = x + r0 * K;
            float* yc = y + r0 * N;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += T) {
                const int valid = N - n < T ? (int)(N - n) : T;
                for (int t = 0; t < T; t++) {
                    const int64_t c = n + (t < valid ? t : 0);
                    for (int64_t b = 0; b < nb; b++) {
                        typename X::V v[32 / X::L];
                        X::template dequant<Q4>(qs + c * row_bytes, d + c * nb, Q4 ? m + c * nb : nullptr, b, v);
                        for (int i = 0; i < 32 / X::L; i++) X::store_aligned(w + t * K + b * 32 + i * X::L, v[i]);
                    }
                }
                int64_t r = 0;
                for (; r + X::TILE <= rows; r += X::TILE) tile<X, X::TILE>(xc + r * K, K, w, valid, yc + r * N + n, N);
                tile_rest<X, X::TILE - 1>(rows - r, xc + r * K, K, w, valid, yc + r * N + n, N);
            }
        }
        free(w);
    }
}

extern "C" void q4_1_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
                          int64_t N, float* y) {
    gemm<GemmLanes, true>(x, M, K, qs, d, m, N, y);
}

extern "C" void q8_0_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, int64_t N, float* y) {
    gemm<GemmLanes, false>(x, M, K, qs, d, nullptr, N, y);
}

// ---- 2. glue ----

// Rows of at least this many elements in all are split over threads.
constexpr int64_t PARALLEL_ELEMENTS = 16384;

static inline float sum_squares(const float* x, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; k < K; k++) ss += x[k] * x[k];
    return ss;
}

// out = w * (x * 1/sqrt(mean(x^2) + eps)), as transformers' RMSNorm orders it.
static inline void rms_norm_row(const float* x, const float* w, float eps, int64_t K, float* out) {
    const float scale = 1.0f / sqrtf(sum_squares(x, K) / (float)K + eps);
    for (int64_t k = 0; k < K; k++) out[k] = w[k] * (x[k] * scale);
}

extern "C" void rms_norm(const float* x, const float* w, float eps, int64_t M, int64_t K, float* out) {
#pragma omp parallel for if (M * K >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < M; r++) rms_norm_row(x + r * K, w, eps, K, out + r * K);
}

// h += delta (the residual stream), then out = rms_norm(h).
extern "C" void add_rms_norm(float* h, const float* delta, const float* w, float eps, int64_t M, int64_t K, float* out) {
#pragma omp parallel for if (M * K >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < M; r++) {
        float* hr = h + r * K;
        for (int64_t k = 0; k < K; k++) hr[k] += delta[r * K + k];
        rms_norm_row(hr, w, eps, K, out + r * K);
    }
}

// Rotary embedding in place on the first `heads` heads (of `dim`) of each of M rows (`stride` floats
// apart): x * cos + rotate_half(x) * sin, with cos/sin one row of `dim` per input row.
extern "C" void rope(float* x, const float* cos, const float* sin, int64_t M, int64_t heads, int64_t dim, int64_t stride) {
    const int64_t half = dim / 2;
#pragma omp parallel for if (M * heads * dim >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < M; r++) {
        const float* c = cos + r * dim;
        const float* s = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            float* v = x + r * stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float lo = v[i], hi = v[i + half];
                v[i] = lo * c[i] + (-hi) * s[i];
                v[i + half] = hi * c[i + half] + lo * s[i + half];
            }
        }
    }
}

// exp for AVX2: 2^n * e^r with |r| <= ln2/2, degree-6 polynomial (~1 ulp); clamped to float's range.
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 in two parts, for an exact reduction
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up; rows of gate_up are [gate (I) | up (I)].
extern "C" void silu_mul(const float* gate_up, int64_t M, int64_t I, float* out) {
#pragma omp parallel for if (M * I >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < M; r++) {
        const float* g = gate_up + r * 2 * I;
        const float* u = g + I;
        float* o = out + r * I;
        int64_t i = 0;
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

// Attention of T queries per row over S cached keys, grouped-query (H query heads share KV key/value
// heads), under an additive mask shared by the heads: softmax(q . k * scale + mask) . v. Each (row,
// head, query) is computed alone. Row b reads only its first rk[b] keys and computes only its first rq[b]
// queries (the rest, padding, are zeros in out); rq/rk null: T and S. Given rk, the caller vouches that a row's
// queries sit in order at its last rq[b] key columns and that none sees a later column than its own (causal
// prefill, draft trees in pop order), so query t reads keys up to its own column only. A key's weight lands in the same lane of
// the softmax's sum (its column mod 8) whatever S and rk are, and masked keys weigh exactly 0, so a row's bits
// depend neither on how many keys the batch's longest row has nor on where its own end is cut. Strides are in
// floats; every vector's last dimension (D = 8 * D8) is contiguous. out: (B, T, H * D).
template <int D8>
static void attention_impl(const float* q, int64_t qb, int64_t qh, int64_t qt, const float* k, const float* v, int64_t kb,
                           int64_t kh, int64_t ks, const float* mask, int64_t mb, int64_t mt, int64_t B, int64_t H,
                           int64_t KV, int64_t T, int64_t S, float scale, float* out, const int64_t* rq, const int64_t* rk) {
    const int64_t group = H / KV;
    // The (row, head, query) items computed, in that order (padding queries are zeroed here, not listed), cut
    // into tasks shared among the threads: with rows enough, one task per row and key/value head (its keys and
    // values come from memory once and serve every query of the group from cache: attention over many rows is
    // bound by reading them), else one per item.
    std::vector<int32_t> todo;
    std::vector<int64_t> tasks{0};
    todo.reserve(B * H * T);
    const bool by_kv_head = B * KV >= 8;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t t = 0; t < T; t++) {
                if (rq && t >= rq[b]) std::memset(out + (b * T + t) * H * D8 * 8 + h * D8 * 8, 0, D8 * 8 * sizeof(float));
                else {
                    todo.push_back((int32_t)((b * H + h) * T + t));
                    if (!by_kv_head) tasks.push_back((int64_t)todo.size());
                }
            }
            if (by_kv_head && (h + 1) % group == 0 && (int64_t)todo.size() > tasks.back()) tasks.push_back((int64_t)todo.size());
        }
    const int64_t count = (int64_t)tasks.size() - 1;
#pragma omp parallel if ((int64_t)todo.size() * S >= 1024)
    {
        float* p = (float*)aligned_alloc(32, ((S + 7) / 8) * 8 * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < count; task++)
        for (int64_t item = tasks[task]; item < tasks[task + 1]; item++) {
            const int64_t b = todo[item] / (H * T), h = todo[item] / T % H, t = todo[item] % T;
            float* o = out + (b * T + t) * H * D8 * 8 + h * D8 * 8;
            int64_t keys = rk ? (rk[b] < S ? rk[b] : S) : S;
            if (rk) {  // the row's queries sit at its last keys, each seeing no later column: stop at its own
                const int64_t own = rk[b] - (rq ? rq[b] : T) + t + 1;
                keys = own < keys ? (own > 0 ? own : 1) : keys;
            }
            const float* qv = q + b * qb + h * qh + t * qt;
            const float* kr = k + b * kb + h / group * kh;
            const float* vr = v + b * kb + h / group * kh;
            const float* m = mask + b * mb + t * mt;
            __m256 qs[D8];
            for (int j = 0; j < D8; j++) qs[j] = _mm256_loadu_ps(qv + 8 * j);
            // q . k for 8 keys at a time, each key's 8 lanes reduced by the same adds whatever its place in the
            // block (a block past the end holds zeros): a key's score never depends on where the keys end
            const int64_t padded = (keys + 7) / 8 * 8;
            const __m256 scalev = _mm256_set1_ps(scale);
            __m256 topv8 = _mm256_set1_ps(-INFINITY);
            for (int64_t s = 0; s < padded; s += 8) {
                __m256 a[8];
                for (int r = 0; r < 8; r++) {
                    if (s + r >= keys) {
                        a[r] = _mm256_setzero_ps();
                        continue;
                    }
                    const float* kv = kr + (s + r) * ks;
                    a[r] = _mm256_mul_ps(qs[0], _mm256_loadu_ps(kv));
                    for (int j = 1; j < D8; j++) a[r] = _mm256_fmadd_ps(qs[j], _mm256_loadu_ps(kv + 8 * j), a[r]);
                }
                const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
                const __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
                __m256 mv;
                if (s + 8 <= keys) mv = _mm256_loadu_ps(m + s);
                else {
                    float tail[8];
                    for (int r = 0; r < 8; r++) tail[r] = s + r < keys ? m[s + r] : -INFINITY;
                    mv = _mm256_loadu_ps(tail);
                }
                const __m256 scores = _mm256_add_ps(_mm256_mul_ps(dots, scalev), mv);
                _mm256_storeu_ps(p + s, scores);
                topv8 = _mm256_max_ps(topv8, scores);
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, topv8);
            float top = lanes[0];
            for (int r = 1; r < 8; r++) top = lanes[r] > top ? lanes[r] : top;
            for (int64_t s = keys; s < padded; s++) p[s] = top;  // lanes past the end: weighed 0 below
            __m256 total = _mm256_setzero_ps();
            const __m256 topv = _mm256_set1_ps(top), floor = _mm256_set1_ps(-87.0f);
            for (int64_t s = 0; s < padded; s += 8) {
                const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + s), topv);
                __m256 e = _mm256_and_ps(exp256(x), _mm256_cmp_ps(x, floor, _CMP_GT_OQ));  // masked keys: exactly 0
                if (s + 8 > keys) {
                    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
                    e = _mm256_and_ps(e, _mm256_cmp_ps(lane, _mm256_set1_ps((float)(keys - s)), _CMP_LT_OQ));
                }
                _mm256_storeu_ps(p + s, e);
                total = _mm256_add_ps(total, e);
            }
            const float sum = hsum(total);
            __m256 acc[D8];
            for (int j = 0; j < D8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t s = 0; s < keys; s++) {
                if (p[s] == 0.0f) continue;  // masked: adds nothing
                const __m256 w = _mm256_set1_ps(p[s]);
                for (int j = 0; j < D8; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + s * ks + 8 * j), acc[j]);
            }
            const __m256 inverse = _mm256_set1_ps(1.0f / sum);
            for (int j = 0; j < D8; j++) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[j], inverse));
        }
        free(p);
    }
}

// Returns 0, or -1 for a head size it was not built for (the caller falls back to SDPA).
extern "C" int attention(const float* q, int64_t qb, int64_t qh, int64_t qt, const float* k, const float* v, int64_t kb,
                         int64_t kh, int64_t ks, const float* mask, int64_t mb, int64_t mt, int64_t B, int64_t H, int64_t KV,
                         int64_t T, int64_t S, int64_t D, float scale, float* out, const int64_t* rq, const int64_t* rk) {
    if (D == 64) attention_impl<8>(q, qb, qh, qt, k, v, kb, kh, ks, mask, mb, mt, B, H, KV, T, S, scale, out, rq, rk);
    else if (D == 128) attention_impl<16>(q, qb, qh, qt, k, v, kb, kh, ks, mask, mb, mt, B, H, KV, T, S, scale, out, rq, rk);
    else return -1;
    return 0;
}

// ---- 3. the roof ----

// For benches: fp32 FLOP/s of independent FMAs on every thread (10 chains each, in registers; the widest
// registers of this build), the ceiling a GEMM here is measured against.
#if defined(__AVX512F__)
typedef __m512 vec;
#define VFMA _mm512_fmadd_ps
#define VSET _mm512_set1_ps
constexpr int LANES = 16;
#else
typedef __m256 vec;
#define VFMA _mm256_fmadd_ps
#define VSET _mm256_set1_ps
constexpr int LANES = 8;
#endif
extern "C" double fma_roof(int64_t iterations) {
    double flops = 0;
#pragma omp parallel reduction(+ : flops)
    {
        vec a[10], x = VSET(0.999999f), y = VSET(1e-7f);
        for (int i = 0; i < 10; i++) a[i] = VSET((float)i);
        for (int64_t n = 0; n < iterations; n++)
            for (int i = 0; i < 10; i++) a[i] = VFMA(a[i], x, y);
        float sink[LANES];
        memcpy(sink, &a[0], sizeof(sink));
        for (int i = 1; i < 10; i++) {
            float more[LANES];
            memcpy(more, &a[i], sizeof(more));
            sink[0] += more[0];
        }
        flops += (double)iterations * 10 * 2 * LANES + (sink[0] == 12345.f);  // 2 flops per FMA per lane
    }
    return flops;
}
