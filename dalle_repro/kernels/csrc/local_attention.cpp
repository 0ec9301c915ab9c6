// Sparse attention over per-query key lists: the CPU kernel of the `local` attention backend.
//
// Query i (of n, text first) attends
//   - text keys 0 .. tv(i) - 1, tv(i) = i + 1 for a text query (i < t), t for an image query. Their
//     scores come in precomputed (one matrix product over all queries, in Python), and so do
//     their values' share of the output and gradients;
//   - the keys listed in idx[i, :] (absolute positions, -1 = empty slot), scored here.
// Only those pairs are scored. For the 11x11 conv mask at grid 32 that is 61 image keys per query,
// where products over whole grid rows score 192 and dense attention all 1024.
//
// Layouts, all contiguous: q, k, v, out, dq, dk, dv: (BH, n, d); idx: (n, kmax) int32;
// p: (BH, n, kmax); text scores, probabilities and gradients: (BH, n, t). q comes pre-scaled.
// alpha > 0 is PB-relax: p = softmax(alpha * (s - max s)), with s from q / alpha; else softmax(s).
// Plain C ABI, loaded with ctypes by dalle_repro/cpu_kernels.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fmath.h"
#include "parallel.h"

namespace {

// D > 0 fixes the head size at compile time, so the 64-wide loops unroll; D == 0 reads d.
// Dot products add over fmath.h's fixed lanes, so float32 results do not depend on the vector width.
template <int D, typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  if constexpr (D > 0) d = D;
  return dalle_repro::lane_dot(a, b, d);
}

inline float exp_of(float x) { return dalle_repro::exp_f(x); }
inline double exp_of(double x) { return std::exp(x); }

template <int D, typename T>
inline void axpy(T a, const T* __restrict x, T* __restrict y, int64_t d) {
  if constexpr (D > 0) d = D;
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += a * x[c];
}

inline int64_t text_visible(int64_t i, int64_t t) { return i < t ? i + 1 : t; }

// text: in, the text scores; out, their probabilities (0 where a text query may not look).
template <int D, typename T>
void forward(int64_t bh, int64_t n, int64_t d, int64_t kmax, int64_t t, const T* q, const T* k, const T* v,
             const int32_t* idx, T* text, T* p_keys, T* out, double alpha, int64_t threads) {
  const T a = alpha > 0 ? T(alpha) : T(1);
  dalle_repro::parallel_for(bh, threads, [=](int64_t h) {
    const T *qh = q + h * n * d, *kh = k + h * n * d, *vh = v + h * n * d;
    for (int64_t i = 0; i < n; ++i) {
      const T* qi = qh + i * d;
      const int32_t* keys = idx + i * kmax;
      T* p = p_keys + (h * n + i) * kmax;
      T* st = text + (h * n + i) * t;
      const int64_t tv = text_visible(i, t);
      T m = std::numeric_limits<T>::lowest();
      for (int64_t j = 0; j < kmax; ++j) {
        p[j] = keys[j] < 0 ? -std::numeric_limits<T>::infinity() : dot<D>(qi, kh + keys[j] * d, d);
        m = std::max(m, p[j]);
      }
      for (int64_t j = 0; j < tv; ++j) m = std::max(m, st[j]);
      // exp in loops of their own, so that they vectorise; the sums in fmath.h's fixed order
#pragma omp simd
      for (int64_t j = 0; j < kmax; ++j) p[j] = exp_of(a * (p[j] - m));  // empty slots: e^-inf = 0
#pragma omp simd
      for (int64_t j = 0; j < tv; ++j) st[j] = exp_of(a * (st[j] - m));
      const T inv = T(1) / (dalle_repro::lane_sum(p, kmax) + dalle_repro::lane_sum(st, tv));
      for (int64_t j = 0; j < kmax; ++j) p[j] *= inv;
      for (int64_t j = 0; j < tv; ++j) st[j] *= inv;
      std::fill(st + tv, st + t, T(0));
      T* oi = out + (h * n + i) * d;
      std::fill(oi, oi + d, T(0));
      for (int64_t j = 0; j < kmax; ++j)
        if (keys[j] >= 0) axpy<D>(p[j], vh + keys[j] * d, oi, d);
    }
  });
}

