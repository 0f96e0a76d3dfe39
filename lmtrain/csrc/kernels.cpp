// lmtrain's compiled kernels (built and loaded by lmtrain/kernels.py):
//
// - The LSTM's two time loops, forward and backward through time: the equations of the Python loops in
//   lmtrain/backward.py (_lstm_forward_loop, _lstm_backward_loop), one step at a time, but with each
//   step's recurrent product and gate arithmetic made together, thread by thread, and no Python or
//   library call between the steps (the recurrent products are made here; the products over all T
//   steps at once stay with lmtrain.gemm). Gates are laid out [Γ_f, Γ_u, c̃, Γ_o] along the last axis of
//   a (T, B, 4H) buffer, rows are batch, and buffers are time-major, exactly as in backward.py. Under
//   train.precision: bfloat16 the recurrent products take bfloat16 factors (AVX-512 BF16).
// - The softmax cross-entropy of the output layer (lmtrain/loss.py): the loss and its gradient with
//   respect to the logits in one pass per row, the gradient written over the logits.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

// The bfloat16 products use AVX-512 BF16 intrinsics: x86 only. Elsewhere (ARM) the rest builds as before
// and `bf16_products_supported()` is false, so the Python loops make the bfloat16 products.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(LMTRAIN_NO_X86)
#define LMTRAIN_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// e^x by Cody and Waite's range reduction, x = n ln2 + r with |r| <= ln2/2, and Cephes' degree-6
// polynomial for e^r (about 1 float ulp); then 2^n built from its exponent bits. Written without
// library calls so that the compiler vectorises the loops below. The clamp keeps 2^n a normal float:
// σ and tanh have saturated long before.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }             // σ(z) = 1 / (1 + e^-z)

inline float tanh_approx(float z) { return 1.0f - 2.0f / (exp_approx(2.0f * z) + 1.0f); }  // (e^2z - 1) / (e^2z + 1)

// --- the recurrent products ----------------------------------------------------------------------
//
// Each step's recurrent product, (B, H) by (H, 4H) with B = 20 and H = 200 in PTB's setting (6.4 MFLOP),
// is too small for a library call to pay off: made by one oneDNN call per step, with W packed once per
// sequence, the 140 such products of a PTB training step averaged about 100 us, some 60 GFLOPS (torch's
// profiler, scripts/profile_train_step.py: 145 oneDNN calls and 30 ms a step, the output layer's
// 2.8-GFLOP product among them). So the time loops run inside one parallel region, each thread owning a
// slice of the hidden units for all T steps: it packs its slice of W once, into its own cache, makes its
// columns of every step's product and the gate arithmetic of its units together, and meets the other
// threads at one barrier per step (the next product needs all of a(t), or all of dz(t)).

using vector16 = float __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones
constexpr int64_t COLUMNS = 16;                              // a packed block's width: one vector16
constexpr int64_t ROWS = 4;   // rows per tile: 4 accumulators (8 of AVX2's 16 registers); of the tiles
                              // tried in a side trial (4-8 rows, 16-64 columns) none was faster

// C[r][0..16) = Σ_k A[r][k] P[k][0..16) for R rows of A (row stride lda) and a packed block P (K, 16).
template <int R>
inline void tile(const float* __restrict A, int64_t lda, const float* __restrict P, int64_t K, float* __restrict C,
                 int64_t ldc) noexcept {
  vector16 sum[R];
  for (int r = 0; r < R; ++r) sum[r] = vector16{};
  for (int64_t k = 0; k < K; ++k) {
    vector16 w;
    std::memcpy(&w, P + k * COLUMNS, sizeof w);
    for (int r = 0; r < R; ++r) sum[r] += A[r * lda + k] * w;
  }
  for (int r = 0; r < R; ++r) std::memcpy(C + r * ldc, &sum[r], sizeof sum[r]);
}

