// The recurrent product of every step, W_a a(t-1) (or W_aᵀ dz(t) backward), made by the thread that owns
// each share of it (some of the batch's rows, or a slice of the hidden units): float32, or bfloat16
// factors summed in float32 (train.precision: bfloat16).
#pragma once

#include "common.h"

namespace {

// --- the recurrent products ----------------------------------------------------------------------
//
// Each step's recurrent product, (B, H) by (H, 4H) with B = 20 and H = 200 in PTB's setting (6.4 MFLOP),
// is too small for a library call to pay off, even with W packed once per sequence (docs/benchmarks.md,
// scripts/profile_train_step.py, measures the calls). So the time loops run inside one parallel region, W packed
// once, each thread making its share of every step's product and the gate arithmetic of that share together
// for all T steps. A share is some of the batch's rows (`on_shares` says when): each row's recurrence is
// its own, so a thread never reads what another wrote and the steps need no barrier. With too few rows for
// that, a share is a slice of the hidden units of every row: the thread packs its slice of W into its own
// cache and meets the other threads at a barrier each step (the next product needs all of a(t), or dz(t)).

// A packed block is 16 columns wide; the tile holds it in vectors of the CPU's own width (VECTOR_LANES
// floats: 16 with AVX-512, 8 with AVX2, 4 elsewhere). A 64-byte vector type on a CPU without 64-byte registers
// is not split into registers by GCC: it kept the sums in memory and made the AVX2 loops 5-9x slower
// (docs/benchmarks.md, "The tile on an AVX2 CPU").
#if defined(__AVX512F__)
constexpr int VECTOR_LANES = 16;
#elif defined(__AVX__)
constexpr int VECTOR_LANES = 8;
#else
constexpr int VECTOR_LANES = 4;
#endif
using native_vector = float __attribute__((vector_size(4 * VECTOR_LANES)));
constexpr int64_t COLUMNS = 16;                              // a packed block's width
constexpr int PARTS = COLUMNS / VECTOR_LANES;                // vectors per block

// C[r][0..16 BLOCKS) = Σ_k A[r][k] P[k][..] for R rows of A (row stride lda) and BLOCKS neighbouring packed
// blocks (K, 16), `stride` floats apart. An FMA takes 4 cycles and two issue per cycle, so 8 independent
// sums keep the FMA units busy: AVX-512's 32 registers hold 6 rows by 2 blocks (12 sums, 2 loads of W
// and 6 of A for 12 FMAs per k); with AVX2 a block is two 8-float vectors, 4 rows by 1 block 8 sums.
// A tile of fewer rows (the last rows of a batch; batch 1, sampling one sample) keeps SPLIT sets of its
// sums, set s taking the k with k % SPLIT == s, added together at the end, so that it too has 8: with one
// set, one row by one block on AVX2 was 2 chains of dependent FMAs, a quarter of what the units can do.
template <int R, int BLOCKS>
inline void tile(const float* __restrict A, int64_t lda, const float* __restrict P, int64_t stride, int64_t K,
                 float* __restrict C, int64_t ldc) noexcept {
  constexpr int SUMS = R * BLOCKS * PARTS, SPLIT = SUMS >= 8 ? 1 : 8 / SUMS;
  native_vector sum[SPLIT][R][BLOCKS][PARTS];
  for (int s = 0; s < SPLIT; ++s)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BLOCKS; ++b)
        for (int p = 0; p < PARTS; ++p) sum[s][r][b][p] = native_vector{};
  // Input k's products, into the sums of set s.
  const auto accumulate = [&](int s, int64_t k) {
    native_vector w[BLOCKS][PARTS];
    for (int b = 0; b < BLOCKS; ++b)
      for (int p = 0; p < PARTS; ++p)
        std::memcpy(&w[b][p], P + b * stride + k * COLUMNS + p * VECTOR_LANES, sizeof w[b][p]);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + k];
      for (int b = 0; b < BLOCKS; ++b)
        for (int p = 0; p < PARTS; ++p) sum[s][r][b][p] += a * w[b][p];
    }
  };
  int64_t k = 0;
  for (; k + SPLIT <= K; k += SPLIT)
    for (int s = 0; s < SPLIT; ++s) accumulate(s, k + s);
  for (int s = 0; k < K; ++k, ++s) accumulate(s, k);
  for (int s = 1; s < SPLIT; ++s)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BLOCKS; ++b)
        for (int p = 0; p < PARTS; ++p) sum[0][r][b][p] += sum[s][r][b][p];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BLOCKS; ++b)
      for (int p = 0; p < PARTS; ++p)
        std::memcpy(C + r * ldc + b * COLUMNS + p * VECTOR_LANES, &sum[0][r][b][p], sizeof sum[0][r][b][p]);
}

