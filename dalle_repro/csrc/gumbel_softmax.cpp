// The dVAE's Gumbel-softmax relaxed sample and its KL to the uniform prior, fused, for CPU training.
//
// Per row (one code position) of V encoder logits l:
//   z  = softmax((l + g) / tau), g ~ Gumbel(0, 1)          the decoder's input
//   kl = sum_j q_j log q_j + log V, q = softmax(l)            KL(q || uniform)
// and the backward of both. PyTorch's ops made about a dozen passes over the (B, h, w, V) logits,
// each of them memory-bound, and drew the uniforms through its Mersenne twister at about 3 ns each;
// here each row is read a few times while it sits in cache.
//
// The noise is counter-based (splitmix64 of seed + element index), so it does not depend on the
// number of threads, and a seed drawn from PyTorch's generator makes it follow torch.manual_seed
// and the generator state that checkpoints carry.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"

namespace {

// A uniform in (0, 1), never 0 or 1: 24 random bits, centred in their bin.
inline float uniform(uint64_t seed, uint64_t i) {
  uint64_t x = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return (float(x >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

inline float gumbel(uint64_t seed, uint64_t i) { return -std::log(-std::log(uniform(seed, i))); }

// log-sum-exp of a row, and sum_j q_j log q_j for q = softmax(l)
inline void row_stats(const float* __restrict l, int64_t V, float& lse, float& plogp) {
  float m = l[0];
  for (int64_t j = 1; j < V; ++j) m = std::max(m, l[j]);
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < V; ++j) s += std::exp(l[j] - m);
  lse = m + std::log(s);
  float e = 0;
  const float c = lse;
#pragma omp simd reduction(+ : e)
  for (int64_t j = 0; j < V; ++j) e += std::exp(l[j] - c) * (l[j] - c);
  plogp = e;
}

}  // namespace

extern "C" {

void dr_gumbel_noise(int64_t n, uint64_t seed, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gumbel(seed, uint64_t(i));
}

void dr_gumbel_softmax_kl_forward(int64_t rows, int64_t V, const float* logits, double tau, uint64_t seed, float* z,
                                  float* kl, int64_t threads) {
  const float inv_tau = float(1.0 / tau), log_v = std::log(float(V));
  dalle_repro::parallel_for(rows, threads, [=](int64_t r) {
    const float* __restrict l = logits + r * V;
    float* __restrict zr = z + r * V;
    float lse, plogp;
    row_stats(l, V, lse, plogp);
    kl[r] = plogp + log_v;
    const uint64_t base = uint64_t(r) * uint64_t(V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] = (l[j] + gumbel(seed, base + uint64_t(j))) * inv_tau;
    float m = zr[0];
    for (int64_t j = 1; j < V; ++j) m = std::max(m, zr[j]);
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) {
      zr[j] = std::exp(zr[j] - m);
      s += zr[j];
    }
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] *= inv;
  });
}

// d_kl: the gradient of each row's kl (0 where the loss does not use it).
void dr_gumbel_softmax_kl_backward(int64_t rows, int64_t V, const float* logits, const float* z, const float* d_z,
                                   double tau, const float* d_kl, float* d_logits, int64_t threads) {
  const float inv_tau = float(1.0 / tau);
  dalle_repro::parallel_for(rows, threads, [=](int64_t r) {
    const float *__restrict l = logits + r * V, *__restrict zr = z + r * V, *__restrict dz = d_z + r * V;
    float* __restrict dl = d_logits + r * V;
    float lse, plogp;
    row_stats(l, V, lse, plogp);
    float zdz = 0;
#pragma omp simd reduction(+ : zdz)
    for (int64_t j = 0; j < V; ++j) zdz += zr[j] * dz[j];
    const float g = d_kl[r];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float log_q = l[j] - lse;
      dl[j] = zr[j] * (dz[j] - zdz) * inv_tau + g * std::exp(log_q) * (log_q - plogp);
    }
  });
}

}  // extern "C"