// C (B, N) = A (B, K) P, P packed as N / 16 blocks of (K, 16), N a multiple of 16. Block by block, so
// that a block (K x 64 bytes) stays in the core's cache while every row passes over it.
void packed_product(const float* A, int64_t B, int64_t K, const float* P, int64_t N, float* C) noexcept {
  for (int64_t block = 0; block < N / COLUMNS; ++block) {
    const float* P_block = P + block * K * COLUMNS;
    float* C_block = C + block * COLUMNS;
    int64_t row = 0;
    for (; row + ROWS <= B; row += ROWS) tile<ROWS>(A + row * K, K, P_block, K, C_block + row * N, N);
    for (; row < B; ++row) tile<1>(A + row * K, K, P_block, K, C_block + row * N, N);
  }
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
std::vector<float> pack(int64_t K, int64_t count, Weight weight) {
  const int64_t N = (count + COLUMNS - 1) / COLUMNS * COLUMNS;
  std::vector<float> P(N * K, 0.0f);
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

// All B rows against BLOCKS neighbouring blocks: tiles of 6 rows, then 4, 2 and 1 for the rest.
template <int BLOCKS>
LMTRAIN_BF16 inline void rows_bf16(const bf16* A, int64_t B, int64_t K, const uint32_t* P, int64_t N,
                                   float* C) noexcept {
  const int64_t K2 = K / 2, stride = K2 * COLUMNS;
  int64_t row = 0;
  for (; row + 6 <= B; row += 6) tile_bf16<6, BLOCKS>(A + row * K, K, P, stride, K2, C + row * N, N);
  if (row + 4 <= B) tile_bf16<4, BLOCKS>(A + row * K, K, P, stride, K2, C + row * N, N), row += 4;
  if (row + 2 <= B) tile_bf16<2, BLOCKS>(A + row * K, K, P, stride, K2, C + row * N, N), row += 2;
  if (row < B) tile_bf16<1, BLOCKS>(A + row * K, K, P, stride, K2, C + row * N, N);
}

// `packed_product` with bfloat16 A (B, K) and P packed as pairs (`PackedWeights`); K even.
LMTRAIN_BF16 __attribute__((noinline)) void packed_product_bf16(const bf16* A, int64_t B, int64_t K,
                                                                  const uint32_t* P, int64_t N, float* C) noexcept {
  const int64_t blocks = N / COLUMNS, stride = K / 2 * COLUMNS;
  int64_t block = 0;
  for (; block + 2 <= blocks; block += 2) rows_bf16<2>(A, B, K, P + block * stride, N, C + block * COLUMNS);
  if (block < blocks) rows_bf16<1>(A, B, K, P + block * stride, N, C + block * COLUMNS);
}

bool bf16_products_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"); }
#else
// Never called (no CPU here is reported to support it), but defined: the same sums, one at a time.
void packed_product_bf16(const bf16* A, int64_t B, int64_t K, const uint32_t* P, int64_t N, float* C) noexcept {
  const auto value = [](uint32_t bits) { float x; std::memcpy(&x, &bits, sizeof x); return x; };
  for (int64_t row = 0; row < B; ++row)
    for (int64_t n = 0; n < N; ++n) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K / 2; ++k) {
        uint32_t pair;
        std::memcpy(&pair, A + row * K + 2 * k, sizeof pair);
        const uint32_t w = P[(n / COLUMNS) * (K / 2) * COLUMNS + k * COLUMNS + n % COLUMNS];
        sum += value(pair << 16) * value(w << 16) + value(pair & 0xffff0000u) * value(w & 0xffff0000u);
      }
      C[row * N + n] = sum;
    }
}

bool bf16_products_supported() { return false; }
#endif

// A thread's share of one recurrent product's weights, packed once for the whole sequence: float32
// blocks for `packed_product`, or bfloat16 pairs for `packed_product_bf16` (K even) when `low`.
struct PackedWeights {
  std::vector<float> single;
  std::vector<uint32_t> pairs;
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

  // C (B, N) = A (B, K) W: A from `A_low` (bfloat16) when packed low, from `A` otherwise.
  void product(const float* A, const bf16* A_low, int64_t B, float* C) const noexcept {
    if (pairs.empty())
      packed_product(A, B, K, single.data(), N, C);
    else
      packed_product_bf16(A_low, B, K, pairs.data(), N, C);
  }
};

// base + n, or null for a null base (a product without bfloat16 copies).
inline bf16* offset(bf16* base, int64_t n) noexcept { return base == nullptr ? nullptr : base + n; }

// out[r][begin + j] = bfloat16(x[r][begin + j]) for rows r < B of width `width`, j < count: a thread's
// units of a(t) or dz(t), rounded for the next step's product.
void round_units(const float* x, int64_t B, int64_t width, int64_t begin, int64_t count, bf16* out) noexcept {
  for (int64_t row = 0; row < B; ++row)
    for (int64_t j = begin; j < begin + count; ++j) out[row * width + j] = to_bf16(x[row * width + j]);
}