// LMTRAIN_SMALL_TILES builds AVX2's tile with AVX-512 too, for scripts/compare_tiles.py (docs/benchmarks.md).
// On AVX2 a tile of 6 rows was no faster than this one (docs/benchmarks.md, "The tile on an AVX2 CPU").
#if defined(__AVX512F__) && !defined(LMTRAIN_SMALL_TILES)
constexpr int TILE_ROWS = 6, TILE_BLOCKS = 2;
#else
constexpr int TILE_ROWS = 4, TILE_BLOCKS = 1;
#endif

// The last `rest` < TILE_ROWS rows of a batch as one tile, which reads the blocks once: as tiles of 2
// and 1 rows, 3 rows read them twice.
template <int BLOCKS, int R = TILE_ROWS - 1>
inline void rest_rows(int64_t rest, const float* A, int64_t lda, const float* P, int64_t stride, int64_t K,
                      float* C, int64_t ldc) noexcept {
  if constexpr (R > 0) {
    if (rest == R)
      tile<R, BLOCKS>(A, lda, P, stride, K, C, ldc);
    else
      rest_rows<BLOCKS, R - 1>(rest, A, lda, P, stride, K, C, ldc);
  }
}

// All B rows against BLOCKS neighbouring blocks: tiles of TILE_ROWS rows, then one tile for the rest.
template <int BLOCKS>
inline void tile_rows(const float* A, int64_t lda, int64_t B, int64_t K, const float* P, int64_t N,
                      float* C) noexcept {
  const int64_t stride = K * COLUMNS;
  int64_t row = 0;
  for (; row + TILE_ROWS <= B; row += TILE_ROWS)
    tile<TILE_ROWS, BLOCKS>(A + row * lda, lda, P, stride, K, C + row * N, N);
  rest_rows<BLOCKS>(B - row, A + row * lda, lda, P, stride, K, C + row * N, N);
}

// C (B, N) = A (B, K) P, A's rows `lda` floats apart, P packed as N / 16 blocks of (K, 16), N a multiple
// of 16. TILE_BLOCKS blocks at a time, so that they stay in the core's cache while every row passes over them.
void packed_product(const float* A, int64_t lda, int64_t B, int64_t K, const float* P, int64_t N,
                    float* C) noexcept {
  const int64_t blocks = N / COLUMNS;
  int64_t block = 0;
  for (; block + TILE_BLOCKS <= blocks; block += TILE_BLOCKS)
    tile_rows<TILE_BLOCKS>(A, lda, B, K, P + block * K * COLUMNS, N, C + block * COLUMNS);
  for (; block < blocks; ++block) tile_rows<1>(A, lda, B, K, P + block * K * COLUMNS, N, C + block * COLUMNS);
}

// The hidden units [begin, end) of one thread, and the width of its gate slices padded to whole blocks.
struct Units {
  int64_t begin, end, padded;
  int64_t count() const { return end - begin; }
};

// Thread `thread` of `threads`: whole blocks of 16 units each, the last thread's block cut at H.
Units units_of(int thread, int threads, int64_t H) {
  const int64_t blocks = (H + COLUMNS - 1) / COLUMNS;
  const int64_t begin = std::min(H, blocks * thread / threads * COLUMNS);
  const int64_t end = std::min(H, blocks * (thread + 1) / threads * COLUMNS);
  return {begin, end, (end - begin + COLUMNS - 1) / COLUMNS * COLUMNS};
}

