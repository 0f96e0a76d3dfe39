// The GRU's time loops: the equations of the Python loops in lmtrain/backprop/gru.py, one step at a time,
// each thread making its share of the step's recurrent products and their gate arithmetic together. Two
// forms, as there:
// - the lecture's (`gru_forward`, `gru_backward`): Γ_r applied to c(t-1) before the product, with the
//   relevance gate (gates [Γ_u, Γ_r, c̃], G = 3) or without it, the simplified GRU (gates [Γ_u, c̃], G = 2).
//   With Γ_r the candidate's product reads Γ_r * c(t-1), which needs every unit's Γ_r of the row first:
//   two products a step, and two barriers where the threads split the units;
// - PyTorch's (`gru_after_forward`, `gru_after_backward`): Γ_r applied after the product, one product a step.
#pragma once

#include "recurrent_products.h"

namespace {

// t = 1 .. T of the lecture's GRU, in place. `gates` (T, B, G H) arrives holding W_x x(t) + b and leaves
// holding the activations; c (T+1, B, H) arrives holding c(0). W (G H, H) is the recurrent half, gate by
// gate as `gates`' last axis:
//   Γ_u = σ(W_u [c(t-1), x(t)] + b_u)           Γ_r = σ(W_r [c(t-1), x(t)] + b_r)
//   c̃ = tanh(W_c [Γ_r * c(t-1), x(t)] + b_c)     (c(t-1) itself without the relevance gate)
//   c(t) = Γ_u * c̃ + (1 - Γ_u) * c(t-1)
// With `c_low` (T+1, B, H) bfloat16, the products take bfloat16 factors: W rounded once, c(t) rounded into
// c_low[t] as it is made, and Γ_r * c(t-1) into a buffer of the loop's own.
void gru_forward(at::Tensor gates, at::Tensor c, at::Tensor W, std::optional<at::Tensor> c_low) {
  check(gates, "gates"), check(c, "c"), check(W, "W");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2), G = gates.size(2) / H, step = B * H;
  TORCH_CHECK((G == 2 || G == 3) && gates.size(2) == G * H && W.size(0) == G * H && W.size(1) == H,
              "gates must be (T, B, G H) and W (G H, H), G = 2 or 3");
  const bool relevance = G == 3;
  bf16* const c_low_0 = low_buffer(c_low, c, "c_low");
  const bool low = c_low_0 != nullptr;
  floats c_in(relevance ? B * H : 0);                                    // Γ_r * c(t-1), every unit
  std::vector<bf16> c_in_low(relevance && low ? B * H : 0);              // its bfloat16 copy
  bf16* const c_in_low_0 = c_in_low.empty() ? nullptr : c_in_low.data();
  float* const gates_0 = gates.data_ptr<float>();
  float* const c_0 = c.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  // The gates' product reads c(t-1). Without Γ_r it holds W_c c(t-1) too (its second block); with Γ_r the
  // candidate has a product of its own, of Γ_r * c(t-1).
  const auto pack = [&](const Units u) {
    return std::make_pair(forward_columns(low, w, H, 0, 2, u),
                          forward_columns(low, w, H, G - 1, relevance ? 1 : 0, u));
  };
  on_shares(B, H, pack, [&](const Share& share, const std::pair<PackedWeights, PackedWeights>& packed) {
    const auto& [P_gates, P_candidate] = packed;
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * H;                                 // the share's first row in c(t)
    floats recurrent(rows.count() * 2 * u.padded), candidate(rows.count() * u.padded);
    if (low) {                                                             // c(0), the first step's factor
      round_units(c_0 + first, rows.count(), H, H, 0, 1, u, c_low_0 + first);
      share.sync();
    }
    for (int64_t t = 1; t <= T; ++t) {
      const float* const c_prev = c_0 + (t - 1) * step;
      float* const g = gates_0 + (t - 1) * G * step;
      P_gates.product(c_prev + first, offset(c_low_0, (t - 1) * step + first), H, rows.count(),
                      recurrent.data());                                   // [W_u, W_r or W_c] c(t-1)
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        float* __restrict gamma_u = g + row * G * H + u.begin;
        float* __restrict gamma_r = gamma_u + H;
        const float* __restrict r_u = recurrent.data() + (row - rows.begin) * 2 * u.padded;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) gamma_u[j] = sigmoid(gamma_u[j] + r_u[j]);
        if (!relevance) continue;
        const float* __restrict r_r = r_u + u.padded;
        const float* __restrict c_prev_row = c_prev + row * H + u.begin;
        float* __restrict c_in_row = c_in.data() + row * H + u.begin;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) {
          gamma_r[j] = sigmoid(gamma_r[j] + r_r[j]);
          c_in_row[j] = gamma_r[j] * c_prev_row[j];
        }
      }
      const float* r_c = recurrent.data() + u.padded;                      // without Γ_r: W_c c(t-1)
      int64_t r_c_width = 2 * u.padded;
      if (relevance) {
        round_units(c_in.data() + first, rows.count(), H, H, 0, 1, u, offset(c_in_low_0, first));
        share.sync();
        P_candidate.product(c_in.data() + first, offset(c_in_low_0, first), H, rows.count(),
                            candidate.data());                             // W_c (Γ_r * c(t-1))
        r_c = candidate.data(), r_c_width = u.padded;
      }
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        const float* __restrict gamma_u = g + row * G * H + u.begin;
        float* __restrict c_tilde = g + row * G * H + (G - 1) * H + u.begin;
        const float* __restrict r = r_c + (row - rows.begin) * r_c_width;
        const float* __restrict c_prev_row = c_prev + row * H + u.begin;
        float* __restrict c_row = c_0 + t * step + row * H + u.begin;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) {
          c_tilde[j] = tanh_approx(c_tilde[j] + r[j]);
          c_row[j] = c_prev_row[j] + gamma_u[j] * (c_tilde[j] - c_prev_row[j]);
        }
      }
      round_units(c_0 + t * step + first, rows.count(), H, H, 0, 1, u, offset(c_low_0, t * step + first));
      share.sync();
    }
  });
}

