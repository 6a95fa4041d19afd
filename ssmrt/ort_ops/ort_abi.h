// The part of ONNX Runtime's C ABI this library touches, declared here because no package this project can
// install carries onnxruntime_c_api.h. OrtApi is a table of function pointers that ONNX Runtime only ever
// appends to, so a slot number, once assigned, holds for every later release; the newest slot below,
// KernelContext_ParallelFor, arrived with API version 17 (ONNX Runtime 1.17; this project needs >= 1.20), and
// the library asks for that version. The numbering is checked against the running ONNX Runtime by behaviour:
// GetBuildInfoString through SsmrtOrtAbiCheck, and every other slot through the AbiProbe op in ops.cc, which a
// test runs and whose output says what each call returned. OrtCustomOp is the struct a library fills to describe
// one op; its `version` tells ONNX Runtime which of its fields exist.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ssmrt_ort {

struct Status;
struct Value;
struct KernelInfo;
struct KernelContext;
struct TensorTypeAndShapeInfo;
struct SessionOptions;
struct CustomOpDomain;
struct Api;

struct ApiBase {
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

enum ElementType : int { kFloat32 = 1, kUint8 = 2, kFloat16 = 10 };
enum ErrorCode : int { kOk = 0, kFail = 1, kInvalidArgument = 2 };
enum Characteristic : int { kRequired = 0, kOptional = 1, kVariadic = 2 };

// OrtApi slot numbers.
enum Slot : size_t {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelInfoGetAttributeString = 87,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kGetBuildInfoString = 254,
  kKernelContextParallelFor = 274,
};

// The OrtCustomOp layout through version 16 (CreateKernelV2 / KernelComputeV2, which report errors), plus the
// fields later versions added, left empty: ONNX Runtime reads only those that `version` says exist.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Api*, const KernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, KernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  Status* (*CreateKernelV2)(const CustomOp*, const Api*, const KernelInfo*, void**);
  Status* (*KernelComputeV2)(void*, KernelContext*);
  void* InferOutputShapeFn;
  void* GetStartVersion;
  void* GetEndVersion;
  void* GetMayInplace;
  void* ReleaseMayInplace;
  void* GetAliasMap;
  void* ReleaseAliasMap;
};
constexpr uint32_t kCustomOpVersion = 16;
constexpr uint32_t kApiVersion = 17;

// Typed calls through the table.
class Calls {
 public:
  explicit Calls(const Api* api) : table_(reinterpret_cast<const void* const*>(api)) {}

  Status* CreateStatus(ErrorCode code, const char* msg) const {
    return fn<Status* (*)(ErrorCode, const char*)>(kCreateStatus)(code, msg);
  }
  Status* CreateCustomOpDomain(const char* domain, CustomOpDomain** out) const {
    return fn<Status* (*)(const char*, CustomOpDomain**)>(kCreateCustomOpDomain)(domain, out);
  }
  Status* CustomOpDomainAdd(CustomOpDomain* domain, const CustomOp* op) const {
    return fn<Status* (*)(CustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, op);
  }
  Status* AddCustomOpDomain(SessionOptions* options, CustomOpDomain* domain) const {
    return fn<Status* (*)(SessionOptions*, CustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
  }
  Status* GetTensorMutableData(Value* value, void** out) const {
    return fn<Status* (*)(Value*, void**)>(kGetTensorMutableData)(value, out);
  }
  Status* GetTensorElementType(const TensorTypeAndShapeInfo* info, int* out) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(info, out);
  }
  Status* GetDimensionsCount(const TensorTypeAndShapeInfo* info, size_t* out) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, out);
  }
  Status* GetDimensions(const TensorTypeAndShapeInfo* info, int64_t* dims, size_t n) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, dims, n);
  }
  Status* GetTensorTypeAndShape(const Value* value, TensorTypeAndShapeInfo** out) const {
    return fn<Status* (*)(const Value*, TensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, out);
  }
  Status* KernelInfoGetAttributeFloat(const KernelInfo* info, const char* name, float* out) const {
    return fn<Status* (*)(const KernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, name, out);
  }
  Status* KernelInfoGetAttributeInt64(const KernelInfo* info, const char* name, int64_t* out) const {
    return fn<Status* (*)(const KernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name, out);
  }
  Status* KernelInfoGetAttributeString(const KernelInfo* info, const char* name, char* out, size_t* size) const {
    return fn<Status* (*)(const KernelInfo*, const char*, char*, size_t*)>(kKernelInfoGetAttributeString)(
        info, name, out, size);
  }
  Status* KernelContextGetInputCount(const KernelContext* ctx, size_t* out) const {
    return fn<Status* (*)(const KernelContext*, size_t*)>(kKernelContextGetInputCount)(ctx, out);
  }
  Status* KernelContextGetInput(const KernelContext* ctx, size_t index, const Value** out) const {
    return fn<Status* (*)(const KernelContext*, size_t, const Value**)>(kKernelContextGetInput)(ctx, index, out);
  }
  Status* KernelContextGetOutput(KernelContext* ctx, size_t index, const int64_t* dims, size_t n, Value** out) const {
    return fn<Status* (*)(KernelContext*, size_t, const int64_t*, size_t, Value**)>(kKernelContextGetOutput)(
        ctx, index, dims, n, out);
  }
  const char* GetBuildInfoString() const { return fn<const char* (*)()>(kGetBuildInfoString)(); }
  // fn(usr_data, i) for i in [0, total) on the session's intra-op threads (at most num_batch batches; 0: no limit).
  Status* KernelContextParallelFor(const KernelContext* ctx, void (*f)(void*, size_t), size_t total, size_t num_batch,
                                   void* usr_data) const {
    return fn<Status* (*)(const KernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
        kKernelContextParallelFor)(ctx, f, total, num_batch, usr_data);
  }
  void ReleaseStatus(Status* s) const { fn<void (*)(Status*)>(kReleaseStatus)(s); }
  void ReleaseTensorTypeAndShapeInfo(TensorTypeAndShapeInfo* info) const {
    fn<void (*)(TensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  }

 private:
  template <typename F>
  F fn(Slot slot) const {
    return reinterpret_cast<F>(const_cast<void*>(table_[slot]));
  }
  const void* const* table_;
};

}  // namespace ssmrt_ort
