// The kernels declared in kernels.h. Compiled with -ffast-math so that the exp / log loops vectorise (glibc's
// vector math); nothing here tests for infinities or NaNs.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "contract.h"  // generated from ssmrt/ops/spec.py
#include "half.h"

namespace ssmrt_cpu {
namespace {

using ssmrt_contract::kSoftplusThreshold;  // x <= threshold ? log1p(exp(x)) : x

// Written so that loops over them vectorize (glibc's vector expf, and log1pf from glibc 2.35, under -ffast-math).
// log1p, not log(1 + e): where dt is small (Mamba's dt is initialised down to 1e-3) e = exp(x) is too, and 1 + e
// rounds away up to 6e-8 of it, a relative error of 6e-5 in dt that the state sums over every step (measured: the
// scan's float32 state 8x further from float64 than the float32 reference's; with log1p, level with it).
inline float softplus(float x) {
  const float soft = std::log1p(std::exp(std::min(x, kSoftplusThreshold)));
  return x > kSoftplusThreshold ? x : soft;
}
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

#if defined(__AVX__)
// The sum of the eight lanes.
inline float hsum8(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif

// e^x for eight lanes in registers, where the compiler targets AVX2 and FMA: x = k ln2 + r (ln2 in two parts, the
// first with few enough bits that k ln2_hi is exact; |r| <= ln2 / 2), e^r by its Taylor series to r^7 (truncation
// under 1e-8 relative), 2^k put in the exponent bits. Within one ulp of the correctly rounded e^x over [-87, 88]
// (tests/test_ort_ops.py checks it through SelectiveScan); below -87.3 (float32's normal range ends at
// -87.34) 0, where glibc returns values under 1.2e-38; above 88.3, e^88.3; NaN stays NaN (the clamps take x's lane
// when it is NaN). Written out rather than left to the vectoriser's calls into glibc: the Mamba-1 scan needs
// dstate exps a channel a step, and inline they are computed next to their use, with no call and no buffer of
// decays between.
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(lo, x));  // maxps / minps return the second operand on NaN
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f),
                                    _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 5040), r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(two_k)));
}
#endif
inline void exp_in_place(float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// v[i] = post(v[i], e^pre(v[i])) for i < n, the exps through exp_in_place a stretch at a time.
template <typename Pre, typename Post>
inline void with_exp_in_place(float* v, int64_t n, Pre pre, Post post) {
  constexpr int64_t kStretch = 64;
  float e[kStretch];
  for (int64_t i0 = 0; i0 < n; i0 += kStretch) {
    const int64_t m = std::min(kStretch, n - i0);
    for (int64_t i = 0; i < m; ++i) e[i] = pre(v[i0 + i]);
    exp_in_place(e, m);
    for (int64_t i = 0; i < m; ++i) v[i0 + i] = post(v[i0 + i], e[i]);
  }
}
// v[i] = silu(v[i]) and v[i] = softplus(v[i]), as silu() and softplus() above.
inline void silu_in_place(float* v, int64_t n) {
  with_exp_in_place(v, n, [](float x) { return -x; }, [](float x, float e) { return x / (1.0f + e); });
}
inline void softplus_in_place(float* v, int64_t n) {
  with_exp_in_place(v, n, [](float x) { return std::min(x, kSoftplusThreshold); },
                    [](float x, float e) { return x > kSoftplusThreshold ? x : std::log1p(e); });
}

// Splits [0, n) into chunks of at least kMinWork element updates (n * cost_per_item in all) and runs fn(begin,
// end) on each through `exec`. A Mamba-1 decode step's scan (1536 x 16) makes 3 chunks: ONNX Runtime's second
// thread, idle while a custom op runs, takes some; a tiny input stays one chunk on the calling thread.
template <typename F>
void parallel_for(const Executor& exec, int64_t n, int64_t cost_per_item, F fn) {
  constexpr int64_t kMinWork = 8192, kMaxChunks = 64;
  const int64_t chunks = std::max<int64_t>(1, std::min({n, kMaxChunks, n * cost_per_item / kMinWork}));
  if (chunks == 1) {
    fn(int64_t{0}, n);
    return;
  }
  exec.run(chunks, [&](int64_t c) { fn(c * n / chunks, (c + 1) * n / chunks); });
}

// One decode step of CausalConv1d for one sequence: y[c] = bias[c] + w[c] . (state row c, x[c]), and the state row
// shifted left by one with x[c] appended. kK1 is the state's row length (width - 1), or 0 for "k1 at run time".
template <int kK1>
void conv_step(const float* __restrict x, const float* __restrict weight, const float* __restrict bias,
               const float* __restrict s, float* __restrict y, float* __restrict so, int64_t dim, int64_t k1 = kK1) {
  const int64_t K1 = kK1 > 0 ? kK1 : k1, width = K1 + 1;
  for (int64_t c = 0; c < dim; ++c) {
    const float* w = weight + c * width;
    const float* sc = s + c * K1;
    float acc = (bias ? bias[c] : 0.0f) + w[K1] * x[c];
    for (int64_t k = 0; k < K1; ++k) acc += w[k] * sc[k];
    for (int64_t k = 0; k + 1 < K1; ++k) so[c * K1 + k] = sc[k + 1];
    if (K1 > 0) so[c * K1 + K1 - 1] = x[c];
    y[c] = acc;
  }
}

}  // namespace

namespace {

// The buffers a thread keeps for Scratch, each of a power-of-two capacity; freed when the thread ends.
struct ScratchPool {
  static constexpr size_t kMostKept = 16;
  std::vector<std::pair<float*, int64_t>> kept;
  ~ScratchPool() {
    for (auto& k : kept) delete[] k.first;
  }
};
thread_local ScratchPool scratch_pool;

}  // namespace

Scratch::Scratch(int64_t n) : data_(nullptr), capacity_(0) {
  n = std::max<int64_t>(n, 1);
  if (n > kPooledFloats) {
    data_ = new float[static_cast<size_t>(n)];
    return;
  }
  auto& kept = scratch_pool.kept;
  size_t best = kept.size();  // the smallest kept buffer that holds n
  for (size_t i = 0; i < kept.size(); ++i)
    if (kept[i].second >= n && (best == kept.size() || kept[i].second < kept[best].second)) best = i;
  if (best < kept.size()) {
    std::tie(data_, capacity_) = kept[best];
    kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(best));
    return;
  }
  capacity_ = 256;
  while (capacity_ < n) capacity_ *= 2;
  data_ = new float[static_cast<size_t>(capacity_)];
}

int64_t Scratch::kept() { return static_cast<int64_t>(scratch_pool.kept.size()); }

Scratch::~Scratch() {
  if (data_ == nullptr) return;
  auto& kept = scratch_pool.kept;
  if (capacity_ > 0 && kept.size() < ScratchPool::kMostKept)
    kept.emplace_back(data_, capacity_);
  else
    delete[] data_;
}

void causal_conv1d(const Executor& exec, const float* x, const float* weight, const float* bias,
                   const float* conv_state, float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim,
                   int64_t width, bool silu_activation) {
  const int64_t K1 = width - 1;
  if (seqlen == 1) {
    // A decode step: per channel, one dot of the state's row and x with the weight's row, and the row shifted
    // by one. Every read is the row as stored: no window buffer, no transposed copy of the weights. The common
    // widths have their own loop: with the row length a constant the channel loop is straight-line code.
    for (int64_t b = 0; b < batch; ++b) {
      const float* s = conv_state + b * dim * K1;
      float* so = state_out + b * dim * K1;
      float* yb = y + b * dim;
      switch (K1) {
        case 1: conv_step<1>(x + b * dim, weight, bias, s, yb, so, dim); break;
        case 2: conv_step<2>(x + b * dim, weight, bias, s, yb, so, dim); break;
        case 3: conv_step<3>(x + b * dim, weight, bias, s, yb, so, dim); break;
        default: conv_step<0>(x + b * dim, weight, bias, s, yb, so, dim, K1); break;
      }
      if (silu_activation) silu_in_place(yb, dim);
    }
    return;
  }
  std::vector<float> wt(width * dim);  // (width, dim): the channel loop reads it contiguously
  for (int64_t c = 0; c < dim; ++c)
    for (int64_t k = 0; k < width; ++k) wt[k * dim + c] = weight[c * width + k];
  for (int64_t b = 0; b < batch; ++b) {
    // hist (K1 + seqlen, dim): the carried inputs, then x
    std::vector<float> hist((K1 + seqlen) * dim);
    const float* s = conv_state + b * dim * K1;
    for (int64_t c = 0; c < dim; ++c)
      for (int64_t j = 0; j < K1; ++j) hist[j * dim + c] = s[c * K1 + j];
    std::copy(x + b * seqlen * dim, x + (b + 1) * seqlen * dim, hist.begin() + K1 * dim);
    float* yb = y + b * seqlen * dim;
    parallel_for(exec, seqlen, dim * width, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* yt = yb + t * dim;
        for (int64_t c = 0; c < dim; ++c) yt[c] = bias ? bias[c] : 0.0f;
        for (int64_t k = 0; k < width; ++k) {
          const float* h = hist.data() + (t + k) * dim;
          const float* w = wt.data() + k * dim;
          for (int64_t c = 0; c < dim; ++c) yt[c] += w[c] * h[c];
        }
        if (silu_activation) silu_in_place(yt, dim);
      }
    });
    float* so = state_out + b * dim * K1;
    for (int64_t c = 0; c < dim; ++c)
      for (int64_t j = 0; j < K1; ++j) so[c * K1 + j] = hist[(seqlen + j) * dim + c];
  }
}

