// oneDNN 2-D convolutions (NHWC data, HWIO kernels, float32) as XLA FFI handlers: the value, the
// input gradient and the kernel gradient. The Python side (jaxcnn/kernels/onednn.py) checks every
// argument and decides when these run; this file only computes.
//
// Each handler looks its primitive up in a per-shape cache (built once, with oneDNN's preferred
// weight layout: `format_tag::any`, the user's HWIO reordered into it), sizes oneDNN's OpenMP team
// to the configured thread count, and runs with a user-owned scratchpad so that concurrent calls
// from XLA's threads never share one.
#include <Python.h>
#include <omp.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// kind, N, H, W, C, KH, KW, O, OH, OW, stride h/w, dilation h/w, pad top/bottom/left/right
using Key = std::array<int64_t, 18>;

struct Entry {
  dnnl::primitive prim;
  memory::desc weights_md;       // the primitive's weights (or diff weights) layout
  memory::desc user_weights_md;  // HWIO
  bool reorder = false;          // weights_md differs from HWIO
  dnnl::reorder to_prim;         // HWIO -> weights_md (value, input gradient)
  dnnl::reorder to_user;         // weights_md -> HWIO (kernel gradient)
  memory::desc src_md, dst_md, scratch_md;
  std::string impl;
};

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::atomic<int> g_threads{0};  // 0: OpenMP's default
std::mutex g_mu;
std::map<Key, std::unique_ptr<Entry>> g_cache;

Entry* lookup(const Key& k) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_cache.find(k);
  if (it != g_cache.end()) return it->second.get();
  const int64_t kind = k[0], n = k[1], h = k[2], w = k[3], c = k[4], kh = k[5], kw = k[6], o = k[7],
                oh = k[8], ow = k[9];
  memory::dims strides = {k[10], k[11]}, dil = {k[12] - 1, k[13] - 1};
  memory::dims pad_l = {k[14], k[16]}, pad_r = {k[15], k[17]};
  auto& eng = cpu_engine();
  memory::desc src(memory::dims{n, c, h, w}, dt::f32, tag::nhwc);
  memory::desc dst(memory::dims{n, o, oh, ow}, dt::f32, tag::nhwc);
  memory::desc wany(memory::dims{o, c, kh, kw}, dt::f32, tag::any);
  memory::desc whwio(memory::dims{o, c, kh, kw}, dt::f32, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, wany, dst, strides,
      dil, pad_l, pad_r, attr);
  auto e = std::make_unique<Entry>();
  e->user_weights_md = whwio;
  e->src_md = src;
  e->dst_md = dst;
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fwd);
    e->weights_md = fwd.weights_desc();
    e->scratch_md = fwd.scratchpad_desc();
    e->impl = fwd.impl_info_str();
  } else if (kind == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(eng, dnnl::algorithm::convolution_direct, src, wany,
                                                              dst, strides, dil, pad_l, pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->weights_md = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src, wany, dst, strides, dil, pad_l, pad_r, fwd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->weights_md = pd.diff_weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  }
  e->reorder = e->weights_md != whwio;
  if (e->reorder) {
    if (kind == kBwdWeights) {
      e->to_user = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->weights_md, eng, whwio));
    } else {
      e->to_prim = dnnl::reorder(dnnl::reorder::primitive_desc(eng, whwio, eng, e->weights_md));
    }
  }
  Entry* raw = e.get();
  g_cache.emplace(k, std::move(e));
  return raw;
}

// A per-thread buffer that only grows: XLA calls a handler from one thread at a time per buffer.
char* scratch(std::vector<char>& buf, size_t bytes) {
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<char*>((p + 63) & ~uintptr_t(63));
}

