// Segmented LoRA kernels for CPU (the SGMV/BGMV split of Punica and S-LoRA, as two fused loops).
//
// A step's rows are split into segments, each using one adapter: segment s covers positions seg[s]..seg[s+1] of
// `order` (the layer-input rows it reads and writes; identity when `order` is empty).
//   shrink: h[i, 0:rp_s]        = x[order[i], :] . At[s]           At[s]: (d_in, rp_s), rp_s a multiple of 8
//   expand: out[order[i], c0:+d] += h[i, r0_s:r0_s+rb_s] . Bt[s]    Bt[s]: (rb_s, d), or absent (skip s)
// Factors are fp32, bf16 or fp16 (each segment its own; 16-bit ones are widened exactly as they are read, so they
// stream half the bytes and give the same result as their fp32 copies).
// Rows are read and written in place (no gather, no scatter), accumulation is in fp32 whatever the activations'
// dtype (fp32, bf16, fp16; fp64 is refused), and a row's result does not depend on the other rows of the call
// (single rows, streamed segments and padded full tiles do the same arithmetic per row). Segments of up to 4 rows
// (decode) stream their factor from memory once, start to end, whole segments spread over torch's threads; larger
// ones run in register tiles, the work (segment × row tile [× column block]) spread over the threads. bf16 factors
// in pair layout use AVX512-BF16 dot products where the CPU has them.
// Written for this project. On AVX2 CPUs without AVX-512 the fp32 loops are explicit 6-row x 16-column register tiles
// (FMA intrinsics); elsewhere they are plain C++ that the compiler vectorizes for the CPU it is built on.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LORAKIT_BF16_DOT 1
#else
#define LORAKIT_BF16_DOT 0
#endif

// AVX2 without AVX-512 (16 vector registers of 8 floats): explicit 6 x 16 register tiles, as in GEMM micro-kernels;
// the compiler's own vectorization of the generic loops spills there. Same fused multiply-adds per element.
// LORAKIT_GENERIC builds the generic loops anyway (tests run them on AVX2 machines: what AVX-512 and Arm CPUs run).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__) && !defined(LORAKIT_GENERIC)
#include <immintrin.h>
#define LORAKIT_AVX2 1
#else
#define LORAKIT_AVX2 0
#endif

namespace {

constexpr int64_t GROUP = 8;  // expand column blocks per work item

#if LORAKIT_AVX2
constexpr int64_t SHRINK_ROWS = 6;  // rows per shrink tile (6 x 2 accumulator vectors of 8 floats)
constexpr int64_t EXPAND_ROWS = 6;  // rows per expand tile
constexpr int64_t COLS = 16;        // output columns per expand tile (6 x 2 vectors of 8 floats)
#else
constexpr int64_t SHRINK_ROWS = 8;  // rows per shrink tile (8 accumulator vectors of 16 floats)
constexpr int64_t EXPAND_ROWS = 8;  // rows per expand tile
constexpr int64_t COLS = 32;        // output columns per expand tile (8 x 2 vectors of 16 floats)
#endif

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

// f(data pointer) with the factor's element type: float, c10::BFloat16 or c10::Half
template <typename F>
inline void with_factor(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return f(t.data_ptr<c10::BFloat16>());
    case at::kHalf: return f(t.data_ptr<c10::Half>());
    default: return f(t.data_ptr<float>());
  }
}

// f(std::integral_constant<int, min(n, N)>{}) for n ≥ 1: a loop count as a compile-time constant
template <int N, typename F>
inline void up_to(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return up_to<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

#if LORAKIT_AVX2
// 8 factor elements widened to fp32 (exact)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// acc[i] += s[i][0:n] · m[0:n, 0:8V] for R rows (m: row stride `stride`), in registers. Every element sees the same
// sequence of fused multiply-adds for any R and V, so a row gets the same bits in every tile shape: 6 rows × 2
// vectors for batches (12 accumulators), one row × up to 8 vectors for a segment's lone last rows (8 independent
// chains where 2 would wait on the FMA latency). Constant indices (unrolled loops) keep acc in registers.
template <int R, int V>
inline void zero(__m256 (&acc)[R][V]) {
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
}

template <int R, int V, typename M>
inline void tile_times(const float* const* s, int64_t n, const M* m, int64_t stride, __m256 (&acc)[R][V]) {
  for (int64_t k = 0; k < n; ++k) {
    __m256 mv[V];
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) mv[v] = load8(m + k * stride + 8 * v);
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m256 sv = _mm256_broadcast_ss(s[i] + k);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(sv, mv[v], acc[i][v]);
    }
  }
}

