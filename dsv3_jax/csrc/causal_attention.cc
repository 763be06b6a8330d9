// Causal attention for the CPU, forward and backward, as XLA FFI handlers: the FlashAttention algorithm over
// BLAS GEMMs on score tiles that stay in cache. Semantics are those of `flash_attention.causal_attention` (see
// dsv3_jax/cpu_attention.py; dsv3_jax/native.py builds and loads this):
//
//   out[b, s, h] = sum_t softmax_t(q[b, s, h] . k[b, t, h], masked) v[b, t, h],   lse[b, h, s] = log-sum-exp
//
// q, k [B, S, H, K] (the queries carry the softmax scale), v [B, S, H, V], mask [B, S, S] bool, which must never
// allow a key after its query (t > s): keys past a query tile's last row are not visited at all. Masked scores
// are float32's lowest value, as in the XLA version, so a row whose visited keys are all masked averages them.
//
// Forward: one task per (b, h, query tile of kQueryRows rows); an online softmax over key tiles of kKeyCols. The
// backward recomputes each tile's probabilities from lse: one task per (b, h), which owns the rows of dq, dk and
// dv of that head and adds into them with beta = 1 GEMMs. Operands are read in place through their row strides
// (H K or H V floats): no transposes or copies of q, k, v. float32 only.

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "native.h"

namespace {

using dsv3::Exp;
using dsv3::Gemm;
using dsv3::ParallelFor;
using dsv3::Scratch;
namespace ffi = xla::ffi;

constexpr float kMasked = std::numeric_limits<float>::lowest();
// Tile sizes measured best of 32-128 query rows x 128-512 keys (4096 tokens, 4 heads, K = 48, V = 32, 2 cores:
// forward 38 ms, backward 81 ms, against 41-47 and 86-100 for the others).
constexpr int64_t kQueryRows = 64, kKeyCols = 256;

// exp(x), exactly 0 below float's range (where `Exp` clamps), so that masked scores weigh nothing.
inline float ExpOrZero(float x) { return x < -87.3f ? 0.0f : Exp(x); }

struct Dims {
  int64_t batch, seq, heads, qk, v;
  int64_t QkRow(int64_t b, int64_t s, int64_t h) const { return ((b * seq + s) * heads + h) * qk; }
  int64_t VRow(int64_t b, int64_t s, int64_t h) const { return ((b * seq + s) * heads + h) * v; }
};

ffi::Error CheckDims(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::PRED> mask, Dims& d) {
  if (!dsv3::HasBlas()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "causal_attention: no BLAS sgemm was set");
  }
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3) {
    return ffi::Error::InvalidArgument("causal_attention: q, k, v must be rank 4 and the mask rank 3");
  }
  d = Dims{qd[0], qd[1], qd[2], qd[3], vd[3]};
  const bool ok = kd[0] == d.batch && kd[1] == d.seq && kd[2] == d.heads && kd[3] == d.qk && vd[0] == d.batch &&
                  vd[1] == d.seq && vd[2] == d.heads && md[0] == d.batch && md[1] == d.seq && md[2] == d.seq;
  if (!ok) return ffi::Error::InvalidArgument("causal_attention: k, v or mask shapes do not match q");
  return ffi::Error::Success();
}

// out[j, s] = x[b, s, h, j]: head (b, h) of a [B, S, H, width] array as [width, S], so that the GEMMs that would
// read it transposed read it in order (OpenBLAS runs its small-matrix kernel only for untransposed operands: 1.5x
// on the score GEMM at K = 48).
void TransposeHead(const float* x, int64_t width, const Dims& d, int64_t b, int64_t h, float* out) {
  dsv3::Transpose(x + (b * d.seq * d.heads + h) * width, d.seq, width, d.heads * width, out);
}

// scores[r, c] = q[b, s0 + r, h] . k[b, t0 + c, h] where the mask allows it, else kMasked; [nq, nt] row-major.
// kt_h: head (b, h) of k as [K, S].
void MaskedScores(const Dims& d, const float* q, const float* kt_h, const bool* mask, int64_t b, int64_t h,
                  int64_t s0, int64_t nq, int64_t t0, int64_t nt, float* scores) {
  Gemm(false, false, nq, nt, d.qk, q + d.QkRow(b, s0, h), d.heads * d.qk, kt_h + t0, d.seq, 0.0f, scores, nt);
  for (int64_t r = 0; r < nq; ++r) {
    const uint8_t* __restrict allowed = reinterpret_cast<const uint8_t*>(mask + (b * d.seq + s0 + r) * d.seq + t0);
    float* __restrict row = scores + r * nt;
#pragma omp simd
    for (int64_t c = 0; c < nt; ++c) row[c] = allowed[c] != 0 ? row[c] : kMasked;
  }
}

