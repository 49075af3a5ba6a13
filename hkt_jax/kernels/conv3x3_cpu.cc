// Direct 3x3 convolutions (padding 1, stride 1 or 2) for CPUs, NHWC activations, HWIO kernels, float32.
//
// Why: XLA:CPU lowers the narrow convolutions of CIFAR ResNets (16-64 channels) to generic kernels that
// run at a third of what the hardware does (and its weight-gradient convolutions far worse), which makes
// a JAX training step on CPU several times slower than PyTorch's oneDNN. These kernels are register-tiled
// loops the compiler vectorises for the host (-march=native): a tile of output pixels x 16 output channels
// kept in vector registers, one broadcast multiply-add per input channel and tap. Exposed to JAX through
// the XLA FFI (hkt_jax/kernels/cpu_conv.py builds, loads and differentiates them).
//
// Forward: y[b, oh, ow, co] = sum_{kh, kw, ci} x[b, oh*s + kh - 1, ow*s + kw - 1, ci] * w[kh, kw, ci, co]
// Weight gradient: dw[kh, kw, ci, co] = sum_{b, oh, ow} x[b, oh*s + kh - 1, ow*s + kw - 1, ci] * dy[b, oh, ow, co]
// Both need Co % 16 == 0 (the Python side checks and otherwise uses XLA's convolution).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void store16(float* p, v16 v) { std::memcpy(p, &v, 64); }

// Applied to each output vector before it is stored: + bias[co], + residual[b, oh, ow, co], max(., 0).
struct Epilogue {
  const float* bias = nullptr;
  const float* residual = nullptr;
  bool relu = false;
};

template <typename F>
static void parallel_for(int n, int threads, F&& f) {
  threads = std::max(1, std::min(threads, n));
  if (threads == 1) { for (int i = 0; i < n; ++i) f(i, 0); return; }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { for (int i = t; i < n; i += threads) f(i, t); });
  for (auto& th : pool) th.join();
}

// Copies one image into a zero-bordered buffer of (H+2) x (W+2) x C.
static void pad_image(const float* x, int H, int W, int C, float* out) {
  const int Wp = W + 2;
  std::memset(out, 0, sizeof(float) * (H + 2) * Wp * C);
  for (int h = 0; h < H; ++h)
    std::memcpy(out + ((h + 1) * Wp + 1) * C, x + (size_t)h * W * C, sizeof(float) * W * C);
}

// acc[p][n] += sum_{kh,kw,ci} xp[(oh*s+kh, (ow+p)*s+kw, ci)] * w[kh,kw,ci, co+16n]
template <int P, int N, int S, int CI>
static inline void fwd_tile(const float* xp, int Wp, int Ci_, const float* w, int Co, int oh, int ow, int co,
                            float* y, int Wo, const Epilogue& ep) {
  const int Ci = CI ? CI : Ci_;
  constexpr int s = S;
  v16 acc[P][N];
  for (int p = 0; p < P; ++p)
    for (int n = 0; n < N; ++n) acc[p][n] = ep.bias ? load16(ep.bias + co + 16 * n) : (v16){};
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) {
      const float* xrow = xp + ((size_t)(oh * s + kh) * Wp + ow * s + kw) * Ci;
      const float* wt = w + ((size_t)(kh * 3 + kw) * Ci) * Co + co;
      for (int ci = 0; ci < Ci; ++ci) {
        v16 wv[N];
#pragma GCC unroll 4
        for (int n = 0; n < N; ++n) wv[n] = load16(wt + (size_t)ci * Co + 16 * n);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
          const float xs = xrow[(size_t)p * s * Ci + ci];
#pragma GCC unroll 4
          for (int n = 0; n < N; ++n) acc[p][n] += xs * wv[n];
        }
      }
    }
  const v16 zero = {};
  for (int p = 0; p < P; ++p)
    for (int n = 0; n < N; ++n) {
      const size_t at = ((size_t)oh * Wo + ow + p) * Co + co + 16 * n;
      v16 v = acc[p][n];
      if (ep.residual) v += load16(ep.residual + at);
      if (ep.relu) v = v > zero ? v : zero;
      store16(y + at, v);
    }
}

template <int P, int N, int S, int CI>
static void fwd_image(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                      const Epilogue& ep) {
  for (int oh = 0; oh < Ho; ++oh)
    for (int co = 0; co < Co; co += 16 * N)
      for (int ow = 0; ow < Wo; ow += P)  // the last tile overlaps the previous one when P does not divide Wo
        fwd_tile<P, N, S, CI>(xp, Wp, Ci, w, Co, oh, std::min(ow, Wo - P), co, y, Wo, ep);
}