namespace {

// One channel's state row over one step: h[n] = exp(dt a[n]) h0[n] + dtx B[n], returning the sum over n of h[n] C[n].
// h may be h0 (each value is read before it is written). The decays are computed in registers next to their use,
// eight lanes at a time where the compiler targets AVX2 and FMA.
inline float scan_row(const float* a, const float* B, const float* C, const float* h0, float* h, int64_t N, float dt,
                      float dtx) {
  float sum = 0.0f;
  int64_t n = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 dv = _mm256_set1_ps(dt), xv = _mm256_set1_ps(dtx);
  __m256 sv = _mm256_setzero_ps();
  for (; n + 8 <= N; n += 8) {
    const __m256 decay = exp8(_mm256_mul_ps(dv, _mm256_loadu_ps(a + n)));
    const __m256 v = _mm256_fmadd_ps(decay, _mm256_loadu_ps(h0 + n), _mm256_mul_ps(xv, _mm256_loadu_ps(B + n)));
    _mm256_storeu_ps(h + n, v);
    sv = _mm256_fmadd_ps(v, _mm256_loadu_ps(C + n), sv);
  }
  sum = hsum8(sv);
#endif
  for (; n < N; ++n) {
    const float v = std::exp(dt * a[n]) * h0[n] + dtx * B[n];
    h[n] = v;
    sum += v * C[n];
  }
  return sum;
}

// A decode step of SelectiveScan: each channel's state row is read from the input, updated and written to the
// output in one pass (the general loop copies a block's rows in and out again), its decays exp(dt A) computed in
// registers next to their use. dt, its softplus and the gate run over kBlock channels at a time as vector loops.
void selective_step(const Executor& exec, const float* u, const float* delta, const float* A, const float* B,
                    const float* C, const float* D, const float* z, const float* delta_bias, const float* ssm_state,
                    float* y, float* state_out, int64_t batch, int64_t dim, int64_t N, int64_t ngroups,
                    bool delta_softplus) {
  const int64_t per_group = dim / ngroups;
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (dim + kBlock - 1) / kBlock;
  parallel_for(exec, batch * blocks, kBlock * N, [&](int64_t i0, int64_t i1) {
    float dt[kBlock], acc[kBlock], gate[kBlock];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, d0 = (i % blocks) * kBlock, nb = std::min(dim, d0 + kBlock) - d0;
      const int64_t row = b * dim + d0;
      for (int64_t j = 0; j < nb; ++j) dt[j] = delta[row + j] + (delta_bias ? delta_bias[d0 + j] : 0.0f);
      if (delta_softplus) softplus_in_place(dt, nb);
      int64_t g = d0 / per_group, next_group = (g + 1) * per_group;  // no division a channel
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t d = d0 + j;
        if (d == next_group) ++g, next_group += per_group;
        const float* Bt = B + (b * ngroups + g) * N;
        const float* Ct = C + (b * ngroups + g) * N;
        const float x = u[row + j];
        const float sum = scan_row(A + d * N, Bt, Ct, ssm_state + (row + j) * N, state_out + (row + j) * N, N, dt[j],
                                   dt[j] * x);
        acc[j] = sum + (D ? D[d] * x : 0.0f);
      }
      if (z) {
        std::copy(z + row, z + row + nb, gate);
        silu_in_place(gate, nb);
        for (int64_t j = 0; j < nb; ++j) acc[j] *= gate[j];
      }
      std::copy(acc, acc + nb, y + row);
    }
  });
}

}  // namespace

void selective_scan(const Executor& exec, const float* u, const float* delta, const float* A, const float* B,
                    const float* C, const float* D, const float* z, const float* delta_bias, const float* ssm_state,
                    float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate,
                    int64_t ngroups, bool delta_softplus) {
  const int64_t per_group = dim / ngroups;
  const int64_t N = dstate;
  if (seqlen == 1) {
    selective_step(exec, u, delta, A, B, C, D, z, delta_bias, ssm_state, y, state_out, batch, dim, N, ngroups,
                   delta_softplus);
    return;
  }
  // Channels in blocks of kBlock: a block's states stay in L1 while it walks the sequence. Its inputs of a step are
  // one short stretch of each of u, delta and z, a row (dim) apart from the previous step's: too far apart for the
  // hardware prefetchers, so they are asked for kAhead steps ahead.
  constexpr int64_t kBlock = 16;
  [[maybe_unused]] constexpr int64_t kAhead = 8;
  const int64_t blocks = (dim + kBlock - 1) / kBlock;
  parallel_for(exec, batch * blocks, seqlen * kBlock * N, [&](int64_t i0, int64_t i1) {
    std::vector<float> hs(kBlock * N);
    float dt[kBlock], x[kBlock], acc[kBlock], gate[kBlock];
    int64_t group[kBlock];  // the offset of each channel's group in a step's B and C
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, d0 = (i % blocks) * kBlock, nb = std::min(dim, d0 + kBlock) - d0;
      for (int64_t j = 0; j < nb; ++j) group[j] = (d0 + j) / per_group * N;
      std::copy(ssm_state + (b * dim + d0) * N, ssm_state + (b * dim + d0 + nb) * N, hs.begin());
      const float* a = A + d0 * N;
      for (int64_t t = 0; t < seqlen; ++t) {
        const int64_t row = (b * seqlen + t) * dim + d0;
        const float* Bs = B + (b * seqlen + t) * ngroups * N;
        const float* Cs = C + (b * seqlen + t) * ngroups * N;
#if defined(__AVX__)
        if (t + kAhead < seqlen)
          for (const float* next : {u, delta, z ? z : u})
            _mm_prefetch(reinterpret_cast<const char*>(next + row + kAhead * dim), _MM_HINT_T0);
#endif
        // 1. dt = softplus(delta + delta_bias) for the block's channels
        for (int64_t j = 0; j < nb; ++j) dt[j] = delta[row + j] + (delta_bias ? delta_bias[d0 + j] : 0.0f);
        if (delta_softplus) softplus_in_place(dt, nb);
        // 2. h = exp(dt A) h + dt u B; y = <h, C>
        for (int64_t j = 0; j < nb; ++j) {
          x[j] = u[row + j];
          float* hj = hs.data() + j * N;
          acc[j] = scan_row(a + j * N, Bs + group[j], Cs + group[j], hj, hj, N, dt[j], dt[j] * x[j]);
        }
        // 3. skip and gate
        if (D)
          for (int64_t j = 0; j < nb; ++j) acc[j] += D[d0 + j] * x[j];
        if (z) {
          std::copy(z + row, z + row + nb, gate);
          silu_in_place(gate, nb);
          for (int64_t j = 0; j < nb; ++j) acc[j] *= gate[j];
        }
        std::copy(acc, acc + nb, y + row);
      }
      std::copy(hs.begin(), hs.begin() + nb * N, state_out + (b * dim + d0) * N);
    }
  });
}