// --- the LSTM ------------------------------------------------------------------------------------

// One step of the forward for the units [u.begin, u.end) of all B rows. z = W_aa a(t-1) + (W_ax x(t) + b):
// `recurrent` (B, 4 u.padded) is the first term for these units, gate by gate; `gates` (B, 4H) holds the
// second on entry and the activations on return:
//   Γ_f = σ(z_f), Γ_u = σ(z_u), c̃ = tanh(z_c), Γ_o = σ(z_o)
//   c(t) = Γ_f * c(t-1) + Γ_u * c̃
//   a(t) = Γ_o * tanh(c(t))
// Raw pointers and no calls that can throw, so that the compiler vectorises the inner loop.
void forward_step(const float* recurrent, float* gates, const float* c_prev, float* c, float* tanh_c, float* a,
                  int64_t B, int64_t H, Units u) noexcept {
  for (int64_t row = 0; row < B; ++row) {
    const float* __restrict r_f = recurrent + row * 4 * u.padded;
    const float* __restrict r_u = r_f + u.padded;
    const float* __restrict r_c = r_f + 2 * u.padded;
    const float* __restrict r_o = r_f + 3 * u.padded;
    float* __restrict gamma_f = gates + row * 4 * H + u.begin;
    float* __restrict gamma_u = gamma_f + H;
    float* __restrict c_tilde = gamma_f + 2 * H;
    float* __restrict gamma_o = gamma_f + 3 * H;
    const float* __restrict c_prev_row = c_prev + row * H + u.begin;
    float* __restrict c_row = c + row * H + u.begin;
    float* __restrict tanh_c_row = tanh_c + row * H + u.begin;
    float* __restrict a_row = a + row * H + u.begin;
#pragma GCC ivdep
    for (int64_t j = 0; j < u.count(); ++j) {
      gamma_f[j] = sigmoid(gamma_f[j] + r_f[j]);
      gamma_u[j] = sigmoid(gamma_u[j] + r_u[j]);
      c_tilde[j] = tanh_approx(c_tilde[j] + r_c[j]);
      gamma_o[j] = sigmoid(gamma_o[j] + r_o[j]);
      c_row[j] = gamma_f[j] * c_prev_row[j] + gamma_u[j] * c_tilde[j];
      tanh_c_row[j] = tanh_approx(c_row[j]);
      a_row[j] = gamma_o[j] * tanh_c_row[j];
    }
  }
}

// One step of the backward for the units [u.begin, u.end) of all B rows, from the forward's activations
// of step t. What reaches a(t) is da(t) = `recurrent` (B, u.padded) (W_aᵀ dz(t+1), through a(t)'s use at
// step t+1) + `outside` (from the outputs); `dc` holds what reaches c(t) through c(t+1):
//   dc(t) = dc + da(t) Γ_o (1 - tanh²(c(t)))
//   dz_f = dc(t) c(t-1) Γ_f (1 - Γ_f)        dz_u = dc(t) c̃ Γ_u (1 - Γ_u)
//   dz_c = dc(t) Γ_u (1 - c̃²)                dz_o = da(t) tanh(c(t)) Γ_o (1 - Γ_o)
//   dc(t-1) = dc(t) Γ_f
// writing dz (B, 4H) for these units, and dc(t-1) over dc.
void backward_step(const float* gates, const float* c_prev, const float* tanh_c, const float* recurrent,
                   const float* outside, float* dc, float* dz, int64_t B, int64_t H, Units u) noexcept {
  for (int64_t row = 0; row < B; ++row) {
    const float* __restrict gamma_f = gates + row * 4 * H + u.begin;
    const float* __restrict gamma_u = gamma_f + H;
    const float* __restrict c_tilde = gamma_f + 2 * H;
    const float* __restrict gamma_o = gamma_f + 3 * H;
    const float* __restrict c_prev_row = c_prev + row * H + u.begin;
    const float* __restrict tanh_c_row = tanh_c + row * H + u.begin;
    const float* __restrict recurrent_row = recurrent + row * u.padded;
    const float* __restrict outside_row = outside + row * H + u.begin;
    float* __restrict dc_row = dc + row * H + u.begin;
    float* __restrict dz_f = dz + row * 4 * H + u.begin;
    float* __restrict dz_u = dz_f + H;
    float* __restrict dz_c = dz_f + 2 * H;
    float* __restrict dz_o = dz_f + 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < u.count(); ++j) {
      const float da = recurrent_row[j] + outside_row[j];
      const float dc_t = dc_row[j] + da * gamma_o[j] * (1.0f - tanh_c_row[j] * tanh_c_row[j]);
      dz_f[j] = dc_t * c_prev_row[j] * gamma_f[j] * (1.0f - gamma_f[j]);
      dz_u[j] = dc_t * c_tilde[j] * gamma_u[j] * (1.0f - gamma_u[j]);
      dz_c[j] = dc_t * gamma_u[j] * (1.0f - c_tilde[j] * c_tilde[j]);
      dz_o[j] = da * tanh_c_row[j] * gamma_o[j] * (1.0f - gamma_o[j]);
      dc_row[j] = dc_t * gamma_f[j];
    }
  }
}

