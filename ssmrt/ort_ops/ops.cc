// ssmrt::CausalConv1d, ssmrt::SelectiveScan and ssmrt::SSDScan as native ONNX Runtime CPU kernels, for float32
// and float16 activations.
//
// An exported model carries each op's fallback body as a model-local function; a session that registers
// this library (SessionOptions.register_custom_ops_library) runs these kernels instead, one node per op.
// The ops' names, input and output counts and optional inputs come from contract.h, generated from
// ssmrt/ops/spec.py when the library is built; the inputs are read by their index in the spec's order
// (tests/test_contract.py checks the registered ops against the spec, test_ort_ops.py every input).
// Attributes: CausalConv1d activation "silu" | "none"; SelectiveScan delta_softplus 0 | 1; SSDScan
// dt_softplus 0 | 1, dt_min / dt_max (the dt limit), chunk_size (unused: the recurrence does not chunk).
//
// Every input is validated here (rank, each dimension against the others); a mismatch fails the run with a
// message naming the op, the input and what was expected.
//
// Each op is registered twice under its one name: once with every tensor float32, once with float16 activations
// and float32 where the contract keeps a tensor float32 (A, D, the dt biases, the SSM state: contract.h's fp32
// flags); ONNX Runtime picks the one whose types match the node. A float16 node's activations are widened to
// float32 once on the way in and its float16 outputs rounded once on the way out (half.h), around the same
// float32 kernels: the references compute float16 inputs in float32 the same way, and an activation tensor of an
// op is small next to the work done on it (a decode step's is one token's).

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "contract.h"  // generated from ssmrt/ops/spec.py: names, input / output counts, optional inputs
#include "half.h"
#include "kernels.h"
#include "ort_abi.h"

using ssmrt_ort::Calls;
using ssmrt_ort::KernelContext;
using ssmrt_ort::KernelInfo;
using ssmrt_ort::Status;
using ssmrt_ort::Value;
using ssmrt_contract::OpContract;

#define SSMRT_TRY(expr)               \
  do {                                  \
    if (Status* s_ = (expr)) return s_; \
  } while (0)

namespace {

struct Tensor {
  bool present = false;  // false: an absent optional input
  const float* data = nullptr;
  std::vector<int64_t> shape;
  const float* or_null() const { return present ? data : nullptr; }
  int64_t operator[](size_t i) const { return shape[i]; }
};

const char* type_name(int type) { return type == ssmrt_ort::kFloat16 ? "float16" : "float32"; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A tensor's element type and shape, the type-and-shape info released on every path.
Status* type_and_shape(const Calls& api, const Value* value, int* type, std::vector<int64_t>* shape) {
  ssmrt_ort::TensorTypeAndShapeInfo* info = nullptr;
  SSMRT_TRY(api.GetTensorTypeAndShape(value, &info));
  size_t n = 0;
  Status* s = api.GetTensorElementType(info, type);
  if (!s) s = api.GetDimensionsCount(info, &n);
  if (!s) {
    shape->resize(n);
    s = api.GetDimensions(info, shape->data(), n);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

// How many distinct threads have run kernel pieces since the last SsmrtPoolThreadsReset(): what a test reads to
// see the work really spread over the session's threads. One relaxed load per piece.
std::atomic<uint64_t> g_epoch{1};
std::atomic<int> g_threads_seen{0};
thread_local uint64_t t_epoch = 0;

void note_thread() {
  const uint64_t epoch = g_epoch.load(std::memory_order_relaxed);
  if (t_epoch != epoch) {
    t_epoch = epoch;
    g_threads_seen.fetch_add(1, std::memory_order_relaxed);
  }
}

// The kernels' pieces on the session's intra-op thread pool (its thread setting holds for them too).
class PoolExecutor final : public ssmrt_cpu::Executor {
 public:
  PoolExecutor(const Calls& api, const KernelContext* ctx) : api_(api), ctx_(ctx) {}
  void run(int64_t chunks, const std::function<void(int64_t)>& fn) const override {
    auto call = [](void* f, size_t i) {
      note_thread();
      (*static_cast<const std::function<void(int64_t)>*>(f))(static_cast<int64_t>(i));
    };
    Status* s = api_.KernelContextParallelFor(ctx_, call, static_cast<size_t>(chunks), 0,
                                              const_cast<std::function<void(int64_t)>*>(&fn));
    if (s == nullptr) return;
    api_.ReleaseStatus(s);  // no pool to run on: do the pieces here
    note_thread();
    for (int64_t c = 0; c < chunks; ++c) fn(c);
  }

 private:
  const Calls& api_;
  const KernelContext* ctx_;
};

// One compute call: reads inputs, checks them, allocates outputs; errors name the op and the tensor. `act` is the
// activations' type of the registered variant; a float16 input reaches the kernel widened to float32, and a
// float16 output is written as float32 to a buffer that finish() rounds into it.
class Call {
 public:
  Call(const Calls& api, KernelContext* ctx, const OpContract& op, int act, const char* domain = "ssmrt")
      : api_(api), ctx_(ctx), contract_(op), op_(op.name), domain_(domain), act_(act) {}

  Status* error(const std::string& msg) const {
    return api_.CreateStatus(ssmrt_ort::kInvalidArgument,
                             (std::string(domain_) + "::" + op_ + ": " + msg).c_str());
  }

  int input_type(size_t index) const { return contract_.fp32_inputs[index] ? ssmrt_ort::kFloat32 : act_; }
  int output_type(size_t index) const { return contract_.fp32_outputs[index] ? ssmrt_ort::kFloat32 : act_; }

  Status* input(size_t index, const char* name, size_t rank, Tensor* out) {
    const Value* value = nullptr;
    SSMRT_TRY(api_.KernelContextGetInput(ctx_, index, &value));
    if (value == nullptr) return nullptr;
    out->present = true;
    int type = 0;
    SSMRT_TRY(type_and_shape(api_, value, &type, &out->shape));
    const size_t n = out->shape.size();
    if (type != input_type(index))
      return error(std::string("input ") + name + " must be " + type_name(input_type(index)));
    if (rank != 0 && n != rank)  // rank 0: the caller checks
      return error(std::string("input ") + name + " must have rank " + std::to_string(rank) + ", got " +
                   shape_str(out->shape));
    void* data = nullptr;
    SSMRT_TRY(api_.GetTensorMutableData(const_cast<Value*>(value), &data));
    if (type == ssmrt_ort::kFloat32) {
      out->data = static_cast<const float*>(data);
      return nullptr;
    }
    const int64_t count = elements(out->shape);
    owned_.emplace_back(count);
    ssmrt_half::to_float(static_cast<const uint16_t*>(data), owned_.back().data(), count);
    out->data = owned_.back().data();
    return nullptr;
  }

  // A float16 input read as stored (a weight a kernel reads as float16), required, of the given rank.
  Status* half_input(size_t index, const char* name, size_t rank, std::vector<int64_t>* shape,
                     const uint16_t** out) {
    const Value* value = nullptr;
    SSMRT_TRY(api_.KernelContextGetInput(ctx_, index, &value));
    if (value == nullptr) return error(std::string("input ") + name + " is required");
    int type = 0;
    SSMRT_TRY(type_and_shape(api_, value, &type, shape));
    if (type != ssmrt_ort::kFloat16) return error(std::string("input ") + name + " must be float16");
    if (shape->size() != rank)
      return error(std::string("input ") + name + " must have rank " + std::to_string(rank) + ", got " +
                   shape_str(*shape));
    void* data = nullptr;
    SSMRT_TRY(api_.GetTensorMutableData(const_cast<Value*>(value), &data));
    *out = static_cast<const uint16_t*>(data);
    return nullptr;
  }

  Status* required(size_t index, const char* name, size_t rank, Tensor* out) {
    SSMRT_TRY(input(index, name, rank, out));
    return out->present ? nullptr : error(std::string("input ") + name + " is required");
  }

  // t's shape must equal `want` (a dimension of -1 matches anything).
  Status* expect(const Tensor& t, const char* name, const std::vector<int64_t>& want, const char* meaning) const {
    bool ok = t.shape.size() == want.size();
    for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || t.shape[i] == want[i];
    if (ok) return nullptr;
    return error(std::string("input ") + name + " has shape " + shape_str(t.shape) + ", expected " +
                 shape_str(want) + " " + meaning);
  }

  Status* output(size_t index, const std::vector<int64_t>& shape, float** out) {
    Value* value = nullptr;
    SSMRT_TRY(api_.KernelContextGetOutput(ctx_, index, shape.data(), shape.size(), &value));
    void* data = nullptr;
    SSMRT_TRY(api_.GetTensorMutableData(value, &data));
    if (output_type(index) == ssmrt_ort::kFloat32) {
      *out = static_cast<float*>(data);
      return nullptr;
    }
    const int64_t count = elements(shape);
    owned_.emplace_back(count);
    pending_.push_back({static_cast<uint16_t*>(data), owned_.back().data(), count});
    *out = owned_.back().data();
    return nullptr;
  }

  // After the kernel: the float16 outputs, rounded from their float32 buffers.
  void finish() {
    for (const Pending& p : pending_) ssmrt_half::from_float(p.src, p.dst, p.count);
    pending_.clear();
  }

 private:
  static int64_t elements(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  struct Pending {
    uint16_t* dst;
    const float* src;
    int64_t count;
  };
  const Calls& api_;
  KernelContext* ctx_;
  const OpContract& contract_;
  const char* op_;
  const char* domain_;
  int act_;
  std::vector<ssmrt_cpu::Scratch> owned_;  // widened inputs, outputs before rounding (moves keep their data)
  std::vector<Pending> pending_;
};

// ------------------------------------------------------------------------------------------ CausalConv1d

struct CausalConv1dKernel {
  Calls api;
  int act;  // the activations' type of the variant this node runs
  bool silu = true;
};

template <int Act>
Status* conv_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  auto* k = new CausalConv1dKernel{api, Act};
  size_t size = 0;
  // A model without the attribute gets the contract's default, silu.
  if (Status* s = api.KernelInfoGetAttributeString(info, "activation", nullptr, &size)) {
    api.ReleaseStatus(s);
  } else {
    std::string value(size, '\0');
    if (Status* s2 = api.KernelInfoGetAttributeString(info, "activation", value.data(), &size)) {
      delete k;
      return s2;
    }
    value.resize(size ? size - 1 : 0);  // size counts the terminating NUL
    if (value != "silu" && value != "none") {
      delete k;
      return api.CreateStatus(ssmrt_ort::kInvalidArgument,
                              ("ssmrt::CausalConv1d: attribute activation must be \"silu\" or \"none\", got \"" +
                               value + "\"").c_str());
    }
    k->silu = value == "silu";
  }
  *out = k;
  return nullptr;
}

Status* conv_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<CausalConv1dKernel*>(kernel);
  Call call(k->api, ctx, ssmrt_contract::kCausalConv1d, k->act);
  Tensor x, w, bias, state;
  SSMRT_TRY(call.required(0, "x", 3, &x));
  SSMRT_TRY(call.required(1, "weight", 2, &w));
  SSMRT_TRY(call.input(2, "bias", 1, &bias));
  SSMRT_TRY(call.required(3, "conv_state", 3, &state));
  const int64_t batch = x[0], seqlen = x[1], dim = x[2], width = w[1];
  if (width < 1) return call.error("weight has width 0");
  SSMRT_TRY(call.expect(w, "weight", {dim, -1}, "(dim, width) with dim from x"));
  if (bias.present) SSMRT_TRY(call.expect(bias, "bias", {dim}, "(dim,)"));
  SSMRT_TRY(call.expect(state, "conv_state", {batch, dim, width - 1}, "(batch, dim, width - 1)"));
  float *y = nullptr, *state_out = nullptr;
  SSMRT_TRY(call.output(0, {batch, seqlen, dim}, &y));
  SSMRT_TRY(call.output(1, {batch, dim, width - 1}, &state_out));
  ssmrt_cpu::causal_conv1d(PoolExecutor(k->api, ctx), x.data, w.data, bias.or_null(), state.data, y, state_out, batch,
                           seqlen, dim, width, k->silu);
  call.finish();
  return nullptr;
}

// ----------------------------------------------------------------------------------------------- SSDScan

// SSDScan's dt attributes, shared with SSDMixer.
struct DtAttributes {
  bool softplus = false;
  float min = 0.0f;
  float max = std::numeric_limits<float>::infinity();
  bool clamp() const { return min > 0.0f || max < std::numeric_limits<float>::infinity(); }
};

// Reads them; absent ones take the contract's defaults (no softplus, no dt limit). Returns what is wrong, or "".
std::string read_dt_attributes(const Calls& api, const KernelInfo* info, DtAttributes* dt) {
  int64_t softplus = 0;
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "dt_softplus", &softplus)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeFloat(info, "dt_min", &dt->min)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeFloat(info, "dt_max", &dt->max)) api.ReleaseStatus(s);
  dt->softplus = softplus == 1;
  if (softplus != 0 && softplus != 1) return "attribute dt_softplus must be 0 or 1, got " + std::to_string(softplus);
  if (!(dt->min >= 0.0f) || !(dt->max >= dt->min))
    return "attributes dt_min / dt_max must satisfy 0 <= dt_min <= dt_max, got " + std::to_string(dt->min) + " / " +
           std::to_string(dt->max);
  return "";
}

// The optional D ((nheads,) or (nheads, headdim): d_per_channel) and dt_bias ((nheads,)) of an SSD.
Status* check_d_and_dt_bias(const Call& call, const Tensor& D, const Tensor& dt_bias, int64_t nheads, int64_t headdim,
                            bool* d_per_channel) {
  *d_per_channel = D.present && D.shape.size() == 2;
  if (D.present && D.shape.size() == 1) SSMRT_TRY(call.expect(D, "D", {nheads}, "(nheads,) or (nheads, headdim)"));
  if (*d_per_channel) SSMRT_TRY(call.expect(D, "D", {nheads, headdim}, "(nheads,) or (nheads, headdim)"));
  if (D.present && D.shape.size() != 1 && D.shape.size() != 2)
    return call.error("input D has shape " + shape_str(D.shape) + ", expected (nheads,) or (nheads, headdim)");
  if (dt_bias.present) SSMRT_TRY(call.expect(dt_bias, "dt_bias", {nheads}, "(nheads,)"));
  return nullptr;
}

struct SsdScanKernel {
  Calls api;
  int act;
  DtAttributes dt;
};

template <int Act>
Status* ssd_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  DtAttributes dt;
  const std::string bad = read_dt_attributes(api, info, &dt);
  if (!bad.empty()) return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt::SSDScan: " + bad).c_str());
  *out = new SsdScanKernel{api, Act, dt};
  return nullptr;
}