namespace {

// One row of a decode step: row[n] = decay * row0[n] + xdt * B[n], returning sum over n of row[n] * C[n]. Where
// the compiler targets AVX and FMA the row is eight lanes at a time, the new values written with streaming stores
// when `stream` (row 32-byte aligned, N a multiple of eight): nothing reads the new state again before the next
// step, 24 layers of state and all the weights later, and a streaming store does not first read the line it
// writes, as an ordinary store does (a third of what the row costs in memory traffic). A state read back from the
// cache soon after would lose by it, which is why benchmarks/cpu_kernels.py cycles through more states than a
// last-level cache holds. Streamed or not, the sums are the same (not bit for bit those of the general loop that a
// prompt runs, whose sums run in another order).
inline float ssd_row(const float* __restrict row0, const float* __restrict B, const float* __restrict C,
                     float* __restrict row, int64_t N, float decay, float xdt, bool stream) {
  int64_t n = 0;
  float acc = 0.0f;
#if defined(__AVX__) && defined(__FMA__)
  const __m256 dv = _mm256_set1_ps(decay), xv = _mm256_set1_ps(xdt);
  __m256 sum = _mm256_setzero_ps();
  for (; n + 8 <= N; n += 8) {
    const __m256 v = _mm256_fmadd_ps(dv, _mm256_loadu_ps(row0 + n), _mm256_mul_ps(xv, _mm256_loadu_ps(B + n)));
    if (stream)
      _mm256_stream_ps(row + n, v);
    else
      _mm256_storeu_ps(row + n, v);
    sum = _mm256_fmadd_ps(v, _mm256_loadu_ps(C + n), sum);
  }
  acc = hsum8(sum);
#else
  (void)stream;
#endif
  for (; n < N; ++n) {
    const float v = decay * row0[n] + xdt * B[n];
    row[n] = v;
    acc += v * C[n];
  }
  return acc;
}

// A decode step of SSDScan: each row of the state is read from the input once, updated and written to the output
// once (the general loop copies the state first, then updates the copy: a second pass over the largest thing a
// step touches, 786 KB a layer in a 130M Mamba-2).
void ssd_step(const Executor& exec, const float* x, const float* dt_in, const float* A, const float* B, const float* C,
              const float* D, bool d_per_channel, const float* dt_bias, const float* ssm_state, float* y,
              float* state_out, int64_t batch, int64_t nheads, int64_t P, int64_t N, int64_t ngroups,
              bool dt_softplus, bool dt_clamp, float dt_min, float dt_max) {
  const int64_t per_group = nheads / ngroups;
  // Streaming stores for a state of a quarter MB or more (a 130M Mamba-2's layer: 0.79 MB); a small model's
  // states and weights may all stay in the cache from one step to the next.
  constexpr int64_t kStreamBytes = int64_t{1} << 18;
  const bool big = batch * nheads * P * N * int64_t{sizeof(float)} >= kStreamBytes;
  parallel_for(exec, batch * nheads, P * N, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nheads, hd = i % nheads, g = hd / per_group;
      float dt = dt_in[i] + (dt_bias ? dt_bias[hd] : 0.0f);
      if (dt_softplus) dt = softplus(dt);
      if (dt_clamp) dt = std::min(std::max(dt, dt_min), dt_max);
      const float decay = std::exp(dt * A[hd]);
      const float* Bt = B + (b * ngroups + g) * N;
      const float* Ct = C + (b * ngroups + g) * N;
      const float* xt = x + i * P;
      float* yt = y + i * P;
      const float* h0 = ssm_state + i * P * N;
      float* h = state_out + i * P * N;
      const bool stream = big && reinterpret_cast<uintptr_t>(h) % 32 == 0 && N % 8 == 0;
      for (int64_t p = 0; p < P; ++p) {
        const float acc = ssd_row(h0 + p * N, Bt, Ct, h + p * N, N, decay, xt[p] * dt, stream);
        const float skip = D ? (d_per_channel ? D[hd * P + p] : D[hd]) : 0.0f;
        yt[p] = acc + skip * xt[p];
      }
    }
#if defined(__AVX__) && defined(__FMA__)
    if (big) _mm_sfence();  // the streamed rows in memory before the pool reports this piece done
#endif
  });
}

}  // namespace

void ssd_scan(const Executor& exec, const float* x, const float* dt_in, const float* A, const float* B,
              const float* C, const float* D, bool d_per_channel, const float* dt_bias, const float* ssm_state,
              float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim,
              int64_t dstate, int64_t ngroups, bool dt_softplus, bool dt_clamp, float dt_min, float dt_max) {
  const int64_t P = headdim, N = dstate, per_group = nheads / ngroups;
  if (seqlen == 1) {
    ssd_step(exec, x, dt_in, A, B, C, D, d_per_channel, dt_bias, ssm_state, y, state_out, batch, nheads, headdim,
             dstate, ngroups, dt_softplus, dt_clamp, dt_min, dt_max);
    return;
  }
  // One (batch, head) at a time: its (headdim, dstate) state, updated in place in the output, stays in L1 / L2
  // while it walks the sequence.
  parallel_for(exec, batch * nheads, seqlen * P * N, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nheads, hd = i % nheads, g = hd / per_group;
      float* h = state_out + i * P * N;
      std::copy(ssm_state + i * P * N, ssm_state + (i + 1) * P * N, h);
      for (int64_t t = 0; t < seqlen; ++t) {
        float dt = dt_in[(b * seqlen + t) * nheads + hd] + (dt_bias ? dt_bias[hd] : 0.0f);
        if (dt_softplus) dt = softplus(dt);
        if (dt_clamp) dt = std::min(std::max(dt, dt_min), dt_max);
        const float decay = std::exp(dt * A[hd]);
        const float* Bt = B + ((b * seqlen + t) * ngroups + g) * N;
        const float* Ct = C + ((b * seqlen + t) * ngroups + g) * N;
        const float* xt = x + ((b * seqlen + t) * nheads + hd) * P;
        float* yt = y + ((b * seqlen + t) * nheads + hd) * P;
        for (int64_t p = 0; p < P; ++p) {
          const float xdt = xt[p] * dt;
          float* row = h + p * N;
          float acc = 0.0f;
          for (int64_t n = 0; n < N; ++n) {
            row[n] = decay * row[n] + xdt * Bt[n];
            acc += row[n] * Ct[n];
          }
          const float skip = D ? (d_per_channel ? D[hd * P + p] : D[hd]) : 0.0f;
          yt[p] = acc + skip * xt[p];
        }
      }
    }
  });
}

namespace {

// Rows of b a decode step's sweep asks for ahead of the ones it reads: with short rows (out_proj's 768 columns are
// 1.5 KB) a group of rows is too short a stretch for the hardware prefetchers to ramp up on before the next starts.
constexpr int64_t kPrefetchRows = 8;
// Where the weights' prefetches ask for their lines: into L2, not L1 (T0). A weight is read once, so L1 gains
// nothing by holding it early, and (the likely reason for what was measured, on an AMD EPYC) a prefetch into L1
// holds one of the core's few L1 miss buffers until its line arrives from memory, the same buffers the sweep's own
// loads wait on, where L2 tracks many more misses at once. In a C++ harness on a 2-vCPU AMD EPYC (24 layers'
// in_proj and out_proj, two threads) the sweep streamed ~1.3x the bytes a second with T1 than with T0, and the
// transposed head's 1.25-1.6x; a processor that treats T1 as T0 loses nothing.
#if defined(__AVX__)
constexpr auto kWeightPrefetch = _MM_HINT_T1;
#endif

// acc[r][0, w) += sum over the kk rows b[k + i] (each at b + i * N) of a[r][k + i] * b[k + i][0, w), r < rows (with
// kFirst, acc[r][0, w) = that sum: acc need not be zeroed first); the float16 weights converted in registers where
// the compiler targets F16C and FMA.
template <int kk, bool kFirst = false>
inline void half_axpy_rows(const uint16_t* b, int64_t N, const float* a, int64_t K, int64_t rows, float* acc,
                           int64_t acc_stride, int64_t w) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__FMA__)
  if ((kk == 4 || kk == 8) && rows == 1) {
    // A decode step's case: the kk weights of a column in registers, their products summed as a tree (no chain
    // of kk dependent FMAs per vector), four vectors per iteration; each partial sum is loaded and stored once per
    // kk rows of b.
    __m256 av[kk];
    for (int i = 0; i < kk; ++i) av[i] = _mm256_broadcast_ss(a + i);
    auto rows_kk = [&](int64_t c) {
      __m256 s[kk / 2];
      for (int i = 0; i < kk / 2; ++i) {
        const __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 * i * N + c)));
        const __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (2 * i + 1) * N + c)));
        s[i] = _mm256_fmadd_ps(av[2 * i + 1], b1, _mm256_mul_ps(av[2 * i], b0));
      }
      for (int width = kk / 2; width > 1; width /= 2)
        for (int i = 0; i < width / 2; ++i) s[i] = _mm256_add_ps(s[2 * i], s[2 * i + 1]);
      _mm256_storeu_ps(acc + c, kFirst ? s[0] : _mm256_add_ps(_mm256_loadu_ps(acc + c), s[0]));
    };
    for (; j + 32 <= w; j += 32) {  // 64 bytes of each row: one prefetch a row
      for (int i = 0; i < kk; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(b + (kPrefetchRows + i) * N + j), kWeightPrefetch);
      rows_kk(j);
      rows_kk(j + 8);
      rows_kk(j + 16);
      rows_kk(j + 24);
    }
    for (; j + 8 <= w; j += 8) rows_kk(j);
  }
  for (; j + 8 <= w; j += 8) {
    __m256 bv[kk];
    for (int i = 0; i < kk; ++i)
      bv[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i * N + j)));
    for (int64_t r = 0; r < rows; ++r) {
      float* ar = acc + r * acc_stride + j;
      __m256 sum = kFirst ? _mm256_setzero_ps() : _mm256_loadu_ps(ar);
      for (int i = 0; i < kk; ++i) sum = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r * K + i), bv[i], sum);
      _mm256_storeu_ps(ar, sum);
    }
  }
#endif
  for (; j < w; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      float sum = kFirst ? 0.0f : acc[r * acc_stride + j];
      for (int i = 0; i < kk; ++i) sum += a[r * K + i] * ssmrt_half::to_float_portable(b[i * N + j]);
      acc[r * acc_stride + j] = sum;
    }
}

}  // namespace