// t = T .. 1 of the lecture's GRU from the forward's activations `gates` (T, B, G H) and c (T+1, B, H); dA[t]
// is what reaches c(t) from outside the recurrence. With dc(t) = dA[t] + what comes back from step t+1:
//   dz_c = dc(t) Γ_u (1 - c̃²)                    dc_in = W_cᵀ dz_c  (reaches Γ_r * c(t-1))
//   dz_r = dc_in c(t-1) Γ_r (1 - Γ_r)            dz_u = dc(t) (c̃ - c(t-1)) Γ_u (1 - Γ_u)
//   dc(t-1) = dA[t-1] + dc(t) (1 - Γ_u) + dc_in Γ_r + [W_u, W_r]ᵀ [dz_u, dz_r]
// (without Γ_r: dc_in is not formed, and dc(t-1) = dA[t-1] + dc(t) (1 - Γ_u) + [W_u, W_c]ᵀ [dz_u, dz_c]).
// Returns dz (T, B, G H), the gradients of every step's gate pre-activations, and dc(0). With `dz_low`
// (T, B, G H) bfloat16, the products take bfloat16 factors: W rounded once, dz(t) rounded into dz_low[t-1]
// as it is made.
std::vector<at::Tensor> gru_backward(at::Tensor gates, at::Tensor c, at::Tensor dA, at::Tensor W,
                                     std::optional<at::Tensor> dz_low) {
  check(gates, "gates"), check(c, "c"), check(dA, "dA"), check(W, "W");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2), G = gates.size(2) / H, step = B * H;
  TORCH_CHECK((G == 2 || G == 3) && gates.size(2) == G * H && W.size(0) == G * H && W.size(1) == H &&
              dA.sizes() == c.sizes(), "gates must be (T, B, G H), W (G H, H), G = 2 or 3, and dA shaped like c");
  const bool relevance = G == 3;
  at::Tensor dz = at::empty_like(gates);
  bf16* const dz_low_0 = low_buffer(dz_low, dz, "dz_low");
  at::Tensor dc_0 = at::empty({B, H}, c.options());
  const float* const gates_0 = gates.data_ptr<float>();
  const float* const c_0 = c.data_ptr<float>();
  const float* const dA_0 = dA.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  float* const dz_0 = dz.data_ptr<float>();
  float* const dc_out = dc_0.data_ptr<float>();
  // The gates' (the first two blocks') gradient reaches c(t-1); the candidate's reaches Γ_r * c(t-1).
  const auto pack = [&](const Units u) {
    return std::make_pair(backward_columns(dz_low_0 != nullptr, w, H, 0, 2, u),
                          backward_columns(dz_low_0 != nullptr, w, H, 2, relevance ? 1 : 0, u));
  };
  on_shares(B, H, pack, [&](const Share& share, const std::pair<PackedWeights, PackedWeights>& packed) {
    const auto& [P_gates, P_candidate] = packed;
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * G * H;                             // the share's first row in dz(t)
    floats recurrent(rows.count() * u.padded, 0.0f), dc_in(rows.count() * u.padded);  // nothing after step T
    floats carry(rows.count() * u.count(), 0.0f);
    for (int64_t t = T; t >= 1; --t) {
      const float* const gates_t = gates_0 + (t - 1) * G * step + u.begin;  // row r at gates_t + r G H
      float* const dz_t = dz_0 + (t - 1) * G * step;
      bf16* const dz_low_t = offset(dz_low_0, (t - 1) * G * step);
      const float* const c_prev = c_0 + (t - 1) * step;
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        const float* __restrict gamma_u = gates_t + row * G * H;
        const float* __restrict c_tilde = gamma_u + (G - 1) * H;
        const float* __restrict c_prev_row = c_prev + row * H + u.begin;
        const float* __restrict outside = dA_0 + t * step + row * H + u.begin;
        const float* __restrict r = recurrent.data() + (row - rows.begin) * u.padded;
        float* __restrict carry_row = carry.data() + (row - rows.begin) * u.count();
        float* __restrict dz_u = dz_t + row * G * H + u.begin;
        float* __restrict dz_c = dz_u + (G - 1) * H;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) {
          const float dc = carry_row[j] + r[j] + outside[j];
          dz_c[j] = dc * gamma_u[j] * (1.0f - c_tilde[j] * c_tilde[j]);
          dz_u[j] = dc * (c_tilde[j] - c_prev_row[j]) * gamma_u[j] * (1.0f - gamma_u[j]);
          carry_row[j] = dc * (1.0f - gamma_u[j]);
        }
      }
      if (relevance) {
        round_units(dz_t + first, rows.count(), G * H, H, 2, 1, u, offset(dz_low_t, first));  // dz_c
        share.sync();
        P_candidate.product(dz_t + first + 2 * H, offset(dz_low_t, first + 2 * H), G * H, rows.count(),
                            dc_in.data());                                 // W_cᵀ dz_c
        for (int64_t row = rows.begin; row < rows.end; ++row) {
          const float* __restrict gamma_r = gates_t + row * G * H + H;
          const float* __restrict c_prev_row = c_prev + row * H + u.begin;
          const float* __restrict in = dc_in.data() + (row - rows.begin) * u.padded;
          float* __restrict carry_row = carry.data() + (row - rows.begin) * u.count();
          float* __restrict dz_r = dz_t + row * G * H + H + u.begin;
#pragma GCC ivdep
          for (int64_t j = 0; j < u.count(); ++j) {
            dz_r[j] = in[j] * c_prev_row[j] * gamma_r[j] * (1.0f - gamma_r[j]);
            carry_row[j] += in[j] * gamma_r[j];
          }
        }
      }
      round_units(dz_t + first, rows.count(), G * H, H, 0, 2, u, offset(dz_low_t, first));  // dz_u, dz_r or dz_c
      share.sync();
      // [W_u, W_r or W_c]ᵀ [dz_u, dz_r or dz_c]
      P_gates.product(dz_t + first, offset(dz_low_t, first), G * H, rows.count(), recurrent.data());
    }
    for (int64_t row = rows.begin; row < rows.end; ++row)
      for (int64_t j = 0; j < u.count(); ++j)
        dc_out[row * H + u.begin + j] = carry[(row - rows.begin) * u.count() + j] +
                                        recurrent[(row - rows.begin) * u.padded + j] + dA_0[row * H + u.begin + j];
  });
  return {dz, dc_0};
}

