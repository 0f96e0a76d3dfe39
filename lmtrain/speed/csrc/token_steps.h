// One step of a layer for a few rows at a time, as sampling takes them (one token per sample), with the
// layer's weights packed once for all the steps: z = W_a [a(t-1), x(t)] + b in one product per gate, the
// lecture's combined form, then the cell's equations. The time loops (lstm_loops.h, ...) pack W per
// sequence and take W_x x(t) + b made for all steps at once; for a single step that packing would cost
// more than the product (docs/benchmarks.md, "Sampling").
//
// Packed weights (lmtrain/speed/token_step.py makes them): W_a (G H, K), K = H + E, as a (blocks, G, K, 16)
// tensor: block j holds, gate by gate, the columns of units 16 j .. 16 j + 15 (zero past H). A thread
// takes whole blocks, so the packing does not depend on the number of threads.
#pragma once

#include "lstm_loops.h"

namespace {

// The packed weights of a step: W_a for `gates` gates of H units over K inputs.
struct StepWeights {
  const float* P;
  int64_t gates, H, K, blocks;

  StepWeights(const at::Tensor& packed, int64_t H_) : H(H_) {
    check(packed, "packed");
    TORCH_CHECK(packed.dim() == 4 && packed.size(3) == COLUMNS && packed.size(0) == (H + COLUMNS - 1) / COLUMNS,
                "packed must be (blocks, gates, K, 16) with blocks = ceil(H / 16)");
    P = packed.data_ptr<float>(), blocks = packed.size(0), gates = packed.size(1), K = packed.size(2);
  }

  // The units of block j.
  Units units(int64_t j) const { return {j * COLUMNS, std::min(H, (j + 1) * COLUMNS), COLUMNS}; }

  // C (B, count 16) = A (B, K) times gates [first, first + count) of block j, A's rows `lda` floats apart.
  void product(int64_t j, int64_t first, int64_t count, const float* A, int64_t lda, int64_t B,
               float* C) const noexcept {
    packed_product(A, lda, B, K, P + (j * gates + first) * K * COLUMNS, count * COLUMNS, C);
  }
};

// [a(t-1), x(t)] (B, H + E), the input every gate reads.
at::Tensor combined(const at::Tensor& a_prev, const at::Tensor& x) {
  check(a_prev, "a_prev"), check(x, "x");
  TORCH_CHECK(a_prev.dim() == 2 && x.dim() == 2 && a_prev.size(0) == x.size(0),
              "a_prev and x must be (B, H) and (B, E)");
  return at::cat({a_prev, x}, 1);
}

// Runs body(j) for every block of units, the blocks shared among torch's threads.
template <typename Body>
void on_blocks(int64_t blocks, Body body) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), blocks));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t j = 0; j < blocks; ++j) body(j);
}

// LSTM: z = W_a [a(t-1), x(t)] + b, then lstm_loops.h's `forward_step` (the lecture's equations).
// Returns a(t), c(t).
std::vector<at::Tensor> lstm_token_step(at::Tensor packed, at::Tensor b, at::Tensor a_prev, at::Tensor x,
                                        at::Tensor c_prev) {
  const at::Tensor input = combined(a_prev, x);
  check(b, "b"), check(c_prev, "c_prev");
  const int64_t B = a_prev.size(0), H = a_prev.size(1);
  const StepWeights W(packed, H);
  TORCH_CHECK(W.gates == 4 && W.K == input.size(1) && b.numel() == 4 * H && c_prev.sizes() == a_prev.sizes(),
              "packed must hold 4 gates over H + E inputs, b 4H values, c_prev be shaped like a_prev");
  at::Tensor a = at::empty_like(a_prev), c = at::empty_like(a_prev), tanh_c = at::empty_like(a_prev);
  // b, then the activations: a copy for every B (expand().contiguous() of one row would be b itself,
  // and the activations would be written over the packed bias).
  at::Tensor gates = b.view({1, 4 * H}).repeat({B, 1});
  const float* const in = input.data_ptr<float>();
  on_blocks(W.blocks, [&](int64_t j) {
    floats z(B * 4 * COLUMNS);
    W.product(j, 0, 4, in, W.K, B, z.data());
    forward_step(z.data(), gates.data_ptr<float>(), c_prev.data_ptr<float>(), c.data_ptr<float>(),
                 tanh_c.data_ptr<float>(), a.data_ptr<float>(), Rows{0, B}, H, W.units(j));
  });
  return {a, c};
}

// The tanh RNN: a(t) = tanh(W_a [a(t-1), x(t)] + b_a).
at::Tensor rnn_token_step(at::Tensor packed, at::Tensor b, at::Tensor a_prev, at::Tensor x) {
  const at::Tensor input = combined(a_prev, x);
  check(b, "b");
  const int64_t B = a_prev.size(0), H = a_prev.size(1);
  const StepWeights W(packed, H);
  TORCH_CHECK(W.gates == 1 && W.K == input.size(1) && b.numel() == H, "packed must hold 1 gate over H + E inputs");
  at::Tensor a = at::empty_like(a_prev);
  const float* const in = input.data_ptr<float>();
  const float* const bias = b.data_ptr<float>();
  float* const a_out = a.data_ptr<float>();
  on_blocks(W.blocks, [&](int64_t j) {
    floats z(B * COLUMNS);
    W.product(j, 0, 1, in, W.K, B, z.data());
    const Units u = W.units(j);
    for (int64_t row = 0; row < B; ++row)
      for (int64_t i = 0; i < u.count(); ++i)
        a_out[row * H + u.begin + i] = tanh_approx(z[row * COLUMNS + i] + bias[u.begin + i]);
  });
  return a;
}