// h[i, 0:8V] (+)= xr[i] · at over n inputs for the first `rows` of R rows (`first`: h starts from zero)
template <int R, int V, typename M>
inline void shrink_vectors(const float* const* xr, int64_t rows, int64_t n, const M* at, int64_t rp, float* h,
                           int64_t h_stride, bool first) {
  __m256 acc[R][V];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v)
      acc[i][v] = first || i >= rows ? _mm256_setzero_ps() : _mm256_loadu_ps(h + i * h_stride + 8 * v);
  tile_times<R, V>(xr, n, at, rp, acc);
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    if (i < rows)
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) _mm256_storeu_ps(h + i * h_stride + 8 * v, acc[i][v]);
}

// orow[i][0:8V] += hrow[i] · b (fp32 outputs) for the first `rows` of R rows
template <int R, int V, typename M>
inline void expand_add_f32(const float* const* hrow, int64_t rows, const M* b, int64_t rb, int64_t d,
                           float* const* orow, int64_t cb) {
  __m256 acc[R][V];
  zero(acc);
  tile_times<R, V>(hrow, rb, b, d, acc);
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    if (i < rows)
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        float* o = orow[i] + cb + 8 * v;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[i][v]));
      }
}

// h[i, 0:rp] = xr[i] · at for a tile of R rows (one row: passes of up to 64 columns). The inputs go in blocks of
// KBLOCK: every column pass of a block reads its rows of At from L1/L2, so At streams from memory once however
// many passes the rank needs. Partial sums wait in h between blocks: the same fused multiply-adds in the same
// order per element as one pass over all inputs.
constexpr int64_t KBLOCK = 64;

template <int R, typename M>
inline void shrink_tile(const float* const* xr, int64_t rows, int64_t d_in, const M* at, int64_t rp, float* h,
                        int64_t h_stride) {
  for (int64_t k0 = 0; k0 < d_in; k0 += KBLOCK) {
    const int64_t n = std::min(KBLOCK, d_in - k0);
    const float* xs[R];
    for (int i = 0; i < R; ++i) xs[i] = xr[i] + k0;
    const M* ak = at + k0 * rp;
    const bool first = k0 == 0;
    if constexpr (R == 1) {
      for (int64_t c = 0; c < rp; c += 64)
        up_to<8>((rp - c) / 8, [&](auto v) { shrink_vectors<1, v()>(xs, 1, n, ak + c, rp, h + c, h_stride, first); });
    } else {
      int64_t c = 0;
      for (; c + 16 <= rp; c += 16) shrink_vectors<R, 2>(xs, rows, n, ak + c, rp, h + c, h_stride, first);
      if (c < rp) shrink_vectors<R, 1>(xs, rows, n, ak + c, rp, h + c, h_stride, first);  // rp: a multiple of 8
    }
  }
}
#else
// h[i, 0:C] = sum_k xr[i][k] * at[k, 0:C] for the R rows of a tile (at: row stride rp). Partial tiles are
// computed as full ones (missing rows point at zeros), lone last rows by the R = 1 instance: every row sees
// the same sequence of fused multiply-adds either way, so its result does not depend on the rows batched with it.
template <int R, int C, typename M>
inline void shrink_chunk(const float* const* xr, int64_t rows, int64_t d_in, const M* at, int64_t rp, float* h,
                         int64_t h_stride) {
  float acc[R][C] = {};
  for (int64_t k = 0; k < d_in; ++k) {
    const M* a = at + k * rp;
#pragma GCC unroll 8
    for (int64_t i = 0; i < R; ++i) {
      const float xv = xr[i][k];
#pragma omp simd
      for (int c = 0; c < C; ++c) acc[i][c] = std::fma(xv, static_cast<float>(a[c]), acc[i][c]);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int c = 0; c < C; ++c) h[i * h_stride + c] = acc[i][c];
}

template <int R, typename M>
inline void shrink_tile(const float* const* xr, int64_t rows, int64_t d_in, const M* at, int64_t rp, float* h,
                        int64_t h_stride) {
  int64_t c = 0;
  for (; c + 16 <= rp; c += 16) shrink_chunk<R, 16>(xr, rows, d_in, at + c, rp, h + c, h_stride);
  for (; c < rp; c += 8) shrink_chunk<R, 8>(xr, rows, d_in, at + c, rp, h + c, h_stride);
}
#endif

// acc[i, 0:cols] = sum_j hrow[i][j] * b[j, 0:cols] for R rows (b: row stride d); the same per-row arithmetic for
// every R, so R = 1 (a segment's lone last row) and padded full tiles agree bit for bit.
template <int R, typename M>
inline void expand_tile(const float* const* hrow, const M* b, int64_t rb, int64_t d, int64_t cols,
                        float* out_acc) {
#if LORAKIT_AVX2
  if (cols == COLS) {
    __m256 acc[R][2];
    zero(acc);
    tile_times<R, 2>(hrow, rb, b, d, acc);
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      _mm256_storeu_ps(out_acc + i * COLS, acc[i][0]);
      _mm256_storeu_ps(out_acc + i * COLS + 8, acc[i][1]);
    }
    return;
  }
#endif
  float acc[R][COLS] = {};  // local, so that it stays in registers
  if (cols == COLS) {
    for (int64_t j = 0; j < rb; ++j) {
      const M* bj = b + j * d;
#pragma GCC unroll 8
      for (int64_t i = 0; i < R; ++i) {
        const float hv = hrow[i][j];
#pragma omp simd
        for (int64_t c = 0; c < COLS; ++c) acc[i][c] = std::fma(hv, static_cast<float>(bj[c]), acc[i][c]);
      }
    }
  } else {  // the last column block of every row
    for (int64_t j = 0; j < rb; ++j) {
      const M* bj = b + j * d;
      for (int64_t i = 0; i < R; ++i) {
        const float hv = hrow[i][j];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) acc[i][c] = std::fma(hv, static_cast<float>(bj[c]), acc[i][c]);
      }
    }
  }
  for (int64_t i = 0; i < R; ++i)
    for (int64_t c = 0; c < COLS; ++c) out_acc[i * COLS + c] = acc[i][c];
}


