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