Status* ssd_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<SsdScanKernel*>(kernel);
  Call call(k->api, ctx, ssmrt_contract::kSSDScan, k->act);
  Tensor x, dt, A, B, C, D, dt_bias, state;
  SSMRT_TRY(call.required(0, "x", 4, &x));
  SSMRT_TRY(call.required(1, "dt", 3, &dt));
  SSMRT_TRY(call.required(2, "A", 1, &A));
  SSMRT_TRY(call.required(3, "B", 4, &B));
  SSMRT_TRY(call.required(4, "C", 4, &C));
  SSMRT_TRY(call.input(5, "D", 0, &D));  // rank 1 or 2, checked below
  SSMRT_TRY(call.input(6, "dt_bias", 1, &dt_bias));
  SSMRT_TRY(call.required(7, "ssm_state", 4, &state));
  const int64_t batch = x[0], seqlen = x[1], nheads = x[2], headdim = x[3], dstate = B[3], ngroups = B[2];
  SSMRT_TRY(call.expect(dt, "dt", {batch, seqlen, nheads}, "(batch, seqlen, nheads)"));
  SSMRT_TRY(call.expect(A, "A", {nheads}, "(nheads,)"));
  SSMRT_TRY(call.expect(B, "B", {batch, seqlen, -1, -1}, "(batch, seqlen, ngroups, dstate)"));
  SSMRT_TRY(call.expect(C, "C", B.shape, "(batch, seqlen, ngroups, dstate) like B"));
  if (ngroups < 1 || nheads % ngroups != 0)
    return call.error("ngroups (" + std::to_string(ngroups) + ", from B) must divide nheads (" +
                      std::to_string(nheads) + ")");
  bool d_per_channel = false;
  SSMRT_TRY(check_d_and_dt_bias(call, D, dt_bias, nheads, headdim, &d_per_channel));
  SSMRT_TRY(call.expect(state, "ssm_state", {batch, nheads, headdim, dstate}, "(batch, nheads, headdim, dstate)"));
  float *y = nullptr, *state_out = nullptr;
  SSMRT_TRY(call.output(0, {batch, seqlen, nheads, headdim}, &y));
  SSMRT_TRY(call.output(1, {batch, nheads, headdim, dstate}, &state_out));
  ssmrt_cpu::ssd_scan(PoolExecutor(k->api, ctx), x.data, dt.data, A.data, B.data, C.data, D.or_null(), d_per_channel,
                      dt_bias.or_null(), state.data, y, state_out, batch, seqlen, nheads, headdim, dstate, ngroups,
                      k->dt.softplus, k->dt.clamp(), k->dt.min, k->dt.max);
  call.finish();
  return nullptr;
}

// ----------------------------------------------------------------------------------------- SelectiveScan

struct SelectiveScanKernel {
  Calls api;
  int act;
  bool delta_softplus = false;
};

template <int Act>
Status* scan_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  auto* k = new SelectiveScanKernel{api, Act};
  int64_t value = 0;
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "delta_softplus", &value)) {
    api.ReleaseStatus(s);  // absent: the contract's default, 0
    value = 0;
  }
  if (value != 0 && value != 1) {
    delete k;
    return api.CreateStatus(ssmrt_ort::kInvalidArgument,
                            ("ssmrt::SelectiveScan: attribute delta_softplus must be 0 or 1, got " +
                             std::to_string(value)).c_str());
  }
  k->delta_softplus = value == 1;
  *out = k;
  return nullptr;
}