#if LORAKIT_BF16_DOT
// bf16 activations with AVX512-BF16: factors in pair layout, one dot-product instruction per 2 × 16 multiply-adds
// (fp32 accumulation). At2: (d_in / 2, rp, 2), At2[k][c][p] = A[c][2k + p]; Bt2: (rb2, d, 2), Bt2[j][c][p] =
// (s·B)ᵀ[2j + p][c], zero-padded. A row's arithmetic is the same whatever R, as in the fp32 kernels.
inline __m512bh pair_of(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

inline __m512bh pair_of(float a, float b) {
  const uint32_t lo = c10::BFloat16(a).x, hi = c10::BFloat16(b).x;
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(lo | (hi << 16)));
}

template <int R>
inline void shrink_bf16_tile(const uint16_t* const* rows, int64_t nrows, int64_t pairs, const uint16_t* at2,
                             int64_t rp, float* h, int64_t h_stride) {
  for (int64_t c = 0; c < rp; c += 16) {  // rp is a multiple of 16 in the pair layout
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < pairs; ++k) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(at2 + (k * rp + c) * 2);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, pair_of(rows[i] + 2 * k));
    }
    for (int64_t i = 0; i < nrows; ++i) _mm512_storeu_ps(h + i * h_stride + c, acc[i]);
  }
}

inline __m512 load_bf16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store_bf16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// out rows [c, c + 16·V) += h · Bt for R rows, V = 1 or 2 vectors of 16 columns
template <int R, int V>
inline void expand_bf16_tile(const float* const* hrow, c10::BFloat16* const* orow, int64_t nrows, int64_t rb2,
                             const uint16_t* bt2, int64_t d, int64_t c) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < rb2; ++j) {
    __m512bh b[V];
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bt2 + (j * d + c + 16 * v) * 2);
    for (int i = 0; i < R; ++i) {
      const __m512bh hp = pair_of(hrow[i][2 * j], hrow[i][2 * j + 1]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b[v], hp);
    }
  }
  for (int64_t i = 0; i < nrows; ++i)
    for (int v = 0; v < V; ++v) {
      c10::BFloat16* o = orow[i] + c + 16 * v;
      store_bf16(o, _mm512_add_ps(load_bf16(o), acc[i][v]));
    }
}
#endif