// text: in, dO v_text^T; out, the text scores' gradient. dq gets the listed keys' share only, and
// dk, dv (which must come in zeroed) the listed keys' rows.
template <int D, typename T>
void backward(int64_t bh, int64_t n, int64_t d, int64_t kmax, int64_t t, const T* q, const T* k, const T* v,
              const int32_t* idx, const T* p_keys, const T* p_text, const T* d_out, T* text, T* dq, T* dk, T* dv,
              double alpha, int64_t threads) {
  const T a = alpha > 0 ? T(alpha) : T(1);
  dalle_repro::parallel_for(bh, threads, [=](int64_t h) {
    std::vector<T> dp(kmax);
    const T *qh = q + h * n * d, *kh = k + h * n * d, *vh = v + h * n * d;
    T *dkh = dk + h * n * d, *dvh = dv + h * n * d;
    for (int64_t i = 0; i < n; ++i) {
      const T *qi = qh + i * d, *doi = d_out + (h * n + i) * d;
      const int32_t* keys = idx + i * kmax;
      const T* p = p_keys + (h * n + i) * kmax;
      const T* pt = p_text + (h * n + i) * t;
      T* st = text + (h * n + i) * t;
      T rowsum = 0;  // sum of p dp over every key, text included
      for (int64_t j = 0; j < kmax; ++j) {
        if (keys[j] < 0) continue;
        dp[j] = dot<D>(doi, vh + keys[j] * d, d);
        rowsum += p[j] * dp[j];
      }
      for (int64_t j = 0; j < t; ++j) rowsum += pt[j] * st[j];
      T* dqi = dq + (h * n + i) * d;
      std::fill(dqi, dqi + d, T(0));
      for (int64_t j = 0; j < kmax; ++j) {
        if (keys[j] < 0) continue;
        const T ds = a * p[j] * (dp[j] - rowsum);
        axpy<D>(ds, kh + keys[j] * d, dqi, d);
        axpy<D>(ds, qi, dkh + keys[j] * d, d);
        axpy<D>(p[j], doi, dvh + keys[j] * d, d);
      }
      for (int64_t j = 0; j < t; ++j) st[j] = a * pt[j] * (st[j] - rowsum);
    }
  });
}

}  // namespace

#define DR_DISPATCH(FN, ...)                \
  switch (d) {                              \
    case 32: FN<32>(__VA_ARGS__); break;    \
    case 64: FN<64>(__VA_ARGS__); break;    \
    case 128: FN<128>(__VA_ARGS__); break;  \
    default: FN<0>(__VA_ARGS__);            \
  }

#define DR_DEFINE(SUFFIX, T)                                                                                      \
  void dr_local_forward_##SUFFIX(int64_t bh, int64_t n, int64_t d, int64_t kmax, int64_t t, const void* q,        \
                                 const void* k, const void* v, const int32_t* idx, void* text, void* p_keys,       \
                                 void* out, double alpha, int64_t threads) {                                       \
    DR_DISPATCH(forward, bh, n, d, kmax, t, (const T*)q, (const T*)k, (const T*)v, idx, (T*)text, (T*)p_keys,     \
                (T*)out, alpha, threads)                                                                           \
  }                                                                                                                \
  void dr_local_backward_##SUFFIX(int64_t bh, int64_t n, int64_t d, int64_t kmax, int64_t t, const void* q,       \
                                  const void* k, const void* v, const int32_t* idx, const void* p_keys,            \
                                  const void* p_text, const void* d_out, void* text, void* dq, void* dk, void* dv, \
                                  double alpha, int64_t threads) {                                                 \
    DR_DISPATCH(backward, bh, n, d, kmax, t, (const T*)q, (const T*)k, (const T*)v, idx, (const T*)p_keys,        \
                (const T*)p_text, (const T*)d_out, (T*)text, (T*)dq, (T*)dk, (T*)dv, alpha, threads)               \
  }

extern "C" {
int dr_abi_version() { return 2; }
DR_DEFINE(f32, float)
DR_DEFINE(f64, double)
}