// The threads to ask for: torch's, but no more than there are blocks of 16 units. The units are shared
// among the threads the region actually got (omp_get_num_threads), which may be fewer.
int threads_for(int64_t H) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + COLUMNS - 1) / COLUMNS)));
}

// The weights of a product's columns, packed for `packed_product`: column i < count takes weight(i, k) for
// input k, the columns from `count` up to the next multiple of 16 are zero.
template <typename Weight>
floats pack(int64_t K, int64_t count, Weight weight) {
  const int64_t N = (count + COLUMNS - 1) / COLUMNS * COLUMNS;
  floats P(N * K, 0.0f);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t k = 0; k < K; ++k) P[(i / COLUMNS) * K * COLUMNS + k * COLUMNS + i % COLUMNS] = weight(i, k);
  return P;
}

// --- the same products with bfloat16 factors (train.precision: bfloat16) ---------------------------
//
// AVX-512 BF16's VDPBF16PS adds, in each of its 16 float32 lanes, a pair of products of bfloat16 factors,
// a[2k] w[2k] + a[2k+1] w[2k+1]: twice an FMA's work per instruction, and half the bytes of W to stream.
// The factors are therefore kept as pairs along k, one 32-bit word each: A's rows are read as they lie
// in a (rows, K) bfloat16 buffer, K even; P is packed as N / 16 blocks of (K / 2, 16) pairs. The sums
// stay float32 from the first product to the result, which is never rounded to bfloat16.

using bf16 = uint16_t;

// float -> bfloat16 rounded to nearest even, as torch's conversion rounds (a NaN stays a NaN).
inline bf16 to_bf16(float x) noexcept {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

#ifdef LMTRAIN_X86
#define LMTRAIN_BF16 __attribute__((target("avx512f,avx512bf16")))

// C[r][0..16 BLOCKS) = Σ_k A[r][k] P[k][..] for R rows of A (row stride lda, in bfloat16s) and BLOCKS
// neighbouring packed blocks (K2 pairs by 16 each, `stride` words apart). Up to 6 rows by 2 blocks: 12
// accumulators, and 8 loads (2 of W, 6 of A) for 12 VDPBF16PS per pair of k, where 4 rows by one block
// made 5 loads for 4.
template <int R, int BLOCKS>
LMTRAIN_BF16 inline void tile_bf16(const bf16* __restrict A, int64_t lda, const uint32_t* __restrict P,
                                   int64_t stride, int64_t K2, float* __restrict C, int64_t ldc) noexcept {
  __m512 sum[R][BLOCKS];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BLOCKS; ++b) sum[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh w[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b)
      w[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(P + b * stride + k * COLUMNS));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k, sizeof pair);
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int b = 0; b < BLOCKS; ++b) sum[r][b] = _mm512_dpbf16_ps(sum[r][b], a, w[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BLOCKS; ++b) _mm512_storeu_ps(C + r * ldc + b * COLUMNS, sum[r][b]);
}

// All B rows (`lda` bfloat16s apart) against BLOCKS neighbouring blocks: tiles of 6 rows, then 4, 2 and 1
// for the rest.
template <int BLOCKS>
LMTRAIN_BF16 inline void rows_bf16(const bf16* A, int64_t lda, int64_t B, int64_t K, const uint32_t* P, int64_t N,
                                   float* C) noexcept {
  const int64_t K2 = K / 2, stride = K2 * COLUMNS;
  int64_t row = 0;
  for (; row + 6 <= B; row += 6) tile_bf16<6, BLOCKS>(A + row * lda, lda, P, stride, K2, C + row * N, N);
  if (row + 4 <= B) tile_bf16<4, BLOCKS>(A + row * lda, lda, P, stride, K2, C + row * N, N), row += 4;
  if (row + 2 <= B) tile_bf16<2, BLOCKS>(A + row * lda, lda, P, stride, K2, C + row * N, N), row += 2;
  if (row < B) tile_bf16<1, BLOCKS>(A + row * lda, lda, P, stride, K2, C + row * N, N);
}

