// CPU float32 kernels of the ssmrt ops, with the contracts of ssmrt/ops/*.py. Plain C++: nothing here knows
// ONNX Runtime (ops.cc validates the tensors and calls these). Outputs never alias inputs. kernels.cc is
// compiled with -ffast-math (vectorised exp / log); callers decide everything that needs infinities or NaNs.
#pragma once

#include <cstdint>
#include <functional>

namespace ssmrt_cpu {

// Where a kernel's independent pieces run: the caller supplies it (ops.cc: ONNX Runtime's intra-op thread pool,
// so a session's thread setting holds here too). run(chunks, fn) calls fn(0) ... fn(chunks - 1), in any order,
// possibly at once, and returns when all have.
class Executor {
 public:
  virtual ~Executor() = default;
  virtual void run(int64_t chunks, const std::function<void(int64_t)>& fn) const = 0;
};

// Float memory for the span of one call, not zeroed (its owner writes every element before reading it). Up to
// kPooledFloats come from buffers the asking thread keeps from call to call (at most 16, 4 MB, a thread): a decode
// step asks for dozens of small buffers on its serial path, each a malloc and a free otherwise. A larger one (a
// prompt's) is allocated and freed with it, so no thread holds a prompt's MBs after the prompt.
class Scratch {
 public:
  static constexpr int64_t kPooledFloats = int64_t{1} << 16;
  explicit Scratch(int64_t n);
  Scratch(Scratch&& other) noexcept : data_(other.data_), capacity_(other.capacity_) { other.data_ = nullptr; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch& operator=(Scratch&&) = delete;
  ~Scratch();
  float* get() const { return data_; }
  float* data() const { return data_; }
  // The floats this buffer holds as the pool counts them: a power of two from 256, or 0 for one it does not keep.
  int64_t capacity() const { return capacity_; }
  // How many buffers the calling thread keeps now.
  static int64_t kept();

 private:
  float* data_;
  int64_t capacity_;
};

// CausalConv1d.
//   x (batch, seqlen, dim), weight (dim, width), bias (dim,) or null, conv_state (batch, dim, width - 1)
//   -> y (batch, seqlen, dim), present_conv_state (batch, dim, width - 1)
void causal_conv1d(const Executor& exec, const float* x, const float* weight, const float* bias,
                   const float* conv_state, float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim,
                   int64_t width, bool silu_activation);

// SelectiveScan.
//   u, delta, z (batch, seqlen, dim); A (dim, dstate); B, C (batch, seqlen, ngroups, dstate);
//   D, delta_bias (dim,) or null; z null for no gate; ssm_state (batch, dim, dstate)
//   -> y (batch, seqlen, dim), present_ssm_state (batch, dim, dstate)
// Channel d reads group d / (dim / ngroups).
void selective_scan(const Executor& exec, const float* u, const float* delta, const float* A, const float* B,
                    const float* C, const float* D, const float* z, const float* delta_bias, const float* ssm_state,
                    float* y, float* state_out, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate,
                    int64_t ngroups, bool delta_softplus);

// SSDScan, as the recurrence (the result does not depend on a chunk length).
//   x (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A (nheads,);
//   B, C (batch, seqlen, ngroups, dstate); D (nheads,) or (nheads, headdim) (d_per_channel) or null;
//   dt_bias (nheads,) or null; ssm_state (batch, nheads, headdim, dstate)
//   -> y (batch, seqlen, nheads, headdim), present_ssm_state (batch, nheads, headdim, dstate)
// Per step, dt after bias, softplus and, when dt_clamp, the limit [dt_min, dt_max]:
//   h = exp(dt A) h + dt x B^T ;  y = h C + D x. Head h reads group h / (nheads / ngroups).
void ssd_scan(const Executor& exec, const float* x, const float* dt, const float* A, const float* B, const float* C,
              const float* D, bool d_per_channel, const float* dt_bias, const float* ssm_state, float* y,
              float* state_out, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim, int64_t dstate,
              int64_t ngroups, bool dt_softplus, bool dt_clamp, float dt_min, float dt_max);

}  // namespace ssmrt_cpu

namespace ssmrt_cpu {

// HalfMatMul (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in a float16 graph's decode
// path). y (M, N) = a (M, K) @ b (K, N), a, b and y IEEE float16 as stored (uint16_t), the sums in float32 and
// rounded once. Written for small M (a decode step's rows): b is streamed once per four rows of a, converted on
// the fly, so a step reads its float16 weights, half the bytes of float32 ones; a large M is correct but slow.
// threads: how many threads `exec` runs on (0: not known), each given one run of b's rows; the result is the same
// for any pool of up to eight.
void half_matmul(const Executor& exec, const uint16_t* a, const uint16_t* b, uint16_t* y, int64_t M, int64_t K,
                 int64_t N, int64_t threads = 0);
// The same with b given transposed, bt (N, K): y = a @ bt^T (a tied lm_head is the embedding, (vocab, d_model)).
void half_matmul_nt(const Executor& exec, const uint16_t* a, const uint16_t* bt, uint16_t* y, int64_t M, int64_t K,
                    int64_t N);

// Int8MatMul (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in the decode step of an
// artifact with 8-bit weights and float32 activations, in place of MatMulNBits). y (M, N) = a (M, K) @ W (K, N),
// a and y float32, W in MatMulNBits' 8-bit layout: q (N, ceil(K / block), block) uint8 codes (the last block's
// codes beyond K unused), scales (N, ceil(K / block)) float32, zp the same shape uint8 or null (128), W[k][n] =
// scale[n][k / block] * (q[n][k] - zp[n][k / block]). Sums in float32. Written for a decode step's few rows: the
// weight is streamed once per four rows of a, its codes converted in registers, a quarter of float32's bytes.
void int8_matmul(const Executor& exec, const float* a, const uint8_t* q, const float* scales, const uint8_t* zp,
                 float* y, int64_t M, int64_t K, int64_t N, int64_t block);

// IntDotMatMul (ssmrt.cpu domain; never in an artifact: the runner puts it in the decode step of an artifact with
// int8 activations, in place of MatMulNBits). y (M, N) = quantise(a) (M, K) @ W (K, N), W in MatMulNBits' layout
// of `bits` 8 or 4: q (N, ceil(K / block), block * bits / 8) uint8 (4 bits: two codes a byte, the first in the low
// nibble), scales (N, ceil(K / block)) float32, zp (N, ceil(K / block)) uint8, for 4 bits (N, ceil(K / block / 2))
// two a byte, or null (the middle code); block a power of two from 32. quantise(a): each block of a row's K as
// int8 codes, as MatMulNBits at accuracy level 4 quantises it (symmetric, round(a * 127 / max|a|), scale
// max|a| / 127). The codes' products with the weight's are summed in integers, exactly, per 32 codes (in four
// int32 lanes, each converted to float exactly), then scaled and summed in float32. Written for a decode step's
// few rows: the weight is streamed once per four rows, close to the rate of a plain read of its bytes where the
// compiler targets AVX-512 VNNI or AVX2 (plain integer loops otherwise).
void int_dot_matmul(const Executor& exec, const float* a, const uint8_t* q, const float* scales, const uint8_t* zp,
                    float* y, int64_t M, int64_t K, int64_t N, int64_t block, int bits);
// Which code int_dot_matmul was compiled with: "avx512-vnni", "avx-vnni", "avx2" or "scalar" (the plain integer
// loops, which ONNX Runtime's own kernel beats: the runner routes to it only where it is not "scalar").
const char* int_dot_path();

}  // namespace ssmrt_cpu

namespace ssmrt_cpu {

// SSDMixer (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in a Mamba-2 graph in place
// of the nodes between the mixer's two projections, which it computes in one call instead of ~13 graph nodes).
//   zxbcdt (batch, seqlen, d_ssm + conv_dim + nheads): in_proj's output, [z, xBC, dt] (no MLP part);
//   conv_weight (conv_dim, width), conv_bias (conv_dim,) or null, conv_state (batch, conv_dim, width - 1);
//   A (nheads,), D (nheads,) or (nheads, headdim) (d_per_channel) or null, dt_bias (nheads,) or null,
//   ssm_state (batch, nheads, headdim, dstate); norm_weight (d_ssm,)
//   -> y (batch, seqlen, d_ssm), present_conv_state, present_ssm_state
// conv_dim = d_ssm + 2 ngroups dstate, d_ssm = nheads headdim. What it computes is Mamba2Mixer's middle:
//   xBC = silu(causal_conv1d(xBC)); x, B, C = split(xBC); y = SSDScan(x, dt, A, B, C, D, dt_bias);
//   y = rmsnorm(y * silu(z)) * norm_weight   (one norm group, the gate before the norm)
// round_half: the graph it replaces held xBC and the scan's y as float16 (a float16 artifact); they are rounded
// to float16 at the same two points, so the fused op computes what the nodes did.
void ssd_mixer(const Executor& exec, const float* zxbcdt, const float* conv_weight, const float* conv_bias,
               const float* conv_state, const float* A, const float* D, bool d_per_channel, const float* dt_bias,
               const float* ssm_state, const float* norm_weight, float* y, float* conv_state_out,
               float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim, int64_t dstate,
               int64_t ngroups, int64_t width, bool dt_softplus, bool dt_clamp, float dt_min, float dt_max,
               float eps, bool round_half);

}  // namespace ssmrt_cpu

namespace ssmrt_cpu {

// AddRMSNorm (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in place of a block's
// residual add and RMSNorm, and of the casts around them in a float16 graph). Per row:
//   residual_out = x + residual (x alone where residual is null: the first block)
//   y = t / sqrt(mean(t^2) + eps) * weight, t = residual_out (round_half: rounded to float16 first, as a float16
//   model's graph rounds the block's input, its residual stream float32)
//   x (rows, dim), residual (rows, dim) or null, weight (dim,) -> y (rows, dim), residual_out (rows, dim)
void add_rmsnorm(const Executor& exec, const float* x, const float* residual, const float* weight, float* y,
                 float* residual_out, int64_t rows, int64_t dim, float eps, bool round_half);

}  // namespace ssmrt_cpu

namespace ssmrt_cpu {

// SSDBlock (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in a float16 Mamba-2 graph's
// decode step in place of a mixer's in_proj, SSDMixer and out_proj on HalfMatMul and the AddRMSNorm after them,
// four nodes a layer, each with ONNX Runtime's dispatch and its own fork and join around a few microseconds of
// serial work).
//   hidden (batch, seqlen, d_model) and in_proj (d_model, d_ssm + conv_dim + nheads), float16 as stored; the
//   mixer's inputs after zxbcdt as ssd_mixer's; out_proj (d_ssm, d_model) float16 as stored; residual (batch,
//   seqlen, d_model) or null, next_norm_weight (d_model,)
//   -> y (batch, seqlen, d_model), residual_out, present_conv_state, present_ssm_state
// What it computes is what the four nodes did, with their float16 values:
//   zxbcdt = half(hidden @ in_proj); m = half(ssd_mixer(zxbcdt, ..., round_half)); o = half(m @ out_proj);
//   y, residual_out = add_rmsnorm(o, residual, next_norm_weight, norm_eps, round_half_norm)
// the products by half_matmul (threads as there), so the fused node gives the nodes' values bit for bit.
void ssd_block(const Executor& exec, const uint16_t* hidden, const uint16_t* in_proj, const float* conv_weight,
               const float* conv_bias, const float* conv_state, const float* A, const float* D, bool d_per_channel,
               const float* dt_bias, const float* ssm_state, const float* norm_weight, const uint16_t* out_proj,
               const float* residual, const float* next_norm_weight, float* y, float* residual_out,
               float* conv_state_out, float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t d_model,
               int64_t nheads, int64_t headdim, int64_t dstate, int64_t ngroups, int64_t width, bool dt_softplus,
               bool dt_clamp, float dt_min, float dt_max, float eps, float norm_eps, bool round_half_norm,
               int64_t threads);

}  // namespace ssmrt_cpu

namespace ssmrt_cpu {

// SelectiveMixer (ssmrt.cpu domain; never in an artifact: the ONNX Runtime runner puts it in a float16 Mamba-1
// graph's decode step in place of the nodes between the mixer's in_proj and out_proj: the split, the conv,
// x_proj, its split, dt_proj, two Reshapes and the scan).
//   xz (batch, seqlen, 2 dim): in_proj's output, [x, z]; conv_weight (dim, width), conv_bias (dim,) or null,
//   conv_state (batch, dim, width - 1); x_proj (dim, dt_rank + 2 dstate) and dt_proj (dt_rank, dim), float16 as
//   stored; A (dim, dstate), D (dim,) or null, dt_bias (dim,) or null, ssm_state (batch, dim, dstate)
//   -> y (batch, seqlen, dim), present_conv_state, present_ssm_state
// What it computes is MambaMixer's middle, with the float16 graph's roundings:
//   u = half(silu(causal_conv1d(x))); dt_low, B, C = split(half(u @ x_proj)); dt = half(dt_low @ dt_proj);
//   y = SelectiveScan(u, dt, A, B, C, D, z, dt_bias)   (one group: B and C shared by every channel)
// the two products by half_matmul, the kernel HalfMatMul runs (threads as there), so the fused node gives the
// nodes' values bit for bit.
void selective_mixer(const Executor& exec, const float* xz, const float* conv_weight, const float* conv_bias,
                     const float* conv_state, const uint16_t* x_proj, const uint16_t* dt_proj, const float* A,
                     const float* D, const float* dt_bias, const float* ssm_state, float* y, float* conv_state_out,
                     float* ssm_state_out, int64_t batch, int64_t seqlen, int64_t dim, int64_t dt_rank,
                     int64_t dstate, int64_t width, bool delta_softplus, int64_t threads);

}  // namespace ssmrt_cpu
