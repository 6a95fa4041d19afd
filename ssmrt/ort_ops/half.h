// IEEE half <-> float conversion for the float16 variants of the ops: their activations arrive and leave as
// float16, and the kernels (kernels.cc) compute in float32, so ops.cc widens each float16 input once and narrows
// each float16 output once, rounding to nearest even as torch's .to(torch.float16) does.
//
// Two paths: F16C (8 values per instruction) where the compiler targets it, and plain integer code everywhere.
// The integer path is the reference the tests hold the F16C one to (SsmrtHalfConvert in ops.cc runs either).
// Neither does float arithmetic, so -ffast-math (kernels.cc) cannot change what they compute.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace ssmrt_half {

inline float to_float_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // infinity, NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: mant * 2^-24, normalised
    uint32_t e = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t from_float_portable(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((x >> 13) & 0x3ffu);  // NaN stays NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (and infinity): rounds to infinity
  if (x >= 0x38800000u) {                        // a normal half (>= 2^-14)
    x += 0xfffu + ((x >> 13) & 1u);              // round to nearest even at the 13 bits dropped
    return sign | static_cast<uint16_t>((x - 0x38000000u) >> 13);  // rebias 127 -> 15
  }
  const uint32_t e = x >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  // a subnormal half in units of 2^-24: the 24-bit significand shifted right, rounded to nearest even
  const uint32_t m = (x & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14 .. 24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may carry into the smallest normal: still right
  return sign | static_cast<uint16_t>(q);
}

inline void to_float(const uint16_t* in, float* out, int64_t n, bool portable = false) {
  int64_t i = 0;
#if defined(__F16C__)
  if (!portable)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < n; ++i) out[i] = to_float_portable(in[i]);
}

inline void from_float(const float* in, uint16_t* out, int64_t n, bool portable = false) {
  int64_t i = 0;
#if defined(__F16C__)
  if (!portable)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = from_float_portable(in[i]);
}

}  // namespace ssmrt_half