// ---- segments of a few rows (decode): each factor streams from memory once, in order
// A row's accumulators lie in L1 (chunks of CHUNK columns) and every factor row is read once, start to end, for all
// the segment's rows. Each element still gets its fused multiply-adds in the register tiles' order (inputs k, or
// ranks j, in turn, from zero), so the bits match the tiles.
constexpr int64_t STREAM_ROWS = 4;  // segments of at most this many rows stream
constexpr int64_t CHUNK = 512;      // accumulator columns per pass (STREAM_ROWS x 2 KB)

// acc[i][0:n] = fma(s[i], m[0:n], acc[i][0:n]) for the R rows
template <int R, typename M>
inline void fma_rows(const float (&s)[R], const M* m, int64_t n, float* const (&acc)[R]) {
  int64_t c = 0;
#if LORAKIT_AVX2
  __m256 sv[R];
  for (int i = 0; i < R; ++i) sv[i] = _mm256_set1_ps(s[i]);
  for (; c + 8 <= n; c += 8) {
    const __m256 mv = load8(m + c);
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
      _mm256_storeu_ps(acc[i] + c, _mm256_fmadd_ps(sv[i], mv, _mm256_loadu_ps(acc[i] + c)));
  }
#endif
#pragma omp simd
  for (int64_t k = c; k < n; ++k) {
    const float mk = static_cast<float>(m[k]);
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) acc[i][k] = std::fma(s[i], mk, acc[i][k]);
  }
}

// h[i, 0:rp] (zeros on entry) = xr[i] · at for R rows (at: (d_in, rp))
template <int R, typename M>
void stream_shrink(const float* const* xr, int64_t d_in, const M* at, int64_t rp, float* h, int64_t h_stride) {
  for (int64_t c = 0; c < rp; c += CHUNK) {
    float* acc[R];
    for (int i = 0; i < R; ++i) acc[i] = h + i * h_stride + c;
    for (int64_t k = 0; k < d_in; ++k) {
      float s[R];
      for (int i = 0; i < R; ++i) s[i] = xr[i][k];
      fma_rows<R>(s, at + k * rp + c, std::min(CHUNK, rp - c), acc);
    }
  }
}

// orow[i][0:d] += hrow[i] · b for R rows (b: (rb, d))
template <int R, typename T, typename M>
void stream_expand(const float* const* hrow, const M* b, int64_t rb, int64_t d, T* const* orow) {
  float buffer[R][CHUNK];
  for (int64_t c = 0; c < d; c += CHUNK) {
    const int64_t n = std::min(CHUNK, d - c);
    float* acc[R];
    for (int i = 0; i < R; ++i) {
      acc[i] = buffer[i];
      std::fill(acc[i], acc[i] + n, 0.f);
    }
    for (int64_t j = 0; j < rb; ++j) {
      float s[R];
      for (int i = 0; i < R; ++i) s[i] = hrow[i][j];
      fma_rows<R>(s, b + j * d + c, n, acc);
    }
    for (int i = 0; i < R; ++i) {
      T* o = orow[i] + c;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) o[k] = static_cast<T>(static_cast<float>(o[k]) + acc[i][k]);
    }
  }
}

// Per thread, the segments it streams: whole segments, the costliest first to the least loaded thread (each thread
// then reads its factors start to end; splitting a factor's columns between threads measured slower). Segments of
// width 0 take no part. cost: per column.
std::vector<std::vector<int64_t>> shares_of(const std::vector<int64_t>& width, const std::vector<int64_t>& cost,
                                         int64_t parts) {
  std::vector<int64_t> order;
  for (size_t s = 0; s < width.size(); ++s)
    if (width[s]) order.push_back(s);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return width[a] * cost[a] > width[b] * cost[b]; });
  std::vector<std::vector<int64_t>> shares(parts);
  std::vector<int64_t> load(parts, 0);
  for (int64_t s : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    load[t] += width[s] * cost[s];
    shares[t].push_back(s);
  }
  return shares;
}

// f(segment) for every segment of `shares`, each thread its own share
template <typename F>
void run_shares(const std::vector<std::vector<int64_t>>& shares, F&& f) {
  at::parallel_for(0, shares.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t s : shares[t]) f(s);
  });
}

struct Tile {
  int64_t seg, first;
};

std::vector<Tile> tiles_of(const int64_t* seg, int64_t nseg, int64_t rows, const std::vector<bool>& skip) {
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < nseg; ++s)
    if (!skip[s])
      for (int64_t i = seg[s]; i < seg[s + 1]; i += rows) tiles.push_back({s, i});
  return tiles;
}