namespace {

// The rows of b cut into `blocks` fixed blocks of whole groups of four (the last takes the remainder), the blocks
// into `regions` runs of consecutive blocks, one per task. A task sweeps its own run front to back, then takes
// blocks from the back of the others' runs until none is left: a task that starts late (a pool thread still waking)
// finds part of its run done, not the others waiting on it. Each block is claimed once, by a compare-and-swap on
// its run's word: the next block from the front in the low 32 bits, one past the last from the back in the high.
class BlockRuns {
 public:
  BlockRuns(int64_t blocks, int64_t regions) : regions_(regions), runs_(regions) {
    for (int64_t r = 0; r < regions; ++r)
      runs_[r].store((uint64_t(blocks * (r + 1) / regions) << 32) | uint64_t(blocks * r / regions));
  }
  // The next block of run r from its front (owner) or its back (anyone else); -1 once the run is used up.
  int64_t claim(int64_t r, bool front) {
    uint64_t w = runs_[r].load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = w & 0xffffffffu, b = w >> 32;
      if (f >= b) return -1;
      const uint64_t next = front ? ((b << 32) | (f + 1)) : (((b - 1) << 32) | f);
      if (runs_[r].compare_exchange_weak(w, next, std::memory_order_relaxed)) return int64_t(front ? f : b - 1);
    }
  }
  template <typename F>
  void task(int64_t r, F sweep) {
    for (int64_t blk; (blk = claim(r, true)) >= 0;) sweep(blk);
    for (int64_t d = 1; d < regions_; ++d)
      for (int64_t blk; (blk = claim((r + d) % regions_, false)) >= 0;) sweep(blk);
  }

 private:
  int64_t regions_;
  std::vector<std::atomic<uint64_t>> runs_;
};

}  // namespace

void half_matmul(const Executor& exec, const uint16_t* a, const uint16_t* b, uint16_t* y, int64_t M, int64_t K,
                 int64_t N, int64_t threads) {
  // b is (K, N) row-major, so a run of whole rows is one contiguous stretch of memory: the sweep is split over K,
  // not N (column blocks would start a new page on every row), into fixed blocks of rows, each swept front to back,
  // four rows at a time, into its own float32 partial sums of every column, loaded and stored once per four rows;
  // the blocks' partials are then added in block order, so the result does not depend on which thread swept which
  // block. Each thread sweeps one run of consecutive blocks (BlockRuns), one sequential stretch that the hardware
  // prefetchers stream at full bandwidth; blocks dealt out one at a time would leave each thread a series of short
  // stretches. Eight blocks at most, or one a thread in a larger pool (up to 32): the blocks, the order their
  // partials are added and so the result are the same for every pool of up to eight threads. Up to kRows rows of a
  // share each converted weight; more rows sweep b again.
  constexpr int64_t kRows = 4, kBlockWork = int64_t{1} << 17, kInlineSum = int64_t{1} << 16;
  const int64_t most_blocks = std::min<int64_t>(32, std::max<int64_t>(8, threads));
  Scratch af(M * K);
  ssmrt_half::to_float(a, af.data(), M * K);
  const int64_t groups = std::max<int64_t>(1, K / 4);
  const int64_t blocks = std::max<int64_t>(1, std::min({most_blocks, groups, K * N / kBlockWork}));
  // threads unknown: a run per block, the pool dealing them out
  const int64_t regions = threads > 0 ? std::min(threads, blocks) : blocks;
  // The partials live in a buffer kept by the calling thread from call to call: a fresh one of a few MB each call
  // would be mapped, faulted in and zeroed anew.
  thread_local std::vector<float> kept_partials;
  if (kept_partials.size() < static_cast<size_t>(blocks * kRows * N)) kept_partials.resize(blocks * kRows * N);
  float* const partial = kept_partials.data();  // the blocks run on other threads: they take this pointer
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    const float* am = af.data() + m0 * K;
    auto sweep = [&](int64_t blk) {
      const int64_t k0 = 4 * (groups * blk / blocks), k1 = blk + 1 == blocks ? K : 4 * (groups * (blk + 1) / blocks);
      float* acc = partial + blk * kRows * N;
      int64_t k = k0;
      if (k + 4 <= k1) {  // the block's first rows write its partials: no pass to zero them first
        half_axpy_rows<4, true>(b + k * N, N, am + k, K, rows, acc, N, N);
        k += 4;
      } else {
        std::fill(acc, acc + rows * N, 0.0f);
      }
      for (; k + 4 <= k1; k += 4) half_axpy_rows<4>(b + k * N, N, am + k, K, rows, acc, N, N);
      for (; k < k1; ++k) half_axpy_rows<1>(b + k * N, N, am + k, K, rows, acc, N, N);
    };
    BlockRuns runs(blocks, regions);
    exec.run(regions, [&](int64_t r) { runs.task(r, sweep); });
    auto add = [&](int64_t i0, int64_t i1) {
      Scratch sum(i1 - i0);
      float* s = sum.data();
      std::copy(partial + i0, partial + i1, s);
      for (int64_t blk = 1; blk < blocks; ++blk) {
        const float* part = partial + blk * kRows * N;
        for (int64_t i = i0; i < i1; ++i) s[i - i0] += part[i];
      }
      // i runs over (row, column) of this group of rows, which are consecutive rows of y
      ssmrt_half::from_float(s, y + m0 * N + i0, i1 - i0);
    };
    // a few partials are added here: handing them to the pool would wake its threads once more for little work
    if (rows * N * blocks <= kInlineSum)
      add(0, rows * N);
    else
      parallel_for(exec, rows * N, blocks, add);
  }
}

namespace {

// out[r * out_stride + c] = dot(a[r], bt[c]) over K, r < R, c < C: C rows of bt (consecutive columns of the
// product, one contiguous stretch of memory) against R rows of a, R * C independent float32 sums of eight lanes
// each, the float16 weights converted in registers where the compiler targets F16C and FMA. Each weight is read
// once for all R rows. C interleaved sweeps are more than the hardware prefetchers follow at full speed from memory,
// so each step also asks for the bytes kPrefetchAhead further on (a prefetch past the end of b never faults).
constexpr int64_t kPrefetchAhead = int64_t{1} << 16;
template <int R, int C>
inline void half_dots(const float* a, int64_t K, const uint16_t* bt, float* out, int64_t out_stride) {
  int64_t k = 0;
  float sum[R][C] = {};
#if defined(__F16C__) && defined(__FMA__)
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    for (int line = 0; line < C * 16; line += 64)  // as many bytes as this step reads
      _mm_prefetch(reinterpret_cast<const char*>(bt + k * C) + kPrefetchAhead + line, kWeightPrefetch);
    __m256 av[R];
    for (int r = 0; r < R; ++r) av[r] = _mm256_loadu_ps(a + r * K + k);
    for (int c = 0; c < C; ++c) {
      const __m256 bv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bt + c * K + k)));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(av[r], bv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sum[r][c] = hsum8(acc[r][c]);
#endif
  for (; k < K; ++k)
    for (int c = 0; c < C; ++c) {
      const float w = ssmrt_half::to_float_portable(bt[c * K + k]);
      for (int r = 0; r < R; ++r) sum[r][c] += a[r * K + k] * w;
    }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * out_stride + c] = sum[r][c];
}

// Columns [n0, n1) of R rows of the product: C columns at a time (R * C sums fill the vector registers without
// spilling), the last few one at a time.
template <int R, int C>
void half_dots_range(const float* a, int64_t K, const uint16_t* bt, int64_t n0, int64_t n1, float* out,
                     int64_t out_stride) {
  int64_t n = n0;
  for (; n + C <= n1; n += C) half_dots<R, C>(a, K, bt + n * K, out + (n - n0), out_stride);
  for (; n < n1; ++n) half_dots<R, 1>(a, K, bt + n * K, out + (n - n0), out_stride);
}

}  // namespace

void half_matmul_nt(const Executor& exec, const uint16_t* a, const uint16_t* bt, uint16_t* y, int64_t M, int64_t K,
                    int64_t N) {
  // bt is (N, K): column n of the product is a dot of a's rows with row n of bt, and consecutive n read consecutive
  // rows, one sequential sweep of bt per range of columns. The sums are fused with the conversion: no float32 copy
  // of a row of bt is written and read back.
  constexpr int64_t kRows = 4;
  Scratch af(M * K);
  ssmrt_half::to_float(a, af.data(), M * K);
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    const float* am = af.data() + m0 * K;
    parallel_for(exec, N, rows * K, [&](int64_t n0, int64_t n1) {
      const int64_t w = n1 - n0;
      Scratch out(rows * w);
      switch (rows) {
        case 1: half_dots_range<1, 8>(am, K, bt, n0, n1, out.data(), w); break;
        case 2: half_dots_range<2, 4>(am, K, bt, n0, n1, out.data(), w); break;
        case 3: half_dots_range<3, 2>(am, K, bt, n0, n1, out.data(), w); break;
        default: half_dots_range<4, 2>(am, K, bt, n0, n1, out.data(), w); break;
      }
      for (int64_t r = 0; r < rows; ++r) ssmrt_half::from_float(out.data() + r * w, y + (m0 + r) * N + n0, w);
    });
  }
}

}  // namespace ssmrt_cpu

// ------------------------------------------------------------------------------------------------ SSDMixer

