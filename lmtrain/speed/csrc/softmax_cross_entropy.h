// The softmax cross-entropy of the output layer (lmtrain/speed/loss.py): the loss and its gradient with
// respect to the logits in one pass per row, the gradient written over the logits.
#pragma once

#include "common.h"

namespace {

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
    if (y[r] != ignore_index && (y[r] < 0 || y[r] >= V))
      fail("target " + std::to_string(y[r]) + " is out of bounds for " + std::to_string(V) + " classes");
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
