// The BLAS entry points every kernel calls through (native.h), set once by the loader (dsv3_jax/native.py).

#include "native.h"

namespace dsv3 {

Sgemm64 sgemm64 = nullptr;
Sgemm32 sgemm32 = nullptr;
SetThreadsLocal set_threads_local = nullptr;

}  // namespace dsv3

// ilp64: sgemm takes 64-bit integers; threads_local: OpenBLAS's per-thread thread-count setter, or null.
extern "C" __attribute__((visibility("default"))) void dsv3_set_blas(void* sgemm, int ilp64, void* threads_local) {
  if (ilp64) {
    dsv3::sgemm64 = reinterpret_cast<dsv3::Sgemm64>(sgemm);
  } else {
    dsv3::sgemm32 = reinterpret_cast<dsv3::Sgemm32>(sgemm);
  }
  dsv3::set_threads_local = reinterpret_cast<dsv3::SetThreadsLocal>(threads_local);
}

// c[i] = op(a[i]) @ op(b[i]) for i < count, through dsv3::Gemm (the small-matrix blocking every kernel here uses):
// a stored [count, k, m] when trans_a else [count, m, k], b [count, n, k] when trans_b else [count, k, n], c [count,
// m, n], all contiguous row-major. For experiments/gemm_floor.py, which times the training step's products as the
// native kernels run them.
extern "C" __attribute__((visibility("default"))) void dsv3_gemm_batch(int trans_a, int trans_b, int64_t m,
                                                                        int64_t n, int64_t k, const float* a,
                                                                        const float* b, float* c, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    dsv3::Gemm(trans_a != 0, trans_b != 0, m, n, k, a + i * m * k, trans_a ? m : k, b + i * k * n, trans_b ? k : n,
               0.0f, c + i * m * n, n);
  }
}
