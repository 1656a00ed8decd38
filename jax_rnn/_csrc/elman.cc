// The Elman cell's two sequential loops on CPUs, as XLA FFI custom calls.
//
// jax_rnn/_kernels.py calls these for a float32 Elman cell with tanh or ReLU (see its
// docstring for when). Each call runs a whole loop over time:
//
//   forward:  h_t = act(x_t @ w_in + b + h_{t-1} @ w)
//   backward: d_g_t = act'(h_t) (d_h_t + d_state_t) + d_pre_t,  d_h_{t-1} = d_g_t @ w_t
//
// (w_t is w transposed, passed in by the caller), in time order or reversed. A step is
// split into panels of 16 output columns. Where a step is large enough, the panels are
// shared by the calling thread and tasks on XLA's own intra-op thread pool (see Run):
// XLA's CPU loops run such per-step products on one core. Work is claimed from one counter
// over all (step, panel) pairs, and a panel waits only for the panels of the step before
// it, so a task that starts late (or never, when the pool is busy) only means that the
// calling thread does more panels; the call never waits for a task to start.
//
// The products accumulate in float32 over the input columns in order (x's, then h's),
// starting from b (forward) or zero (backward), with fused multiply-adds where the
// target has them (-march=native on x86-64 since Haswell). tanh
// is computed here (an odd polynomial below |x| = 0.4, else 1 - 2 / (exp(2|x|) + 1)):
// within 2.4 ulp (1.7e-7 relative) of the exact value over [-20, 20] and at tiny values
// (measured on a grid of 2e7 points), about XLA's own float32 tanh.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // output columns per panel (one vector)
constexpr int kRows = 8;    // rows per block of the product

typedef float Vec __attribute__((vector_size(64)));
typedef float VecU __attribute__((vector_size(64), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(64)));

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }

// The first n < kLanes entries; the rest zero.
inline Vec LoadPart(const float* p, int n) {
  float tmp[kLanes] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return Load(tmp);
}

inline void StorePart(float* p, Vec v, int n) {
  float tmp[kLanes];
  Store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}

inline Vec Splat(float x) { return Vec{} + x; }