ffi::Error run(int64_t kind, float* x, float* w, float* y, const Key& key) {
  try {
    int t = g_threads.load();
    if (t > 0) omp_set_num_threads(t);
    Entry* e = lookup(key);
    auto& eng = cpu_engine();
    dnnl::stream s(eng);
    thread_local std::vector<char> scratch_buf, weights_buf;
    memory scratch_mem(e->scratch_md, eng, scratch(scratch_buf, e->scratch_md.get_size()));
    // x: the input (or its gradient), y: the output (or its gradient), w: the kernel (or its gradient)
    memory src(e->src_md, eng, x), dst(e->dst_md, eng, y), user_w(e->user_weights_md, eng, w);
    memory prim_w = e->reorder ? memory(e->weights_md, eng, scratch(weights_buf, e->weights_md.get_size())) : user_w;
    if (kind == kFwd) {
      if (e->reorder) e->to_prim.execute(s, user_w, prim_w);
      e->prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else if (kind == kBwdData) {
      if (e->reorder) e->to_prim.execute(s, user_w, prim_w);
      e->prim.execute(s, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else {
      e->prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      if (e->reorder) e->to_user.execute(s, prim_w, user_w);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn oneDNN convolution: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn oneDNN convolution: ") + err.what());
  }
  return ffi::Error::Success();
}

Key make_key(int64_t kind, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd,
             int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Key{kind, xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2], sh, sw, dh, dw, pt, pb, pl, pr};
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
               int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Key k = make_key(kFwd, x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, dh, dw, pt, pb, pl, pr);
  return run(kFwd, x.typed_data(), w.typed_data(), y->typed_data(), k);
}

// g: the output's gradient (N, OH, OW, O), w: the kernel; dx: the input's gradient (N, H, W, C)
ffi::Error BwdData(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                   int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Key k = make_key(kBwdData, dx->dimensions(), w.dimensions(), g.dimensions(), sh, sw, dh, dw, pt, pb, pl, pr);
  return run(kBwdData, dx->typed_data(), w.typed_data(), g.typed_data(), k);
}

// x: the input, g: the output's gradient; dw: the kernel's gradient (KH, KW, C, O)
ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dwt,
                      int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr) {
  Key k = make_key(kBwdWeights, x.dimensions(), dwt->dimensions(), g.dimensions(), sh, sw, dh, dw, pt, pb, pl, pr);
  return run(kBwdWeights, x.typed_data(), dwt->typed_data(), g.typed_data(), k);
}

#define CONV_ATTRS                                                                                           \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("dilation_h").Attr<int64_t>("dilation_w") \
      .Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcnn_conv_fwd, Fwd,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcnn_conv_bwd_data, BwdData,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcnn_conv_bwd_weights, BwdWeights,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

// ---------------------------------------------------------------- the Python module: capsules and settings

static PyObject* capsule(void* fn) { return PyCapsule_New(fn, nullptr, nullptr); }

static PyObject* py_handlers(PyObject*, PyObject*) {
  return Py_BuildValue("{s:N,s:N,s:N}", "fwd", capsule(reinterpret_cast<void*>(jaxcnn_conv_fwd)), "bwd_data",
                       capsule(reinterpret_cast<void*>(jaxcnn_conv_bwd_data)), "bwd_weights",
                       capsule(reinterpret_cast<void*>(jaxcnn_conv_bwd_weights)));
}

static PyObject* py_set_threads(PyObject*, PyObject* arg) {
  long t = PyLong_AsLong(arg);
  if (t == -1 && PyErr_Occurred()) return nullptr;
  g_threads.store(static_cast<int>(t));
  Py_RETURN_NONE;
}

// impl(kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, dh, dw, pt, pb, pl, pr) -> oneDNN's implementation name
static PyObject* py_impl(PyObject*, PyObject* args) {
  Key k;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLLLLLLL", &k[0], &k[1], &k[2], &k[3], &k[4], &k[5], &k[6], &k[7], &k[8],
                        &k[9], &k[10], &k[11], &k[12], &k[13], &k[14], &k[15], &k[16], &k[17]))
    return nullptr;
  try {
    return PyUnicode_FromString(lookup(k)->impl.c_str());
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
}

static PyObject* py_version(PyObject*, PyObject*) {
  const dnnl_version_t* v = dnnl_version();
  return Py_BuildValue("(iii)", v->major, v->minor, v->patch);
}

static PyMethodDef methods[] = {
    {"handlers", py_handlers, METH_NOARGS, "The FFI handlers, as capsules: {'fwd', 'bwd_data', 'bwd_weights'}."},
    {"set_threads", py_set_threads, METH_O, "oneDNN's OpenMP thread count for later calls (0: OpenMP's default)."},
    {"impl", py_impl, METH_VARARGS, "oneDNN's implementation for one cached shape key."},
    {"version", py_version, METH_NOARGS, "oneDNN's version, (major, minor, patch)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_onednn", "jaxcnn's oneDNN convolution kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__onednn(void) { return PyModule_Create(&module); }
