// Float maths of the CPU kernels whose results do not depend on the CPU they run on.
//
// The kernels are built with -march=native (AVX-512 here, AVX2 there, SSE2 on the oldest x86-64)
// and used to be built with -ffast-math, which let three things change the numbers between CPUs:
//   - reductions (`omp simd reduction`, or any sum under -fassociative-math) are split over as many
//     lanes as the vector unit has, 16 floats with AVX-512 and 8 with AVX2, so they add in another
//     order;
//   - exp and log came from libmvec, whose vector variants (one per ISA) and the scalar libm do not
//     round alike;
//   - a * b + c is contracted to one fused multiply-add where the target has FMA (x86-64-v3 and
//     up) and rounded twice where it has not.
// Now the kernels are compiled without -ffast-math and with -ffp-contract=off, every reduction
// runs over a fixed number of lanes (kLanes) summed in a fixed tree, and exp and log are the
// functions below: plain IEEE adds, multiplies and bit operations, which every x86-64 level rounds
// alike. The compiler still vectorises them (each lane is independent), and a build for any
// -march gives bit-identical float32 results (tests/test_cpu_kernels.py builds x86-64, x86-64-v3
// and native, and compares).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dalle_repro {

constexpr int kLanes = 16;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// e^x for x <= 88 (the kernels call it on x <= 0); 0 below -87.3 (no subnormal results), NaN for
// NaN. Range reduction x = k ln 2 + r with |r| <= ln2 / 2 (ln 2 split in two, so k ln 2 is exact),
// then Cephes' degree-5 polynomial for e^r (about 1 ulp), scaled by 2^k through the exponent bits.
inline float exp_f(float x) {
  const float lo = -87.33654475f, hi = 88.0f;
  const float xc = std::min(std::max(x, lo), hi);  // NaN passes through std::max(NaN, lo)
  const float shifter = 12582912.0f;                // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const int32_t ki = int32_t(float_to_bits(t) - float_to_bits(shifter));
  float r = xc - k * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in 9 bits
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = bits_to_float(uint32_t(ki + 127) << 23);
  return x < lo ? 0.0f : p * scale;
}

// ln x for a positive normal float x (the kernels call it on uniforms in (0, 1) and on sums >= 1).
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), then Cephes' polynomial in m - 1 (about 1 ulp).
inline float log_f(float x) {
  const uint32_t b = float_to_bits(x);
  int32_t e = int32_t((b >> 23) & 0xff) - 126;                // x = 2^e * m, m in [0.5, 1)
  float m = bits_to_float((b & 0x007fffffu) | 0x3f000000u);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = (low ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = float(e);
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + ef * 0.693359375f;
}

// Sum of x[0..n) in a fixed order: lane l adds x[l], x[l + kLanes], ...; then the lanes in a tree.
inline float lane_sum(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  for (int l = 0; j + l < n; ++l) acc[l] += x[j + l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// sum_j a[j] * b[j] in the same fixed order.
inline float lane_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) acc[l] += a[j + l] * b[j + l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// The float64 build of the attention kernel (used by tests and gradient checks) keeps libm's exp
// and plain sums: only float32, what training runs, is promised identical across CPUs.
inline double lane_sum(const double* __restrict x, int64_t n) {
  double acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += x[j];
  return acc;
}

inline double lane_dot(const double* __restrict a, const double* __restrict b, int64_t n) {
  double acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

}  // namespace dalle_repro
