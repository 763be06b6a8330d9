// One parameter's AdamW step in one pass over its elements, as an XLA FFI handler for the CPU: reads p, g, m and v
// once and writes p, m and v in place (the results alias those operands). XLA runs the same update as four passes
// (the clipped gradient, each moment, then the parameter), moving 48 bytes per element where this moves 28. The
// arithmetic is `optimizer.make`'s chain in its order; with the compiler's default FMA contraction the moments equal
// XLA's bit for bit, and the parameters differ from XLA's in a few percent of the elements by up to two ulps of the
// step plus one of the result (one side fuses a multiply and an add that the other rounds twice; where p + step u
// cancels, that is several ulps of the result; tests/test_native_adamw.py):
//
//   g' = g / divisor * multiplier          (clip_by_global_norm; divisor = multiplier = 1 when it does not clip)
//   m' = b1 m + (1 - b1) g'                v' = b2 v + (1 - b2) g' g'
//   u  = (m' / c1) / (sqrt(v' / c2) + eps) [+ decay p]                 p' = p + step u   (step = -learning rate)
//
// hyper = [divisor, multiplier, c1, c2, step] (float32, computed in the step); b1, 1 - b1, b2, 1 - b2, eps and decay
// are attributes (decay 0: the term is left out, as for the norm weights that optax's mask skips). float32 only. See
// dsv3_jax/optimizer.py; dsv3_jax/native.py builds and loads this.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "native.h"

namespace {

using dsv3::ParallelFor;
namespace ffi = xla::ffi;

constexpr int64_t kChunk = 1 << 16;  // elements per task

struct Hyper {
  float divisor, multiplier, c1, c2, step, b1, one_minus_b1, b2, one_minus_b2, eps, decay;
};

template <bool kDecay>
void Step(const Hyper& h, float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
          int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float grad = g[i] / h.divisor * h.multiplier;
    const float m1 = h.b1 * m[i] + h.one_minus_b1 * grad;
    const float v1 = h.b2 * v[i] + h.one_minus_b2 * grad * grad;
    float u = (m1 / h.c1) / (std::sqrt(v1 / h.c2) + h.eps);
    if (kDecay) u = u + h.decay * p[i];
    m[i] = m1;
    v[i] = v1;
    p[i] = p[i] + h.step * u;
  }
}

ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> p_out,
                  ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out, float b1, float one_minus_b1,
                  float b2, float one_minus_b2, float eps, float decay, int64_t threads) {
  const int64_t n = p.element_count();
  if (g.element_count() != n || m.element_count() != n || v.element_count() != n ||
      p_out->element_count() != n || m_out->element_count() != n || v_out->element_count() != n) {
    return ffi::Error::InvalidArgument("adamw: g, m, v and the results must have p's " + std::to_string(n) +
                                       " elements");
  }
  if (hyper.element_count() != 5) return ffi::Error::InvalidArgument("adamw: hyper must hold 5 values");
  const float* x = hyper.typed_data();
  const Hyper h{x[0], x[1], x[2], x[3], x[4], b1, one_minus_b1, b2, one_minus_b2, eps, decay};
  const float *pi = p.typed_data(), *gi = g.typed_data(), *mi = m.typed_data(), *vi = v.typed_data();
  float *po = p_out->typed_data(), *mo = m_out->typed_data(), *vo = v_out->typed_data();
  ParallelFor(pool, (n + kChunk - 1) / kChunk, threads, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, size = std::min(n, begin + kChunk) - begin;
    // In place when XLA gave the aliased buffers (the step donates its state); else copy in first.
    if (po != pi) std::copy(pi + begin, pi + begin + size, po + begin);
    if (mo != mi) std::copy(mi + begin, mi + begin + size, mo + begin);
    if (vo != vi) std::copy(vi + begin, vi + begin + size, vo + begin);
    if (decay != 0.0f) {
      Step<true>(h, po + begin, gi + begin, mo + begin, vo + begin, size);
    } else {
      Step<false>(h, po + begin, gi + begin, mo + begin, vo + begin, size);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamWUpdate, Update,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper
                                  .Ret<ffi::Buffer<ffi::F32>>()  // p', aliasing p
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m', aliasing m
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v', aliasing v
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("decay")
                                  .Attr<int64_t>("threads"));
