// The tanh RNN's two time loops: the equations of the Python loops in lmtrain/backprop/rnn.py, one step at a
// time, each thread making its share of the step's recurrent product and its tanh together.
#pragma once

#include "recurrent_products.h"

namespace {

// t = 1 .. T, in place: a(t) = tanh(W_aa a(t-1) + z(t)), where `z` (T, B, H) holds W_ax x(t) + b and
// a (T+1, B, H) arrives holding a(0). W (H, H) is W_aa. With `a_low` (T+1, B, H) bfloat16, the products
// take bfloat16 factors: W rounded once, a(t) rounded into a_low[t] as it is made.
void rnn_forward(at::Tensor z, at::Tensor a, at::Tensor W, std::optional<at::Tensor> a_low) {
  check(z, "z"), check(a, "a"), check(W, "W");
  const int64_t T = z.size(0), B = z.size(1), H = a.size(2), step = B * H;
  TORCH_CHECK(W.size(0) == H && W.size(1) == H && z.size(2) == H, "W must be (H, H) and z (T, B, H)");
  bf16* const a_low_0 = low_buffer(a_low, a, "a_low");
  const float* const z_0 = z.data_ptr<float>();
  float* const a_0 = a.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  on_shares(B, H, [&](const Units u) { return forward_columns(a_low_0 != nullptr, w, H, 0, 1, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * H;                                 // the share's first row in a(t)
    floats recurrent(rows.count() * u.padded);
    if (a_low_0 != nullptr) {                                               // a(0), the first step's factor
      round_units(a_0 + first, rows.count(), H, H, 0, 1, u, a_low_0 + first);
      share.sync();
    }
    for (int64_t t = 1; t <= T; ++t) {
      P.product(a_0 + (t - 1) * step + first, offset(a_low_0, (t - 1) * step + first), H, rows.count(),
                recurrent.data());
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        const float* __restrict r = recurrent.data() + (row - rows.begin) * u.padded;
        const float* __restrict z_row = z_0 + (t - 1) * step + row * H + u.begin;
        float* __restrict a_row = a_0 + t * step + row * H + u.begin;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) a_row[j] = tanh_approx(z_row[j] + r[j]);
      }
      round_units(a_0 + t * step + first, rows.count(), H, H, 0, 1, u, offset(a_low_0, t * step + first));
      share.sync();
    }
  });
}

// t = T .. 1 from the forward's a (T+1, B, H); dA[t] is what reaches a(t) from outside the recurrence:
//   da(t) = dA[t] + W_aaᵀ dz(t+1)        dz(t) = da(t) (1 - a(t)²)
// dz(t) overwrites dA[t], which only step t reads (one buffer fewer at the backward's peak). Returns dz
// (T, B, H) = dA[1:], the gradients of every step's pre-activation, and da(0). With `dz_low` (T, B, H)
// bfloat16, the products take bfloat16 factors: W rounded once, dz(t) rounded into dz_low[t-1] as it is made.
std::vector<at::Tensor> rnn_backward(at::Tensor a, at::Tensor dA, at::Tensor W, std::optional<at::Tensor> dz_low) {
  check(a, "a"), check(dA, "dA"), check(W, "W");
  const int64_t T = a.size(0) - 1, B = a.size(1), H = a.size(2), step = B * H;
  TORCH_CHECK(W.size(0) == H && W.size(1) == H && dA.sizes() == a.sizes(), "W must be (H, H) and dA shaped like a");
  at::Tensor dz = dA.narrow(0, 1, T);
  bf16* const dz_low_0 = low_buffer(dz_low, dz, "dz_low");
  at::Tensor da_0 = at::empty({B, H}, a.options());
  const float* const a_0 = a.data_ptr<float>();
  const float* const dA_0 = dA.data_ptr<float>();
  const float* const w = W.data_ptr<float>();
  float* const dz_0 = dA.data_ptr<float>() + step;                         // dz(t) at dA[t]
  float* const da_out = da_0.data_ptr<float>();
  on_shares(B, H, [&](const Units u) { return backward_columns(dz_low_0 != nullptr, w, H, 0, 1, u); },
            [&](const Share& share, const PackedWeights& P) {
    const Units u = share.units;
    const Rows rows = share.rows;
    const int64_t first = rows.begin * H;                                 // the share's first row in dz(t)
    floats recurrent(rows.count() * u.padded, 0.0f);                       // nothing after step T
    for (int64_t t = T; t >= 1; --t) {
      for (int64_t row = rows.begin; row < rows.end; ++row) {
        const float* __restrict r = recurrent.data() + (row - rows.begin) * u.padded;
        const float* outside = dA_0 + t * step + row * H + u.begin;        // the same floats as dz_row
        const float* __restrict a_row = a_0 + t * step + row * H + u.begin;
        float* dz_row = dz_0 + (t - 1) * step + row * H + u.begin;
#pragma GCC ivdep
        for (int64_t j = 0; j < u.count(); ++j) dz_row[j] = (r[j] + outside[j]) * (1.0f - a_row[j] * a_row[j]);
      }
      round_units(dz_0 + (t - 1) * step + first, rows.count(), H, H, 0, 1, u, offset(dz_low_0, (t - 1) * step + first));
      share.sync();
      P.product(dz_0 + (t - 1) * step + first, offset(dz_low_0, (t - 1) * step + first), H, rows.count(),
                recurrent.data());
    }
    for (int64_t row = rows.begin; row < rows.end; ++row)
      for (int64_t j = 0; j < u.count(); ++j)
        da_out[row * H + u.begin + j] = recurrent[(row - rows.begin) * u.padded + j] + dA_0[row * H + u.begin + j];
  });
  return {dz, da_0};
}

}  // namespace