// The GRU, gates [Γ_u, Γ_r, c̃] (G = 3) or [Γ_u, c̃] (the simplified GRU, G = 2), as in gru_loops.h:
//   the lecture's:  Γ_u = σ(W_u [c(t-1), x(t)] + b_u)    Γ_r = σ(W_r [c(t-1), x(t)] + b_r)
//                   c̃ = tanh(W_c [Γ_r * c(t-1), x(t)] + b_c)    (c(t-1) itself without Γ_r)
//   PyTorch's (`b_cc` given):  c̃ = tanh(W_cx x(t) + b_c + Γ_r * (W_cc c(t-1) + b_cc))
//   c(t) = Γ_u * c̃ + (1 - Γ_u) * c(t-1)
// With the lecture's Γ_r the candidate's product reads every unit's Γ_r * c(t-1): a second pass over the
// blocks after the first has made them all. Returns c(t).
at::Tensor gru_token_step(at::Tensor packed, at::Tensor b, at::Tensor c_prev, at::Tensor x,
                          std::optional<at::Tensor> b_cc) {
  const at::Tensor input = combined(c_prev, x);
  check(b, "b");
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  const StepWeights W(packed, H);
  const int64_t G = W.gates, K = W.K;
  const bool after = b_cc.has_value(), relevance = G == 3;
  TORCH_CHECK((G == 2 || G == 3) && K == input.size(1) && b.numel() == G * H &&
                  (!after || (relevance && b_cc->numel() == H)),
              "packed must hold 2 or 3 gates over H + E inputs, b G H values, b_cc H values (with 3 gates)");
  at::Tensor c = at::empty_like(c_prev);
  at::Tensor gamma = at::empty({B, 2 * H}, c_prev.options());              // Γ_u, Γ_r
  at::Tensor candidate_input = relevance && !after ? input.clone() : at::Tensor();  // [Γ_r * c(t-1), x(t)]
  const float* const in = input.data_ptr<float>();
  const float* const bias = b.data_ptr<float>();
  const float* const b_recurrent = after ? b_cc->data_ptr<float>() : nullptr;
  float* const g = gamma.data_ptr<float>();
  float* const c_out = c.data_ptr<float>();
  float* const c_in = candidate_input.defined() ? candidate_input.data_ptr<float>() : nullptr;
  // The memory: c̃ from its pre-activation z_c, then c(t), for unit i of row `row`.
  const auto remember = [&](int64_t row, int64_t unit, float z_c) {
    const float c_tilde = tanh_approx(z_c), c_before = in[row * K + unit];
    c_out[row * H + unit] = c_before + g[row * 2 * H + unit] * (c_tilde - c_before);
  };
  on_blocks(W.blocks, [&](int64_t j) {
    const Units u = W.units(j);
    floats z(B * 2 * COLUMNS), p(after ? B * COLUMNS : 0), zx(after ? B * COLUMNS : 0);
    W.product(j, 0, 2, in, K, B, z.data());                  // [Γ_u, Γ_r] or [Γ_u, c̃] of [c(t-1), x(t)]
    if (after) {  // the candidate's halves apart, rows k < H and k >= H of its block: W_cc c(t-1), W_cx x(t)
      const float* const P_c = W.P + (j * G + 2) * K * COLUMNS;
      packed_product(in, K, B, H, P_c, COLUMNS, p.data());
      packed_product(in + H, K, B, K - H, P_c + H * COLUMNS, COLUMNS, zx.data());
    }
    for (int64_t row = 0; row < B; ++row)
      for (int64_t i = 0; i < u.count(); ++i) {
        const int64_t unit = u.begin + i;
        const float* z_row = z.data() + row * 2 * COLUMNS;
        g[row * 2 * H + unit] = sigmoid(z_row[i] + bias[unit]);
        if (!relevance) {
          remember(row, unit, z_row[COLUMNS + i] + bias[H + unit]);
          continue;
        }
        const float gamma_r = sigmoid(z_row[COLUMNS + i] + bias[H + unit]);
        g[row * 2 * H + H + unit] = gamma_r;
        if (after)
          remember(row, unit, zx[row * COLUMNS + i] + bias[2 * H + unit] +
                                  gamma_r * (p[row * COLUMNS + i] + b_recurrent[unit]));
        else
          c_in[row * K + unit] = gamma_r * in[row * K + unit];
      }
  });
  if (c_in != nullptr)  // the lecture's candidate, now that every unit's Γ_r * c(t-1) is made
    on_blocks(W.blocks, [&](int64_t j) {
      const Units u = W.units(j);
      floats z(B * COLUMNS);
      W.product(j, 2, 1, c_in, K, B, z.data());
      for (int64_t row = 0; row < B; ++row)
        for (int64_t i = 0; i < u.count(); ++i)
          remember(row, u.begin + i, z[row * COLUMNS + i] + bias[2 * H + u.begin + i]);
    });
  return c;
}

}  // namespace