// One query tile [s0, s0 + nq) of head (b, h): out rows and lse, by an online softmax over the key tiles.
void ForwardTile(const Dims& d, const float* q, const float* kt_h, const float* v, const bool* mask, int64_t b,
                 int64_t h, int64_t s0, int64_t nq, float* out, float* lse) {
  thread_local std::vector<float> score_buffer, acc_buffer, state_buffer;
  float* scores = Scratch(score_buffer, nq * kKeyCols);
  float* acc = Scratch(acc_buffer, nq * d.v);
  float* state = Scratch(state_buffer, 2 * nq);
  float *m = state, *total = state + nq;
  std::fill(acc, acc + nq * d.v, 0.0f);
  std::fill(m, m + nq, kMasked);
  std::fill(total, total + nq, 0.0f);
  const int64_t end = s0 + nq, vld = d.heads * d.v;
  for (int64_t t0 = 0; t0 < end; t0 += kKeyCols) {
    const int64_t nt = std::min(kKeyCols, end - t0);
    MaskedScores(d, q, kt_h, mask, b, h, s0, nq, t0, nt, scores);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = scores + r * nt;
      float top = m[r];
#pragma omp simd reduction(max : top)
      for (int64_t c = 0; c < nt; ++c) top = row[c] > top ? row[c] : top;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < nt; ++c) {
        row[c] = ExpOrZero(row[c] - top);
        sum += row[c];
      }
      const float decay = ExpOrZero(m[r] - top);
      total[r] = total[r] * decay + sum;
      m[r] = top;
      if (decay != 1.0f) {
        for (int64_t j = 0; j < d.v; ++j) acc[r * d.v + j] *= decay;
      }
    }
    Gemm(false, false, nq, d.v, nt, scores, nt, v + d.VRow(b, t0, h), vld, 1.0f, acc, d.v);
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* o = out + d.VRow(b, s0 + r, h);
    const float inv = 1.0f / total[r];
    for (int64_t j = 0; j < d.v; ++j) o[j] = acc[r * d.v + j] * inv;
    lse[(b * d.heads + h) * d.seq + s0 + r] = m[r] + std::log(total[r]);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t threads) {
  Dims d;
  if (ffi::Error e = CheckDims(q, k, v, mask, d); e.failure()) return e;
  const int64_t heads = d.batch * d.heads, tiles = (d.seq + kQueryRows - 1) / kQueryRows, head_size = d.qk * d.seq;
  std::vector<float> kt(heads * head_size);  // each head of k as [K, S]
  ParallelFor(pool, heads, threads, [&](int64_t bh) {
    TransposeHead(k.typed_data(), d.qk, d, bh / d.heads, bh % d.heads, kt.data() + bh * head_size);
  });
  // Longest tiles (the last, which visit the most keys) first, so that the threads finish together.
  ParallelFor(pool, heads * tiles, threads, [&](int64_t i) {
    const int64_t tile = tiles - 1 - i / heads, bh = i % heads, s0 = tile * kQueryRows;
    ForwardTile(d, q.typed_data(), kt.data() + bh * head_size, v.typed_data(), mask.typed_data(), bh / d.heads,
                bh % d.heads, s0, std::min(kQueryRows, d.seq - s0), out->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

struct Grads {
  float *dq, *dk, *dv;
};

// Zeros head (b, h)'s rows of dq, dk and dv, and sets delta[s] = do[b, s, h] . out[b, s, h].
void StartHead(const Dims& d, const float* out, const float* dout, int64_t b, int64_t h, Grads g, float* delta) {
  for (int64_t s = 0; s < d.seq; ++s) {
    std::memset(g.dq + d.QkRow(b, s, h), 0, sizeof(float) * d.qk);
    std::memset(g.dk + d.QkRow(b, s, h), 0, sizeof(float) * d.qk);
    std::memset(g.dv + d.VRow(b, s, h), 0, sizeof(float) * d.v);
    const float *o = out + d.VRow(b, s, h), *g_o = dout + d.VRow(b, s, h);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d.v; ++j) sum += o[j] * g_o[j];
    delta[s] = sum;
  }
}

// The gradients of head (b, h), tile by tile: p = exp(scores - lse), dv += p^T do, ds = p (do v^T - delta),
// dq += ds k, dk += ds^T q.
void BackwardHead(const Dims& d, const float* q, const float* k, const float* v, const bool* mask, const float* out,
                  const float* lse, const float* dout, int64_t b, int64_t h, Grads g) {
  thread_local std::vector<float> p_buffer, ds_buffer, delta_buffer, kt_buffer, vt_buffer;
  float* p = Scratch(p_buffer, kQueryRows * kKeyCols);
  float* ds = Scratch(ds_buffer, kQueryRows * kKeyCols);
  float* delta = Scratch(delta_buffer, d.seq);
  float* kt = Scratch(kt_buffer, d.qk * d.seq);
  float* vt = Scratch(vt_buffer, d.v * d.seq);
  TransposeHead(k, d.qk, d, b, h, kt);
  TransposeHead(v, d.v, d, b, h, vt);
  StartHead(d, out, dout, b, h, g, delta);
  const float* lse_h = lse + (b * d.heads + h) * d.seq;
  const int64_t qld = d.heads * d.qk, vld = d.heads * d.v;
  for (int64_t s0 = 0; s0 < d.seq; s0 += kQueryRows) {
    const int64_t nq = std::min(kQueryRows, d.seq - s0), end = s0 + nq;
    const float *q_i = q + d.QkRow(b, s0, h), *do_i = dout + d.VRow(b, s0, h);
    for (int64_t t0 = 0; t0 < end; t0 += kKeyCols) {
      const int64_t nt = std::min(kKeyCols, end - t0);
      const float* k_j = k + d.QkRow(b, t0, h);
      MaskedScores(d, q, kt, mask, b, h, s0, nq, t0, nt, p);
      for (int64_t r = 0; r < nq; ++r) {
        float* row = p + r * nt;
        const float shift = lse_h[s0 + r];
        for (int64_t c = 0; c < nt; ++c) row[c] = ExpOrZero(row[c] - shift);
      }
      Gemm(true, false, nt, d.v, nq, p, nt, do_i, vld, 1.0f, g.dv + d.VRow(b, t0, h), vld);
      Gemm(false, false, nq, nt, d.v, do_i, vld, vt + t0, d.seq, 0.0f, ds, nt);
      for (int64_t r = 0; r < nq; ++r) {
        const float* p_row = p + r * nt;
        float* ds_row = ds + r * nt;
        const float shift = delta[s0 + r];
        for (int64_t c = 0; c < nt; ++c) ds_row[c] = p_row[c] * (ds_row[c] - shift);
      }
      Gemm(false, false, nq, d.qk, nt, ds, nt, k_j, qld, 1.0f, g.dq + d.QkRow(b, s0, h), qld);
      Gemm(true, false, nt, d.qk, nq, ds, nt, q_i, qld, 1.0f, g.dk + d.QkRow(b, t0, h), qld);
    }
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, int64_t threads) {
  Dims d;
  if (ffi::Error e = CheckDims(q, k, v, mask, d); e.failure()) return e;
  if (out.element_count() != dout.element_count() ||
      static_cast<int64_t>(out.element_count()) != d.batch * d.seq * d.heads * d.v ||
      static_cast<int64_t>(lse.element_count()) != d.batch * d.heads * d.seq) {
    return ffi::Error::InvalidArgument("causal_attention: out, dout must be [B, S, H, V] and lse [B, H, S]");
  }
  const Grads g{dq->typed_data(), dk->typed_data(), dv->typed_data()};
  ParallelFor(pool, d.batch * d.heads, threads, [&](int64_t bh) {
    BackwardHead(d, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), out.typed_data(),
                 lse.typed_data(), dout.typed_data(), bh / d.heads, bh % d.heads, g);
  });
  return ffi::Error::Success();
}

// The thread pool and the operands both handlers start with.
auto BindOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()    // q
      .Arg<ffi::Buffer<ffi::F32>>()    // k
      .Arg<ffi::Buffer<ffi::F32>>()    // v
      .Arg<ffi::Buffer<ffi::PRED>>();  // mask
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionForward, Forward,
                              BindOperands()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, Backward,
                              BindOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int64_t>("threads"));
