// The LSTM's two time loops, forward and backward through time, compiled: the equations of the Python
// loops in lmtrain/backward.py (_lstm_forward_loop, _lstm_backward_loop), one step at a time, but with
// each step's gate arithmetic in one pass over the (B, H) elements instead of a dozen separate tensor
// operations, and no Python between the steps. The matrix products stay with the GEMM that
// lmtrain.gemm chose (oneDNN with its packed weight, or ATen's mm); this file only drives them.
//
// Gates are laid out [Γ_f, Γ_u, c̃, Γ_o] along the last axis of a (T, B, 4H) buffer, rows are batch,
// and buffers are time-major, exactly as in backward.py.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstring>

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

// x Wᵀ by the GEMM lmtrain.gemm.FixedProduct chose: oneDNN's linear with its packed W, or mm with W's
// transpose. The sum with the other term is left to the step functions, which read both anyway
// (oneDNN's fused add cost about 20 us a call more than the add inside the step).
struct Product {
  at::Tensor W;
  bool onednn;

  at::Tensor operator()(const at::Tensor& x) const {
    if (onednn) {
      static auto op = c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
      return op.call(x, W, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
    }
    return at::mm(x, W);
  }
};

// One step of the forward for all B rows. z = W_aa a(t-1) + (W_ax x(t) + b): `recurrent` (B, 4H) is the
// first term, `gates` (B, 4H) holds the second on entry and the activations on return:
//   Γ_f = σ(z_f), Γ_u = σ(z_u), c̃ = tanh(z_c), Γ_o = σ(z_o)
//   c(t) = Γ_f * c(t-1) + Γ_u * c̃
//   a(t) = Γ_o * tanh(c(t))
// Raw pointers and no calls that can throw, so that the compiler vectorises the inner loop.
void forward_step(const float* recurrent, float* gates, const float* c_prev, float* c, float* tanh_c, float* a,
                  int64_t B, int64_t H) noexcept {
  for (int64_t row = 0; row < B; ++row) {
    const float* __restrict r_f = recurrent + row * 4 * H;
    const float* __restrict r_u = r_f + H;
    const float* __restrict r_c = r_f + 2 * H;
    const float* __restrict r_o = r_f + 3 * H;
    float* __restrict gamma_f = gates + row * 4 * H;
    float* __restrict gamma_u = gamma_f + H;
    float* __restrict c_tilde = gamma_f + 2 * H;
    float* __restrict gamma_o = gamma_f + 3 * H;
    const float* __restrict c_prev_row = c_prev + row * H;
    float* __restrict c_row = c + row * H;
    float* __restrict tanh_c_row = tanh_c + row * H;
    float* __restrict a_row = a + row * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
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

// One step of the backward for all B rows, from the forward's activations of step t. What reaches a(t)
// is da(t) = `recurrent` (W_aᵀ dz(t+1), through a(t)'s use at step t+1) + `outside` (from the outputs);
// `dc` holds what reaches c(t) through c(t+1):
//   dc(t) = dc + da(t) Γ_o (1 - tanh²(c(t)))
//   dz_f = dc(t) c(t-1) Γ_f (1 - Γ_f)        dz_u = dc(t) c̃ Γ_u (1 - Γ_u)
//   dz_c = dc(t) Γ_u (1 - c̃²)                dz_o = da(t) tanh(c(t)) Γ_o (1 - Γ_o)
//   dc(t-1) = dc(t) Γ_f
// writing dz (B, 4H), and dc(t-1) over dc.
void backward_step(const float* gates, const float* c_prev, const float* tanh_c, const float* recurrent,
                   const float* outside, float* dc, float* dz, int64_t B, int64_t H) noexcept {
  for (int64_t row = 0; row < B; ++row) {
    const float* __restrict gamma_f = gates + row * 4 * H;
    const float* __restrict gamma_u = gamma_f + H;
    const float* __restrict c_tilde = gamma_f + 2 * H;
    const float* __restrict gamma_o = gamma_f + 3 * H;
    const float* __restrict c_prev_row = c_prev + row * H;
    const float* __restrict tanh_c_row = tanh_c + row * H;
    const float* __restrict recurrent_row = recurrent + row * H;
    const float* __restrict outside_row = outside + row * H;
    float* __restrict dc_row = dc + row * H;
    float* __restrict dz_f = dz + row * 4 * H;
    float* __restrict dz_u = dz_f + H;
    float* __restrict dz_c = dz_f + 2 * H;
    float* __restrict dz_o = dz_f + 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
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

// t = 1 .. T: forward_step on the product W_aa a(t-1). `gates` (T, B, 4H) arrives holding W_ax x(t) + b
// and leaves holding the activations; a[t], c[t] (T+1, B, H) and tanh_c[t-1] = tanh(c(t)) are filled.
void lstm_forward(at::Tensor gates, at::Tensor a, at::Tensor c, at::Tensor tanh_c, at::Tensor W, bool onednn) {
  check(gates, "gates"), check(a, "a"), check(c, "c"), check(tanh_c, "tanh_c");
  const int64_t T = gates.size(0), B = gates.size(1), H = a.size(2);
  const Product product{W, onednn};
  for (int64_t t = 1; t <= T; ++t) {
    const at::Tensor recurrent = product(a[t - 1]).contiguous();            // (B, 4H)
    forward_step(recurrent.data_ptr<float>(), gates[t - 1].data_ptr<float>(), c[t - 1].data_ptr<float>(),
                 c[t].data_ptr<float>(), tanh_c[t - 1].data_ptr<float>(), a[t].data_ptr<float>(), B, H);
  }
}

// t = T .. 1: backward_step, then W_aᵀ dz(t), the part of da(t-1) that comes through the recurrence.
// `gates`, c and tanh_c are the forward's buffers, dA[t] what reaches a(t) from outside the recurrence,
// dc what reaches c(T). Returns dz (T, B, 4H), the gradients of every step's gate pre-activations, and
// da(0), dc(0).
std::vector<at::Tensor> lstm_backward(at::Tensor gates, at::Tensor c, at::Tensor tanh_c, at::Tensor dA,
                                      at::Tensor dc, at::Tensor W, bool onednn) {
  check(gates, "gates"), check(c, "c"), check(tanh_c, "tanh_c"), check(dA, "dA");
  const int64_t T = gates.size(0), B = gates.size(1), H = c.size(2);
  const Product product{W, onednn};
  at::Tensor dz = at::empty_like(gates);
  at::Tensor recurrent = at::zeros_like(dA[T]);                              // nothing after step T
  dc = dc.contiguous().clone();
  check(dc, "dc");
  for (int64_t t = T; t >= 1; --t) {
    backward_step(gates[t - 1].data_ptr<float>(), c[t - 1].data_ptr<float>(), tanh_c[t - 1].data_ptr<float>(),
                  recurrent.data_ptr<float>(), dA[t].data_ptr<float>(), dc.data_ptr<float>(),
                  dz[t - 1].data_ptr<float>(), B, H);
    recurrent = product(dz[t - 1]).contiguous();
  }
  return {dz, recurrent + dA[0], dc};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lstm_forward", &lstm_forward, "The LSTM forward through time (in place)");
  module.def("lstm_backward", &lstm_backward, "The LSTM backward through time: returns (dz, da(0), dc(0))");
}
