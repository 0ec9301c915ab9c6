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
// and the generator state that checkpoints carry. Its exp, log and sums are fmath.h's, so a build
// for any x86-64 level gives the same bits.
#include <algorithm>
#include <cstdint>

#include "fmath.h"
#include "parallel.h"

namespace {

using dalle_repro::exp_f;
using dalle_repro::lane_sum;
using dalle_repro::log_f;

// The 64 random bits of element i.
inline uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t x = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Gumbel(0, 1) noise -log(-log u) from 64 random bits, finite for every input.
// u = (k + 1/2) / 2^23 for the top 23 bits k: in [2^-24, 1 - 2^-24], every value exact in float32.
// (With 24 bits, the top bin's 16777215.5 is not a float32: it rounded to 2^24, u became 1.0 and
// the noise +inf, one draw in 2^24, so one dVAE step in 16 at 2048 rows of 512 codes got a NaN.)
// -log u is at least 2^-24 (and clamped there against any rounding), so the noise lies in
// [-2.82, 16.7].
inline float gumbel_bits(uint64_t x) {
  const float u = (float(int32_t(x >> 41)) + 0.5f) * (1.0f / 8388608.0f);  // via int32: AVX2 converts those
  const float e = std::max(-log_f(u), 5.9604645e-8f);
  return -log_f(e);
}

inline float gumbel(uint64_t seed, uint64_t i) { return gumbel_bits(mix(seed, i)); }

inline float row_max(const float* __restrict x, int64_t n) {
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 1; j < n; ++j) m = std::max(m, x[j]);  // exact in any order
  return m;
}

// log-sum-exp of a row, and sum_j q_j log q_j for q = softmax(l); tmp: V floats of scratch
inline void row_stats(const float* __restrict l, int64_t V, float* __restrict tmp, float& lse, float& plogp) {
  const float m = row_max(l, V);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) tmp[j] = exp_f(l[j] - m);
  lse = m + log_f(lane_sum(tmp, V));
  const float c = lse;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) tmp[j] = exp_f(l[j] - c) * (l[j] - c);
  plogp = lane_sum(tmp, V);
}

}  // namespace

extern "C" {

void dr_gumbel_noise(int64_t n, uint64_t seed, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gumbel(seed, uint64_t(i));
}

// The noise for given random bits: lets the tests reach the generator's extreme values directly.
void dr_gumbel_of_bits(int64_t n, const uint64_t* bits, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gumbel_bits(bits[i]);
}

void dr_gumbel_softmax_kl_forward(int64_t rows, int64_t V, const float* logits, double tau, uint64_t seed, float* z,
                                  float* kl, int64_t threads) {
  const float inv_tau = float(1.0 / tau), log_v = log_f(float(V));
  dalle_repro::parallel_for(rows, threads, [=](int64_t r) {
    const float* __restrict l = logits + r * V;
    float* __restrict zr = z + r * V;
    float lse, plogp;
    row_stats(l, V, zr, lse, plogp);  // zr as scratch until it gets the sample
    kl[r] = plogp + log_v;
    const uint64_t base = uint64_t(r) * uint64_t(V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] = (l[j] + gumbel(seed, base + uint64_t(j))) * inv_tau;
    const float m = row_max(zr, V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zr[j] = exp_f(zr[j] - m);
    const float inv = 1.0f / lane_sum(zr, V);
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
    row_stats(l, V, dl, lse, plogp);  // dl as scratch until it gets the gradient
    const float zdz = dalle_repro::lane_dot(zr, dz, V);
    const float g = d_kl[r];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float log_q = l[j] - lse;
      dl[j] = zr[j] * (dz[j] - zdz) * inv_tau + g * exp_f(log_q) * (log_q - plogp);
    }
  });
}

}  // extern "C"
