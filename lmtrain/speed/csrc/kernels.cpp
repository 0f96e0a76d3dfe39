// lmtrain's compiled kernels (built and loaded by lmtrain/speed/kernels.py), one library in one
// translation unit (torch's headers take most of the build time), its parts in headers by concern:
//
// - lstm_loops.h, gru_loops.h, rnn_loops.h: each cell's two time loops, forward and backward through
//   time: the equations of the Python loops in lmtrain/backprop/ (lstm.py's _lstm_forward_loop and
//   _lstm_backward_loop, ...), one step at a time, but with each step's recurrent product (recurrent_products.h) and gate arithmetic made
//   together, thread by thread, and no Python or library call between the steps (the products over all
//   T steps at once stay with lmtrain/speed/gemm.py). Gates are laid out [Γ_f, Γ_u, c̃, Γ_o] along the
//   last axis of a (T, B, 4H) buffer, rows are batch, and buffers are time-major, exactly as in the
//   Python loops. The GRU's (both forms) and the RNN's follow the same plan with their own equations
//   (lmtrain/backprop/gru.py, rnn.py). Under train.precision: bfloat16 every loop's recurrent products take
//   bfloat16 factors (AVX-512 BF16), rounded into a bfloat16 copy of each factor as it is made.
// - token_steps.h: one step of each cell for a few rows (sampling), from W_a = [W_aa, W_ax] packed once.
// - softmax_cross_entropy.h: the output layer's loss and its gradient with respect to the logits in
//   one pass per row (lmtrain/speed/loss.py).
// - recurrent_products.h: each step's recurrent product, a thread's columns of W packed once a sequence.
// - common.h: e^x, σ and tanh without library calls, so that the loops vectorise.

#include "gru_loops.h"
#include "lstm_loops.h"
#include "rnn_loops.h"
#include "softmax_cross_entropy.h"
#include "token_steps.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lstm_forward", &lstm_forward, "The LSTM forward through time (in place)", py::arg("gates"),
             py::arg("a"), py::arg("c"), py::arg("tanh_c"), py::arg("W"), py::arg("a_low") = py::none());
  module.def("lstm_backward", &lstm_backward, "The LSTM backward through time: returns (dz, da(0), dc(0))",
             py::arg("gates"), py::arg("c"), py::arg("tanh_c"), py::arg("dA"), py::arg("dc"), py::arg("W"),
             py::arg("dz_low") = py::none());
  module.def("gru_forward", &gru_forward, "The lecture's GRU forward through time (in place)", py::arg("gates"),
             py::arg("c"), py::arg("W"), py::arg("c_low") = py::none());
  module.def("gru_backward", &gru_backward, "The lecture's GRU backward through time: returns (dz, dc(0))",
             py::arg("gates"), py::arg("c"), py::arg("dA"), py::arg("W"), py::arg("dz_low") = py::none());
  module.def("gru_after_forward", &gru_after_forward, "PyTorch's GRU forward through time (in place)",
             py::arg("gates"), py::arg("c"), py::arg("p"), py::arg("W"), py::arg("b_cc"),
             py::arg("c_low") = py::none());
  module.def("gru_after_backward", &gru_after_backward,
             "PyTorch's GRU backward through time: returns (dr, dz_c, dc(0)); dz_c takes dA's place",
             py::arg("gates"), py::arg("c"), py::arg("p"), py::arg("dA"), py::arg("W"), py::arg("dr_low") = py::none());
  module.def("rnn_forward", &rnn_forward, "The tanh RNN forward through time (in place)", py::arg("z"),
             py::arg("a"), py::arg("W"), py::arg("a_low") = py::none());
  module.def("rnn_backward", &rnn_backward, "The tanh RNN backward through time: returns (dz, da(0))",
             py::arg("a"), py::arg("dA"), py::arg("W"), py::arg("dz_low") = py::none());
  module.def("lstm_token_step", &lstm_token_step, "One LSTM step from packed W_a: returns (a, c)",
             py::arg("packed"), py::arg("b"), py::arg("a_prev"), py::arg("x"), py::arg("c_prev"));
  module.def("gru_token_step", &gru_token_step, "One GRU step from packed W_a: returns c", py::arg("packed"),
             py::arg("b"), py::arg("c_prev"), py::arg("x"), py::arg("b_cc") = py::none());
  module.def("rnn_token_step", &rnn_token_step, "One tanh RNN step from packed W_a: returns a", py::arg("packed"),
             py::arg("b"), py::arg("a_prev"), py::arg("x"));
  module.def("bf16_products_supported", &bf16_products_supported,
             "Whether this CPU runs the bfloat16 products (AVX-512 BF16)");
  module.def("softmax_cross_entropy_", &softmax_cross_entropy_,
             "The summed cross-entropy of (rows, V) logits; overwrites them with its gradient, whose column "
             "sums go to column_sum if given", py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
             py::arg("column_sum") = py::none());
}