Status* scan_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<SelectiveScanKernel*>(kernel);
  Call call(k->api, ctx, ssmrt_contract::kSelectiveScan, k->act);
  Tensor u, delta, A, B, C, D, z, delta_bias, state;
  SSMRT_TRY(call.required(0, "u", 3, &u));
  SSMRT_TRY(call.required(1, "delta", 3, &delta));
  SSMRT_TRY(call.required(2, "A", 2, &A));
  SSMRT_TRY(call.required(3, "B", 4, &B));
  SSMRT_TRY(call.required(4, "C", 4, &C));
  SSMRT_TRY(call.input(5, "D", 1, &D));
  SSMRT_TRY(call.input(6, "z", 3, &z));
  SSMRT_TRY(call.input(7, "delta_bias", 1, &delta_bias));
  SSMRT_TRY(call.required(8, "ssm_state", 3, &state));
  const int64_t batch = u[0], seqlen = u[1], dim = u[2], dstate = A[1], ngroups = B[2];
  SSMRT_TRY(call.expect(delta, "delta", u.shape, "(batch, seqlen, dim) like u"));
  SSMRT_TRY(call.expect(A, "A", {dim, -1}, "(dim, dstate) with dim from u"));
  SSMRT_TRY(call.expect(B, "B", {batch, seqlen, -1, dstate}, "(batch, seqlen, ngroups, dstate)"));
  SSMRT_TRY(call.expect(C, "C", B.shape, "(batch, seqlen, ngroups, dstate) like B"));
  if (ngroups < 1 || dim % ngroups != 0)
    return call.error("ngroups (" + std::to_string(ngroups) + ", from B) must divide dim (" + std::to_string(dim) +
                      ")");
  if (D.present) SSMRT_TRY(call.expect(D, "D", {dim}, "(dim,)"));
  if (z.present) SSMRT_TRY(call.expect(z, "z", u.shape, "(batch, seqlen, dim) like u"));
  if (delta_bias.present) SSMRT_TRY(call.expect(delta_bias, "delta_bias", {dim}, "(dim,)"));
  SSMRT_TRY(call.expect(state, "ssm_state", {batch, dim, dstate}, "(batch, dim, dstate)"));
  float *y = nullptr, *state_out = nullptr;
  SSMRT_TRY(call.output(0, {batch, seqlen, dim}, &y));
  SSMRT_TRY(call.output(1, {batch, dim, dstate}, &state_out));
  ssmrt_cpu::selective_scan(PoolExecutor(k->api, ctx), u.data, delta.data, A.data, B.data, C.data, D.or_null(),
                            z.or_null(), delta_bias.or_null(), state.data, y, state_out, batch, seqlen, dim, dstate,
                            ngroups, k->delta_softplus);
  call.finish();
  return nullptr;
}

// ------------------------------------------------------------------------------------------ HalfMatMul
//
// ssmrt.cpu::HalfMatMul(A (..., K) float16, B (K, N) float16) -> Y (..., N) float16: MatMul with float32 sums and
// float16 weights read as stored; attribute trans_b 1: B is given as (N, K). Not an artifact op: the ONNX Runtime
// runner routes a float16 graph's decode-step MatMuls here (ONNX Runtime's CPU float16 MatMul reads its weights at
// float32 cost). Attribute threads (default 0: not known): the session's intra-op thread count, each of which the
// (K, N) kernel gives one run of b's rows (ONNX Runtime's C API does not tell a custom op its pool's size); the
// (N, K) kernel splits by columns, with no partial sums to add, and deals them to the pool in small blocks (one
// run per thread measured no faster there).

struct HalfMatMulKernel {
  Calls api;
  bool trans_b = false;
  int64_t threads = 0;
};

Status* half_matmul_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  int64_t trans_b = 0;
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "trans_b", &trans_b)) api.ReleaseStatus(s);  // absent: 0
  if (trans_b != 0 && trans_b != 1)
    return api.CreateStatus(ssmrt_ort::kInvalidArgument,
                            ("ssmrt.cpu::HalfMatMul: attribute trans_b must be 0 or 1, got " +
                             std::to_string(trans_b)).c_str());
  int64_t threads = 0;
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "threads", &threads)) api.ReleaseStatus(s);  // absent: 0
  if (threads < 0)
    return api.CreateStatus(ssmrt_ort::kInvalidArgument,
                            ("ssmrt.cpu::HalfMatMul: attribute threads must be 0 or more, got " +
                             std::to_string(threads)).c_str());
  *out = new HalfMatMulKernel{api, trans_b == 1, threads};
  return nullptr;
}

Status* half_matmul_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<HalfMatMulKernel*>(kernel);
  const Calls& api = k->api;
  auto error = [&](const std::string& msg) {
    return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt.cpu::HalfMatMul: " + msg).c_str());
  };
  const void* data[2] = {nullptr, nullptr};
  std::vector<int64_t> shape[2];
  for (size_t i = 0; i < 2; ++i) {
    const Value* value = nullptr;
    SSMRT_TRY(api.KernelContextGetInput(ctx, i, &value));
    if (value == nullptr) return error("both inputs are required");
    int type = 0;
    SSMRT_TRY(type_and_shape(api, value, &type, &shape[i]));
    if (type != ssmrt_ort::kFloat16) return error(std::string(i ? "B" : "A") + " must be float16");
    void* p = nullptr;
    SSMRT_TRY(api.GetTensorMutableData(const_cast<Value*>(value), &p));
    data[i] = p;
  }
  const size_t k_dim = k->trans_b ? 1 : 0;
  if (shape[1].size() != 2 || shape[0].empty() || shape[0].back() != shape[1][k_dim])
    return error("A " + shape_str(shape[0]) + " and B " + shape_str(shape[1]) + " do not multiply: B must be " +
                 (k->trans_b ? "(N, K)" : "(K, N)") + " with K A's last dimension");
  const int64_t K = shape[1][k_dim], N = shape[1][1 - k_dim];
  int64_t M = 1;
  for (size_t i = 0; i + 1 < shape[0].size(); ++i) M *= shape[0][i];
  std::vector<int64_t> out_shape(shape[0]);
  out_shape.back() = N;
  Value* out = nullptr;
  SSMRT_TRY(api.KernelContextGetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out));
  void* y = nullptr;
  SSMRT_TRY(api.GetTensorMutableData(out, &y));
  const auto* a = static_cast<const uint16_t*>(data[0]);
  const auto* b = static_cast<const uint16_t*>(data[1]);
  if (k->trans_b)
    ssmrt_cpu::half_matmul_nt(PoolExecutor(api, ctx), a, b, static_cast<uint16_t*>(y), M, K, N);
  else
    ssmrt_cpu::half_matmul(PoolExecutor(api, ctx), a, b, static_cast<uint16_t*>(y), M, K, N, k->threads);
  return nullptr;
}

// ------------------------------------------------------------------------------------------ Int8MatMul, IntDotMatMul
//
// ssmrt.cpu::Int8MatMul(A (..., K) float32, B (N, ceil(K / block_size), block_size) uint8, scales (N, blocks)
// or (N * blocks,) float32, zero_points the same uint8, optional) -> Y (..., N) float32, attributes K, N,
// block_size: what com.microsoft::MatMulNBits computes with bits 8 and float32 activations (accuracy level 0), on
// the same initializers.
// ssmrt.cpu::IntDotMatMul: the same inputs for an attribute bits of 8 or 4 (B (N, blocks, block_size / 2), two
// codes a byte; zero points (N, ceil(blocks / 2)) or flat, two a byte), block_size a power of two from 32: what
// MatMulNBits computes with int8 activations (accuracy level 4).
// Neither is an artifact op: the ONNX Runtime runner routes a quantised artifact's decode-step MatMulNBits to them
// (kernels.h says what each reads and why).

struct NBitsKernel {
  Calls api;
  const char* op;
  int64_t K = 0, N = 0, block = 0, bits = 8;
  bool int_dot = false;
};