namespace ssmrt_cpu {
namespace {

// A float buffer left uninitialised (every element is written before it is read): a prompt's buffers are MBs,
// and zeroing them first would be another pass over memory.
using Buffer = Scratch;
Buffer buffer(int64_t n) { return Scratch(n); }

// Columns [begin, begin + width) of a (rows, row_len) matrix, as a contiguous (rows, width) one.
Buffer columns(const Executor& exec, const float* m, int64_t rows, int64_t row_len, int64_t begin, int64_t width) {
  Buffer out = buffer(rows * width);
  float* o = out.get();
  parallel_for(exec, rows, width, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::copy(m + r * row_len + begin, m + r * row_len + begin + width, o + r * width);
  });
  return out;
}

// out = h / sqrt(mean(h^2) + eps) * w over one row of n.
void rmsnorm_row(const float* __restrict h, const float* __restrict w, float* __restrict out, int64_t n, float eps) {
  float sum = 0.0f;
  for (int64_t c = 0; c < n; ++c) sum += h[c] * h[c];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t c = 0; c < n; ++c) out[c] = h[c] * scale * w[c];
}

// out[i] = the value a float16 tensor would have held for v[i] (out may be v), a stretch at a time through a
// buffer on the stack.
void round_to_half(const float* v, float* out, int64_t n) {
  constexpr int64_t kStretch = 512;
  uint16_t h[kStretch];
  for (int64_t i0 = 0; i0 < n; i0 += kStretch) {
    const int64_t m = std::min(kStretch, n - i0);
    ssmrt_half::from_float(v + i0, h, m);
    ssmrt_half::to_float(h, out + i0, m);
  }
}
void round_to_half(float* v, int64_t n) { round_to_half(v, v, n); }

}  // namespace

void ssd_mixer(const Executor& exec, const float* zxbcdt, const float* conv_weight, const float* conv_bias,
               const float* conv_state, const float* A, const float* D, bool d_per_channel, const float* dt_bias,
               const float* ssm_state, const float* norm_weight, float* y, float* conv_state_out,
               float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim, int64_t dstate,
               int64_t ngroups, int64_t width, bool dt_softplus, bool dt_clamp, float dt_min, float dt_max,
               float eps, bool round_half) {
  const int64_t rows = batch * seqlen, d_ssm = nheads * headdim, gn = ngroups * dstate;
  const int64_t conv_dim = d_ssm + 2 * gn, row_len = d_ssm + conv_dim + nheads;
  Buffer xbc = columns(exec, zxbcdt, rows, row_len, d_ssm, conv_dim);
  Buffer dt = columns(exec, zxbcdt, rows, row_len, d_ssm + conv_dim, nheads);
  Buffer conv_y = buffer(rows * conv_dim);
  causal_conv1d(exec, xbc.get(), conv_weight, conv_bias, conv_state, conv_y.get(), conv_state_out, batch, seqlen,
                conv_dim, width, true);
  if (round_half) round_to_half(conv_y.get(), rows * conv_dim);
  Buffer x = columns(exec, conv_y.get(), rows, conv_dim, 0, d_ssm);
  Buffer B = columns(exec, conv_y.get(), rows, conv_dim, d_ssm, gn);
  Buffer C = columns(exec, conv_y.get(), rows, conv_dim, d_ssm + gn, gn);
  Buffer scan_y = buffer(rows * d_ssm);
  ssd_scan(exec, x.get(), dt.get(), A, B.get(), C.get(), D, d_per_channel, dt_bias, ssm_state, scan_y.get(),
           ssm_state_out, batch, seqlen, nheads, headdim, dstate, ngroups, dt_softplus, dt_clamp, dt_min, dt_max);
  if (round_half) round_to_half(scan_y.get(), rows * d_ssm);
  // The gate and the norm, a row at a time: h = y silu(z), y = h / sqrt(mean(h^2) + eps) w.
  parallel_for(exec, rows, 4 * d_ssm, [&](int64_t r0, int64_t r1) {
    Scratch h(d_ssm);
    for (int64_t r = r0; r < r1; ++r) {
      const float* z = zxbcdt + r * row_len;
      const float* s = scan_y.get() + r * d_ssm;
      for (int64_t c = 0; c < d_ssm; ++c) h.data()[c] = s[c] * silu(z[c]);
      rmsnorm_row(h.data(), norm_weight, y + r * d_ssm, d_ssm, eps);
    }
  });
}

void add_rmsnorm(const Executor& exec, const float* x, const float* residual, const float* weight, float* y,
                 float* residual_out, int64_t rows, int64_t dim, float eps, bool round_half) {
  parallel_for(exec, rows, 4 * dim, [&](int64_t r0, int64_t r1) {
    Scratch t(round_half ? dim : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * dim;
      float* sum = residual_out + r * dim;
      if (residual != nullptr) {
        const float* rr = residual + r * dim;
        for (int64_t c = 0; c < dim; ++c) sum[c] = xr[c] + rr[c];
      } else {
        std::copy(xr, xr + dim, sum);
      }
      const float* h = sum;
      if (round_half) {
        round_to_half(sum, t.data(), dim);
        h = t.data();
      }
      rmsnorm_row(h, weight, y + r * dim, dim, eps);
    }
  });
}

void ssd_block(const Executor& exec, const uint16_t* hidden, const uint16_t* in_proj, const float* conv_weight,
               const float* conv_bias, const float* conv_state, const float* A, const float* D, bool d_per_channel,
               const float* dt_bias, const float* ssm_state, const float* norm_weight, const uint16_t* out_proj,
               const float* residual, const float* next_norm_weight, float* y, float* residual_out,
               float* conv_state_out, float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t d_model,
               int64_t nheads, int64_t headdim, int64_t dstate, int64_t ngroups, int64_t width, bool dt_softplus,
               bool dt_clamp, float dt_min, float dt_max, float eps, float norm_eps, bool round_half_norm,
               int64_t threads) {
  const int64_t rows = batch * seqlen, d_ssm = nheads * headdim;
  const int64_t in_len = 2 * d_ssm + 2 * ngroups * dstate + nheads;
  std::vector<uint16_t> zx16(static_cast<size_t>(rows * in_len)), m16(static_cast<size_t>(rows * d_ssm)),
      o16(static_cast<size_t>(rows * d_model));
  half_matmul(exec, hidden, in_proj, zx16.data(), rows, d_model, in_len, threads);
  Buffer zx = buffer(rows * in_len), m = buffer(rows * d_ssm);
  ssmrt_half::to_float(zx16.data(), zx.get(), rows * in_len);
  ssd_mixer(exec, zx.get(), conv_weight, conv_bias, conv_state, A, D, d_per_channel, dt_bias, ssm_state, norm_weight,
            m.get(), conv_state_out, ssm_state_out, batch, seqlen, nheads, headdim, dstate, ngroups, width,
            dt_softplus, dt_clamp, dt_min, dt_max, eps, true);
  ssmrt_half::from_float(m.get(), m16.data(), rows * d_ssm);
  half_matmul(exec, m16.data(), out_proj, o16.data(), rows, d_ssm, d_model, threads);
  Buffer o = buffer(rows * d_model);
  ssmrt_half::to_float(o16.data(), o.get(), rows * d_model);
  add_rmsnorm(exec, o.get(), residual, next_norm_weight, y, residual_out, rows, d_model, norm_eps, round_half_norm);
}

}  // namespace ssmrt_cpu

// ------------------------------------------------------------------------------------------ SelectiveMixer

