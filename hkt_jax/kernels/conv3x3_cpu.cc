// Direct 3x3 convolutions (padding 1, stride 1 or 2) for CPUs, NHWC activations, HWIO kernels, float32.
//
// Why: XLA:CPU lowers the narrow convolutions of CIFAR ResNets (16-64 channels) to generic kernels that
// run at a third of what the hardware does (and its weight-gradient convolutions far worse), which makes
// a JAX training step on CPU several times slower than PyTorch's oneDNN. These kernels are register-tiled
// loops the compiler vectorises for the build target (-march=native, or $HKT_JAX_KERNEL_MARCH): a tile of
// output pixels x 16 output channels kept in vector registers, one broadcast multiply-add per input channel
// and tap. The tile sizes follow the target's register file (below): 16-float vectors and 32 registers on
// AVX-512, 8-float vectors and 16 registers on AVX2 + FMA, 4-float vectors otherwise. Tiles that do not fit
// the register file spill on every multiply-add, which is what made the AVX-512 tiles 2.5-10x slower than
// XLA on AVX2-only CPUs. Exposed to JAX through the XLA FFI (hkt_jax/kernels/cpu_conv.py builds, loads,
// differentiates them, and hkt_jax/kernels/conv_tuning.py times them against XLA per shape).
//
// Forward: y[b, oh, ow, co] = sum_{kh, kw, ci} x[b, oh*s + kh - 1, ow*s + kw - 1, ci] * w[kh, kw, ci, co]
// Weight gradient: dw[kh, kw, ci, co] = sum_{b, oh, ow} x[b, oh*s + kh - 1, ow*s + kw - 1, ci] * dy[b, oh, ow, co]
// Both need Co % 16 == 0 (the Python side checks and otherwise uses XLA's convolution).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int VL = 16, VREGS = 32;  // zmm0-31
#elif defined(__AVX__)
constexpr int VL = 8, VREGS = 16;   // ymm0-15 (AVX2 + FMA targets)
#elif defined(__aarch64__)
constexpr int VL = 4, VREGS = 32;   // NEON v0-31
#else
constexpr int VL = 4, VREGS = 16;   // SSE xmm0-15
#endif
constexpr int G = 16 / VL;          // vectors per group of 16 output channels

typedef float vf __attribute__((vector_size(VL * 4)));  // what lives in a register
// Unaligned loads and stores as plain vector moves. (A memcpy into `vf` made GCC build each vector from
// two 16-byte halves through the stack for generic x86-64-v3 targets.)
typedef float vf_unaligned __attribute__((vector_size(VL * 4), aligned(4), may_alias));

