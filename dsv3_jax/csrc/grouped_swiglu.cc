// The routed experts' SwiGLU over expert-contiguous row tiles, forward and backward, as XLA FFI handlers for the
// CPU: one BLAS GEMM per expert run (all of an expert's consecutive tiles at once), the SwiGLU's elementwise work
// between them, the weight gradients written straight into [E, ...] and transposed operands read in place; the
// runs spread over XLA's intra-op thread pool. Semantics are those of `ops.grouped_swiglu` (see
// dsv3_jax/cpu_experts.py; dsv3_jax/native.py builds and loads this).
//
// Shapes: x, y, dy, dx [G, M, D]; w1, w3 [E, D, F]; w2 [E, F, D]; tile_expert, live_rows [G] int32; n_tiles []
// int32. Tiles g < n_tiles compute; the rest give zeros. Rows of a tile past its live_rows are padding (zero inputs
// in the layout `moe.tile_layout` makes): they are not computed and give zeros. float32 only.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "native.h"

namespace {

using dsv3::Exp;
using dsv3::Gemm;
using dsv3::ParallelFor;
using dsv3::Scratch;
using dsv3::Transpose;
namespace ffi = xla::ffi;

struct Run {  // consecutive tiles [first, last) of one expert, the first `rows` of their rows live
  int64_t first, last, expert, rows;
};

// The runs of equal experts among the first n_tiles tiles, checked: tile_expert in [0, E), n_tiles in [0, G],
// live_rows in [0, M]. A run's live rows are all its rows up to its last tile's live ones when every earlier
// tile of the run is full (the layout `moe.tile_layout` makes), else all of its rows.
ffi::Error Runs(ffi::Buffer<ffi::S32> tile_expert, ffi::Buffer<ffi::S32> n_tiles, ffi::Buffer<ffi::S32> live_rows,
                int64_t n_experts, int64_t tile_rows, std::vector<Run>& runs) {
  const int64_t n_groups = tile_expert.element_count();
  const int64_t live = n_tiles.typed_data()[0];
  if (live < 0 || live > n_groups) {
    return ffi::Error::InvalidArgument("grouped_swiglu: n_tiles " + std::to_string(live) + " outside [0, " +
                                       std::to_string(n_groups) + "]");
  }
  const int32_t *expert = tile_expert.typed_data(), *rows = live_rows.typed_data();
  runs.clear();
  for (int64_t g = 0; g < live;) {
    const int64_t e = expert[g];
    if (e < 0 || e >= n_experts) {
      return ffi::Error::InvalidArgument("grouped_swiglu: tile " + std::to_string(g) + " names expert " +
                                         std::to_string(e) + " of " + std::to_string(n_experts));
    }
    if (!runs.empty() && e < runs.back().expert) {  // each expert's tiles must be one run (their gradients meet)
      return ffi::Error::InvalidArgument("grouped_swiglu: tile_expert decreases at tile " + std::to_string(g));
    }
    int64_t end = g;
    bool full = true;
    for (; end < live && expert[end] == e; ++end) {
      if (rows[end] < 0 || rows[end] > tile_rows) {
        return ffi::Error::InvalidArgument("grouped_swiglu: tile " + std::to_string(end) + " has " +
                                           std::to_string(rows[end]) + " live rows of " + std::to_string(tile_rows));
      }
      if (end > g && rows[end - 1] != tile_rows) full = false;
    }
    runs.push_back({g, end, e, full ? (end - 1 - g) * tile_rows + rows[end - 1] : (end - g) * tile_rows});
    g = end;
  }
  return ffi::Error::Success();
}

struct Dims {
  int64_t groups, rows, dim, hidden, experts;
};

ffi::Error CheckDims(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                     ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::S32> tile_expert, ffi::Buffer<ffi::S32> live_rows,
                     Dims& d) {
  if (!dsv3::HasBlas()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "grouped_swiglu: no BLAS sgemm was set");
  }
  const auto xd = x.dimensions(), w1d = w1.dimensions(), w3d = w3.dimensions(), w2d = w2.dimensions();
  if (xd.size() != 3 || w1d.size() != 3 || w3d.size() != 3 || w2d.size() != 3) {
    return ffi::Error::InvalidArgument("grouped_swiglu: x and the weights must be rank 3");
  }
  d = Dims{xd[0], xd[1], xd[2], w1d[2], w1d[0]};
  const bool ok = w1d[1] == d.dim && w3d[0] == d.experts && w3d[1] == d.dim && w3d[2] == d.hidden &&
                  w2d[0] == d.experts && w2d[1] == d.hidden && w2d[2] == d.dim &&
                  static_cast<int64_t>(tile_expert.element_count()) == d.groups &&
                  static_cast<int64_t>(live_rows.element_count()) == d.groups;
  if (!ok) return ffi::Error::InvalidArgument("grouped_swiglu: weight, tile_expert or live_rows shapes do not match x");
  return ffi::Error::Success();
}

inline float Sigmoid(float a) { return 1.0f / (1.0f + Exp(-a)); }