template <int N, int S, int CI>
static void fwd_image_n(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                        const Epilogue& ep) {
  constexpr int Pmax = N == 1 ? 16 : N == 2 ? 8 : 4;
  if (Wo >= Pmax) fwd_image<Pmax, N, S, CI>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else if (Wo >= 8) fwd_image<8, N, S, CI>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else if (Wo >= 4) fwd_image<4, N, S, CI>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else fwd_image<1, N, S, CI>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
}

template <int N, int S>
static void dispatch_ci(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                        const Epilogue& ep) {
  switch (Ci) {
    case 3: return fwd_image_n<N, S, 3>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 16: return fwd_image_n<N, S, 16>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 32: return fwd_image_n<N, S, 32>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 64: return fwd_image_n<N, S, 64>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    default: return fwd_image_n<N, S, 0>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  }
}

template <int S>
static void dispatch_n(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                       const Epilogue& ep) {
  if (Co % 64 == 0 && Wo < 16) dispatch_ci<4, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else if (Co % 32 == 0 && Wo < 16) dispatch_ci<2, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else dispatch_ci<1, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
}

static void dispatch_fwd(const float* xp, int Wp, int Ci, int s, const float* w, int Co, int Ho, int Wo,
                         float* y, const Epilogue& ep) {
  if (s == 1) dispatch_n<1>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  else dispatch_n<2>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
}

// f(b, t, xp) for each image b of x, on `threads` threads (t = thread index), with xp = image b zero-padded.
template <typename F>
static void for_each_padded_image(const float* x, int B, int H, int W, int C, int threads, F&& f) {
  std::vector<std::vector<float>> bufs(threads, std::vector<float>((size_t)(H + 2) * (W + 2) * C));
  parallel_for(B, threads, [&](int b, int t) {
    pad_image(x + (size_t)b * H * W * C, H, W, C, bufs[t].data());
    f(b, t, bufs[t].data());
  });
}

static void conv3x3_fwd(const float* x, const float* w, const Epilogue& epilogue, float* y, int B, int H, int W,
                        int Ci, int Co, int s, int threads) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, Wp = W + 2;
  threads = std::max(1, std::min(threads, B));
  for_each_padded_image(x, B, H, W, Ci, threads, [&](int b, int, const float* xp) {
    float* yb = y + (size_t)b * Ho * Wo * Co;
    Epilogue ep = epilogue;
    if (ep.residual) ep.residual += (size_t)b * Ho * Wo * Co;
    dispatch_fwd(xp, Wp, Ci, s, w, Co, Ho, Wo, yb, ep);
  });
}

// dw[kh, kw, ci0 + c, co0:co0+16] += sum over output pixels of xp[pix*s + tap, ci0 + c] * dy[pix, co0:co0+16]
template <int CB, int S>
static inline void dw_tile(const float* xp, int Wp, int Ci, const float* dy, int Co, int Ho, int Wo,
                           int kh, int kw, int ci0, int co0, float* dw) {
  v16 acc[CB] = {};
  for (int oh = 0; oh < Ho; ++oh) {
    const float* xr = xp + ((size_t)(oh * S + kh) * Wp + kw) * Ci + ci0;
    const float* dr = dy + (size_t)oh * Wo * Co + co0;
    for (int ow = 0; ow < Wo; ++ow) {
      const float* xs = xr + (size_t)ow * S * Ci;
      const v16 d = load16(dr + (size_t)ow * Co);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) acc[c] += xs[c] * d;
    }
  }
  float* out = dw + ((size_t)(kh * 3 + kw) * Ci + ci0) * Co + co0;
  for (int c = 0; c < CB; ++c) store16(out + (size_t)c * Co, load16(out + (size_t)c * Co) + acc[c]);
}

template <int CB, int S>
static void dw_image(const float* xp, int Wp, int Ci, const float* dy, int Co, int Ho, int Wo, float* dw) {
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ci0 = 0; ci0 < Ci; ci0 += CB)
        for (int co0 = 0; co0 < Co; co0 += 16) dw_tile<CB, S>(xp, Wp, Ci, dy, Co, Ho, Wo, kh, kw, ci0, co0, dw);
}

template <int S>
static void dw_dispatch(const float* xp, int Wp, int Ci, const float* dy, int Co, int Ho, int Wo, float* dw) {
  if (Ci % 16 == 0) dw_image<16, S>(xp, Wp, Ci, dy, Co, Ho, Wo, dw);
  else if (Ci % 8 == 0) dw_image<8, S>(xp, Wp, Ci, dy, Co, Ho, Wo, dw);
  else if (Ci % 4 == 0) dw_image<4, S>(xp, Wp, Ci, dy, Co, Ho, Wo, dw);
  else if (Ci % 3 == 0) dw_image<3, S>(xp, Wp, Ci, dy, Co, Ho, Wo, dw);
  else dw_image<1, S>(xp, Wp, Ci, dy, Co, Ho, Wo, dw);
}