// Which segments stream (up to STREAM_ROWS rows, a plain-layout factor) and the threads' shares of them; `skip`
// marks the rest for the register tiles. cost(factor, rows): a column's cost.
struct Streamed {
  std::vector<bool> skip;
  std::vector<std::vector<int64_t>> shares;  // per thread, the streamed segments
};

template <typename Cost>
Streamed streamed_segments(const int64_t* seg, const std::vector<at::Tensor>& factors, const std::vector<bool>& skip,
                           Cost&& cost) {
  const size_t nseg = factors.size();
  Streamed streamed{skip, {}};
  std::vector<int64_t> width(nseg, 0), costs(nseg, 0);
  bool any = false;
  for (size_t s = 0; s < nseg; ++s) {
    const int64_t rows = seg[s + 1] - seg[s];
    if (skip[s] || rows == 0 || rows > STREAM_ROWS || factors[s].dim() != 2) continue;
    streamed.skip[s] = true;
    width[s] = factors[s].size(1);
    costs[s] = cost(factors[s], rows);
    any = true;
  }
  if (any) streamed.shares = shares_of(width, costs, at::get_num_threads());
  return streamed;
}

template <typename T>
void shrink_impl(const at::Tensor& x, const int64_t* order, const int64_t* seg, const std::vector<at::Tensor>& At,
                 const std::vector<bool>& skip, at::Tensor& h) {
  const int64_t d_in = x.size(1), xs = x.stride(0), hs = h.stride(0);
  const T* xp = x.data_ptr<T>();
  float* hp = h.data_ptr<float>();
  const auto row_of = [&](int64_t i) { return xp + (order ? order[i] : i) * xs; };
  const Streamed streamed = streamed_segments(seg, At, skip, [&](const at::Tensor& a, int64_t) {
    return d_in * a.element_size();
  });
  run_shares(streamed.shares, [&](int64_t s) {
    const int64_t first = seg[s], rows = seg[s + 1] - first;
    std::vector<float> xb(std::is_same_v<T, float> ? 0 : rows * d_in);
    const float* xr[STREAM_ROWS];
    for (int64_t i = 0; i < rows; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        xr[i] = row_of(first + i);
      } else {
        load_row(row_of(first + i), xb.data() + i * d_in, d_in);
        xr[i] = xb.data() + i * d_in;
      }
    }
    const int64_t rp = At[s].size(1);
    with_factor(At[s], [&](const auto* at) {
      up_to<STREAM_ROWS>(rows, [&](auto R) { stream_shrink<R()>(xr, d_in, at, rp, hp + first * hs, hs); });
    });
  });
  const auto tiles = tiles_of(seg, At.size(), SHRINK_ROWS, streamed.skip);
  const std::vector<T> zero_row(d_in, T(0));
  const std::vector<float> zeros(d_in, 0.f);
  at::parallel_for(0, tiles.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xb(std::is_same_v<T, float> ? 0 : SHRINK_ROWS * d_in);  // rows converted to fp32
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tiles[t];
      const int64_t rows = std::min(SHRINK_ROWS, seg[tile.seg + 1] - tile.first);
#if LORAKIT_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (At[tile.seg].dim() == 3) {  // pair layout
          const uint16_t* rp_[SHRINK_ROWS];
          for (int64_t i = 0; i < SHRINK_ROWS; ++i) {
            const T* r = i < rows ? row_of(tile.first + i) : zero_row.data();
            rp_[i] = reinterpret_cast<const uint16_t*>(r);
          }
          const auto* at2 = reinterpret_cast<const uint16_t*>(At[tile.seg].data_ptr<at::BFloat16>());
          const int64_t pairs = At[tile.seg].size(0), rp = At[tile.seg].size(1);
          if (rows == 1)
            shrink_bf16_tile<1>(rp_, rows, pairs, at2, rp, hp + tile.first * hs, hs);
          else
            shrink_bf16_tile<SHRINK_ROWS>(rp_, rows, pairs, at2, rp, hp + tile.first * hs, hs);
          continue;
        }
      }