namespace ssmrt_cpu {

void selective_mixer(const Executor& exec, const float* xz, const float* conv_weight, const float* conv_bias,
                     const float* conv_state, const uint16_t* x_proj, const uint16_t* dt_proj, const float* A,
                     const float* D, const float* dt_bias, const float* ssm_state, float* y, float* conv_state_out,
                     float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t dim, int64_t dt_rank,
                     int64_t dstate, int64_t width, bool delta_softplus, int64_t threads) {
  const int64_t rows = batch * seqlen, R = dt_rank, N = dstate, dbc_len = R + 2 * N;
  Buffer x = columns(exec, xz, rows, 2 * dim, 0, dim);
  Buffer z = columns(exec, xz, rows, 2 * dim, dim, dim);
  Buffer u = buffer(rows * dim);
  causal_conv1d(exec, x.get(), conv_weight, conv_bias, conv_state, u.get(), conv_state_out, batch, seqlen, dim,
                width, true);
  // u as the float16 graph holds it, in both forms: the products read it as float16, the scan widened
  std::vector<uint16_t> u16(static_cast<size_t>(rows * dim));
  ssmrt_half::from_float(u.get(), u16.data(), rows * dim);
  ssmrt_half::to_float(u16.data(), u.get(), rows * dim);
  std::vector<uint16_t> dbc(static_cast<size_t>(rows * dbc_len)), dt_low(static_cast<size_t>(rows * R)),
      dt16(static_cast<size_t>(rows * dim));
  half_matmul(exec, u16.data(), x_proj, dbc.data(), rows, dim, dbc_len, threads);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(dbc.data() + r * dbc_len, R, dt_low.data() + r * R);
  half_matmul(exec, dt_low.data(), dt_proj, dt16.data(), rows, R, dim, threads);
  Buffer delta = buffer(rows * dim), B = buffer(rows * N), C = buffer(rows * N);
  ssmrt_half::to_float(dt16.data(), delta.get(), rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    ssmrt_half::to_float(dbc.data() + r * dbc_len + R, B.get() + r * N, N);
    ssmrt_half::to_float(dbc.data() + r * dbc_len + R + N, C.get() + r * N, N);
  }
  selective_scan(exec, u.get(), delta.get(), A, B.get(), C.get(), D, z.get(), dt_bias, ssm_state, y, ssm_state_out,
                 batch, seqlen, dim, N, 1, delta_softplus);
}

// ------------------------------------------------------------------------------------------ Int8MatMul

namespace {

// Bytes of a weight's codes the sweep asks for ahead of the block it reads (into L2, as HalfMatMul's weights).
// Each thread sweeps a contiguous run of columns, one stream the hardware prefetchers follow too; asking ahead
// keeps more of the stream in flight while the block's conversions run.
constexpr int64_t kInt8Ahead = 2048;

// Columns [n0, n1) of y for rows [m0, m0 + kRows) of a: y[m][n] = sum over blocks b of scale[n][b] * (sum over the
// block's k of (q[n][k] - zp[n][b]) a[m][k]), each code less its zero point exact in integers before it is widened
// (as MatMulNBits dequantises; taking zp * sum(a) out of the sum instead would round (|q| + |zp|) / |q - zp|
// times coarser), once for every row. kBlock: the block size where it is known when compiled (the default,
// 32: its loops unrolled, measured ~1.3x faster than with the size read at run time), else 0.
//
// Each row's sum is kChains independent FMA chains: within a block the products alternate between kChains partial
// sums, and consecutive blocks between kChains accumulators. With one row (a decode step) a single chain, each FMA
// waiting on the one before, held the sweep back; with two rows or more the rows' chains already interleave, and
// more registers a row would spill on AVX2's sixteen.
//
// With AVX-512, one row's whole 32-code stretches run sixteen codes a vector, in 512-bit partial sums and
// accumulators of their own (kWide): half the instructions a code of the 256-bit loop, so that more of the sweep
// fits the core's reorder window (the 256-bit sweep's samples sat on its code loads and on the FMA waiting for a
// block's sum; benchmarks/RESULTS.md has what it gained). Several rows keep 256-bit registers: each widened code
// there already serves every row, and that case was not measured.
template <int kRows, int kBlock>
void int8_columns(const float* a, const uint8_t* q, const float* scales, const uint8_t* zp, float* y, int64_t m0,
                  int64_t K, int64_t N, int64_t block_size, int64_t n0, int64_t n1) {
  constexpr int kChains = kRows == 1 ? 2 : 1;
  const int64_t block = kBlock ? kBlock : block_size;
  const int64_t blocks = (K + block - 1) / block;
  const float* am = a + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * blocks * block;
    float tail[kRows] = {};
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[kChains][kRows];
    for (int c = 0; c < kChains; ++c)
      for (int r = 0; r < kRows; ++r) acc[c][r] = _mm256_setzero_ps();
#endif
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    constexpr bool kWide = kRows == 1;
    __m512 wide_acc[kChains];
    for (int c = 0; c < kChains; ++c) wide_acc[c] = _mm512_setzero_ps();
#endif
    // Block b's first `valid` codes into accumulator `chain`. Inlined where it is called with constants: the arrays
    // stay in registers, and a whole block's loops unroll where kBlock is known.
    auto one_block = [&](int64_t b, [[maybe_unused]] int chain, int64_t valid) __attribute__((always_inline)) {
      const uint8_t* qb = qn + b * block;
      const int64_t k0 = b * block;
      const float* scale = scales + n * blocks + b;
      const int z = zp ? zp[n * blocks + b] : 128;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      // Once for each 64-byte line of the row's codes that starts in this block.
      for (int64_t off = (64 - (k0 & 63)) & 63; off < valid; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qb + off + kInt8Ahead), kWeightPrefetch);
      __m256 sums[kChains][kRows];
      for (int c = 0; c < kChains; ++c)
        for (int r = 0; r < kRows; ++r) sums[c][r] = _mm256_setzero_ps();
#if defined(__AVX512F__)
      if constexpr (kWide) {
        const __m512i zw = _mm512_set1_epi32(z);
        auto wide = [&](int64_t at) {
          const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + at));
          return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(c), zw));
        };
        __m512 ws[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // both set by the first stretch's multiplies
        for (; i + 32 <= valid; i += 32) {
          const __m512 x0 = _mm512_loadu_ps(am + k0 + i), x1 = _mm512_loadu_ps(am + k0 + i + 16);
          ws[0] = i == 0 ? _mm512_mul_ps(wide(i), x0) : _mm512_fmadd_ps(wide(i), x0, ws[0]);
          ws[1] = i == 0 ? _mm512_mul_ps(wide(i + 16), x1) : _mm512_fmadd_ps(wide(i + 16), x1, ws[1]);
        }
        if (i > 0)
          wide_acc[chain] = _mm512_fmadd_ps(_mm512_set1_ps(*scale), _mm512_add_ps(ws[0], ws[1]), wide_acc[chain]);
      }
#endif
      const int64_t narrow_from = i;  // where the 256-bit loops start: past the wide stretch, if any
      const __m256i zv = _mm256_set1_epi32(z);
      auto widen = [&](__m128i codes) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(codes), zv)); };
      auto codes = [&](int64_t at) { return widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + at))); };
      for (; i + 32 <= valid; i += 32) {
        const __m256 w[4] = {codes(i), codes(i + 8), codes(i + 16), codes(i + 24)};
        for (int r = 0; r < kRows; ++r)
          for (int j = 0; j < 4; ++j) {
            const __m256 x = _mm256_loadu_ps(am + r * K + k0 + i + 8 * j);
            __m256& sum = sums[j % kChains][r];
            // A block's first products start its sums: a multiply, where an add to zero would cost a register copy
            sum = i == 0 && j < kChains ? _mm256_mul_ps(w[j], x) : _mm256_fmadd_ps(w[j], x, sum);
          }
      }
      for (; i + 8 <= valid; i += 8) {
        const __m256 w = codes(i);
        for (int r = 0; r < kRows; ++r)
          sums[0][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(am + r * K + k0 + i), sums[0][r]);
      }
      if (i > narrow_from) {  // a whole block of the wide loop leaves nothing to add here
        const __m256 sv = _mm256_broadcast_ss(scale);
        for (int r = 0; r < kRows; ++r) {
          __m256 s = sums[0][r];
          for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, sums[c][r]);
          acc[chain][r] = _mm256_fmadd_ps(sv, s, acc[chain][r]);
        }
      }
#endif
      for (; i < valid; ++i)
        for (int r = 0; r < kRows; ++r) tail[r] += *scale * float(int(qb[i]) - z) * am[r * K + k0 + i];
    };
    const int64_t whole = K / block;
    int64_t b = 0;
    for (; b + kChains <= whole; b += kChains) {
      one_block(b, 0, block);
      if constexpr (kChains == 2) one_block(b + 1, 1, block);
    }
    for (; b < whole; ++b) one_block(b, 0, block);
    if (whole < blocks) one_block(whole, 0, K - whole * block);
    for (int r = 0; r < kRows; ++r) {
      float sum = tail[r];
#if defined(__AVX2__) && defined(__FMA__)
      __m256 s = acc[0][r];
      for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c][r]);
      sum += hsum8(s);
#if defined(__AVX512F__)
      if constexpr (kWide) {
        __m512 w = wide_acc[0];
        for (int c = 1; c < kChains; ++c) w = _mm512_add_ps(w, wide_acc[c]);
        sum += _mm512_reduce_add_ps(w);  // as IntDotMatMul's 512-bit sums end
      }
#endif
#endif
      y[(m0 + r) * N + n] = sum;
    }
  }
}

template <int kRows>
void int8_columns_any(const float* a, const uint8_t* q, const float* scales, const uint8_t* zp, float* y,
                      int64_t m0, int64_t K, int64_t N, int64_t block, int64_t n0, int64_t n1) {
  if (block == 32)
    int8_columns<kRows, 32>(a, q, scales, zp, y, m0, K, N, block, n0, n1);
  else
    int8_columns<kRows, 0>(a, q, scales, zp, y, m0, K, N, block, n0, n1);
}

// The sweep of both quantised decode matmuls: a's rows in passes of up to four, which share each weight load (more
// rows would sweep the weight again), each pass's columns in a few contiguous runs over the pool, each run one
// stream for the prefetchers: 64 runs (parallel_for's most) measured ~1.3x slower than 8 in a two-thread harness
// of the 24 layers' projections, 2 no faster than 8. columns(rows, m0, n0, n1) computes one run.
template <typename Columns>
void sweep_columns(const Executor& exec, int64_t M, int64_t K, int64_t N, const Columns& columns) {
  constexpr int64_t kRuns = 8, kMinWork = 8192, kRows = 4;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    const int64_t runs = std::max<int64_t>(1, std::min({kRuns, N, N * K * rows / kMinWork}));
    auto run = [&](int64_t c) { columns(rows, m0, c * N / runs, (c + 1) * N / runs); };
    if (runs == 1)
      run(0);
    else
      exec.run(runs, run);
  }
}

}  // namespace