void check(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// A (T+1, B, H) or (T, B, 4H) bfloat16 buffer shaped like `like`, for the bfloat16 copies of a(t) or dz(t).
bf16* low_buffer(const std::optional<at::Tensor>& low, const at::Tensor& like, const char* name) {
  if (!low) return nullptr;
  TORCH_CHECK(low->device().is_cpu() && low->scalar_type() == at::kBFloat16 && low->is_contiguous() &&
              low->sizes() == like.sizes(), name, " must be a contiguous bfloat16 CPU tensor shaped like ", like.sizes());
  TORCH_CHECK(like.size(2) % 2 == 0 && bf16_products_supported(),
              "bfloat16 products need an even width and a CPU with AVX-512 BF16");
  return reinterpret_cast<bf16*>(low->data_ptr<at::BFloat16>());
}

// t = 1 .. T: W_aa a(t-1), then forward_step. `gates` (T, B, 4H) arrives holding W_ax x(t) + b and leaves
// holding the activations; a[t], c[t] (T+1, B, H) and tanh_c[t-1] = tanh(c(t)) are filled. W (4H, H) is
// W_aa, gate by gate as the rows of `gates`' last axis. With `a_low` (T+1, B, H) bfloat16, the products
// take bfloat16 factors: W rounded once, a(t) rounded into a_low[t] as it is made (then also the
// factor of the weight gradient's product).
void lstm_forward(at::Tensor gates, at::Tensor a, at::Tensor c, at::Tensor tanh_c, at::Tensor W,
                  std::optional<at::Tensor> a_low) {
  check(gates, "gates"), check(a, "a"), check(c, "c"), check(tanh_c, "tanh_c"), check(W, "W");
  const int64_t T = gates.size(0), B = gates.size(1), H = a.size(2), step = B * H;
  TORCH_CHECK(W.size(0) == 4 * H && W.size(1) == H, "W must be (4H, H)");
  bf16* const a_low_0 = low_buffer(a_low, a, "a_low");
  float* const gates_0 = gates.data_ptr<float>();
  float* const a_0 = a.data_ptr<float>();
  float* const c_0 = c.data_ptr<float>();
  float* const tanh_c_0 = tanh_c.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  const int threads = threads_for(H);
#pragma omp parallel num_threads(threads)
  {
    const Units u = units_of(omp_get_thread_num(), omp_get_num_threads(), H);
    // Column g u.padded + i of this thread's product: gate g of unit u.begin + i, row g H + u.begin + i of W.
    const PackedWeights P(a_low_0 != nullptr, H, 4 * u.padded, [&](int64_t i, int64_t k) {
      const int64_t gate = i / u.padded, unit = i % u.padded;
      return unit < u.count() ? w[(gate * H + u.begin + unit) * H + k] : 0.0f;
    });
    std::vector<float> recurrent(B * 4 * u.padded);
    if (a_low_0 != nullptr) {
      round_units(a_0, B, H, u.begin, u.count(), a_low_0);
#pragma omp barrier
    }
    for (int64_t t = 1; t <= T; ++t) {
      P.product(a_0 + (t - 1) * step, offset(a_low_0, (t - 1) * step), B, recurrent.data());
      forward_step(recurrent.data(), gates_0 + (t - 1) * 4 * step, c_0 + (t - 1) * step, c_0 + t * step,
                   tanh_c_0 + (t - 1) * step, a_0 + t * step, B, H, u);
      if (a_low_0 != nullptr) round_units(a_0 + t * step, B, H, u.begin, u.count(), a_low_0 + t * step);
#pragma omp barrier
    }
  }
}

// t = T .. 1: backward_step, then W_aᵀ dz(t), the part of da(t-1) that comes through the recurrence.
// `gates`, c and tanh_c are the forward's buffers, dA[t] what reaches a(t) from outside the recurrence,
// dc what reaches c(T), W (4H, H) is W_aa. Returns dz (T, B, 4H), the gradients of every step's gate
// pre-activations, and da(0), dc(0). With `dz_low` (T, B, 4H) bfloat16, the products take bfloat16 factors:
// W rounded once, dz(t) rounded into dz_low[t-1] as it is made.
std::vector<at::Tensor> lstm_backward(at::Tensor gates, at::Tensor c, at::Tensor tanh_c, at::Tensor dA,
                                      at::Tensor dc, at::Tensor W, std::optional<at::Tensor> dz_low) {
  check(gates, "gates"), check(c, "c"), check(tanh_c, "tanh_c"), check(dA, "dA"), check(W, "W");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2), step = B * H;
  TORCH_CHECK(W.size(0) == 4 * H && W.size(1) == H, "W must be (4H, H)");
  at::Tensor dz = at::empty_like(gates);
  at::Tensor da_0 = at::empty_like(dA[0]);
  bf16* const dz_low_0 = low_buffer(dz_low, dz, "dz_low");
  dc = dc.contiguous().clone();
  check(dc, "dc");
  const float* const gates_0 = gates.data_ptr<float>();
  const float* const c_0 = c.data_ptr<float>();
  const float* const tanh_c_0 = tanh_c.data_ptr<float>();
  const float* const dA_0 = dA.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  float* const dz_0 = dz.data_ptr<float>();
  float* const dc_0 = dc.data_ptr<float>();
  float* const da_out = da_0.data_ptr<float>();
  const int threads = threads_for(H);
#pragma omp parallel num_threads(threads)
  {
    const Units u = units_of(omp_get_thread_num(), omp_get_num_threads(), H);
    // Column i of this thread's product: unit u.begin + i of da, Σ_k dz[.][k] W[k][u.begin + i].
    const PackedWeights P(dz_low_0 != nullptr, 4 * H, u.padded, [&](int64_t i, int64_t k) {
      return i < u.count() ? w[k * H + u.begin + i] : 0.0f;
    });
    std::vector<float> recurrent(B * u.padded, 0.0f);                      // nothing after step T
    for (int64_t t = T; t >= 1; --t) {
      float* const dz_t = dz_0 + (t - 1) * 4 * step;
      backward_step(gates_0 + (t - 1) * 4 * step, c_0 + (t - 1) * step, tanh_c_0 + (t - 1) * step,
                    recurrent.data(), dA_0 + t * step, dc_0, dz_t, B, H, u);
      if (dz_low_0 != nullptr)
        for (int64_t gate = 0; gate < 4; ++gate)
          round_units(dz_t, B, 4 * H, gate * H + u.begin, u.count(), offset(dz_low_0, (t - 1) * 4 * step));
#pragma omp barrier
      P.product(dz_t, offset(dz_low_0, (t - 1) * 4 * step), B, recurrent.data());
    }
    for (int64_t row = 0; row < B; ++row)
      for (int64_t j = 0; j < u.count(); ++j)
        da_out[row * H + u.begin + j] = recurrent[row * u.padded + j] + dA_0[row * H + u.begin + j];
  }
  return {dz, da_0, dc};
}