template <bool kIntDot>
Status* nbits_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  const char* op = kIntDot ? "ssmrt.cpu::IntDotMatMul" : "ssmrt.cpu::Int8MatMul";
  // bits: Int8MatMul's are 8; IntDotMatMul's default is MatMulNBits' own, 4
  int64_t v[4] = {0, 0, 0, kIntDot ? 4 : 8};
  const char* names[4] = {"K", "N", "block_size", "bits"};
  if (kIntDot) {
    if (Status* s = api.KernelInfoGetAttributeInt64(info, "bits", &v[3])) api.ReleaseStatus(s);  // absent: 4
  }
  for (int i = 0; i < 3; ++i) {
    if (Status* s = api.KernelInfoGetAttributeInt64(info, names[i], &v[i])) api.ReleaseStatus(s);  // absent: 0
    if (v[i] < 1)
      return api.CreateStatus(ssmrt_ort::kInvalidArgument, (std::string(op) + ": attribute " + names[i] +
                                                            " must be 1 or more, got " + std::to_string(v[i])).c_str());
  }
  if (v[3] != 4 && v[3] != 8)
    return api.CreateStatus(ssmrt_ort::kInvalidArgument,
                            (std::string(op) + ": attribute bits must be 4 or 8, got " + std::to_string(v[3])).c_str());
  if (kIntDot && (v[2] < 32 || (v[2] & (v[2] - 1)) != 0))
    return api.CreateStatus(ssmrt_ort::kInvalidArgument, (std::string(op) + ": attribute block_size must be a power "
                                                          "of two from 32, got " + std::to_string(v[2])).c_str());
  *out = new NBitsKernel{api, op, v[0], v[1], v[2], v[3], kIntDot};
  return nullptr;
}

Status* nbits_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<NBitsKernel*>(kernel);
  const Calls& api = k->api;
  auto error = [&](const std::string& msg) {
    return api.CreateStatus(ssmrt_ort::kInvalidArgument, (std::string(k->op) + ": " + msg).c_str());
  };
  const int64_t blocks = (k->K + k->block - 1) / k->block;
  const int64_t zp_cols = k->bits == 8 ? blocks : (blocks + 1) / 2;  // 4-bit zero points two a byte
  const char* names[4] = {"A", "B", "scales", "zero_points"};
  const int types[4] = {ssmrt_ort::kFloat32, ssmrt_ort::kUint8, ssmrt_ort::kFloat32, ssmrt_ort::kUint8};
  const std::vector<int64_t> want[4] = {{}, {k->N, blocks, k->block * k->bits / 8}, {k->N, blocks}, {k->N, zp_cols}};
  const void* data[4] = {nullptr, nullptr, nullptr, nullptr};
  std::vector<int64_t> shape[4];
  for (size_t i = 0; i < 4; ++i) {
    const Value* value = nullptr;
    SSMRT_TRY(api.KernelContextGetInput(ctx, i, &value));
    if (value == nullptr) {
      if (i < 3) return error(std::string(names[i]) + " is required");
      continue;
    }
    int type = 0;
    SSMRT_TRY(type_and_shape(api, value, &type, &shape[i]));
    if (type != types[i])
      return error(std::string(names[i]) + " must be " + (types[i] == ssmrt_ort::kUint8 ? "uint8" : "float32"));
    // scales and zero points may also be flat, as MatMulNBits takes them from older quantisers
    const bool flat = i >= 2 && shape[i] == std::vector<int64_t>{want[i][0] * want[i][1]};
    if (i > 0 && shape[i] != want[i] && !flat)
      return error(std::string(names[i]) + " must be " + shape_str(want[i]) + (i >= 2 ? " or flat" : "") + " (N " +
                   std::to_string(k->N) + ", K " + std::to_string(k->K) + ", block_size " +
                   std::to_string(k->block) + (k->int_dot ? ", bits " + std::to_string(k->bits) : "") + "), got " +
                   shape_str(shape[i]));
    void* p = nullptr;
    SSMRT_TRY(api.GetTensorMutableData(const_cast<Value*>(value), &p));
    data[i] = p;
  }
  if (shape[0].empty() || shape[0].back() != k->K)
    return error("A " + shape_str(shape[0]) + " must end in K " + std::to_string(k->K));
  int64_t M = 1;
  for (size_t i = 0; i + 1 < shape[0].size(); ++i) M *= shape[0][i];
  std::vector<int64_t> out_shape(shape[0]);
  out_shape.back() = k->N;
  Value* out = nullptr;
  SSMRT_TRY(api.KernelContextGetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out));
  void* y = nullptr;
  SSMRT_TRY(api.GetTensorMutableData(out, &y));
  const auto* a = static_cast<const float*>(data[0]);
  const auto* q = static_cast<const uint8_t*>(data[1]);
  const auto* scales = static_cast<const float*>(data[2]);
  const auto* zp = static_cast<const uint8_t*>(data[3]);
  if (k->int_dot)
    ssmrt_cpu::int_dot_matmul(PoolExecutor(api, ctx), a, q, scales, zp, static_cast<float*>(y), M, k->K, k->N,
                              k->block, static_cast<int>(k->bits));
  else
    ssmrt_cpu::int8_matmul(PoolExecutor(api, ctx), a, q, scales, zp, static_cast<float*>(y), M, k->K, k->N, k->block);
  return nullptr;
}

// ------------------------------------------------------------------------------------------ SSDMixer
//
// ssmrt.cpu::SSDMixer: the Mamba-2 mixer between its projections in one node (kernels.h says what it computes;
// ssmrt.ort_ops.fuse_ssd_mixers puts it in a graph). Inputs zxbcdt, conv_weight, conv_bias (optional),
// conv_state, A, D (optional), dt_bias (optional), ssm_state, norm_weight; outputs y, present_conv_state,
// present_ssm_state. Every size is read from the inputs: nheads, headdim and dstate from ssm_state, ngroups from
// what the conv's width leaves for B and C. Attributes: dt_softplus, dt_min, dt_max as SSDScan's; eps the norm's.

constexpr bool kSsdMixerOptional[] = {false, false, true, false, false, true, true, false, false};
constexpr bool kSsdMixerFp32Inputs[] = {false, false, false, false, true, true, true, true, true};
constexpr bool kSsdMixerFp32Outputs[] = {false, false, true};
constexpr OpContract kSsdMixer{"SSDMixer", 9, 3, kSsdMixerOptional, kSsdMixerFp32Inputs, kSsdMixerFp32Outputs};

struct SsdMixerKernel {
  Calls api;
  int act;
  DtAttributes dt;
  float eps = 1e-5f;
};

// The attributes SSDMixer and SSDBlock share: SSDScan's dt ones and the gated norm's eps. Returns what is wrong,
// or "".
std::string read_mixer_attributes(const Calls& api, const KernelInfo* info, DtAttributes* dt, float* eps) {
  std::string bad = read_dt_attributes(api, info, dt);
  if (Status* s = api.KernelInfoGetAttributeFloat(info, "eps", eps)) api.ReleaseStatus(s);
  if (bad.empty() && !(*eps >= 0.0f)) bad = "attribute eps must be 0 or more, got " + std::to_string(*eps);
  return bad;
}

template <int Act>
Status* ssd_mixer_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info,
                         void** out) {
  Calls api(raw);
  DtAttributes dt;
  float eps = 1e-5f;
  std::string bad = read_mixer_attributes(api, info, &dt, &eps);
  if (!bad.empty()) return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt.cpu::SSDMixer: " + bad).c_str());
  *out = new SsdMixerKernel{api, Act, dt, eps};
  return nullptr;
}

// A Mamba-2 mixer's inputs after zxbcdt (SSDMixer's 1-8, SSDBlock's 2-9): conv_weight, conv_bias (optional),
// conv_state, A, D (optional), dt_bias (optional), ssm_state, norm_weight, and the sizes they give.
struct MixerInputs {
  Tensor w, bias, conv_state, A, D, dt_bias, ssm_state, norm_w;
  int64_t batch = 0, nheads = 0, headdim = 0, dstate = 0, ngroups = 0, conv_dim = 0, width = 0, d_ssm = 0;
  bool d_per_channel = false;
  int64_t zxbcdt_len() const { return d_ssm + conv_dim + nheads; }
};

// Reads them from index `first` on and checks each against the others: every size comes from the inputs,
// nheads, headdim and dstate from ssm_state, ngroups from what the conv's width leaves for B and C.
Status* read_mixer_inputs(Call& call, size_t first, MixerInputs* m) {
  SSMRT_TRY(call.required(first, "conv_weight", 2, &m->w));
  SSMRT_TRY(call.input(first + 1, "conv_bias", 1, &m->bias));
  SSMRT_TRY(call.required(first + 2, "conv_state", 3, &m->conv_state));
  SSMRT_TRY(call.required(first + 3, "A", 1, &m->A));
  SSMRT_TRY(call.input(first + 4, "D", 0, &m->D));  // rank 1 or 2, checked below
  SSMRT_TRY(call.input(first + 5, "dt_bias", 1, &m->dt_bias));
  SSMRT_TRY(call.required(first + 6, "ssm_state", 4, &m->ssm_state));
  SSMRT_TRY(call.required(first + 7, "norm_weight", 1, &m->norm_w));
  m->batch = m->ssm_state[0];
  m->nheads = m->ssm_state[1];
  m->headdim = m->ssm_state[2];
  m->dstate = m->ssm_state[3];
  m->conv_dim = m->w[0];
  m->width = m->w[1];
  m->d_ssm = m->nheads * m->headdim;
  const int64_t nheads = m->nheads, dstate = m->dstate, conv_dim = m->conv_dim, d_ssm = m->d_ssm;
  if (m->width < 1) return call.error("conv_weight has width 0");
  if (dstate < 1 || conv_dim <= d_ssm || (conv_dim - d_ssm) % (2 * dstate) != 0)
    return call.error("conv_weight's " + std::to_string(conv_dim) + " channels must be nheads * headdim (" +
                      std::to_string(d_ssm) + ", from ssm_state) plus B's and C's, each a multiple of dstate (" +
                      std::to_string(dstate) + ")");
  m->ngroups = (conv_dim - d_ssm) / (2 * dstate);
  if (nheads % m->ngroups != 0)
    return call.error("ngroups (" + std::to_string(m->ngroups) + ", from conv_weight) must divide nheads (" +
                      std::to_string(nheads) + ")");
  if (m->bias.present) SSMRT_TRY(call.expect(m->bias, "conv_bias", {conv_dim}, "(conv_dim,)"));
  SSMRT_TRY(call.expect(m->conv_state, "conv_state", {m->batch, conv_dim, m->width - 1},
                        "(batch, conv_dim, width - 1)"));
  SSMRT_TRY(call.expect(m->A, "A", {nheads}, "(nheads,)"));
  SSMRT_TRY(check_d_and_dt_bias(call, m->D, m->dt_bias, nheads, m->headdim, &m->d_per_channel));
  SSMRT_TRY(call.expect(m->norm_w, "norm_weight", {d_ssm}, "(nheads * headdim,)"));
  return nullptr;
}