static void conv3x3_dw(const float* x, const float* dy, float* dw, int B, int H, int W, int Ci, int Co, int s,
                       int threads) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, Wp = W + 2;
  const size_t wsize = (size_t)9 * Ci * Co;
  threads = std::max(1, std::min(threads, B));
  std::vector<std::vector<float>> partial(threads, std::vector<float>(wsize, 0.0f));
  for_each_padded_image(x, B, H, W, Ci, threads, [&](int b, int t, const float* xp) {
    const float* dyb = dy + (size_t)b * Ho * Wo * Co;
    if (s == 1) dw_dispatch<1>(xp, Wp, Ci, dyb, Co, Ho, Wo, partial[t].data());
    else dw_dispatch<2>(xp, Wp, Ci, dyb, Co, Ho, Wo, partial[t].data());
  });
  for (size_t i = 0; i < wsize; ++i) {
    float sum = 0.0f;
    for (int t = 0; t < threads; ++t) sum += partial[t][i];
    dw[i] = sum;
  }
}

// -- XLA FFI handlers -----------------------------------------------------------------------------------

// x: (B, H, W, Ci); second: the kernel (3, 3, Ci, Co) or, for the weight gradient, dy (B, Ho, Wo, Co).
static ffi::Error check_operands(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& second, bool is_kernel,
                                 int32_t stride) {
  auto xd = x.dimensions(), sd = second.dimensions();
  if (xd.size() != 4 || sd.size() != 4)
    return ffi::Error::InvalidArgument("conv3x3: operands must be rank 4 (NHWC activations, HWIO kernel)");
  if (is_kernel && (sd[0] != 3 || sd[1] != 3 || sd[2] != xd[3]))
    return ffi::Error::InvalidArgument("conv3x3: kernel must be (3, 3, Ci, Co) with Ci = input channels");
  if (sd[3] % 16 || (stride != 1 && stride != 2))
    return ffi::Error::InvalidArgument("conv3x3: needs output channels % 16 == 0 and stride 1 or 2");
  return ffi::Error::Success();
}

static ffi::Error Conv3x3FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                                 int32_t stride, int32_t threads) {
  if (auto err = check_operands(x, w, true, stride); err.failure()) return err;
  auto d = x.dimensions();
  conv3x3_fwd(x.typed_data(), w.typed_data(), Epilogue{}, y->typed_data(), (int)d[0], (int)d[1], (int)d[2], (int)d[3],
              (int)w.dimensions()[3], stride, threads);
  return ffi::Error::Success();
}

static ffi::Error Conv3x3WeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                        ffi::ResultBuffer<ffi::F32> dw, int32_t stride, int32_t threads) {
  if (auto err = check_operands(x, dy, false, stride); err.failure()) return err;
  auto d = x.dimensions();
  conv3x3_dw(x.typed_data(), dy.typed_data(), dw->typed_data(), (int)d[0], (int)d[1], (int)d[2], (int)d[3],
             (int)dy.dimensions()[3], stride, threads);
  return ffi::Error::Success();
}

// relu?(conv(x, w) + bias (+ residual)): the whole folded-BatchNorm inference block in one pass over memory.
static ffi::Error Conv3x3BiasActImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                                     ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y, int32_t stride,
                                     int32_t relu, int32_t has_residual, int32_t threads) {
  if (auto err = check_operands(x, w, true, stride); err.failure()) return err;
  auto d = x.dimensions();
  const int Co = (int)w.dimensions()[3];
  if (bias.element_count() != (size_t)Co)
    return ffi::Error::InvalidArgument("conv3x3: bias must have one value per output channel");
  if (has_residual && residual.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("conv3x3: residual must have the output's shape");
  Epilogue ep{bias.typed_data(), has_residual ? residual.typed_data() : nullptr, relu != 0};
  conv3x3_fwd(x.typed_data(), w.typed_data(), ep, y->typed_data(), (int)d[0], (int)d[1], (int)d[2], (int)d[3], Co,
              stride, threads);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HktConv3x3BiasAct, Conv3x3BiasActImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("relu")
                                  .Attr<int32_t>("has_residual")
                                  .Attr<int32_t>("threads"));

// (x, kernel or dy) -> result, attributes stride and threads: the forward and weight-gradient signature.
static auto two_operand_binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int32_t>("stride")
      .Attr<int32_t>("threads");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HktConv3x3Fwd, Conv3x3FwdImpl, two_operand_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HktConv3x3WeightGrad, Conv3x3WeightGradImpl, two_operand_binding());