// --- the softmax cross-entropy -------------------------------------------------------------------

// Independent partial results, so that GCC vectorises a row's maximum and sum (a single float
// accumulator would be a serial chain to it: reordering float sums needs -ffast-math).
constexpr int64_t LANES = 16;

// For one row of logits z (V,) and its target y: returns -log softmax(z)[y] = log Σ_j e^(z_j - m) + m - z_y
// (m = max_j z_j, so that no e^x overflows) and overwrites z with its gradient softmax(z) - onehot(y),
// which it also adds to `column_sum` (V,) if that is not null. Three passes over the row (maximum;
// e^(z - m) and its sum; scaling), the last two in cache.
double softmax_row(float* __restrict z, int64_t V, int64_t y, float* __restrict column_sum) noexcept {
  float lane_max[LANES];
  for (int64_t k = 0; k < LANES; ++k) lane_max[k] = -INFINITY;
  int64_t j = 0;
  for (; j + LANES <= V; j += LANES)
    for (int64_t k = 0; k < LANES; ++k) lane_max[k] = z[j + k] > lane_max[k] ? z[j + k] : lane_max[k];
  float m = -INFINITY;
  for (int64_t k = 0; k < LANES; ++k) m = lane_max[k] > m ? lane_max[k] : m;
  for (int64_t i = j; i < V; ++i) m = z[i] > m ? z[i] : m;
  const float z_y = z[y];
  float lane_sum[LANES] = {};
  for (j = 0; j + LANES <= V; j += LANES)
    for (int64_t k = 0; k < LANES; ++k) {
      const float e = exp_approx(z[j + k] - m);
      z[j + k] = e;
      lane_sum[k] += e;
    }
  double sum = 0.0;
  for (int64_t i = j; i < V; ++i) {
    z[i] = exp_approx(z[i] - m);
    sum += z[i];
  }
  for (int64_t k = 0; k < LANES; ++k) sum += lane_sum[k];
  const float inverse = static_cast<float>(1.0 / sum);
  if (column_sum == nullptr) {
    for (int64_t i = 0; i < V; ++i) z[i] *= inverse;
  } else {
    for (int64_t i = 0; i < V; ++i) {
      z[i] *= inverse;
      column_sum[i] += z[i];
    }
    column_sum[y] -= 1.0f;
  }
  z[y] -= 1.0f;
  return std::log(sum) + m - z_y;
}