// Its outputs from index `first` on: y (batch, seqlen, d_ssm), present_conv_state, present_ssm_state; y left out
// where `y` is null (SSDBlock's first output is the norm's after it, and its mixer's y stays inside).
struct MixerOutputs {
  float *y = nullptr, *conv_state = nullptr, *ssm_state = nullptr;
};
Status* mixer_outputs(Call& call, size_t first, const MixerInputs& m, int64_t seqlen, float** y, MixerOutputs* out) {
  if (y != nullptr) SSMRT_TRY(call.output(first, {m.batch, seqlen, m.d_ssm}, y));
  SSMRT_TRY(call.output(first + 1, {m.batch, m.conv_dim, m.width - 1}, &out->conv_state));
  return call.output(first + 2, {m.batch, m.nheads, m.headdim, m.dstate}, &out->ssm_state);
}

Status* ssd_mixer_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<SsdMixerKernel*>(kernel);
  Call call(k->api, ctx, kSsdMixer, k->act, "ssmrt.cpu");
  Tensor zxbcdt;
  MixerInputs m;
  SSMRT_TRY(call.required(0, "zxbcdt", 3, &zxbcdt));
  SSMRT_TRY(read_mixer_inputs(call, 1, &m));
  const int64_t seqlen = zxbcdt[1];
  SSMRT_TRY(call.expect(zxbcdt, "zxbcdt", {m.batch, seqlen, m.zxbcdt_len()},
                        "(batch, seqlen, d_ssm + conv_dim + nheads): z, xBC and dt"));
  float* y = nullptr;
  MixerOutputs out;
  SSMRT_TRY(mixer_outputs(call, 0, m, seqlen, &y, &out));
  ssmrt_cpu::ssd_mixer(PoolExecutor(k->api, ctx), zxbcdt.data, m.w.data, m.bias.or_null(), m.conv_state.data,
                       m.A.data, m.D.or_null(), m.d_per_channel, m.dt_bias.or_null(), m.ssm_state.data,
                       m.norm_w.data, y, out.conv_state, out.ssm_state, m.batch, seqlen, m.nheads, m.headdim,
                       m.dstate, m.ngroups, m.width, k->dt.softplus, k->dt.clamp(), k->dt.min, k->dt.max, k->eps,
                       k->act == ssmrt_ort::kFloat16);
  call.finish();
  return nullptr;
}

// ---------------------------------------------------------------------------------------------- AddRMSNorm
//
// ssmrt.cpu::AddRMSNorm: a block's residual add and RMSNorm in one node (kernels.h says what it computes;
// ssmrt.ort_ops.fuse_add_rmsnorms puts it in a graph). Inputs x (activations), residual (float32, optional: the
// first block has none), weight (float32); outputs y (activations), residual_out (float32). Attributes eps, and
// round_half 0 | 1: the norm reads the sum rounded to float16 (a float16 model's graph does so; an attribute,
// not the variant's type, so that what is computed never depends on which variant ONNX Runtime picks).
// x's last dimension is the normalised one; every leading dimension is a row.

constexpr bool kAddRmsNormOptional[] = {false, true, false};
constexpr bool kAddRmsNormFp32Inputs[] = {false, true, true};
constexpr bool kAddRmsNormFp32Outputs[] = {false, true};
constexpr OpContract kAddRmsNorm{"AddRMSNorm", 3, 2, kAddRmsNormOptional, kAddRmsNormFp32Inputs,
                                 kAddRmsNormFp32Outputs};

struct AddRmsNormKernel {
  Calls api;
  int act;
  float eps = 1e-5f;
  bool round_half = false;
};

template <int Act>
Status* add_rmsnorm_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info,
                           void** out) {
  Calls api(raw);
  auto* k = new AddRmsNormKernel{api, Act};
  int64_t round_half = 0;
  if (Status* s = api.KernelInfoGetAttributeFloat(info, "eps", &k->eps)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "round_half", &round_half)) api.ReleaseStatus(s);
  std::string bad;
  if (!(k->eps >= 0.0f)) bad = "attribute eps must be 0 or more, got " + std::to_string(k->eps);
  if (round_half != 0 && round_half != 1) bad = "attribute round_half must be 0 or 1, got " + std::to_string(round_half);
  if (!bad.empty()) {
    delete k;
    return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt.cpu::AddRMSNorm: " + bad).c_str());
  }
  k->round_half = round_half == 1;
  *out = k;
  return nullptr;
}

Status* add_rmsnorm_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<AddRmsNormKernel*>(kernel);
  Call call(k->api, ctx, kAddRmsNorm, k->act, "ssmrt.cpu");
  Tensor x, residual, weight;
  SSMRT_TRY(call.required(0, "x", 0, &x));  // any rank of 1 or more, checked below
  SSMRT_TRY(call.input(1, "residual", 0, &residual));
  SSMRT_TRY(call.required(2, "weight", 1, &weight));
  if (x.shape.empty()) return call.error("input x must have rank 1 or more, got a scalar");
  const int64_t dim = x.shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.shape.size(); ++i) rows *= x.shape[i];
  if (residual.present) SSMRT_TRY(call.expect(residual, "residual", x.shape, "like x"));
  SSMRT_TRY(call.expect(weight, "weight", {dim}, "(dim,) with dim x's last dimension"));
  float *y = nullptr, *residual_out = nullptr;
  SSMRT_TRY(call.output(0, x.shape, &y));
  SSMRT_TRY(call.output(1, x.shape, &residual_out));
  ssmrt_cpu::add_rmsnorm(PoolExecutor(k->api, ctx), x.data, residual.or_null(), weight.data, y, residual_out, rows,
                         dim, k->eps, k->round_half);
  call.finish();
  return nullptr;
}

// ------------------------------------------------------------------------------------------ SelectiveMixer
//
// ssmrt.cpu::SelectiveMixer: a float16 Mamba-1 mixer between its projections in one node (kernels.h says what it
// computes; ssmrt.ort_ops.route_decode_matmuls puts it in a float16 graph's decode step, whose x_proj and dt_proj
// run on HalfMatMul). Inputs xz, conv_weight, conv_bias (optional), conv_state, x_proj, dt_proj (float16 as
// stored), A, D (optional), dt_bias (optional), ssm_state (float32 the last four); outputs y, present_conv_state,
// present_ssm_state (float32). Sizes from the inputs: dim from conv_weight, dstate from A, dt_rank from dt_proj.
// Attributes: delta_softplus as SelectiveScan's; threads as HalfMatMul's. Registered for float16 activations
// only: a float32 graph's products run on ONNX Runtime's MatMul, which this node could not call.

constexpr bool kSelectiveMixerOptional[] = {false, false, true, false, false, false, false, true, true, false};
constexpr bool kSelectiveMixerFp32Inputs[] = {false, false, false, false, false, false, true, true, true, true};
constexpr bool kSelectiveMixerFp32Outputs[] = {false, false, true};
constexpr OpContract kSelectiveMixer{"SelectiveMixer", 10, 3, kSelectiveMixerOptional, kSelectiveMixerFp32Inputs,
                                     kSelectiveMixerFp32Outputs};

struct SelectiveMixerKernel {
  Calls api;
  bool delta_softplus = false;
  int64_t threads = 0;
};

Status* selective_mixer_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info,
                               void** out) {
  Calls api(raw);
  int64_t softplus = 0, threads = 0;
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "delta_softplus", &softplus)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "threads", &threads)) api.ReleaseStatus(s);
  std::string bad;
  if (softplus != 0 && softplus != 1) bad = "attribute delta_softplus must be 0 or 1, got " + std::to_string(softplus);
  if (bad.empty() && threads < 0) bad = "attribute threads must be 0 or more, got " + std::to_string(threads);
  if (!bad.empty())
    return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt.cpu::SelectiveMixer: " + bad).c_str());
  *out = new SelectiveMixerKernel{api, softplus == 1, threads};
  return nullptr;
}