// exp(x) for x <= 0 (clamped at -87): x = n ln2 + r, exp(r) by its Taylor polynomial to
// r^7 (|r| <= ln2 / 2), times 2^n built in the exponent bits.
inline Vec ExpNonPositive(Vec x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  n = n == n ? n : Splat(0.0f);  // NaN (whose result stays NaN through p): a defined 2^0
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  Vec p = r * (1.0f / 5040) + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline Vec Tanh(Vec x) {
  const Vec a = x < 0.0f ? -x : x;
  const Vec e = ExpNonPositive(-2.0f * a);
  const Vec large = (1.0f - e) / (1.0f + e);
  // tanh's Taylor series to x^15 (the first term left out is below 4e-10 relative at
  // |x| < 0.4, where the exp form would lose digits to 1 - e).
  const Vec x2 = x * x;
  Vec p = x2 * (-929569.0f / 638512875) + (21844.0f / 6081075);
  p = p * x2 + (-1382.0f / 155925);
  p = p * x2 + (62.0f / 2835);
  p = p * x2 + (-17.0f / 315);
  p = p * x2 + (2.0f / 15);
  p = p * x2 + (-1.0f / 3);
  const Vec small = a + a * x2 * p;
  const Vec t = a < 0.4f ? small : large;  // NaN takes `large`, which stays NaN
  // |tanh| with x's sign bit (so that tanh(-0) = -0).
  IVec bits, sign;
  std::memcpy(&bits, &t, sizeof bits);
  std::memcpy(&sign, &x, sizeof sign);
  bits |= sign & static_cast<int32_t>(0x80000000u);
  Vec out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// NaN stays NaN, as in jax.nn.relu.
inline Vec Relu(Vec x) { return x < 0.0f ? Splat(0.0f) : x; }

enum Activation : int32_t { kTanh = 0, kRelu = 1 };

// acc[r] += a[r, :] @ m[:, panel] for rows a (stride lda) and a packed matrix m whose
// panel starts at m (row stride ldm), over `depth` columns of a.
template <int R>
inline void Product(const float* a, int64_t lda, const float* m, int64_t ldm, int64_t depth,
                    Vec* acc) {
  for (int64_t k = 0; k < depth; ++k) {
    const Vec w = Load(m + k * ldm);
    for (int r = 0; r < R; ++r) acc[r] += a[r * lda + k] * w;
  }
}

// The (step, panel) work of a loop, shared by the participating threads.
struct Work {
  int64_t panels = 0, total = 0;
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
};

// Waits until `done` reaches `target`: spins briefly, then yields the core (the machine
// may have fewer free cores than threads).
inline void WaitFor(const std::atomic<int64_t>& done, int64_t target) {
  for (int spins = 0; done.load(std::memory_order_acquire) < target; ++spins) {
    if (spins > 2000) {
      std::this_thread::yield();
    } else {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
}

// Claims and runs panels until none are left. `panel(step, j0)` computes one.
template <typename Panel>
void Participate(Work& work, const Panel& panel) {
  for (;;) {
    const int64_t item = work.next.fetch_add(1, std::memory_order_relaxed);
    if (item >= work.total) return;
    const int64_t step = item / work.panels;
    WaitFor(work.done, step * work.panels);
    panel(step, (item % work.panels) * kLanes);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// Products of at least this many multiply-adds per step are shared with a second thread
// (and 2 * kShareMin with a third, ...); smaller steps run on the calling thread alone.
// Measured on 2 cores, forward / backward loop in ms: B=8, I=32, H=64 (49152 and 32768
// per step) shared 14.0 / 19.8, alone 19.6 / 27.8; B=4, I=16, H=64 (20480 and 16384)
// shared 0.65 / 0.95, alone 0.61 / 0.80.
constexpr int64_t kShareMin = 1 << 15;

}  // namespace

// The threads that share a loop: one more per kShareMin multiply-adds of a step, at most
// one per panel and XLA's pool size (only 2 threads were measured: this machine's pool).
// Exported for the tests (jax_rnn._native.threads).
extern "C" int64_t JaxRnnThreads(int64_t step_work, int64_t panels, int64_t pool_threads) {
  return std::max<int64_t>(1, std::min({1 + step_work / kShareMin, panels, pool_threads}));
}

namespace {

template <typename Panel>
void Run(ffi::ThreadPool& pool, int64_t steps, int64_t panels, int64_t step_work,
         const Panel& panel) {
  auto work = std::make_shared<Work>();
  work->panels = panels;
  work->total = steps * panels;
  const int64_t threads = JaxRnnThreads(step_work, panels, pool.num_threads());
  for (int64_t i = 1; i < threads; ++i) {
    // A task holds `work` alive; it reads `panel` (on this stack) only for items it
    // claims, and every item is claimed and done before this function returns.
    pool.Schedule([work, &panel] { Participate(*work, panel); });
  }
  Participate(*work, panel);
  WaitFor(work->done, work->total);
}

// Matrices of `hidden` columns stacked by rows, packed to `padded` columns.
std::vector<float> Pack(std::initializer_list<std::pair<const float*, int64_t>> parts,
                        int64_t hidden, int64_t padded) {
  int64_t rows = 0;
  for (const auto& part : parts) rows += part.second;
  std::vector<float> packed(rows * padded, 0.0f);
  float* out = packed.data();
  for (const auto& [m, count] : parts) {
    for (int64_t k = 0; k < count; ++k, out += padded) {
      std::memcpy(out, m + k * hidden, hidden * sizeof(float));
    }
  }
  return packed;
}

// Rows of one operand of a step's product: row r is a + r * depth, `depth` long.
struct Rows {
  const float* a;
  int64_t depth;
};

// out[r, j0:j0+16] = finish(r, j0, n, acc) over the rows in blocks, where acc starts at
// start(r, j0, n) and adds [x[r], h[r]] @ packed[:, j0:j0+16] (packed: x's depth rows,
// then h's); n = the panel's real columns.
template <typename Start, typename Finish>
void Panel(Rows x, Rows h, const float* packed, int64_t batch, int64_t hidden,
           int64_t padded, int64_t j0, const Start& start, const Finish& finish) {
  const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j0));
  const float* m = packed + j0;
  int64_t r = 0;
  auto block = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    Vec acc[R];
    for (int i = 0; i < R; ++i) acc[i] = start(r + i, j0, n);
    if (x.depth > 0) Product<R>(x.a + r * x.depth, x.depth, m, padded, x.depth, acc);
    Product<R>(h.a + r * h.depth, h.depth, m + x.depth * padded, padded, h.depth, acc);
    for (int i = 0; i < R; ++i) finish(r + i, j0, n, acc[i]);
    r += R;
  };
  while (r + kRows <= batch) block(std::integral_constant<int, kRows>{});
  switch (batch - r) {
    case 7: block(std::integral_constant<int, 7>{}); break;
    case 6: block(std::integral_constant<int, 6>{}); break;
    case 5: block(std::integral_constant<int, 5>{}); break;
    case 4: block(std::integral_constant<int, 4>{}); break;
    case 3: block(std::integral_constant<int, 3>{}); break;
    case 2: block(std::integral_constant<int, 2>{}); break;
    case 1: block(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

inline Vec LoadN(const float* p, int n) { return n == kLanes ? Load(p) : LoadPart(p, n); }
inline void StoreN(float* p, Vec v, int n) {
  if (n == kLanes) Store(p, v); else StorePart(p, v, n);
}

// Whether `dims` is `want` (-1: any), else an error naming the kernel and the operand.
ffi::Error CheckShape(const char* kernel, const char* operand, ffi::Span<const int64_t> dims,
                      std::initializer_list<int64_t> want) {
  bool ok = dims.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) {
    ok = want.begin()[i] < 0 || dims[i] == want.begin()[i];
  }
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(kernel) + ": " + operand +
                                     " has the wrong shape (jax_rnn._native calls it)");
}

// The forward loop from the inputs xs: each step's product is [x_t, h_{t-1}] @ [w_in; w],
// plus b. Only the states are written: jax_rnn recomputes the pre-activations with one
// XLA product, which XLA drops where they are unused (writing them here cost 4.5 ms of
// 21 at T=1000, B=32, I=64, H=128: fresh memory).
ffi::Error ElmanForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                            ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> b,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0,
                            ffi::Result<ffi::Buffer<ffi::F32>> h, int32_t activation,
                            int32_t reverse) {
  const char* name = "jax_rnn_elman_forward";
  const auto dims = xs.dimensions();
  if (dims.size() != 3) return CheckShape(name, "xs", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], inputs = dims[2];
  const int64_t hidden = w.dimensions().size() == 2 ? w.dimensions()[0] : -1;
  for (auto error : {CheckShape(name, "w", w.dimensions(), {hidden, hidden}),
                     CheckShape(name, "w_in", w_in.dimensions(), {inputs, hidden}),
                     CheckShape(name, "b", b.dimensions(), {hidden}),
                     CheckShape(name, "h0", h0.dimensions(), {batch, hidden}),
                     CheckShape(name, "h", h->dimensions(), {length, batch, hidden})}) {
    if (error.failure()) return error;
  }
  if (length == 0 || batch == 0 || hidden == 0) return ffi::Error::Success();
  const int64_t padded = (hidden + kLanes - 1) / kLanes * kLanes;
  const std::vector<float> packed = Pack({{w_in.typed_data(), inputs},
                                          {w.typed_data(), hidden}}, hidden, padded);
  std::vector<float> bias(padded, 0.0f);
  std::memcpy(bias.data(), b.typed_data(), hidden * sizeof(float));
  const float* xs_p = xs.typed_data();
  float* h_p = h->typed_data();
  const int64_t size = batch * hidden;
  auto panel = [&](int64_t step, int64_t j0) {
    const int64_t t = reverse ? length - 1 - step : step;
    const float* prev = step == 0 ? h0.typed_data() : h_p + (reverse ? t + 1 : t - 1) * size;
    float* h_t = h_p + t * size;
    auto start = [&](int64_t, int64_t j, int) { return Load(bias.data() + j); };
    auto finish = [&](int64_t r, int64_t j, int n, Vec acc) {
      StoreN(h_t + r * hidden + j, activation == kTanh ? Tanh(acc) : Relu(acc), n);
    };
    Panel(Rows{xs_p + t * batch * inputs, inputs}, Rows{prev, hidden}, packed.data(), batch,
          hidden, padded, j0, start, finish);
  };
  Run(pool, length, padded / kLanes, batch * (inputs + hidden) * hidden, panel);
  return ffi::Error::Success();
}

// act'(h) d from the activation's output h.
inline Vec Back(int32_t activation, Vec h, Vec d) {
  return activation == kTanh ? d * (1.0f - h * h) : (h > 0.0f ? d : Splat(0.0f));
}

// The backward loop. d_g is written transposed, (H, T, B): XLA's CPU products take it
// as it is for the weight gradients (d_w^T = d_g^T @ h_in), where the (T, B, H) layout
// needed transposed copies of the states and inputs. The loop itself reads each step's
// d_g by rows, from a scratch copy.
ffi::Error ElmanBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                             ffi::Buffer<ffi::F32> d_state, ffi::Buffer<ffi::F32> d_pre,
                             ffi::Buffer<ffi::F32> w_t, ffi::Buffer<ffi::F32> d_final,
                             ffi::ResultBuffer<ffi::F32> d_g_t, ffi::ResultBuffer<ffi::F32> d_h0,
                             int32_t activation, int32_t reverse) {
  const char* name = "jax_rnn_elman_backward";
  const auto dims = h.dimensions();
  if (dims.size() != 3) return CheckShape(name, "h", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  for (auto error : {CheckShape(name, "d_state", d_state.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "d_pre", d_pre.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "w_t", w_t.dimensions(), {hidden, hidden}),
                     CheckShape(name, "d_final", d_final.dimensions(), {batch, hidden}),
                     CheckShape(name, "d_g_t", d_g_t->dimensions(), {hidden, length, batch})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  if (batch == 0 || hidden == 0) return ffi::Error::Success();
  if (length == 0) {
    std::memcpy(d_h0->typed_data(), d_final.typed_data(), size * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t padded = (hidden + kLanes - 1) / kLanes * kLanes;
  const std::vector<float> packed = Pack({{w_t.typed_data(), hidden}}, hidden, padded);
  const float *h_p = h.typed_data(), *ds_p = d_state.typed_data(), *dp_p = d_pre.typed_data();
  float* dgt_p = d_g_t->typed_data();
  // Step s of the loop's d_g by rows: scratch[s % 2] (step s + 1 writes the other half
  // only once every panel of step s is done).
  std::vector<float> scratch(2 * size);
  // The backward order visits t = order(0), order(1), ...; d_g of the first from d_final.
  auto order = [&](int64_t step) { return reverse ? step : length - 1 - step; };
  // d_g at step s (time t = order(s)), row r, columns j:j+n, from the cotangent d of h_t.
  auto gate = [&](int64_t step, int64_t r, int64_t j, int n, Vec d) {
    const int64_t t = order(step), at = t * size + r * hidden + j;
    const Vec g = Back(activation, LoadN(h_p + at, n), d + LoadN(ds_p + at, n)) +
                  LoadN(dp_p + at, n);
    StoreN(scratch.data() + (step % 2) * size + r * hidden + j, g, n);
    float* out = dgt_p + (j * length + t) * batch + r;
    for (int i = 0; i < n; ++i) out[i * length * batch] = g[i];
  };
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t j = 0; j < hidden; j += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j));
      gate(0, r, j, n, LoadN(d_final.typed_data() + r * hidden + j, n));
    }
  }
  float* dh0_p = d_h0->typed_data();
  auto panel = [&](int64_t step, int64_t j0) {
    const float* source = scratch.data() + (step % 2) * size;
    auto start = [](int64_t, int64_t, int) { return Vec{}; };
    auto finish = [&](int64_t r, int64_t j, int n, Vec acc) {
      if (step + 1 < length) gate(step + 1, r, j, n, acc);
      else StoreN(dh0_p + r * hidden + j, acc, n);
    };
    Panel(Rows{nullptr, 0}, Rows{source, hidden}, packed.data(), batch, hidden, padded, j0,
          start, finish);
  };
  Run(pool, length, padded / kLanes, batch * hidden * hidden, panel);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnElmanForward, ElmanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (T, B, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in (I, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b (H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnElmanBackward, ElmanBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_state (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pre (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_t (H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_final (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_g^T (H, T, B)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0 (B, H)
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("reverse"));