// `packed_product` with bfloat16 A (B, K), rows `lda` apart, and P packed as pairs (`PackedWeights`); K even.
LMTRAIN_BF16 __attribute__((noinline)) void packed_product_bf16(const bf16* A, int64_t lda, int64_t B, int64_t K,
                                                                  const uint32_t* P, int64_t N, float* C) noexcept {
  const int64_t blocks = N / COLUMNS, stride = K / 2 * COLUMNS;
  int64_t block = 0;
  for (; block + 2 <= blocks; block += 2) rows_bf16<2>(A, lda, B, K, P + block * stride, N, C + block * COLUMNS);
  if (block < blocks) rows_bf16<1>(A, lda, B, K, P + block * stride, N, C + block * COLUMNS);
}

bool bf16_products_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"); }
#else
// No AVX-512 BF16 instructions to build with: `bf16_products_supported()` is false, so the Python loops
// make the bfloat16 products and this is never reached.
void packed_product_bf16(const bf16*, int64_t, int64_t, int64_t, const uint32_t*, int64_t, float*) {
  TORCH_CHECK(false, "the bfloat16 products need AVX-512 BF16, which this build lacks");
}

bool bf16_products_supported() { return false; }
#endif

// A thread's share of one recurrent product's weights, packed once for the whole sequence: float32
// blocks for `packed_product`, or bfloat16 pairs for `packed_product_bf16` (K even) when `low`.
struct PackedWeights {
  floats single;
  std::vector<uint32_t, CacheAligned<uint32_t>> pairs;
  int64_t K, N;

  template <typename Weight>
  PackedWeights(bool low, int64_t K_, int64_t count, Weight weight) : K(K_), N((count + COLUMNS - 1) / COLUMNS * COLUMNS) {
    if (!low) {
      single = pack(K, count, weight);
      return;
    }
    pairs.assign(N * (K / 2), 0u);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t k = 0; k + 1 < K; k += 2)
        pairs[(i / COLUMNS) * (K / 2) * COLUMNS + (k / 2) * COLUMNS + i % COLUMNS] =
            to_bf16(weight(i, k)) | (static_cast<uint32_t>(to_bf16(weight(i, k + 1))) << 16);
  }

  // C (B, N) = A (B, K) W, A's rows `lda` apart (more than K for a gate slice of dz(t)): read from `A_low`,
  // A's bfloat16 copy laid out alike, when packed low, from `A` otherwise.
  void product(const float* A, const bf16* A_low, int64_t lda, int64_t B, float* C) const noexcept {
    if (pairs.empty())
      packed_product(A, lda, B, K, single.data(), N, C);
    else
      packed_product_bf16(A_low, lda, B, K, pairs.data(), N, C);
  }
};

// A thread's columns of a forward product W_a a(t-1), W (G H, H) holding `gates` gate blocks of H rows from
// block `first`: column g u.padded + i is gate g of unit u.begin + i (zero past u.count()), so that the
// thread's result lies gate by gate, u.padded wide each.
PackedWeights forward_columns(bool low, const float* W, int64_t H, int64_t first, int64_t gates, Units u) {
  return PackedWeights(low, H, gates * u.padded, [&](int64_t i, int64_t k) {
    const int64_t gate = i / u.padded, unit = i % u.padded;
    return unit < u.count() ? W[((first + gate) * H + u.begin + unit) * H + k] : 0.0f;
  });
}

// A thread's columns of a backward product W_aᵀ dz(t) over the `gates` gate blocks of W from block `first`:
// column i is unit u.begin + i of the result, Σ_k dz[k] W[first H + k][u.begin + i].
PackedWeights backward_columns(bool low, const float* W, int64_t H, int64_t first, int64_t gates, Units u) {
  return PackedWeights(low, gates * H, u.count(), [&](int64_t i, int64_t k) {
    return W[(first * H + k) * H + u.begin + i];
  });
}