Status* selective_mixer_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<SelectiveMixerKernel*>(kernel);
  Call call(k->api, ctx, kSelectiveMixer, ssmrt_ort::kFloat16, "ssmrt.cpu");
  Tensor xz, w, bias, conv_state, A, D, dt_bias, ssm_state;
  std::vector<int64_t> x_proj_shape, dt_proj_shape;
  const uint16_t *x_proj = nullptr, *dt_proj = nullptr;
  SSMRT_TRY(call.required(0, "xz", 3, &xz));
  SSMRT_TRY(call.required(1, "conv_weight", 2, &w));
  SSMRT_TRY(call.input(2, "conv_bias", 1, &bias));
  SSMRT_TRY(call.required(3, "conv_state", 3, &conv_state));
  SSMRT_TRY(call.half_input(4, "x_proj", 2, &x_proj_shape, &x_proj));
  SSMRT_TRY(call.half_input(5, "dt_proj", 2, &dt_proj_shape, &dt_proj));
  SSMRT_TRY(call.required(6, "A", 2, &A));
  SSMRT_TRY(call.input(7, "D", 1, &D));
  SSMRT_TRY(call.input(8, "dt_bias", 1, &dt_bias));
  SSMRT_TRY(call.required(9, "ssm_state", 3, &ssm_state));
  const int64_t batch = xz[0], seqlen = xz[1], dim = w[0], width = w[1], dstate = A[1], dt_rank = dt_proj_shape[0];
  if (width < 1) return call.error("conv_weight has width 0");
  SSMRT_TRY(call.expect(xz, "xz", {batch, seqlen, 2 * dim}, "(batch, seqlen, 2 dim) with dim from conv_weight"));
  if (bias.present) SSMRT_TRY(call.expect(bias, "conv_bias", {dim}, "(dim,)"));
  SSMRT_TRY(call.expect(conv_state, "conv_state", {batch, dim, width - 1}, "(batch, dim, width - 1)"));
  SSMRT_TRY(call.expect(A, "A", {dim, -1}, "(dim, dstate)"));
  if (x_proj_shape != std::vector<int64_t>{dim, dt_rank + 2 * dstate})
    return call.error("input x_proj has shape " + shape_str(x_proj_shape) + ", expected " +
                      shape_str({dim, dt_rank + 2 * dstate}) + " (dim, dt_rank + 2 dstate)");
  if (dt_proj_shape[1] != dim)
    return call.error("input dt_proj has shape " + shape_str(dt_proj_shape) + ", expected (dt_rank, " +
                      std::to_string(dim) + ")");
  if (D.present) SSMRT_TRY(call.expect(D, "D", {dim}, "(dim,)"));
  if (dt_bias.present) SSMRT_TRY(call.expect(dt_bias, "dt_bias", {dim}, "(dim,)"));
  SSMRT_TRY(call.expect(ssm_state, "ssm_state", {batch, dim, dstate}, "(batch, dim, dstate)"));
  float *y = nullptr, *conv_out = nullptr, *ssm_out = nullptr;
  SSMRT_TRY(call.output(0, {batch, seqlen, dim}, &y));
  SSMRT_TRY(call.output(1, {batch, dim, width - 1}, &conv_out));
  SSMRT_TRY(call.output(2, {batch, dim, dstate}, &ssm_out));
  ssmrt_cpu::selective_mixer(PoolExecutor(k->api, ctx), xz.data, w.data, bias.or_null(), conv_state.data, x_proj,
                             dt_proj, A.data, D.or_null(), dt_bias.or_null(), ssm_state.data, y, conv_out, ssm_out,
                             batch, seqlen, dim, dt_rank, dstate, width, k->delta_softplus, k->threads);
  call.finish();
  return nullptr;
}

// ------------------------------------------------------------------------------------------ SSDBlock
//
// ssmrt.cpu::SSDBlock: in a float16 Mamba-2 graph's decode step, a mixer from in_proj to out_proj and the next
// block's residual add and norm (or the final norm) in one node, in place of HalfMatMul, SSDMixer, HalfMatMul and
// AddRMSNorm (kernels.h says what it computes; ssmrt.ort_ops.fuse_ssd_blocks puts it in a graph). Inputs hidden
// (the block's normed input), in_proj (float16 as stored), conv_weight, conv_bias (optional), conv_state, A, D
// (optional), dt_bias (optional), ssm_state, norm_weight (the gated norm's), out_proj (float16 as stored),
// residual (float32, optional), next_norm_weight (float32); outputs y (the next block's normed input),
// residual_out (float32), present_conv_state, present_ssm_state (float32). Attributes: SSDMixer's (dt_softplus,
// dt_min, dt_max, eps), HalfMatMul's threads, AddRMSNorm's eps and round_half as norm_eps and round_half.
// Registered for float16 activations only: its products are HalfMatMul's.

constexpr bool kSsdBlockOptional[] = {false, false, false, true, false, false, true, true,
                                      false, false, false, true, false};
constexpr bool kSsdBlockFp32Inputs[] = {false, false, false, false, false, true, true, true,
                                        true,  true,  false, true, true};
constexpr bool kSsdBlockFp32Outputs[] = {false, true, false, true};
constexpr OpContract kSsdBlock{"SSDBlock", 13, 4, kSsdBlockOptional, kSsdBlockFp32Inputs, kSsdBlockFp32Outputs};

struct SsdBlockKernel {
  Calls api;
  DtAttributes dt;
  float eps = 1e-5f, norm_eps = 1e-5f;
  bool round_half = false;
  int64_t threads = 0;
};

Status* ssd_block_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  SsdBlockKernel k{api};
  int64_t round_half = 0;
  std::string bad = read_mixer_attributes(api, info, &k.dt, &k.eps);
  if (Status* s = api.KernelInfoGetAttributeFloat(info, "norm_eps", &k.norm_eps)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "round_half", &round_half)) api.ReleaseStatus(s);
  if (Status* s = api.KernelInfoGetAttributeInt64(info, "threads", &k.threads)) api.ReleaseStatus(s);
  if (bad.empty() && !(k.norm_eps >= 0.0f))
    bad = "attribute norm_eps must be 0 or more, got " + std::to_string(k.norm_eps);
  if (bad.empty() && round_half != 0 && round_half != 1)
    bad = "attribute round_half must be 0 or 1, got " + std::to_string(round_half);
  if (bad.empty() && k.threads < 0) bad = "attribute threads must be 0 or more, got " + std::to_string(k.threads);
  if (!bad.empty()) return api.CreateStatus(ssmrt_ort::kInvalidArgument, ("ssmrt.cpu::SSDBlock: " + bad).c_str());
  k.round_half = round_half == 1;
  *out = new SsdBlockKernel(k);
  return nullptr;
}

Status* ssd_block_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<SsdBlockKernel*>(kernel);
  Call call(k->api, ctx, kSsdBlock, ssmrt_ort::kFloat16, "ssmrt.cpu");
  std::vector<int64_t> hidden_shape, in_shape, out_shape;
  const uint16_t *hidden = nullptr, *in_proj = nullptr, *out_proj = nullptr;
  MixerInputs m;
  Tensor residual, next_norm;
  SSMRT_TRY(call.half_input(0, "hidden", 3, &hidden_shape, &hidden));
  SSMRT_TRY(call.half_input(1, "in_proj", 2, &in_shape, &in_proj));
  SSMRT_TRY(read_mixer_inputs(call, 2, &m));
  SSMRT_TRY(call.half_input(10, "out_proj", 2, &out_shape, &out_proj));
  SSMRT_TRY(call.input(11, "residual", 3, &residual));
  SSMRT_TRY(call.required(12, "next_norm_weight", 1, &next_norm));
  const int64_t seqlen = hidden_shape[1], d_model = hidden_shape[2];
  if (hidden_shape[0] != m.batch)
    return call.error("input hidden has shape " + shape_str(hidden_shape) + ", expected (batch, seqlen, d_model) " +
                      "with batch " + std::to_string(m.batch) + " (from ssm_state)");
  if (in_shape != std::vector<int64_t>{d_model, m.zxbcdt_len()})
    return call.error("input in_proj has shape " + shape_str(in_shape) + ", expected " +
                      shape_str({d_model, m.zxbcdt_len()}) + " (d_model, d_ssm + conv_dim + nheads)");
  if (out_shape != std::vector<int64_t>{m.d_ssm, d_model})
    return call.error("input out_proj has shape " + shape_str(out_shape) + ", expected " +
                      shape_str({m.d_ssm, d_model}) + " (nheads * headdim, d_model)");
  if (residual.present) SSMRT_TRY(call.expect(residual, "residual", hidden_shape, "like hidden"));
  SSMRT_TRY(call.expect(next_norm, "next_norm_weight", {d_model}, "(d_model,)"));
  float *y = nullptr, *residual_out = nullptr;
  MixerOutputs out;
  SSMRT_TRY(call.output(0, hidden_shape, &y));
  SSMRT_TRY(call.output(1, hidden_shape, &residual_out));
  SSMRT_TRY(mixer_outputs(call, 1, m, seqlen, nullptr, &out));
  ssmrt_cpu::ssd_block(PoolExecutor(k->api, ctx), hidden, in_proj, m.w.data, m.bias.or_null(), m.conv_state.data,
                       m.A.data, m.D.or_null(), m.d_per_channel, m.dt_bias.or_null(), m.ssm_state.data,
                       m.norm_w.data, out_proj, residual.or_null(), next_norm.data, y, residual_out, out.conv_state,
                       out.ssm_state, m.batch, seqlen, d_model, m.nheads, m.headdim, m.dstate, m.ngroups, m.width,
                       k->dt.softplus, k->dt.clamp(), k->dt.min, k->dt.max, k->eps, k->norm_eps, k->round_half,
                       k->threads);
  call.finish();
  return nullptr;
}