static inline vf loadv(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
static inline void storev(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

// Forward tile: P output pixels x N groups of 16 channels = P * N * G accumulators, plus N * G weight
// vectors and a broadcast must stay in registers. AVX-512 keeps the tuned 16x1 / 8x2 / 4x4 tiles.
constexpr int fwd_pixels(int N) {
  return VL == 16 ? (N == 1 ? 16 : N == 2 ? 8 : 4) : std::max(1, std::min(8, (VREGS - N * G - 2) / (N * G)));
}
// Weight-gradient tile: CB input channels x 16 output channels = CB * G accumulators + G vectors of dy.
constexpr int DW_CHANNELS = VL == 16 ? 16 : std::max(1, (VREGS - G - 1) / G);
// Remainder tiles of a row: P, then 8, 4, 2, 1 (as they are smaller than P).
constexpr int next_pixels(int P) { return P > 8 ? 8 : P > 4 ? 4 : P / 2; }

// Applied to each output vector before it is stored: + bias[co], + residual[b, oh, ow, co], max(., 0).
struct Epilogue {
  const float* bias = nullptr;
  const float* residual = nullptr;
  bool relu = false;
};

// f(i, t) for i < n on `threads` threads (t = thread index). Items are handed out one at a time, so a
// thread slowed down by another process on its core does not hold the others back.
template <typename F>
static void parallel_for(int n, int threads, F&& f) {
  threads = std::max(1, std::min(threads, n));
  if (threads == 1) { for (int i = 0; i < n; ++i) f(i, 0); return; }
  std::atomic<int> next{0};
  auto work = [&](int t) { for (int i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i, t); };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

// Copies one image into a zero-bordered buffer of (H+2) x (W+2) x C.
static void pad_image(const float* x, int H, int W, int C, float* out) {
  const int Wp = W + 2;
  std::memset(out, 0, sizeof(float) * (H + 2) * Wp * C);
  for (int h = 0; h < H; ++h)
    std::memcpy(out + ((h + 1) * Wp + 1) * C, x + (size_t)h * W * C, sizeof(float) * W * C);
}

// acc[p][v] += sum_{kh,kw,ci} xp[(oh*s+kh, (ow+p)*s+kw, ci)] * w[kh,kw,ci, co + VL*v], v < N*G
template <int P, int N, int S, int CI>
static inline void fwd_tile(const float* xp, int Wp, int Ci_, const float* w, int Co, int oh, int ow, int co,
                            float* y, int Wo, const Epilogue& ep) {
  constexpr int V = N * G;
  const int Ci = CI ? CI : Ci_;
  constexpr int s = S;
  vf acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = ep.bias ? loadv(ep.bias + co + VL * v) : (vf){};
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) {
      const float* xrow = xp + ((size_t)(oh * s + kh) * Wp + ow * s + kw) * Ci;
      const float* wt = w + ((size_t)(kh * 3 + kw) * Ci) * Co + co;
      for (int ci = 0; ci < Ci; ++ci) {
        vf wv[V];
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) wv[v] = loadv(wt + (size_t)ci * Co + VL * v);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
          const float xs = xrow[(size_t)p * s * Ci + ci];
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) acc[p][v] += xs * wv[v];
        }
      }
    }
  const vf zero = {};
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) {
      const size_t at = ((size_t)oh * Wo + ow + p) * Co + co + VL * v;
      vf r = acc[p][v];
      if (ep.residual) r += loadv(ep.residual + at);
      if (ep.relu) r = r > zero ? r : zero;
      storev(y + at, r);
    }
}

// Output pixels [ow, Wo) of row oh: tiles of P, the rest with the next smaller tiles.
template <int P, int N, int S, int CI>
static void fwd_row(const float* xp, int Wp, int Ci, const float* w, int Co, int oh, int ow, int co, float* y,
                    int Wo, const Epilogue& ep) {
  for (; ow + P <= Wo; ow += P) fwd_tile<P, N, S, CI>(xp, Wp, Ci, w, Co, oh, ow, co, y, Wo, ep);
  if constexpr (P > 1)
    if (ow < Wo) fwd_row<next_pixels(P), N, S, CI>(xp, Wp, Ci, w, Co, oh, ow, co, y, Wo, ep);
}

template <int N, int S, int CI>
static void fwd_image(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                      const Epilogue& ep) {
  constexpr int P = fwd_pixels(N);
  for (int oh = 0; oh < Ho; ++oh)
    for (int co = 0; co < Co; co += 16 * N) fwd_row<P, N, S, CI>(xp, Wp, Ci, w, Co, oh, 0, co, y, Wo, ep);
}

template <int N, int S>
static void dispatch_ci(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                        const Epilogue& ep) {
  switch (Ci) {
    case 3: return fwd_image<N, S, 3>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 16: return fwd_image<N, S, 16>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 32: return fwd_image<N, S, 32>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    case 64: return fwd_image<N, S, 64>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    default: return fwd_image<N, S, 0>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  }
}