void int8_matmul(const Executor& exec, const float* a, const uint8_t* q, const float* scales, const uint8_t* zp,
                 float* y, int64_t M, int64_t K, int64_t N, int64_t block) {
  if (M == 0 || N == 0) return;
  sweep_columns(exec, M, K, N, [&](int64_t rows, int64_t m0, int64_t n0, int64_t n1) {
    switch (rows) {
      case 4: int8_columns_any<4>(a, q, scales, zp, y, m0, K, N, block, n0, n1); break;
      case 3: int8_columns_any<3>(a, q, scales, zp, y, m0, K, N, block, n0, n1); break;
      case 2: int8_columns_any<2>(a, q, scales, zp, y, m0, K, N, block, n0, n1); break;
      default: int8_columns_any<1>(a, q, scales, zp, y, m0, K, N, block, n0, n1); break;
    }
  });
}

}  // namespace ssmrt_cpu

// ------------------------------------------------------------------------------------------ IntDotMatMul

namespace ssmrt_cpu {
namespace {

// The sweep's code bytes are asked for this far ahead, into L2. A 4-bit quad is 64 bytes of work done in a few
// cycles, so a line must be asked for many quads before it is read to have arrived from memory by then: 4096
// bytes kept the sweep at a plain read's rate in the harness (benchmarks/RESULTS.md), a quarter of that did not.
constexpr int64_t kDotAhead = 4096;

// A row of activations quantised as MatMulNBits at accuracy level 4 quantises it: per block of the weight's
// block size along K, symmetric int8 codes round-to-nearest-even(a * 127 / max|a|), the block's scale max|a| / 127
// (a block of zeros: codes and scale 0), zeros past K. Laid out for the dot products, in quads of four 32-code
// chunks: `codes` for 8-bit weights in K order; for 4-bit weights, whose byte j of a chunk holds codes 2j (low
// nibble) and 2j + 1, a quad's 64 even-indexed codes (16 a chunk, chunk by chunk) then its 64 odd ones, so that the
// low and high nibbles of the quad's 64 code bytes meet their activations lane for lane. `scales`: 4 lanes a chunk,
// its block's scale in each; `neg_sums`: 4 lanes a chunk, -(sum of the chunk's codes) in the low 16 bits of its
// first lane (|sum| <= 32 * 127), the rest 0: the zero point's share, added with a 16-bit multiply. `natural`,
// `chunk_sums`, `block_scales`: the codes in K order, the chunks' sums and the blocks' scales, for the chunks past
// the last whole quad.
struct QuantizedRow {
  std::vector<int8_t> codes, natural;
  std::vector<float> scales, block_scales;
  std::vector<int32_t> neg_sums, chunk_sums;
};

// The chunks of 32 codes a row has: those holding K's values (a block reaching past K is stored whole, but the
// codes there multiply zeros and are not read).
inline int64_t chunks_of(int64_t K) { return (K + 31) / 32; }

void quantize_row(const float* a, int64_t K, int64_t block, int bits, QuantizedRow& row) {
  const int64_t blocks = (K + block - 1) / block, chunks = chunks_of(K), quads = (chunks + 3) / 4;
  row.natural.assign(quads * 128, 0);
  row.block_scales.assign(blocks, 0.0f);
  row.chunk_sums.assign(chunks, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, valid = std::min(block, K - k0);
    float amax = 0.0f;
    for (int64_t i = 0; i < valid; ++i) amax = std::max(amax, std::fabs(a[k0 + i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < valid; ++i) {
      // within [-127, 127] for any finite a; the clamp keeps a NaN or an infinity from an undefined conversion
      const auto c = static_cast<int32_t>(std::nearbyint(std::min(127.0f, std::max(-127.0f, a[k0 + i] * inv))));
      row.natural[k0 + i] = static_cast<int8_t>(c);
      row.chunk_sums[(k0 + i) / 32] += c;
    }
    row.block_scales[b] = amax / 127.0f;
  }
  row.codes.assign(quads * 128, 0);
  row.scales.assign(quads * 16, 0.0f);
  row.neg_sums.assign(quads * 16, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t quad = c / 4, h = c % 4, b = c * 32 / block;
    for (int j = 0; j < 4; ++j) row.scales[quad * 16 + h * 4 + j] = row.block_scales[b];
    row.neg_sums[quad * 16 + h * 4] = static_cast<uint16_t>(static_cast<int16_t>(-row.chunk_sums[c]));
    for (int i = 0; i < 32; ++i)
      row.codes[bits == 4 ? quad * 128 + (i % 2) * 64 + h * 16 + i / 2 : c * 32 + i] = row.natural[c * 32 + i];
  }
}

// The zero point of block b of column n (4-bit ones two a byte, the first in the low nibble; none: the middle).
inline int zero_point(const uint8_t* zp, int bits, int64_t n, int64_t blocks, int64_t b) {
  if (!zp) return 1 << (bits - 1);
  if (bits == 8) return zp[n * blocks + b];
  return (zp[n * ((blocks + 1) / 2) + b / 2] >> (4 * (b & 1))) & 0x0F;
}

// Chunks [c0, chunks) of column n for one row: the same integer sums as the vector code's, each chunk's exact, then
// scaled and summed in float32 (in another order than the vector code's lanes).
float dot_chunks(const QuantizedRow& row, const uint8_t* qn, const float* sn, const uint8_t* zp, int bits, int64_t n,
                 int64_t blocks, int64_t block, int64_t c0, int64_t chunks) {
  float sum = 0.0f;
  for (int64_t c = c0; c < chunks; ++c) {
    const int64_t b = c * 32 / block;
    int32_t dot = 0;
    for (int64_t i = c * 32; i < c * 32 + 32; ++i) {
      const int code = bits == 8 ? qn[i] : (qn[i / 2] >> (4 * (i & 1))) & 0x0F;
      dot += code * row.natural[i];
    }
    dot -= zero_point(zp, bits, n, blocks, b) * row.chunk_sums[c];
    sum += static_cast<float>(dot) * (sn[b] * row.block_scales[b]);
  }
  return sum;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SSMRT_DOT_512 1
// Columns [n0, n1) for rows [m0, m0 + kRows): each quad of chunks in 512-bit registers, 64 code bytes of 4-bit
// weights or 128 of 8-bit ones. Per chunk 4 int32 lanes: u8 codes times int8 activations (vpdpbusd), then the zero
// point times -(the block's activation sum) (vpdpwssd), exact: |lane| < 2^24, so converting it to float is too;
// then times the weight's and the activation's scales, summed in float32.
template <int kRows, int kBits>
void dot_columns(const QuantizedRow* rows, const uint8_t* q, const float* scales, const uint8_t* zp, float* y,
                 int64_t m0, int64_t K, int64_t N, int64_t block, int64_t n0, int64_t n1) {
  const int64_t blocks = (K + block - 1) / block, chunks = chunks_of(K), quads = chunks / 4;
  const int64_t col_bytes = blocks * block * kBits / 8, zstride = kBits == 8 ? blocks : (blocks + 1) / 2;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // lane group h (chunk h of the quad) reads the scale and zero point of block (c + h) * 32 / block - c * 32 / block
  const int per = static_cast<int>(block / 32);  // chunks a block, a power of two
  const int per_shift = __builtin_ctz(static_cast<unsigned>(per));  // a shift, not a division, in the sweep
  alignas(64) int32_t group_block[16];
  for (int l = 0; l < 16; ++l) group_block[l] = (l / 4) / per;
  const __m512i sidx = _mm512_load_si512(group_block);
  const __m512i zshift = kBits == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12)
                                    : _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512i zmask = _mm512_set1_epi32(kBits == 4 ? 0x0F : 0xFF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * col_bytes;
    const float* sn = scales + n * blocks;
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t quad = 0; quad < quads; ++quad) {
      const int64_t c = quad * 4, b0 = c >> per_shift;
      __m512i lo, hi;
      if constexpr (kBits == 4) {
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 64 + kDotAhead), kWeightPrefetch);
        const __m512i raw = _mm512_loadu_si512(qn + quad * 64);
        lo = _mm512_and_si512(raw, nibble);
        hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 128 + kDotAhead), kWeightPrefetch);
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 128 + kDotAhead + 64), kWeightPrefetch);
        lo = _mm512_loadu_si512(qn + quad * 128);
        hi = _mm512_loadu_si512(qn + quad * 128 + 64);
      }
      // each chunk's lanes: the zero point of its block (read in the low 16 bits of the first lane)
      __m512i zv;
      if (!zp) {
        zv = _mm512_set1_epi32(1 << (kBits - 1));
      } else if (per == 1) {
        uint32_t packed = 0;
        std::memcpy(&packed, zp + n * zstride + (kBits == 4 ? c / 2 : c), kBits == 4 ? 2 : 4);
        zv = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int32_t>(packed)), zshift), zmask);
      } else {
        zv = _mm512_set1_epi32(zero_point(zp, kBits, n, blocks, b0));
        if (per == 2)
          zv = _mm512_mask_mov_epi32(zv, 0xFF00, _mm512_set1_epi32(zero_point(zp, kBits, n, blocks, b0 + 1)));
      }
      // the quad's blocks' scales, 4, 2 or 1 of them, all there for a whole quad: plain loads, no mask
      const __m128 s4 = per == 1   ? _mm_loadu_ps(sn + b0)
                        : per == 2 ? _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sn + b0)))
                                   : _mm_set1_ps(sn[b0]);
      const __m512 sw = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(s4));
      for (int r = 0; r < kRows; ++r) {
        const QuantizedRow& row = rows[m0 + r];
        __m512i d;
        if constexpr (kBits == 4) {
          d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(row.codes.data() + quad * 128));
          d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(row.codes.data() + quad * 128 + 64));
        } else {  // each register two chunks of 8 lanes: the halves of each chunk's lanes added into 4
          const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                                 _mm512_loadu_si512(row.codes.data() + quad * 128));
          const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi,
                                                 _mm512_loadu_si512(row.codes.data() + quad * 128 + 64));
          d = _mm512_add_epi32(_mm512_shuffle_i64x2(d0, d1, 0x88), _mm512_shuffle_i64x2(d0, d1, 0xDD));
        }
        d = _mm512_dpwssd_epi32(d, zv, _mm512_loadu_si512(row.neg_sums.data() + quad * 16));
        const __m512 scale = _mm512_mul_ps(sw, _mm512_loadu_ps(row.scales.data() + quad * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      y[(m0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
      if (quads * 4 < chunks)
        y[(m0 + r) * N + n] += dot_chunks(rows[m0 + r], qn, sn, zp, kBits, n, blocks, block, quads * 4, chunks);
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define SSMRT_DOT_256 1
// u8 x int8 products four a lane (vpdpbusd) and 16-bit ones two a lane (vpdpwssd): AVX-VNNI's where the compiler
// targets it, else AVX2's vpmaddubsw / vpmaddwd, exact for codes under 16 (pairs of products stay within int16),
// which is why 8-bit codes go in as their two nibbles there.
#if defined(__AVXVNNI__)
inline __m256i dot_u8_i8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
inline __m256i dot_byte_codes(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
inline __m256i dot_u8_i8(__m256i acc, __m256i u, __m256i s) {  // u < 16
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256i dot_byte_codes(__m256i acc, __m256i u, __m256i s) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i lo = dot_u8_i8(_mm256_setzero_si256(), _mm256_and_si256(u, nibble), s);
  const __m256i hi = dot_u8_i8(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(u, 4), nibble), s);
  return _mm256_add_epi32(acc, _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4)));
}
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif

// As the AVX-512 dot_columns below the #else, each quad as two pairs of chunks in 256-bit registers.
template <int kRows, int kBits>
void dot_columns(const QuantizedRow* rows, const uint8_t* q, const float* scales, const uint8_t* zp, float* y,
                 int64_t m0, int64_t K, int64_t N, int64_t block, int64_t n0, int64_t n1) {
  const int64_t blocks = (K + block - 1) / block, chunks = chunks_of(K), quads = chunks / 4;
  const int64_t col_bytes = blocks * block * kBits / 8, zstride = kBits == 8 ? blocks : (blocks + 1) / 2;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int per = static_cast<int>(block / 32);  // chunks a block, a power of two
  const int per_shift = __builtin_ctz(static_cast<unsigned>(per));
  const __m256i pair_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i zshift = _mm256_setr_epi32(0, 0, 0, 0, kBits, kBits, kBits, kBits);
  const __m256i zmask = _mm256_set1_epi32(kBits == 4 ? 0x0F : 0xFF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * col_bytes;
    const float* sn = scales + n * blocks;
    __m256 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t quad = 0; quad < quads; ++quad) {
      if constexpr (kBits == 4) {
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 64 + kDotAhead), kWeightPrefetch);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 128 + kDotAhead), kWeightPrefetch);
        _mm_prefetch(reinterpret_cast<const char*>(qn + quad * 128 + kDotAhead + 64), kWeightPrefetch);
      }
      for (int h = 0; h < 2; ++h) {  // chunks c, c + 1 of the quad's four
        const int64_t c = quad * 4 + 2 * h, b0 = c >> per_shift;
        __m256i lo, hi;
        if constexpr (kBits == 4) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + c * 16));
          lo = _mm256_and_si256(raw, nibble);
          hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
        } else {
          lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + c * 32));
          hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + c * 32 + 32));
        }
        __m256i zv;  // each chunk's lanes: its block's zero point
        if (!zp) {
          zv = _mm256_set1_epi32(1 << (kBits - 1));
        } else if (per == 1) {
          uint32_t packed = 0;
          std::memcpy(&packed, zp + n * zstride + (kBits == 4 ? c / 2 : c), kBits == 4 ? 1 : 2);
          zv = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(packed)), zshift), zmask);
        } else {
          zv = _mm256_set1_epi32(zero_point(zp, kBits, n, blocks, b0));
        }
        const __m256 sw = per == 1 ? _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(
                                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sn + b0)))), pair_idx)
                                   : _mm256_set1_ps(sn[b0]);
        for (int r = 0; r < kRows; ++r) {
          const QuantizedRow& row = rows[m0 + r];
          const int8_t* codes = row.codes.data() + quad * 128;
          __m256i d;
          if constexpr (kBits == 4) {
            d = dot_u8_i8(_mm256_setzero_si256(), lo,
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * h)));
            d = dot_u8_i8(d, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 + 32 * h)));
          } else {
            const __m256i d0 = dot_byte_codes(_mm256_setzero_si256(), lo,
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * h)));
            const __m256i d1 = dot_byte_codes(
                _mm256_setzero_si256(), hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * h + 32)));
            d = _mm256_add_epi32(_mm256_permute2x128_si256(d0, d1, 0x20), _mm256_permute2x128_si256(d0, d1, 0x31));
          }
          const int32_t* neg_sums = row.neg_sums.data() + quad * 16 + 8 * h;
          d = dot_i16(d, zv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(neg_sums)));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d),
                                   _mm256_mul_ps(sw, _mm256_loadu_ps(row.scales.data() + quad * 16 + 8 * h)), acc[r]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      y[(m0 + r) * N + n] = hsum8(acc[r]);
      if (quads * 4 < chunks)
        y[(m0 + r) * N + n] += dot_chunks(rows[m0 + r], qn, sn, zp, kBits, n, blocks, block, quads * 4, chunks);
    }
  }
}
#else
// Without AVX2: the same sums chunk by chunk in plain integers (dot_chunks).
template <int kRows, int kBits>
void dot_columns(const QuantizedRow* rows, const uint8_t* q, const float* scales, const uint8_t* zp, float* y,
                 int64_t m0, int64_t K, int64_t N, int64_t block, int64_t n0, int64_t n1) {
  const int64_t blocks = (K + block - 1) / block, chunks = chunks_of(K);
  const int64_t col_bytes = blocks * block * kBits / 8;
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < kRows; ++r)
      y[(m0 + r) * N + n] = dot_chunks(rows[m0 + r], q + n * col_bytes, scales + n * blocks, zp, kBits, n, blocks,
                                       block, 0, chunks);
}
#endif