// t = 1 .. T of PyTorch's GRU, in place: `gates` (T, B, 3H) arrives holding W_x x(t) + b and leaves holding
// [Γ_u, Γ_r, c̃]; c (T+1, B, H) arrives holding c(0); p (T, B, H) receives p(t). W (3H, H) is [W_u; W_r; W_cc]:
//   p(t) = W_cc c(t-1) + b_cc
//   Γ_u = σ(W_ux x(t) + b_u + W_u c(t-1))        Γ_r = σ(W_rx x(t) + b_r + W_r c(t-1))
//   c̃ = tanh(W_cx x(t) + b_c + Γ_r * p(t))       c(t) = Γ_u * c̃ + (1 - Γ_u) * c(t-1)
// With `c_low` (T+1, B, H) bfloat16, the products take bfloat16 factors: W rounded once, c(t) rounded into
// c_low[t] as it is made.
void gru_after_forward(at::Tensor gates, at::Tensor c, at::Tensor p, at::Tensor W, at::Tensor b_cc,
                       std::optional<at::Tensor> c_low) {
  check(gates, "gates"), check(c, "c"), check(p, "p"), check(W, "W"), check(b_cc, "b_cc");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2), step = B * H;
  TORCH_CHECK(gates.size(2) == 3 * H && W.size(0) == 3 * H && W.size(1) == H && b_cc.numel() == H &&
              p.size(0) == T && p.size(1) == B && p.size(2) == H, "gates must be (T, B, 3H), p (T, B, H), W (3H, H)");
  bf16* const c_low_0 = low_buffer(c_low, c, "c_low");
  float* const gates_0 = gates.data_ptr<float>();
  float* const c_0 = c.data_ptr<float>();
  float* const p_0 = p.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  const float* const b = b_cc.data_ptr<float>();
  on_shares(B, H, [&](const Units u) { return forward_columns(c_low_0 != nullptr, w, H, 0, 3, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * H;                                 // the share's first row in c(t)
    floats recurrent(rows.count() * 3 * u.padded);
    if (c_low_0 != nullptr) {                                               // c(0), the first step's factor
      round_units(c_0 + first, rows.count(), H, H, 0, 1, u, c_low_0 + first);
      share.sync();
    }
    for (int64_t t = 1; t <= T; ++t) {
      const float* const c_prev = c_0 + (t - 1) * step;
      P.product(c_prev + first, offset(c_low_0, (t - 1) * step + first), H, rows.count(), recurrent.data());
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        float* __restrict gamma_u = gates_0 + (t - 1) * 3 * step + row * 3 * H + u.begin;
        float* __restrict gamma_r = gamma_u + H;
        float* __restrict c_tilde = gamma_u + 2 * H;
        const float* __restrict r_u = recurrent.data() + (row - rows.begin) * 3 * u.padded;
        const float* __restrict r_r = r_u + u.padded;
        const float* __restrict r_c = r_u + 2 * u.padded;
        const float* __restrict b_row = b + u.begin;
        const float* __restrict c_prev_row = c_prev + row * H + u.begin;
        float* __restrict p_row = p_0 + (t - 1) * step + row * H + u.begin;
        float* __restrict c_row = c_0 + t * step + row * H + u.begin;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) {
          p_row[j] = r_c[j] + b_row[j];
          gamma_u[j] = sigmoid(gamma_u[j] + r_u[j]);
          gamma_r[j] = sigmoid(gamma_r[j] + r_r[j]);
          c_tilde[j] = tanh_approx(c_tilde[j] + gamma_r[j] * p_row[j]);
          c_row[j] = c_prev_row[j] + gamma_u[j] * (c_tilde[j] - c_prev_row[j]);
        }
      }
      round_units(c_0 + t * step + first, rows.count(), H, H, 0, 1, u, offset(c_low_0, t * step + first));
      share.sync();
    }
  });
}