// ------------------------------------------------------------------------------------------ ABI probe
//
// ssmrt.abi_probe::AbiProbe exists to check, through behaviour, that every OrtApi slot this library calls is the
// function ort_abi.h says it is (the table is numbered by hand). Attributes f (float), i (int), s (string),
// fail (int: return an error). Inputs: one or more float tensors. Output (8,) float32: f, i, len(s), the input
// count, input 0's element type, its rank, the sum of its elements, and the number of distinct threads that ran
// 64 pieces of ~1 ms each through KernelContext_ParallelFor (whose indices must each run once: sum 2016).

struct AbiProbeKernel {
  Calls api;
  float f = 0.0f;
  int64_t i = 0;
  std::string s;
  int64_t fail = 0;
};

Status* probe_create(const ssmrt_ort::CustomOp*, const ssmrt_ort::Api* raw, const KernelInfo* info, void** out) {
  Calls api(raw);
  auto* k = new AbiProbeKernel{api};
  SSMRT_TRY(api.KernelInfoGetAttributeFloat(info, "f", &k->f));
  SSMRT_TRY(api.KernelInfoGetAttributeInt64(info, "i", &k->i));
  if (Status* st = api.KernelInfoGetAttributeInt64(info, "fail", &k->fail)) api.ReleaseStatus(st);  // optional
  size_t size = 0;
  SSMRT_TRY(api.KernelInfoGetAttributeString(info, "s", nullptr, &size));
  k->s.assign(size, '\0');
  SSMRT_TRY(api.KernelInfoGetAttributeString(info, "s", k->s.data(), &size));
  k->s.resize(size ? size - 1 : 0);
  *out = k;
  return nullptr;
}

struct ProbePieces {
  std::mutex mu;
  std::set<std::thread::id> threads;
  std::atomic<int64_t> index_sum{0};
};

Status* probe_compute(void* kernel, KernelContext* ctx) {
  auto* k = static_cast<AbiProbeKernel*>(kernel);
  const Calls& api = k->api;
  if (k->fail) return api.CreateStatus(ssmrt_ort::kInvalidArgument, "ssmrt abi probe: failing as asked");
  size_t n_inputs = 0;
  SSMRT_TRY(api.KernelContextGetInputCount(ctx, &n_inputs));
  const Value* value = nullptr;
  SSMRT_TRY(api.KernelContextGetInput(ctx, 0, &value));
  int type = 0;
  std::vector<int64_t> dims;
  SSMRT_TRY(type_and_shape(api, value, &type, &dims));
  const size_t rank = dims.size();
  int64_t count = 1;
  for (int64_t d : dims) count *= d;
  void* data = nullptr;
  SSMRT_TRY(api.GetTensorMutableData(const_cast<Value*>(value), &data));
  double sum = 0.0;
  for (int64_t j = 0; j < count; ++j) sum += static_cast<const float*>(data)[j];

  ProbePieces pieces;
  auto piece = [](void* p, size_t index) {
    auto* pp = static_cast<ProbePieces*>(p);
    {
      std::lock_guard<std::mutex> lock(pp->mu);
      pp->threads.insert(std::this_thread::get_id());
    }
    pp->index_sum += static_cast<int64_t>(index);
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
    while (std::chrono::steady_clock::now() < until) {
    }
  };
  SSMRT_TRY(api.KernelContextParallelFor(ctx, piece, 64, 0, &pieces));

  const int64_t out_dims[1] = {8};
  Value* output = nullptr;
  SSMRT_TRY(api.KernelContextGetOutput(ctx, 0, out_dims, 1, &output));
  void* out_data = nullptr;
  SSMRT_TRY(api.GetTensorMutableData(output, &out_data));
  const float result[8] = {k->f,
                           static_cast<float>(k->i),
                           static_cast<float>(k->s.size()),
                           static_cast<float>(n_inputs),
                           static_cast<float>(type),
                           static_cast<float>(rank),
                           static_cast<float>(sum),
                           static_cast<float>(pieces.threads.size() + 1000 * (pieces.index_sum != 2016))};
  std::memcpy(out_data, result, sizeof(result));
  return nullptr;
}

// ------------------------------------------------------------------------------------------ registration

template <typename K>
void destroy(void* kernel) {
  delete static_cast<K*>(kernel);
}

int float32_type(const ssmrt_ort::CustomOp*, size_t) { return ssmrt_ort::kFloat32; }
char type_letter(int type) { return type == ssmrt_ort::kFloat16 ? 'h' : 'f'; }
int required_io(const ssmrt_ort::CustomOp*, size_t) { return ssmrt_ort::kRequired; }
int default_memory(const ssmrt_ort::CustomOp*, size_t) { return 0; }  // OrtMemTypeDefault
const char* cpu_provider(const ssmrt_ort::CustomOp*) { return nullptr; }  // null: the CPU provider

using Op = ssmrt_ort::CustomOp;

// What ONNX Runtime asks an op about its inputs and outputs, answered from the op's contract.
template <const OpContract& C>
const char* op_name(const Op*) { return C.name; }
template <const OpContract& C>
size_t input_count(const Op*) { return C.inputs; }
template <const OpContract& C>
size_t output_count(const Op*) { return C.outputs; }
template <const OpContract& C>
int input_characteristic(const Op*, size_t i) {
  return i < C.inputs && C.optional[i] ? ssmrt_ort::kOptional : ssmrt_ort::kRequired;
}
// The variant with activations of type Act: float32 where the contract keeps a tensor float32, else Act.
template <const OpContract& C, int Act>
int input_type(const Op*, size_t i) {
  return i < C.inputs && C.fp32_inputs[i] ? ssmrt_ort::kFloat32 : Act;
}
template <const OpContract& C, int Act>
int output_type(const Op*, size_t i) {
  return i < C.outputs && C.fp32_outputs[i] ? ssmrt_ort::kFloat32 : Act;
}

template <const OpContract& C, int Act = ssmrt_ort::kFloat32>
Op make_op(Status* (*create)(const Op*, const ssmrt_ort::Api*, const KernelInfo*, void**),
           Status* (*compute)(void*, KernelContext*), void (*destroy_fn)(void*)) {
  ssmrt_ort::CustomOp op{};
  op.version = ssmrt_ort::kCustomOpVersion;
  op.GetName = op_name<C>;
  op.GetExecutionProviderType = cpu_provider;
  op.GetInputType = input_type<C, Act>;
  op.GetInputTypeCount = input_count<C>;
  op.GetOutputType = output_type<C, Act>;
  op.GetOutputTypeCount = output_count<C>;
  op.KernelDestroy = destroy_fn;
  op.GetInputCharacteristic = input_characteristic<C>;
  op.GetOutputCharacteristic = required_io;
  op.GetInputMemoryType = default_memory;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  return op;
}

template <int Act>
Op conv_op() {
  return make_op<ssmrt_contract::kCausalConv1d, Act>(conv_create<Act>, conv_compute, destroy<CausalConv1dKernel>);
}
template <int Act>
Op scan_op() {
  return make_op<ssmrt_contract::kSelectiveScan, Act>(scan_create<Act>, scan_compute,
                                                      destroy<SelectiveScanKernel>);
}
template <int Act>
Op ssd_op() {
  return make_op<ssmrt_contract::kSSDScan, Act>(ssd_create<Act>, ssd_compute, destroy<SsdScanKernel>);
}
constexpr int kF32 = ssmrt_ort::kFloat32, kF16 = ssmrt_ort::kFloat16;
const Op kOpVariants[] = {conv_op<kF32>(), scan_op<kF32>(), ssd_op<kF32>(),
                          conv_op<kF16>(), scan_op<kF16>(), ssd_op<kF16>()};