template <int kBits>
void dot_columns_rows(int64_t rows_here, const QuantizedRow* rows, const uint8_t* q, const float* scales,
                      const uint8_t* zp, float* y, int64_t m0, int64_t K, int64_t N, int64_t block, int64_t n0,
                      int64_t n1) {
  switch (rows_here) {
    case 4: dot_columns<4, kBits>(rows, q, scales, zp, y, m0, K, N, block, n0, n1); break;
    case 3: dot_columns<3, kBits>(rows, q, scales, zp, y, m0, K, N, block, n0, n1); break;
    case 2: dot_columns<2, kBits>(rows, q, scales, zp, y, m0, K, N, block, n0, n1); break;
    default: dot_columns<1, kBits>(rows, q, scales, zp, y, m0, K, N, block, n0, n1); break;
  }
}

}  // namespace

const char* int_dot_path() {
#if defined(SSMRT_DOT_512)
  return "avx512-vnni";
#elif defined(SSMRT_DOT_256) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(SSMRT_DOT_256)
  return "avx2";
#else
  return "scalar";
#endif
}

void int_dot_matmul(const Executor& exec, const float* a, const uint8_t* q, const float* scales, const uint8_t* zp,
                    float* y, int64_t M, int64_t K, int64_t N, int64_t block, int bits) {
  if (M == 0 || N == 0) return;
  std::vector<QuantizedRow> rows(M);
  for (int64_t m = 0; m < M; ++m) quantize_row(a + m * K, K, block, bits, rows[m]);
  sweep_columns(exec, M, K, N, [&](int64_t here, int64_t m0, int64_t n0, int64_t n1) {
    if (bits == 4)
      dot_columns_rows<4>(here, rows.data(), q, scales, zp, y, m0, K, N, block, n0, n1);
    else
      dot_columns_rows<8>(here, rows.data(), q, scales, zp, y, m0, K, N, block, n0, n1);
  });
}

}  // namespace ssmrt_cpu
