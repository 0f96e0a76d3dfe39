// What every kernel shares: the includes, and e^x, σ and tanh written without library calls so that
// the compiler vectorises the loops that use them.
#pragma once

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
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// A failed check whose message carries values raises Python's RuntimeError (pybind11's translation of
// std::runtime_error), the message put together with std::to_string. Not TORCH_CHECK with values: it
// writes them into an ostream, and with torch 2.11's CUDA wheels and Ubuntu 24.04's GCC 13 an extension
// that wrote a number into an ostream crashed the process (a segmentation fault) instead of raising.
[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error(message); }

// "(2, 3, 4)": a shape for such a message.
inline std::string shape_text(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + ")";
}

// An allocator whose blocks start on a cache line (64 bytes). malloc's start on 16, so an AVX-512 load or
// store of a packed block's 16 floats would straddle two lines, two accesses for one, in 3 of 4 placements.
// The block is a plain malloc'd one 64 bytes longer, its start moved up to the next line and malloc's own
// pointer kept just before it: with aligned_alloc, which splits a block's unused head off as a free chunk
// of its own, a training step's peak memory grew by up to 60 MB (docs/benchmarks.md, "Buffers on cache lines").
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::size_t LINE = 64;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) noexcept {}
  T* allocate(std::size_t n) {
    static_assert(alignof(std::max_align_t) >= sizeof(void*), "room for malloc's pointer before the block");
    void* block = std::malloc(n * sizeof(T) + LINE);
    if (block == nullptr) throw std::bad_alloc();
    // malloc's start is a multiple of alignof(max_align_t) (16), so the next line is at most 64 - 16 bytes on.
    const auto start = (reinterpret_cast<std::uintptr_t>(block) + alignof(std::max_align_t) + LINE - 1) / LINE * LINE;
    reinterpret_cast<void**>(start)[-1] = block;
    return reinterpret_cast<T*>(start);
  }
  void deallocate(T* memory, std::size_t) noexcept { std::free(reinterpret_cast<void**>(memory)[-1]); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const noexcept { return false; }
};

// A float buffer of the loops' own (packed weights, one step's products), starting on a cache line.
using floats = std::vector<float, CacheAligned<float>>;

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

}  // namespace