// Σ_r -log softmax(z_r)[y_r] over the rows r of `logits` (R, V) whose target y_r is not `ignore_index`;
// `logits` is overwritten with the gradient of that sum, softmax(z_r) - onehot(y_r) (a zero row where
// the target is ignored), and `column_sum` (V,), if given, receives that gradient summed over the rows
// (the output bias's gradient, without another pass over the logits). Rows run in parallel on torch's
// threads, each thread summing its rows' columns apart; the loss is summed in row order, so it does not
// depend on the number of threads.
double softmax_cross_entropy_(at::Tensor logits, at::Tensor targets, int64_t ignore_index,
                              std::optional<at::Tensor> column_sum) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be (rows, V)");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
              targets.dim() == 1 && targets.size(0) == logits.size(0),
              "targets must be a contiguous int64 CPU tensor with one entry per row of logits");
  const int64_t rows = logits.size(0), V = logits.size(1);
  if (column_sum) {
    check(*column_sum, "column_sum");
    TORCH_CHECK(column_sum->numel() == V, "column_sum must have one entry per column of logits");
  }
  const int64_t* const y = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < V), "target ", y[r], " is out of bounds for ", V,
                " classes");
  float* const z = logits.data_ptr<float>();
  std::vector<double> nll(rows, 0.0);
  std::vector<float> partial_sums(column_sum ? at::get_num_threads() * V : 0, 0.0f);  // one (V,) per thread
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float* const partial = column_sum ? partial_sums.data() + at::get_thread_num() * V : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      if (y[r] == ignore_index)
        std::memset(z + r * V, 0, V * sizeof(float));
      else
        nll[r] = softmax_row(z + r * V, V, y[r], partial);
    }
  });
  if (column_sum) {
    float* const out = column_sum->data_ptr<float>();
    std::memset(out, 0, V * sizeof(float));
    for (int64_t thread = 0; thread < at::get_num_threads(); ++thread)
      for (int64_t i = 0; i < V; ++i) out[i] += partial_sums[thread * V + i];
  }
  double total = 0.0;
  for (const double value : nll) total += value;
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lstm_forward", &lstm_forward, "The LSTM forward through time (in place)", py::arg("gates"),
             py::arg("a"), py::arg("c"), py::arg("tanh_c"), py::arg("W"), py::arg("a_low") = py::none());
  module.def("lstm_backward", &lstm_backward, "The LSTM backward through time: returns (dz, da(0), dc(0))",
             py::arg("gates"), py::arg("c"), py::arg("tanh_c"), py::arg("dA"), py::arg("dc"), py::arg("W"),
             py::arg("dz_low") = py::none());
  module.def("bf16_products_supported", &bf16_products_supported,
             "Whether this CPU runs the bfloat16 products (AVX-512 BF16)");
  module.def("softmax_cross_entropy_", &softmax_cross_entropy_,
             "The summed cross-entropy of (rows, V) logits; overwrites them with its gradient, whose column "
             "sums go to column_sum if given", py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
             py::arg("column_sum") = py::none());
}