template <int S>
static void dispatch_n(const float* xp, int Wp, int Ci, const float* w, int Co, int Ho, int Wo, float* y,
                       const Epilogue& ep) {
  // Wider channel tiles for short rows, where they fit the register file (AVX-512 only).
  if constexpr (VL == 16) {
    if (Co % 64 == 0 && Wo < 16) return dispatch_ci<4, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
    if (Co % 32 == 0 && Wo < 16) return dispatch_ci<2, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
  }
  dispatch_ci<1, S>(xp, Wp, Ci, w, Co, Ho, Wo, y, ep);
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
  vf acc[CB][G] = {};
  for (int oh = 0; oh < Ho; ++oh) {
    const float* xr = xp + ((size_t)(oh * S + kh) * Wp + kw) * Ci + ci0;
    const float* dr = dy + (size_t)oh * Wo * Co + co0;
    for (int ow = 0; ow < Wo; ++ow) {
      const float* xs = xr + (size_t)ow * S * Ci;
      vf d[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) d[g] = loadv(dr + (size_t)ow * Co + VL * g);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c)
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) acc[c][g] += xs[c] * d[g];
    }
  }
  float* out = dw + ((size_t)(kh * 3 + kw) * Ci + ci0) * Co + co0;
  for (int c = 0; c < CB; ++c)
    for (int g = 0; g < G; ++g) {
      float* at = out + (size_t)c * Co + VL * g;
      storev(at, loadv(at) + acc[c][g]);
    }
}

// Input channels [ci0, Ci) of one tap, every channel group: tiles of CB, the rest with one exact-size tile.
template <int CB, int S>
static void dw_channels(const float* xp, int Wp, int Ci, const float* dy, int Co, int Ho, int Wo, int kh, int kw,
                        int ci0, float* dw) {
  for (; ci0 + CB <= Ci; ci0 += CB)
    for (int co0 = 0; co0 < Co; co0 += 16) dw_tile<CB, S>(xp, Wp, Ci, dy, Co, Ho, Wo, kh, kw, ci0, co0, dw);
  if constexpr (CB > 1) {
    const int rest = Ci - ci0;
    if (rest >= 8 && CB > 8) return dw_channels<8, S>(xp, Wp, Ci, dy, Co, Ho, Wo, kh, kw, ci0, dw);
    if (rest > 0) return dw_channels<(CB > 8 ? 7 : CB - 1), S>(xp, Wp, Ci, dy, Co, Ho, Wo, kh, kw, ci0, dw);
  }
}

template <int S>
static void dw_image(const float* xp, int Wp, int Ci, const float* dy, int Co, int Ho, int Wo, float* dw) {
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) dw_channels<DW_CHANNELS, S>(xp, Wp, Ci, dy, Co, Ho, Wo, kh, kw, 0, dw);
}

static void conv3x3_dw(const float* x, const float* dy, float* dw, int B, int H, int W, int Ci, int Co, int s,
                       int threads) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, Wp = W + 2;
  const size_t wsize = (size_t)9 * Ci * Co;
  // Fixed contiguous chunks of images, each summed in image order into its own partial, then the partials
  // in chunk order: the result does not depend on which thread ran what (a run resumed in another process
  // must compute bit-identically), unlike handing out single images to whichever thread is free.
  const int chunks = std::max(1, std::min(threads, B));
  std::vector<std::vector<float>> partial(chunks, std::vector<float>(wsize, 0.0f));
  std::vector<std::vector<float>> padded(chunks, std::vector<float>((size_t)(H + 2) * Wp * Ci));
  parallel_for(chunks, chunks, [&](int c, int) {
    const int first = (int)((long long)B * c / chunks), last = (int)((long long)B * (c + 1) / chunks);
    for (int b = first; b < last; ++b) {
      pad_image(x + (size_t)b * H * W * Ci, H, W, Ci, padded[c].data());
      const float* dyb = dy + (size_t)b * Ho * Wo * Co;
      if (s == 1) dw_image<1>(padded[c].data(), Wp, Ci, dyb, Co, Ho, Wo, partial[c].data());
      else dw_image<2>(padded[c].data(), Wp, Ci, dyb, Co, Ho, Wo, partial[c].data());
    }
  });
  for (size_t i = 0; i < wsize; ++i) {
    float sum = 0.0f;
    for (int c = 0; c < chunks; ++c) sum += partial[c][i];
    dw[i] = sum;
  }
}

// Vector width the library was built for (floats per vector): lets Python tests and benchmarks say which
// variant they ran.
extern "C" int HktConv3x3VectorFloats() { return VL; }

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