// t = T .. 1 of PyTorch's GRU from the forward's `gates` [Γ_u, Γ_r, c̃], c and p; dA[t] is what reaches c(t)
// from outside the recurrence. With dc(t) = dA[t] + what comes back from step t+1:
//   dz_c = dc(t) Γ_u (1 - c̃²)        dz_r = dz_c p Γ_r (1 - Γ_r)        dp = dz_c Γ_r
//   dz_u = dc(t) (c̃ - c(t-1)) Γ_u (1 - Γ_u)
//   dc(t-1) = dA[t-1] + dc(t) (1 - Γ_u) + [W_u; W_r; W_cc]ᵀ [dz_u, dz_r, dp]
// Returns dr (T, B, 3H) = [dz_u, dz_r, dp], the gradients of the recurrent products, dz_c (T, B, H), and dc(0).
// dz_c(t) is written where dA[t] was, once read: it is dA[1:], one (T, B, H) buffer less at the backward's peak.
// With `dr_low` (T, B, 3H) bfloat16, the products take bfloat16 factors: W rounded once, dr(t) rounded into
// dr_low[t-1] as it is made.
std::vector<at::Tensor> gru_after_backward(at::Tensor gates, at::Tensor c, at::Tensor p, at::Tensor dA, at::Tensor W,
                                           std::optional<at::Tensor> dr_low) {
  check(gates, "gates"), check(c, "c"), check(p, "p"), check(dA, "dA"), check(W, "W");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2), step = B * H;
  TORCH_CHECK(gates.size(2) == 3 * H && W.size(0) == 3 * H && W.size(1) == H && dA.sizes() == c.sizes() &&
              p.size(0) == T && p.size(1) == B && p.size(2) == H,
              "gates must be (T, B, 3H), p (T, B, H), W (3H, H) and dA shaped like c");
  at::Tensor dr = at::empty_like(gates);
  bf16* const dr_low_0 = low_buffer(dr_low, dr, "dr_low");
  at::Tensor dc_0 = at::empty({B, H}, c.options());
  const float* const gates_0 = gates.data_ptr<float>();
  const float* const c_0 = c.data_ptr<float>();
  const float* const p_0 = p.data_ptr<float>();
  float* const dA_0 = dA.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  float* const dr_0 = dr.data_ptr<float>();
  float* const dc_out = dc_0.data_ptr<float>();
  on_shares(B, H, [&](const Units u) { return backward_columns(dr_low_0 != nullptr, w, H, 0, 3, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * 3 * H;                             // the share's first row in dr(t)
    floats recurrent(rows.count() * u.padded, 0.0f), carry(rows.count() * u.count(), 0.0f);  // nothing after step T
    for (int64_t t = T; t >= 1; --t) {
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        const float* __restrict gamma_u = gates_0 + (t - 1) * 3 * step + row * 3 * H + u.begin;
        const float* __restrict gamma_r = gamma_u + H;
        const float* __restrict c_tilde = gamma_u + 2 * H;
        const float* __restrict p_row = p_0 + (t - 1) * step + row * H + u.begin;
        const float* __restrict c_prev_row = c_0 + (t - 1) * step + row * H + u.begin;
        const float* __restrict r = recurrent.data() + (row - rows.begin) * u.padded;
        float* __restrict carry_row = carry.data() + (row - rows.begin) * u.count();
        float* __restrict dz_u = dr_0 + (t - 1) * 3 * step + row * 3 * H + u.begin;
        float* __restrict dz_r = dz_u + H;
        float* __restrict dp = dz_u + 2 * H;
        float* __restrict dz_c_row = dA_0 + t * step + row * H + u.begin;  // holds dA[t] until read
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) {
          const float dc = carry_row[j] + r[j] + dz_c_row[j];
          dz_c_row[j] = dc * gamma_u[j] * (1.0f - c_tilde[j] * c_tilde[j]);
          dz_r[j] = dz_c_row[j] * p_row[j] * gamma_r[j] * (1.0f - gamma_r[j]);
          dp[j] = dz_c_row[j] * gamma_r[j];
          dz_u[j] = dc * (c_tilde[j] - c_prev_row[j]) * gamma_u[j] * (1.0f - gamma_u[j]);
          carry_row[j] = dc * (1.0f - gamma_u[j]);
        }
      }
      float* const dr_t = dr_0 + (t - 1) * 3 * step;
      bf16* const dr_low_t = offset(dr_low_0, (t - 1) * 3 * step);
      round_units(dr_t + first, rows.count(), 3 * H, H, 0, 3, u, offset(dr_low_t, first));
      share.sync();
      // [W_u; W_r; W_cc]ᵀ [dz_u, dz_r, dp]
      P.product(dr_t + first, offset(dr_low_t, first), 3 * H, rows.count(), recurrent.data());
    }
    for (int64_t row = rows.begin; row < rows.end; ++row)
      for (int64_t j = 0; j < u.count(); ++j)
        dc_out[row * H + u.begin + j] = carry[(row - rows.begin) * u.count() + j] +
                                        recurrent[(row - rows.begin) * u.padded + j] + dA_0[row * H + u.begin + j];
  });
  return {dr, dA.narrow(0, 1, T), dc_0};
}

}  // namespace
