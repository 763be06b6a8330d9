// What the native CPU kernels share: the BLAS entry points (set once by the loader, blas.cc), a row-major GEMM
// over them, a parallel loop over XLA's intra-op thread pool with one BLAS thread per task, a vectorizable exp
// and per-thread scratch. dsv3_jax/native.py builds every .cc file here into one library and loads it.

#ifndef DSV3_JAX_CSRC_NATIVE_H_
#define DSV3_JAX_CSRC_NATIVE_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace dsv3 {

namespace ffi = xla::ffi;

// cblas_sgemm with 64-bit (ILP64) or 32-bit (LP64) integers; which one is set is decided by the loader.
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);
using SetThreadsLocal = int (*)(int);

extern Sgemm64 sgemm64;
extern Sgemm32 sgemm32;
extern SetThreadsLocal set_threads_local;

inline bool HasBlas() { return sgemm64 != nullptr || sgemm32 != nullptr; }

// One BLAS call: C[m, n] = op(A) @ op(B) + beta * C, row-major; lda/ldb/ldc are the row strides of the stored
// matrices.
inline void BlasGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  if (sgemm64 != nullptr) {
    sgemm64(kRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  } else {
    sgemm32(kRowMajor, ta, tb, static_cast<int32_t>(m), static_cast<int32_t>(n), static_cast<int32_t>(k), 1.0f, a,
            static_cast<int32_t>(lda), b, static_cast<int32_t>(ldb), beta, c, static_cast<int32_t>(ldc));
  }
}

// OpenBLAS's AVX-512 builds multiply products of m * n * k <= 1e6 with a small-matrix kernel that reads the operands
// in place instead of packing them. On the development machine (one thread) that ran at 104-117 GFLOP/s against
// 81-102 for the same shapes one step above the limit, e.g. [64, 256] x [256, 128]: 96 GFLOP/s in one call, 113 in
// three column blocks. The transposed-B small kernel is slower than packing (41-76 GFLOP/s at 16-64 rows), so
// op(B) = B^T is left to one call; callers transpose such operands first (Transpose below).
constexpr int64_t kSmallGemm = 1000000;
constexpr int64_t kGemmBlockAlign = 16;  // column blocks in whole AVX-512 vectors

// C[m, n] = op(A) @ op(B) + beta * C, row-major; lda/ldb/ldc are the row strides of the stored matrices. Products
// past kSmallGemm (B not transposed) run as row and column blocks under it, the columns in multiples of 16.
inline void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int64_t row_limit = kSmallGemm / (kGemmBlockAlign * std::max<int64_t>(k, 1));
  if (trans_b || m * n * k <= kSmallGemm || row_limit == 0) {
    BlasGemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  auto balanced = [](int64_t total, int64_t most, int64_t align) {  // equal blocks of at most `most`
    const int64_t pieces = (total + most - 1) / most;
    return std::min(most, ((total + pieces - 1) / pieces + align - 1) / align * align);
  };
  const int64_t rows = m <= row_limit ? m : balanced(m, row_limit, 1);
  const int64_t cols = balanced(n, kSmallGemm / (rows * k) / kGemmBlockAlign * kGemmBlockAlign, kGemmBlockAlign);
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t mi = std::min(rows, m - i);
    const float* ai = trans_a ? a + i : a + i * lda;
    for (int64_t j = 0; j < n; j += cols) {
      BlasGemm(trans_a, false, mi, std::min(cols, n - j), k, ai, lda, b + j, ldb, beta, c + i * ldc + j, ldc);
    }
  }
}

// out[cols, rows] = in[rows, cols]^T where in's rows are ld floats apart, in 8 x 8 blocks (AVX shuffles where the
// target has them).
inline void Transpose(const float* __restrict in, int64_t rows, int64_t cols, int64_t ld, float* __restrict out) {
  int64_t r = 0;
#ifdef __AVX__
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const float* src = in + r * ld + c;
      __m256 v[8], t[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + i * ld);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      float* dst = out + c * rows + r;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * rows, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * rows, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
      }
    }
    for (; c < cols; ++c) {
      for (int64_t i = r; i < r + 8; ++i) out[c * rows + i] = in[i * ld + c];
    }
  }
#endif
  for (; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * ld + c];
  }
}

// Sets the calling thread's BLAS thread count for the lifetime of the object (when the library supports it).
class BlasThreads {
 public:
  explicit BlasThreads(int64_t n) {
    if (set_threads_local != nullptr && n > 0) previous_ = set_threads_local(static_cast<int>(n));
  }
  ~BlasThreads() {
    if (previous_ > 0) set_threads_local(previous_);
  }

 private:
  int previous_ = 0;
};

// Runs body(i) for every i in [0, n) on the calling thread and on up to `threads` - 1 tasks of XLA's intra-op pool,
// each with one BLAS thread. The caller takes indices too, so the work completes even when no task ever starts; a
// task that starts after every index is taken touches nothing but the shared counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t threads, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body] {
    BlasThreads one(1);
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// exp(x) without a library call, so that loops over it vectorize: x = n ln2 + r with |r| <= ln2 / 2, exp(r) from
// its degree-6 minimax polynomial, 2^n put into the exponent bits. Measured within 7.9e-8 relative of exp over
// [-87, 88]; arguments past the clamp [-87.3, 88.7] give the clamp's value (the sigmoid's is the same to float
// precision). NaN stays NaN.
inline float Exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for an exact first product
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(n == n ? static_cast<int32_t>(n) : 0) << 23;  // n in [-126, 128]
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += scale;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// Scratch reused across calls on the same thread (no allocation per step once warm).
inline float* Scratch(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

}  // namespace dsv3

#endif  // DSV3_JAX_CSRC_NATIVE_H_