constexpr bool kAbiProbeOptional[] = {false};
constexpr OpContract kAbiProbe{"AbiProbe", 1, 1, kAbiProbeOptional, kAbiProbeOptional, kAbiProbeOptional};
Op make_probe() {
  Op op = make_op<kAbiProbe>(probe_create, probe_compute, destroy<AbiProbeKernel>);
  op.GetInputType = float32_type;
  op.GetOutputType = float32_type;
  op.GetVariadicInputMinArity = [](const Op*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const Op*) { return 1; };
  op.GetInputCharacteristic = [](const Op*, size_t) -> int { return ssmrt_ort::kVariadic; };
  return op;
}
const Op kAbiProbeOp = make_probe();

constexpr bool kHalfMatMulFlags[] = {false, false};
constexpr OpContract kHalfMatMul{"HalfMatMul", 2, 1, kHalfMatMulFlags, kHalfMatMulFlags, kHalfMatMulFlags};
const Op kHalfMatMulOp =
    make_op<kHalfMatMul, ssmrt_ort::kFloat16>(half_matmul_create, half_matmul_compute, destroy<HalfMatMulKernel>);
constexpr bool kNBitsOptional[] = {false, false, false, true};
constexpr bool kNBitsFp32[] = {true, false, true, false};
constexpr OpContract kInt8MatMul{"Int8MatMul", 4, 1, kNBitsOptional, kNBitsFp32, kNBitsFp32};
constexpr OpContract kIntDotMatMul{"IntDotMatMul", 4, 1, kNBitsOptional, kNBitsFp32, kNBitsFp32};
template <const OpContract& C, bool kIntDot>
Op make_nbits_matmul() {
  Op op = make_op<C>(nbits_create<kIntDot>, nbits_compute, destroy<NBitsKernel>);
  op.GetInputType = [](const Op*, size_t i) -> int {
    return i == 1 || i == 3 ? ssmrt_ort::kUint8 : ssmrt_ort::kFloat32;
  };
  op.GetOutputType = float32_type;
  return op;
}
const Op kInt8MatMulOp = make_nbits_matmul<kInt8MatMul, false>();
const Op kIntDotMatMulOp = make_nbits_matmul<kIntDotMatMul, true>();
template <int Act>
Op ssd_mixer_op() {
  return make_op<kSsdMixer, Act>(ssd_mixer_create<Act>, ssd_mixer_compute, destroy<SsdMixerKernel>);
}
const Op kSsdMixerOps[] = {ssd_mixer_op<kF32>(), ssd_mixer_op<kF16>()};
template <int Act>
Op add_rmsnorm_op() {
  return make_op<kAddRmsNorm, Act>(add_rmsnorm_create<Act>, add_rmsnorm_compute, destroy<AddRmsNormKernel>);
}
const Op kAddRmsNormOps[] = {add_rmsnorm_op<kF32>(), add_rmsnorm_op<kF16>()};
const Op kSelectiveMixerOp = make_op<kSelectiveMixer, kF16>(selective_mixer_create, selective_mixer_compute,
                                                             destroy<SelectiveMixerKernel>);
const Op kSsdBlockOp = make_op<kSsdBlock, kF16>(ssd_block_create, ssd_block_compute, destroy<SsdBlockKernel>);

}  // namespace

// The ops as ONNX Runtime sees them, asked through the registered structs themselves: "name inputs outputs
// optional-flags input-types output-types" per registered variant (types: f float32, h float16), ";"-separated
// (a test compares it with ssmrt/ops/spec.py).
extern "C" __attribute__((visibility("default"))) const char* SsmrtOpTable() {
  static const std::string table = [] {
    std::string out;
    for (const Op& v : kOpVariants) {
      const Op* op = &v;
      const size_t n = op->GetInputTypeCount(op), m = op->GetOutputTypeCount(op);
      out += std::string(op->GetName(op)) + " " + std::to_string(n) + " " + std::to_string(m) + " ";
      for (size_t i = 0; i < n; ++i) out += op->GetInputCharacteristic(op, i) == ssmrt_ort::kOptional ? "1" : "0";
      out += " ";
      for (size_t i = 0; i < n; ++i) out += type_letter(op->GetInputType(op, i));
      out += " ";
      for (size_t i = 0; i < m; ++i) out += type_letter(op->GetOutputType(op, i));
      out += ";";
    }
    return out;
  }();
  return table.c_str();
}

// The half conversions of half.h on n values, for the tests: to_float (direction 0, uint16 -> float) or from_float
// (1, float -> uint16), through the integer reference path (portable 1) or the fast one this build uses (0).
extern "C" __attribute__((visibility("default"))) void SsmrtHalfConvert(const void* in, void* out, int64_t n,
                                                                        int direction, int portable) {
  if (direction == 0)
    ssmrt_half::to_float(static_cast<const uint16_t*>(in), static_cast<float*>(out), n, portable != 0);
  else
    ssmrt_half::from_float(static_cast<const float*>(in), static_cast<uint16_t*>(out), n, portable != 0);
}

// Scratch's pool, for the tests: a buffer of n floats taken on the calling thread (an object to give back with
// SsmrtScratchGive), its data and capacity, and how many buffers the calling thread keeps.
extern "C" __attribute__((visibility("default"))) void* SsmrtScratchTake(int64_t n) {
  return new ssmrt_cpu::Scratch(n);
}
extern "C" __attribute__((visibility("default"))) float* SsmrtScratchData(void* s) {
  return static_cast<ssmrt_cpu::Scratch*>(s)->data();
}
extern "C" __attribute__((visibility("default"))) int64_t SsmrtScratchCapacity(void* s) {
  return static_cast<ssmrt_cpu::Scratch*>(s)->capacity();
}
extern "C" __attribute__((visibility("default"))) void SsmrtScratchGive(void* s) {
  delete static_cast<ssmrt_cpu::Scratch*>(s);
}
extern "C" __attribute__((visibility("default"))) int64_t SsmrtScratchKept() { return ssmrt_cpu::Scratch::kept(); }

// The code IntDotMatMul was compiled with (kernels.h; ssmrt.ort_ops.int_dot_path asks).
extern "C" __attribute__((visibility("default"))) const char* SsmrtIntDotPath() { return ssmrt_cpu::int_dot_path(); }
extern "C" __attribute__((visibility("default"))) int SsmrtPoolThreadsSeen() { return g_threads_seen.load(); }
extern "C" __attribute__((visibility("default"))) void SsmrtPoolThreadsReset() {
  g_threads_seen.store(0);
  g_epoch.fetch_add(1);
}

// ONNX Runtime's build string through this library's slot numbering: "ORT Build Info: ..." when the numbering
// matches the running ONNX Runtime (a test checks it).
extern "C" __attribute__((visibility("default"))) const char* SsmrtOrtAbiCheck(const ssmrt_ort::ApiBase* base) {
  const ssmrt_ort::Api* raw = base->GetApi(ssmrt_ort::kApiVersion);
  return raw ? Calls(raw).GetBuildInfoString() : "";
}

extern "C" __attribute__((visibility("default"))) Status* RegisterCustomOps(ssmrt_ort::SessionOptions* options,
                                                                            const ssmrt_ort::ApiBase* base) {
  const ssmrt_ort::Api* raw = base->GetApi(ssmrt_ort::kApiVersion);
  if (raw == nullptr) return nullptr;  // an ONNX Runtime older than API 17: nothing registered, the bodies run
  Calls api(raw);
  // One domain for the process, shared by every session that registers the library: ONNX Runtime needs it to
  // outlive them all, and a domain per session would never be freed.
  auto make_domain = [&](const char* name, std::initializer_list<const Op*> ops) -> ssmrt_ort::CustomOpDomain* {
    ssmrt_ort::CustomOpDomain* d = nullptr;
    Status* s = api.CreateCustomOpDomain(name, &d);
    for (const Op* op : ops)
      if (s == nullptr) s = api.CustomOpDomainAdd(d, op);
    if (s == nullptr) return d;
    api.ReleaseStatus(s);
    return nullptr;
  };
  static ssmrt_ort::CustomOpDomain* const domain =
      make_domain("ssmrt", {&kOpVariants[0], &kOpVariants[1], &kOpVariants[2], &kOpVariants[3], &kOpVariants[4],
                            &kOpVariants[5]});
  static ssmrt_ort::CustomOpDomain* const probe = make_domain("ssmrt.abi_probe", {&kAbiProbeOp});
  static ssmrt_ort::CustomOpDomain* const cpu =
      make_domain("ssmrt.cpu", {&kHalfMatMulOp, &kInt8MatMulOp, &kIntDotMatMulOp, &kSsdMixerOps[0], &kSsdMixerOps[1],
                                &kAddRmsNormOps[0], &kAddRmsNormOps[1], &kSelectiveMixerOp, &kSsdBlockOp});
  if (domain == nullptr || probe == nullptr || cpu == nullptr)
    return api.CreateStatus(ssmrt_ort::kFail, "ssmrt: ONNX Runtime refused the ssmrt custom-op domain");
  SSMRT_TRY(api.AddCustomOpDomain(options, domain));
  SSMRT_TRY(api.AddCustomOpDomain(options, cpu));
  return api.AddCustomOpDomain(options, probe);
}