#endif
      const float* xr[SHRINK_ROWS];  // fp32 rows where they lie, others converted into xb; missing rows: zeros
      for (int64_t i = 0; i < SHRINK_ROWS; ++i) {
        const T* row = i < rows ? row_of(tile.first + i) : nullptr;
        if (row == nullptr) {
          xr[i] = zeros.data();
        } else if constexpr (std::is_same_v<T, float>) {
          xr[i] = row;
        } else {
          load_row(row, xb.data() + i * d_in, d_in);
          xr[i] = xb.data() + i * d_in;
        }
      }
      const int64_t rp = At[tile.seg].size(1);
      float* ht = hp + tile.first * hs;
      with_factor(At[tile.seg], [&](const auto* at) {
        if (rows <= 2)  // a segment's last one or two rows: single-row passes, not a tile of mostly padding
          for (int64_t i = 0; i < rows; ++i) shrink_tile<1>(xr + i, 1, d_in, at, rp, ht + i * hs, hs);
        else
          shrink_tile<SHRINK_ROWS>(xr, rows, d_in, at, rp, ht, hs);
      });
    }
  });
}

// orow[i][first:last) += hrow[i] · b[:, first:last) for a tile of `rows` rows (b: (rb, d) factors of type M)
template <typename T, typename M>
void expand_block(const float* const* hrow, int64_t rows, const M* b, int64_t rb, int64_t d, T* const* orow,
                  int64_t first, int64_t last) {
  int64_t cb = first;
#if LORAKIT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (rows == 1) {  // a single row: up to 64 columns per pass (see tile_times); a tail of < 8 columns below
      const int64_t end = last - (last - first) % 8;
      for (; cb < end; cb += 64)
        up_to<8>((end - cb) / 8, [&](auto v) { expand_add_f32<1, v()>(hrow, 1, b + cb, rb, d, orow, cb); });
      cb = end;
    }
  }
#endif
  for (; cb < last; cb += COLS) {
    const int64_t cols = std::min(COLS, last - cb);
#if LORAKIT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (cols == COLS) {  // 2..6 rows (a single row went above)
        expand_add_f32<EXPAND_ROWS, 2>(hrow, rows, b + cb, rb, d, orow, cb);
        continue;
      }
    }
#endif
    float acc[EXPAND_ROWS][COLS];
    if (rows == 1)
      expand_tile<1>(hrow, b + cb, rb, d, cols, &acc[0][0]);
    else
      expand_tile<EXPAND_ROWS>(hrow, b + cb, rb, d, cols, &acc[0][0]);
    for (int64_t i = 0; i < rows; ++i) {
      T* o = orow[i] + cb;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<T>(static_cast<float>(o[c]) + acc[i][c]);
    }
  }
}

template <typename T>
void expand_impl(at::Tensor& out, const int64_t* order, const int64_t* seg, const at::Tensor& h,
                 const std::vector<int64_t>& r0, const std::vector<at::Tensor>& Bt, const std::vector<bool>& skip,
                 int64_t c0, int64_t d) {
  const int64_t hs = h.stride(0), os = out.stride(0), ncol = (d + COLS - 1) / COLS;
  T* op = out.data_ptr<T>();
  const float* hp = h.data_ptr<float>();
  const auto out_row = [&](int64_t i) { return op + (order ? order[i] : i) * os + c0; };
  const Streamed streamed = streamed_segments(seg, Bt, skip, [&](const at::Tensor& b, int64_t rows) {
    return b.size(0) * b.element_size() + 8 * rows;  // factor bytes, and the rows' outputs read and written
  });
  run_shares(streamed.shares, [&](int64_t s) {
    const int64_t first = seg[s], rows = seg[s + 1] - first;
    const float* hrow[STREAM_ROWS];
    T* orow[STREAM_ROWS];
    for (int64_t i = 0; i < rows; ++i) {
      hrow[i] = hp + (first + i) * hs + r0[s];
      orow[i] = out_row(first + i);
    }
    const int64_t rb = Bt[s].size(0);
    with_factor(Bt[s], [&](const auto* b) {
      up_to<STREAM_ROWS>(rows, [&](auto R) { stream_expand<R()>(hrow, b, rb, d, orow); });
    });
  });
  const auto tiles = tiles_of(seg, Bt.size(), EXPAND_ROWS, streamed.skip);
  int64_t max_rank = 0;
  for (const auto& b : Bt)
    if (b.defined()) max_rank = std::max(max_rank, 2 * b.size(0));
  const std::vector<float> zeros(max_rank, 0.f);
  // a work item: one row tile × up to GROUP column blocks (row pointers set up once per item)
  const int64_t ngroup = (ncol + GROUP - 1) / GROUP;
  at::parallel_for(0, tiles.size() * ngroup, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const Tile tile = tiles[w / ngroup];
      const int64_t first = (w % ngroup) * GROUP * COLS, last = std::min(d, first + GROUP * COLS);
      const int64_t rows = std::min(EXPAND_ROWS, seg[tile.seg + 1] - tile.first);
      // single rows alone, other tiles as full ones (missing rows read zeros): see expand_tile
      const float* hrow[EXPAND_ROWS];
      T* orow[EXPAND_ROWS];
      for (int64_t i = 0; i < EXPAND_ROWS; ++i) {
        hrow[i] = i < rows ? hp + (tile.first + i) * hs + r0[tile.seg] : zeros.data();
        orow[i] = i < rows ? out_row(tile.first + i) : nullptr;
      }
#if LORAKIT_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (Bt[tile.seg].dim() == 3) {  // pair layout; d is a multiple of 16
          const auto* bt2 = reinterpret_cast<const uint16_t*>(Bt[tile.seg].data_ptr<at::BFloat16>());
          const int64_t rb2 = Bt[tile.seg].size(0);
          for (int64_t cb = first; cb < last; cb += COLS) {
            const bool full = last - cb >= COLS;
            if (rows == 1 && full) expand_bf16_tile<1, 2>(hrow, orow, rows, rb2, bt2, d, cb);
            else if (rows == 1) expand_bf16_tile<1, 1>(hrow, orow, rows, rb2, bt2, d, cb);
            else if (full) expand_bf16_tile<EXPAND_ROWS, 2>(hrow, orow, rows, rb2, bt2, d, cb);
            else expand_bf16_tile<EXPAND_ROWS, 1>(hrow, orow, rows, rb2, bt2, d, cb);
          }
          continue;
        }
      }