// h = silu(a1) * a3 over n elements (h may be a1).
void SwigluForward(const float* a1, const float* a3, float* h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] = a1[j] * Sigmoid(a1[j]) * a3[j];
}

// From the pre-activations and dh = dL/dh: da1, da3, and h = silu(a1) * a3 (the input of w2) written over dh.
void SwigluBackward(const float* __restrict a1, const float* __restrict a3, float* __restrict dh,
                    float* __restrict da1, float* __restrict da3, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float a = a1[j], b = a3[j], g = dh[j], s = Sigmoid(a), silu = a * s;
    da1[j] = g * b * s * (1.0f + a * (1.0f - s));
    da3[j] = g * silu;
    dh[j] = silu * b;
  }
}

// Zeros rows [from, to) of a row-major [*, width] array.
void ZeroRows(float* data, int64_t from, int64_t to, int64_t width) {
  if (to > from) std::memset(data + from * width, 0, sizeof(float) * (to - from) * width);
}

// y and, when a1_out/a3_out are given, the pre-activations x @ w1 and x @ w3 (the backward's residuals).
ffi::Error ForwardImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                       ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::S32> tile_expert,
                       ffi::Buffer<ffi::S32> n_tiles, ffi::Buffer<ffi::S32> live_rows, float* y_data, float* a1_out,
                       float* a3_out, int64_t threads) {
  Dims d;
  if (ffi::Error e = CheckDims(x, w1, w3, w2, tile_expert, live_rows, d); e.failure()) return e;
  std::vector<Run> runs;
  if (ffi::Error e = Runs(tile_expert, n_tiles, live_rows, d.experts, d.rows, runs); e.failure()) return e;

  const int64_t wsize = d.dim * d.hidden;
  ParallelFor(pool, static_cast<int64_t>(runs.size()), threads, [&](int64_t i) {
    thread_local std::vector<float> a1_buffer, a3_buffer, h_buffer;
    const Run& r = runs[i];
    const int64_t row0 = r.first * d.rows, m = r.rows, mf = m * d.hidden, end = r.last * d.rows;
    const float* xr = x.typed_data() + row0 * d.dim;
    float* a1 = a1_out != nullptr ? a1_out + row0 * d.hidden : Scratch(a1_buffer, mf);
    float* a3 = a3_out != nullptr ? a3_out + row0 * d.hidden : Scratch(a3_buffer, mf);
    float* h = a1_out != nullptr ? Scratch(h_buffer, mf) : a1;
    Gemm(false, false, m, d.hidden, d.dim, xr, d.dim, w1.typed_data() + r.expert * wsize, d.hidden, 0.0f, a1,
         d.hidden);
    Gemm(false, false, m, d.hidden, d.dim, xr, d.dim, w3.typed_data() + r.expert * wsize, d.hidden, 0.0f, a3,
         d.hidden);
    SwigluForward(a1, a3, h, mf);
    Gemm(false, false, m, d.dim, d.hidden, h, d.hidden, w2.typed_data() + r.expert * wsize, d.dim, 0.0f,
         y_data + row0 * d.dim, d.dim);
    ZeroRows(y_data, row0 + m, end, d.dim);
    if (a1_out != nullptr) {
      ZeroRows(a1_out, row0 + m, end, d.hidden);
      ZeroRows(a3_out, row0 + m, end, d.hidden);
    }
  });
  const int64_t done = runs.empty() ? 0 : runs.back().last * d.rows;
  ZeroRows(y_data, done, d.groups * d.rows, d.dim);
  if (a1_out != nullptr) {
    ZeroRows(a1_out, done, d.groups * d.rows, d.hidden);
    ZeroRows(a3_out, done, d.groups * d.rows, d.hidden);
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                   ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::S32> tile_expert, ffi::Buffer<ffi::S32> n_tiles,
                   ffi::Buffer<ffi::S32> live_rows, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  return ForwardImpl(pool, x, w1, w3, w2, tile_expert, n_tiles, live_rows, y->typed_data(), nullptr, nullptr,
                     threads);
}

ffi::Error ForwardSaving(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                         ffi::Buffer<ffi::F32> w3, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::S32> tile_expert,
                         ffi::Buffer<ffi::S32> n_tiles, ffi::Buffer<ffi::S32> live_rows,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> a1,
                         ffi::ResultBuffer<ffi::F32> a3, int64_t threads) {
  return ForwardImpl(pool, x, w1, w3, w2, tile_expert, n_tiles, live_rows, y->typed_data(), a1->typed_data(),
                     a3->typed_data(), threads);
}

// dx and the weight gradients from the saved pre-activations a1 = x @ w1, a3 = x @ w3 ([G, M, F]). Each run owns
// its rows of dx and its expert's slices of the weight gradients, so the runs proceed in parallel.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                    ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::S32> tile_expert, ffi::Buffer<ffi::S32> n_tiles,
                    ffi::Buffer<ffi::S32> live_rows, ffi::Buffer<ffi::F32> a1_saved, ffi::Buffer<ffi::F32> a3_saved,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw1,
                    ffi::ResultBuffer<ffi::F32> dw3, ffi::ResultBuffer<ffi::F32> dw2, int64_t threads) {
  Dims d;
  if (ffi::Error e = CheckDims(x, w1, w3, w2, tile_expert, live_rows, d); e.failure()) return e;
  if (static_cast<int64_t>(a1_saved.element_count()) != d.groups * d.rows * d.hidden ||
      a3_saved.element_count() != a1_saved.element_count()) {
    return ffi::Error::InvalidArgument("grouped_swiglu: saved pre-activations are not [G, M, F]");
  }
  std::vector<Run> runs;
  if (ffi::Error e = Runs(tile_expert, n_tiles, live_rows, d.experts, d.rows, runs); e.failure()) return e;

  const int64_t wsize = d.dim * d.hidden;
  float *dx_data = dx->typed_data(), *dw1_data = dw1->typed_data(), *dw3_data = dw3->typed_data(),
        *dw2_data = dw2->typed_data();
  std::vector<bool> routed(d.experts, false);  // each expert has at most one run; the others' gradients are zeros
  for (const Run& r : runs) routed[r.expert] = true;
  for (int64_t e = 0; e < d.experts; ++e) {
    if (routed[e]) continue;
    for (float* dw : {dw1_data, dw3_data, dw2_data}) std::memset(dw + e * wsize, 0, sizeof(float) * wsize);
  }
  ParallelFor(pool, static_cast<int64_t>(runs.size()), threads, [&](int64_t i) {
    thread_local std::vector<float> dh_buffer, da1_buffer, da3_buffer, wt_buffer;
    const Run& r = runs[i];
    const int64_t row0 = r.first * d.rows, m = r.rows, mf = m * d.hidden;
    const float *xr = x.typed_data() + row0 * d.dim, *dyr = dy.typed_data() + row0 * d.dim;
    const float *a1 = a1_saved.typed_data() + row0 * d.hidden, *a3 = a3_saved.typed_data() + row0 * d.hidden;
    float* dh = Scratch(dh_buffer, mf);
    float* da1 = Scratch(da1_buffer, mf);
    float* da3 = Scratch(da3_buffer, mf);
    // The products with transposed weights run untransposed on a transposed copy (see dsv3::Gemm): w2^T [D, F],
    // then w1^T and w3^T [F, D] side by side.
    float* wt = Scratch(wt_buffer, 2 * wsize);
    Transpose(w2.typed_data() + r.expert * wsize, d.hidden, d.dim, d.dim, wt);
    Gemm(false, false, m, d.hidden, d.dim, dyr, d.dim, wt, d.hidden, 0.0f, dh, d.hidden);  // dy @ w2^T
    SwigluBackward(a1, a3, dh, da1, da3, mf);  // dh becomes h
    Transpose(w1.typed_data() + r.expert * wsize, d.dim, d.hidden, d.hidden, wt);
    Transpose(w3.typed_data() + r.expert * wsize, d.dim, d.hidden, d.hidden, wt + wsize);
    float* dxr = dx_data + row0 * d.dim;
    Gemm(false, false, m, d.dim, d.hidden, da1, d.hidden, wt, d.dim, 0.0f, dxr, d.dim);          // da1 @ w1^T
    Gemm(false, false, m, d.dim, d.hidden, da3, d.hidden, wt + wsize, d.dim, 1.0f, dxr, d.dim);  // + da3 @ w3^T
    Gemm(true, false, d.dim, d.hidden, m, xr, d.dim, da1, d.hidden, 0.0f, dw1_data + r.expert * wsize, d.hidden);
    Gemm(true, false, d.dim, d.hidden, m, xr, d.dim, da3, d.hidden, 0.0f, dw3_data + r.expert * wsize, d.hidden);
    Gemm(true, false, d.hidden, d.dim, m, dh, d.hidden, dyr, d.dim, 0.0f, dw2_data + r.expert * wsize, d.dim);
    ZeroRows(dx_data, row0 + m, r.last * d.rows, d.dim);
  });
  ZeroRows(dx_data, runs.empty() ? 0 : runs.back().last * d.rows, d.groups * d.rows, d.dim);
  return ffi::Error::Success();
}

// The thread pool and the operands every handler starts with.
auto BindLayout() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::Buffer<ffi::F32>>()   // w1
      .Arg<ffi::Buffer<ffi::F32>>()   // w3
      .Arg<ffi::Buffer<ffi::F32>>()   // w2
      .Arg<ffi::Buffer<ffi::S32>>()   // tile_expert
      .Arg<ffi::Buffer<ffi::S32>>()   // n_tiles
      .Arg<ffi::Buffer<ffi::S32>>();  // live_rows
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedSwigluForward, Forward,
                              BindLayout().Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedSwigluForwardSaving, ForwardSaving,
                              BindLayout()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a1 = x @ w1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a3 = x @ w3
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedSwigluBackward, Backward,
                              BindLayout()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a3
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw3
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw2
                                  .Attr<int64_t>("threads"));
