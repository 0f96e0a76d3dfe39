// The LSTM's two time loops, forward and backward through time: the equations of the Python loops in
// lmtrain/backprop/lstm.py, one step at a time, each step's recurrent product and gate arithmetic made
// together, thread by thread.
#pragma once

#include "recurrent_products.h"

namespace {

// One step of the forward for the units [u.begin, u.end) of the batch rows `rows`. z = W_aa a(t-1) + (W_ax x(t) + b):
// `recurrent` (rows, 4 u.padded) is the first term for them, gate by gate; `gates` (B, 4H) holds the
// second on entry and the activations on return:
//   Γ_f = σ(z_f), Γ_u = σ(z_u), c̃ = tanh(z_c), Γ_o = σ(z_o)
//   c(t) = Γ_f * c(t-1) + Γ_u * c̃
//   a(t) = Γ_o * tanh(c(t))
// Raw pointers and no calls that can throw, so that the compiler vectorises the inner loop.
void forward_step(const float* recurrent, float* gates, const float* c_prev, float* c, float* tanh_c, float* a,
                  Rows rows, int64_t H, Units u) noexcept {
  for (int64_t row = rows.begin; row < rows.end; ++row) {
    const float* __restrict r_f = recurrent + (row - rows.begin) * 4 * u.padded;
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

// One step of the backward for the units [u.begin, u.end) of the batch rows `rows`, from the forward's activations
// of step t. What reaches a(t) is da(t) = `recurrent` (rows, u.padded) (W_aᵀ dz(t+1), through a(t)'s use at
// step t+1) + `outside` (from the outputs); `dc` holds what reaches c(t) through c(t+1):
//   dc(t) = dc + da(t) Γ_o (1 - tanh²(c(t)))
//   dz_f = dc(t) c(t-1) Γ_f (1 - Γ_f)        dz_u = dc(t) c̃ Γ_u (1 - Γ_u)
//   dz_c = dc(t) Γ_u (1 - c̃²)                dz_o = da(t) tanh(c(t)) Γ_o (1 - Γ_o)
//   dc(t-1) = dc(t) Γ_f
// writing dz (B, 4H) for these units, and dc(t-1) over dc.
void backward_step(const float* gates, const float* c_prev, const float* tanh_c, const float* recurrent,
                   const float* outside, float* dc, float* dz, Rows rows, int64_t H, Units u) noexcept {
  for (int64_t row = rows.begin; row < rows.end; ++row) {
    const float* __restrict gamma_f = gates + row * 4 * H + u.begin;
    const float* __restrict gamma_u = gamma_f + H;
    const float* __restrict c_tilde = gamma_f + 2 * H;
    const float* __restrict gamma_o = gamma_f + 3 * H;
    const float* __restrict c_prev_row = c_prev + row * H + u.begin;
    const float* __restrict tanh_c_row = tanh_c + row * H + u.begin;
    const float* __restrict recurrent_row = recurrent + (row - rows.begin) * u.padded;
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
  on_shares(B, H, [&](const Units u) { return forward_columns(a_low_0 != nullptr, w, H, 0, 4, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * H;                                 // the share's first row in a(t)
    floats recurrent(rows.count() * 4 * u.padded);
    if (a_low_0 != nullptr) {                                               // a(0), the first step's factor
      round_units(a_0 + first, rows.count(), H, H, 0, 1, u, a_low_0 + first);
      share.sync();
    }
    for (int64_t t = 1; t <= T; ++t) {
      P.product(a_0 + (t - 1) * step + first, offset(a_low_0, (t - 1) * step + first), H, rows.count(),
                recurrent.data());
      forward_step(recurrent.data(), gates_0 + (t - 1) * 4 * step, c_0 + (t - 1) * step, c_0 + t * step,
                   tanh_c_0 + (t - 1) * step, a_0 + t * step, rows, H, u);
      round_units(a_0 + t * step + first, rows.count(), H, H, 0, 1, u, offset(a_low_0, t * step + first));
      share.sync();
    }
  });
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
  on_shares(B, H, [&](const Units u) { return backward_columns(dz_low_0 != nullptr, w, H, 0, 4, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * 4 * H;                             // the share's first row in dz(t)
    floats recurrent(rows.count() * u.padded, 0.0f);                       // nothing after step T
    for (int64_t t = T; t >= 1; --t) {
      float* const dz_t = dz_0 + (t - 1) * 4 * step;
      backward_step(gates_0 + (t - 1) * 4 * step, c_0 + (t - 1) * step, tanh_c_0 + (t - 1) * step,
                    recurrent.data(), dA_0 + t * step, dc_0, dz_t, rows, H, u);
      round_units(dz_t + first, rows.count(), 4 * H, H, 0, 4, u, offset(dz_low_0, (t - 1) * 4 * step + first));
      share.sync();
      P.product(dz_t + first, offset(dz_low_0, (t - 1) * 4 * step + first), 4 * H, rows.count(), recurrent.data());
    }
    for (int64_t row = rows.begin; row < rows.end; ++row)
      for (int64_t j = 0; j < u.count(); ++j)
        da_out[row * H + u.begin + j] = recurrent[(row - rows.begin) * u.padded + j] + dA_0[row * H + u.begin + j];
  });
  return {dz, da_0, dc};
}

}  // namespace