#endif
      with_factor(Bt[tile.seg], [&](const auto* b) {
        expand_block(hrow, rows, b, Bt[tile.seg].size(0), d, orow, first, last);
      });
    }
  });
}

const int64_t* check_segments(const at::Tensor& order, const at::Tensor& seg, int64_t nseg, int64_t rows) {
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.is_contiguous() && seg.numel() == nseg + 1,
              "seg must hold one more int64 offset than there are segments");
  const int64_t* sp = seg.data_ptr<int64_t>();
  for (int64_t s = 0; s < nseg; ++s) TORCH_CHECK(sp[s] <= sp[s + 1], "segment offsets must not decrease");
  TORCH_CHECK(nseg == 0 || sp[0] >= 0, "negative segment offset");
  if (order.numel()) {
    TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous(), "order must be contiguous int64");
    TORCH_CHECK(nseg == 0 || sp[nseg] <= order.numel(), "segments reach past the end of order");
    const int64_t* o = order.data_ptr<int64_t>();
    for (int64_t i = 0; i < order.numel(); ++i) TORCH_CHECK(o[i] >= 0 && o[i] < rows, "order index out of range");
  } else {
    TORCH_CHECK(nseg == 0 || sp[nseg] <= rows, "segments reach past the last row");
  }
  return order.numel() ? order.data_ptr<int64_t>() : nullptr;
}

// a factor in the plain layout: a contiguous fp32, bf16 or fp16 matrix
bool plain_factor(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return t.dim() == 2 && t.is_contiguous() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf);
}

at::Tensor shrink(const at::Tensor& x, const at::Tensor& order, const at::Tensor& seg,
                  const c10::List<std::optional<at::Tensor>>& At_list) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU (rows, d_in) matrix, rows contiguous");
  const int64_t nseg = At_list.size();
  const int64_t* op = check_segments(order, seg, nseg, x.size(0));
  std::vector<at::Tensor> At(nseg);
  std::vector<bool> skip(nseg, true);
  int64_t width = 8;
  for (int64_t s = 0; s < nseg; ++s) {
    const std::optional<at::Tensor> a = At_list.get(s);
    if (!a.has_value() || !a->defined()) continue;
    if (a->dim() == 3) {
      TORCH_CHECK(a->scalar_type() == at::kBFloat16 && LORAKIT_BF16_DOT && x.scalar_type() == at::kBFloat16 &&
                      a->is_contiguous() && 2 * a->size(0) == x.size(1) && a->size(1) % 16 == 0 && a->size(1) > 0 &&
                      a->size(2) == 2,
                  "a 3-d At must be the bf16 pair layout (d_in / 2, r, 2), r a positive multiple of 16, for bf16 x "
                  "on a CPU with AVX512-BF16 (see bf16_dot)");
    } else {
      TORCH_CHECK(plain_factor(*a) && a->size(0) == x.size(1) && a->size(1) % 8 == 0 && a->size(1) > 0,
                  "each At must be contiguous fp32, bf16 or fp16 (d_in, r) with r a positive multiple of 8");
    }
    width = std::max(width, a->size(1));
    At[s] = *a;
    skip[s] = false;
  }
  const int64_t* sp = seg.data_ptr<int64_t>();
  // zeros: the bf16 expand reads rank pairs, one column past an odd rank (times a zero factor)
  at::Tensor h = at::zeros({nseg ? sp[nseg] : 0, width + 1}, x.options().dtype(at::kFloat));
  TORCH_CHECK(x.scalar_type() != at::kDouble, "the kernels accumulate in fp32: fp64 inputs keep the eager path");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lorakit_shrink",
                                  [&] { shrink_impl<scalar_t>(x, op, sp, At, skip, h); });
  return h;
}