// The batch rows [begin, end) of one thread.
struct Rows {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};

// One thread's share of a time loop: the hidden units `units` of the batch rows `rows`.
struct Share {
  Units units;
  Rows rows;
  bool units_split;  // the threads split the units: each step's product reads what the others wrote

  // Waits, where the threads split the units, until every thread has written its part of this step.
  void sync() const {
    if (units_split) {
#pragma omp barrier
    }
  }
};

// Runs body(share, packed) on the threads of one parallel region; pack(units) packs the weights of those
// units' columns. Where each thread gets a whole register tile of rows (TILE_ROWS), the threads split the
// batch's rows and W is packed once for all of them: no barrier between steps and no data passed between
// cores (on a shared host the units split slowed for stretches of seconds where the rows split held: docs/
// benchmarks.md, "Rows or units"). Otherwise they split the units, each
// thread packing its own slice.
template <typename Pack, typename Body>
void on_shares(int64_t B, int64_t H, Pack pack, Body body) {
  const int threads = at::get_num_threads();
  if (B >= threads * TILE_ROWS) {
    const Units all = units_of(0, 1, H);
    const auto packed = pack(all);
#pragma omp parallel num_threads(threads)
    {
      const int thread = omp_get_thread_num(), region = omp_get_num_threads();
      body(Share{all, {B * thread / region, B * (thread + 1) / region}, false}, packed);
    }
  } else {
#pragma omp parallel num_threads(threads_for(H))
    {
      const Units units = units_of(omp_get_thread_num(), omp_get_num_threads(), H);
      body(Share{units, {0, B}, true}, pack(units));
    }
  }
}

// Every buffer a time loop reads or writes is a contiguous float32 CPU tensor (lmtrain/backprop/ makes them so).
void check(const at::Tensor& tensor, const char* name) {
  if (!(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous()))
    fail(std::string(name) + " must be a contiguous float32 CPU tensor");
}

// A bfloat16 buffer shaped like `like` (a(t), c(t) or dz(t)), for the bfloat16 copies a time loop makes of
// its products' factors; null when not given (float32 products).
bf16* low_buffer(const std::optional<at::Tensor>& low, const at::Tensor& like, const char* name) {
  if (!low) return nullptr;
  if (!(low->device().is_cpu() && low->scalar_type() == at::kBFloat16 && low->is_contiguous() &&
        low->sizes() == like.sizes()))
    fail(std::string(name) + " must be a contiguous bfloat16 CPU tensor shaped like " + shape_text(like.sizes()));
  TORCH_CHECK(like.size(2) % 2 == 0 && bf16_products_supported(),
              "bfloat16 products need an even width and a CPU with AVX-512 BF16");
  return reinterpret_cast<bf16*>(low->data_ptr<at::BFloat16>());
}

// base + n, or null for a null base (a product without bfloat16 copies).
inline bf16* offset(bf16* base, int64_t n) noexcept { return base == nullptr ? nullptr : base + n; }

// out[r][g H + u.begin + j] = bfloat16(x[r][g H + u.begin + j]) for rows r < B of width `width`, the
// gate blocks g in [first, first + gates) of H units each, j < u.count(): a thread's units of a(t), c(t)
// or dz(t), rounded for the next product. Nothing without `out` (float32 products).
void round_units(const float* x, int64_t B, int64_t width, int64_t H, int64_t first, int64_t gates, Units u,
                 bf16* out) noexcept {
  if (out == nullptr) return;
  for (int64_t row = 0; row < B; ++row)
    for (int64_t gate = first; gate < first + gates; ++gate)
      for (int64_t j = gate * H + u.begin; j < gate * H + u.end; ++j)
        out[row * width + j] = to_bf16(x[row * width + j]);
}

}  // namespace
