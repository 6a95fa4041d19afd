// The kernels declared in kernels.h. Compiled with -ffast-math so that the exp / log loops vectorise (glibc's
// vector math); nothing here tests for infinities or NaNs.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "contract.h"  // generated from ssmrt/ops/spec.py

namespace ssmrt_cpu {
namespace {

using ssmrt_contract::kSoftplusThreshold;  // x <= threshold ? log1p(exp(x)) : x

// Written so that loops over them vectorize (glibc's vector expf / logf under -ffast-math). log(1 + exp(x))
// differs from log1p(exp(x)) by at most ~6e-8 absolute where exp(x) is tiny, as in the ONNX fallback body.
inline float softplus(float x) {
  float soft = std::log(1.0f + std::exp(std::min(x, kSoftplusThreshold)));
  return x > kSoftplusThreshold ? x : soft;
}
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

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

}  // namespace

void causal_conv1d(const Executor& exec, const float* x, const float* weight, const float* bias,
                   const float* conv_state, float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim,
                   int64_t width, bool silu_activation) {
  const int64_t K1 = width - 1;
  if (seqlen == 1) {
    // A decode step: per channel, one dot of the state's row and x with the weight's row, and the row shifted
    // by one. Every read is the row as stored: no window buffer, no transposed copy of the weights.
    for (int64_t b = 0; b < batch; ++b) {
      const float* s = conv_state + b * dim * K1;
      const float* xb = x + b * dim;
      float* so = state_out + b * dim * K1;
      float* yb = y + b * dim;
      for (int64_t c = 0; c < dim; ++c) {
        const float* w = weight + c * width;
        const float* sc = s + c * K1;
        float acc = (bias ? bias[c] : 0.0f) + w[K1] * xb[c];
        for (int64_t k = 0; k < K1; ++k) acc += w[k] * sc[k];
        for (int64_t k = 0; k + 1 < K1; ++k) so[c * K1 + k] = sc[k + 1];
        if (K1 > 0) so[c * K1 + K1 - 1] = xb[c];
        yb[c] = acc;
      }
      if (silu_activation)
        for (int64_t c = 0; c < dim; ++c) yb[c] = silu(yb[c]);
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
        if (silu_activation)
          for (int64_t c = 0; c < dim; ++c) yt[c] = silu(yt[c]);
      }
    });
    float* so = state_out + b * dim * K1;
    for (int64_t c = 0; c < dim; ++c)
      for (int64_t j = 0; j < K1; ++j) so[c * K1 + j] = hist[(seqlen + j) * dim + c];
  }
}

void selective_scan(const Executor& exec, const float* u, const float* delta, const float* A, const float* B,
                    const float* C, const float* D, const float* z, const float* delta_bias, const float* ssm_state,
                    float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate,
                    int64_t ngroups, bool delta_softplus) {
  const int64_t per_group = dim / ngroups;
  const int64_t N = dstate;
  // Channels in blocks of kBlock: a block's states stay in L1 while it walks the sequence, and each step's
  // exps run as one loop over (block, dstate), long enough for the vector units.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (dim + kBlock - 1) / kBlock;
  parallel_for(exec, batch * blocks, seqlen * kBlock * N, [&](int64_t i0, int64_t i1) {
    std::vector<float> hs(kBlock * N), dA(kBlock * N);
    float dt[kBlock], x[kBlock], acc[kBlock];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, d0 = (i % blocks) * kBlock, nb = std::min(dim, d0 + kBlock) - d0;
      std::copy(ssm_state + (b * dim + d0) * N, ssm_state + (b * dim + d0 + nb) * N, hs.begin());
      const float* a = A + d0 * N;
      for (int64_t t = 0; t < seqlen; ++t) {
        const int64_t row = (b * seqlen + t) * dim + d0;
        // 1. dt = softplus(delta + delta_bias) for the block's channels
        for (int64_t j = 0; j < nb; ++j) dt[j] = delta[row + j] + (delta_bias ? delta_bias[d0 + j] : 0.0f);
        if (delta_softplus)
          for (int64_t j = 0; j < nb; ++j) dt[j] = softplus(dt[j]);
        // 2. dA = exp(dt * A)
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t n = 0; n < N; ++n) dA[j * N + n] = dt[j] * a[j * N + n];
        for (int64_t k = 0; k < nb * N; ++k) dA[k] = std::exp(dA[k]);
        // 3. h = dA * h + dt u B; y = <h, C>
        for (int64_t j = 0; j < nb; ++j) {
          x[j] = u[row + j];
          const int64_t g = (d0 + j) / per_group;
          const float* Bt = B + ((b * seqlen + t) * ngroups + g) * N;
          const float* Ct = C + ((b * seqlen + t) * ngroups + g) * N;
          const float dtx = dt[j] * x[j];
          float* hj = hs.data() + j * N;
          const float* dAj = dA.data() + j * N;
          float sum = 0.0f;
          for (int64_t n = 0; n < N; ++n) {
            hj[n] = dAj[n] * hj[n] + dtx * Bt[n];
            sum += hj[n] * Ct[n];
          }
          acc[j] = sum;
        }
        // 4. skip and gate
        if (D)
          for (int64_t j = 0; j < nb; ++j) acc[j] += D[d0 + j] * x[j];
        if (z)
          for (int64_t j = 0; j < nb; ++j) acc[j] *= silu(z[row + j]);
        std::copy(acc, acc + nb, y + row);
      }
      std::copy(hs.begin(), hs.begin() + nb * N, state_out + (b * dim + d0) * N);
    }
  });
}

void ssd_scan(const Executor& exec, const float* x, const float* dt_in, const float* A, const float* B,
              const float* C, const float* D, bool d_per_channel, const float* dt_bias, const float* ssm_state,
              float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim,
              int64_t dstate, int64_t ngroups, bool dt_softplus, bool dt_clamp, float dt_min, float dt_max) {
  const int64_t P = headdim, N = dstate, per_group = nheads / ngroups;
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

}  // namespace ssmrt_cpu