void expand(at::Tensor out, const at::Tensor& order, const at::Tensor& seg, const at::Tensor& h, at::IntArrayRef r0,
            const c10::List<std::optional<at::Tensor>>& Bt_list, int64_t c0) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.stride(1) == 1,
              "out must be a CPU (rows, d_out) matrix, rows contiguous");
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.stride(1) == 1,
              "h must be the fp32 output of shrink");
  const int64_t nseg = Bt_list.size();
  TORCH_CHECK(static_cast<int64_t>(r0.size()) == nseg, "one rank offset per segment");
  const int64_t* op = check_segments(order, seg, nseg, out.size(0));
  std::vector<at::Tensor> Bt(nseg);
  std::vector<bool> skip(nseg, true);
  int64_t d = -1;
  for (int64_t s = 0; s < nseg; ++s) {
    const std::optional<at::Tensor> b = Bt_list.get(s);
    if (!b.has_value() || !b->defined()) continue;
    if (b->dim() == 3) {
      TORCH_CHECK(b->scalar_type() == at::kBFloat16 && LORAKIT_BF16_DOT && out.scalar_type() == at::kBFloat16 &&
                      b->is_contiguous() &&
                      b->size(1) % 16 == 0 && b->size(2) == 2,
                  "a 3-d Bt must be the bf16 pair layout (r / 2, d, 2), d a multiple of 16, for a bf16 out");
      TORCH_CHECK(r0[s] >= 0 && r0[s] + 2 * b->size(0) <= h.size(1), "rank slice outside h");
    } else {
      TORCH_CHECK(plain_factor(*b), "each Bt must be contiguous fp32, bf16 or fp16 (r, d)");
      TORCH_CHECK(r0[s] >= 0 && r0[s] + b->size(0) <= h.size(1), "rank slice outside h");
    }
    TORCH_CHECK(d < 0 || b->size(1) == d, "every Bt must have the same number of columns");
    d = b->size(1);
    Bt[s] = *b;
    skip[s] = false;
  }
  if (d < 0) return;
  TORCH_CHECK(h.size(0) >= (nseg ? seg.data_ptr<int64_t>()[nseg] : 0), "h has fewer rows than the segments");
  TORCH_CHECK(c0 >= 0 && c0 + d <= out.size(1), "columns outside out");
  std::vector<int64_t> offsets(r0.begin(), r0.end());
  const int64_t* sp = seg.data_ptr<int64_t>();
  TORCH_CHECK(out.scalar_type() != at::kDouble, "the kernels accumulate in fp32: fp64 outputs keep the eager path");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "lorakit_expand",
                                  [&] { expand_impl<scalar_t>(out, op, sp, h, offsets, Bt, skip, c0, d); });
}

bool bf16_dot() { return LORAKIT_BF16_DOT; }
bool avx2_tiles() { return LORAKIT_AVX2; }

}  // namespace

#ifndef LORAKIT_OPS
#define LORAKIT_OPS lorakit_sgmv  // the op namespace (another one for the LORAKIT_GENERIC test build)
#endif

TORCH_LIBRARY(LORAKIT_OPS, m) {
  m.def("bf16_dot() -> bool", &bf16_dot);
  m.def("avx2_tiles() -> bool", &avx2_tiles);
  m.def("shrink(Tensor x, Tensor order, Tensor seg, Tensor?[] At) -> Tensor", &shrink);
  m.def("expand(Tensor(a!) out, Tensor order, Tensor seg, Tensor h, int[] r0, Tensor?[] Bt, int c0) -> ()", &expand);
}
