// Shared by the CPU kernels (elman.cc, gru.cc, lstm.cc): float32 vectors, the activations,
// the loop runner that shares steps with XLA's thread pool, what the kernels do to their
// results' fresh memory first (PrepareResults: AdviseHugePages, PreTouch), and operand
// checks.

#ifndef JAX_RNN_CSRC_COMMON_H_
#define JAX_RNN_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>  // madvise (AdviseHugePages)
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // output columns per panel (one vector)

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

// Asks Linux to back the 2 MiB-aligned part of each result with transparent huge pages
// (madvise MADV_HUGEPAGE) before a kernel writes it, where huge_pages is set (the
// attribute of every kernel here: jax_rnn._native.HUGE_PAGES, off by default). The advice
// stays on that memory after XLA frees the result, until the memory is unmapped. XLA maps
// a computation's intermediate arrays anew for every call, and a first write to a 4 KiB
// page costs a page fault: an LSTM's forward+backward at T=1000, B=32, H=128 took 46,200-
// 47,800 of them a call, 11,400-11,800 with the advice (both without PreTouch, whose
// 30,000 the advice was not measured against; docs/performance.md, "Huge pages, opt-in",
// also for why it is off by default). Where Linux's transparent huge pages are off, or
// none is free, the advice changes nothing; where madvise has no MADV_HUGEPAGE (not
// Linux), there is none.
template <typename... Results>
inline void AdviseHugePages(int32_t huge_pages, Results&... results) {
#ifdef MADV_HUGEPAGE
  if (!huge_pages) return;
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  for (auto [data, bytes] : {std::pair{results->untyped_data(), results->size_bytes()}...}) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
    const uintptr_t start = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (begin + bytes) & ~(kHuge - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#else  // no transparent huge pages (not Linux)
  (void)huge_pages;
  ((void)results, ...);
#endif
}

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

// tanh: an odd polynomial below |x| = 0.4, else 1 - 2 / (exp(2|x|) + 1); within 2.4 ulp
// (1.7e-7 relative) of the exact value over [-20, 20] and at tiny values (measured on a
// grid of 2e7 points), about XLA's own float32 tanh.
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

// The logistic sigmoid 1 / (1 + exp(-x)), from e = exp(-|x|): 1 / (1 + e) for x >= 0,
// e / (1 + e) below (no cancellation either side): within 2.7 ulp of the exact value over
// [-30, 30] (2e6 points; XLA's own float32 sigmoid: 2.5). Below -87 (exp's clamp) it is
// 1.6e-38 where the exact value is smaller; NaN stays NaN.
inline Vec Sigmoid(Vec x) {
  const Vec e = ExpNonPositive(x < 0.0f ? x : -x);
  const Vec s = 1.0f / (1.0f + e);
  return x < 0.0f ? e * s : s;
}

// NaN stays NaN, as in jax.nn.relu.
inline Vec Relu(Vec x) { return x < 0.0f ? Splat(0.0f) : x; }

enum Activation : int32_t { kTanh = 0, kRelu = 1 };

// acc[r][Slots[q]] += a[r, :] @ m[:, 16 q:16 (q + 1)] for rows a (stride lda) and a
// panel m of K = sizeof...(Slots) vectors of 16 columns (row stride 16 K), over `depth`
// columns of a: each of the panel's vectors adds into its slot of a row's G accumulators.
template <int R, int G, int... Slots>
inline void Product(const float* a, int64_t lda, const float* m, int64_t depth,
                    Vec (&acc)[R][G], std::integer_sequence<int, Slots...>) {
  constexpr int K = sizeof...(Slots);
  constexpr int slot[K] = {Slots...};
  for (int64_t k = 0; k < depth; ++k) {
    Vec w[K];
    for (int q = 0; q < K; ++q) w[q] = Load(m + (k * K + q) * kLanes);
    for (int r = 0; r < R; ++r) {
      const float v = a[r * lda + k];
      for (int q = 0; q < K; ++q) acc[r][slot[q]] += v * w[q];
    }
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

// Claims and runs panels until none are left. `panel(step, p)` computes panel p of a step.
template <typename Panel>
void Participate(Work& work, const Panel& panel) {
  for (;;) {
    const int64_t item = work.next.fetch_add(1, std::memory_order_relaxed);
    if (item >= work.total) return;
    const int64_t step = item / work.panels;
    WaitFor(work.done, step * work.panels);
    panel(step, item % work.panels);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// Products of at least this many multiply-adds per step are shared with a second thread
// (and 2 * kShareMin with a third, ...); smaller steps run on the calling thread alone.
// Measured on 2 cores, forward / backward loop in ms: B=8, I=32, H=64 (49152 and 32768
// per step) shared 14.0 / 19.8, alone 19.6 / 27.8; B=4, I=16, H=64 (20480 and 16384)
// shared 0.65 / 0.95, alone 0.61 / 0.80.
constexpr int64_t kShareMin = 1 << 15;

// The threads that share a loop: one more per kShareMin multiply-adds of a step, at most
// one per panel and XLA's pool size (only 2 threads were measured: this machine's pool).
// Exported for the tests as JaxRnnThreads (elman.cc; jax_rnn._native.threads).
inline int64_t Threads(int64_t step_work, int64_t panels, int64_t pool_threads) {
  return std::max<int64_t>(1, std::min({1 + step_work / kShareMin, panels, pool_threads}));
}

template <typename Panel>
void Run(ffi::ThreadPool& pool, int64_t steps, int64_t panels, int64_t step_work,
         const Panel& panel) {
  auto work = std::make_shared<Work>();
  work->panels = panels;
  work->total = steps * panels;
  const int64_t threads = Threads(step_work, panels, pool.num_threads());
  for (int64_t i = 1; i < threads; ++i) {
    // A task holds `work` alive; it reads `panel` (on this stack) only for items it
    // claims, and every item is claimed and done before this function returns.
    pool.Schedule([work, &panel] { Participate(*work, panel); });
  }
  Participate(*work, panel);
  WaitFor(work->done, work->total);
}

// Writes a zero into every 4 KiB page of the results, in chunks of pages shared with XLA's
// thread pool (Run), before a kernel's loop writes them, where `pretouch` is set (the
// attribute of every kernel: jax_rnn._native.PRETOUCH) and the results hold at least
// kPreTouchMin bytes. XLA maps the memory of a computation's intermediate arrays anew
// for every call; in the loop, the threads that share a step wrote into the same fresh
// pages, both faulted on them, and a fault on one stalled the step for both. Touched here,
// the faults are taken once, in parallel, and the loop runs without them: at T=1000,
// B=32, H=128 the GRU's forward+backward took 28,000 page faults a call instead of 44,400,
// and 152 against 187 ms (docs/performance.md, "Touching fresh pages first").
constexpr int64_t kPage = 4096;
constexpr int64_t kPreTouchMin = int64_t{1} << 20;

template <typename... Results>
void PreTouch(ffi::ThreadPool& pool, int32_t pretouch, Results&... results) {
  if (!pretouch || (int64_t{0} + ... + static_cast<int64_t>(results->size_bytes())) <
                       kPreTouchMin) {
    return;
  }
  struct Span {
    uintptr_t begin, first_page;
    int64_t pages;
  };
  std::vector<Span> spans;
  int64_t total = 0;
  for (auto [data, size] : {std::pair{results->untyped_data(), results->size_bytes()}...}) {
    if (size == 0) continue;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
    const uintptr_t first = begin / kPage, last = (begin + size - 1) / kPage;
    spans.push_back({begin, first, static_cast<int64_t>(last - first + 1)});
    total += spans.back().pages;
  }
  // One more thread (Threads) per MiB of pages, up to the pool's: 64 chunks to share.
  const int64_t chunks = std::min<int64_t>(64, total);
  Run(pool, 1, chunks, total * kShareMin / (kPreTouchMin / kPage), [&](int64_t, int64_t p) {
    // Pages lo..hi-1 of all the spans' pages in order.
    int64_t lo = p * total / chunks, hi = (p + 1) * total / chunks;
    for (const Span& span : spans) {
      for (int64_t q = std::max<int64_t>(lo, 0); q < std::min(hi, span.pages); ++q) {
        const uintptr_t at = std::max<uintptr_t>(span.begin, (span.first_page + q) * kPage);
        *reinterpret_cast<volatile char*>(at) = 0;
      }
      lo -= span.pages;
      hi -= span.pages;
      if (hi <= 0) break;
    }
  });
}

// What every kernel does to its results before its loop: the huge-pages advice first, so
// that the pages PreTouch then faults in are huge where advised, then PreTouch.
template <typename... Results>
void PrepareResults(ffi::ThreadPool& pool, int32_t huge_pages, int32_t pretouch,
                    Results&... results) {
  AdviseHugePages(huge_pages, results...);
  PreTouch(pool, pretouch, results...);
}

// Matrices stacked by rows (each (rows, ld), given as (pointer, rows)), packed by panels
// of G vectors of 16 columns: panel p is (rows, 16 G), and its vector q holds the source
// columns c, ..., c + n - 1 for (c, n) = columns(p, q), zero past n. The panels follow one
// another, so that a panel's product reads its weights in order (the rows of a wide
// matrix, strided, were slower: LSTM forward 79 vs 65 ms at T=1000, B=32, H=128).
template <typename Columns>
std::vector<float> PackPanels(std::initializer_list<std::pair<const float*, int64_t>> parts,
                              int64_t ld, int64_t panels, int G, const Columns& columns) {
  int64_t rows = 0;
  for (const auto& part : parts) rows += part.second;
  std::vector<float> packed(panels * rows * G * kLanes, 0.0f);
  float* out = packed.data();
  for (int64_t p = 0; p < panels; ++p) {
    for (const auto& [m, count] : parts) {
      for (int64_t k = 0; k < count; ++k, out += G * kLanes) {
        for (int q = 0; q < G; ++q) {
          const auto [c, n] = columns(p, q);
          if (n > 0) std::memcpy(out + q * kLanes, m + k * ld + c, n * sizeof(float));
        }
      }
    }
  }
  return packed;
}

// The columns of a matrix of `cols` columns in order, for panels of one vector: panel p
// is columns 16 p on (for PackPanels).
inline auto InOrder(int64_t cols) {
  return [cols](int64_t p, int q) {
    const int64_t c = (p + q) * kLanes;
    return std::pair<int64_t, int64_t>{c, std::clamp<int64_t>(cols - c, 0, kLanes)};
  };
}

// The columns of gates side by side ([gate 0 | gate 1 | ...], `hidden` columns each), for
// panels of one vector per gate: panel p's vector q is gate q's columns for hidden units
// 16 p on, so that one panel's product gives every gate of 16 units (for PackPanels).
inline auto GateColumns(int64_t hidden) {
  return [hidden](int64_t p, int q) {
    return std::pair<int64_t, int64_t>{q * hidden + p * kLanes,
                                       std::min<int64_t>(kLanes, hidden - p * kLanes)};
  };
}

// Rows of one operand of a step's product: row r is a + r * depth, `depth` long.
struct Rows {
  const float* a;
  int64_t depth;
};

// block(R) for the R = rest < kMax + 1 rows left at r.
template <int R, typename Block>
inline void ForTail(int64_t rest, int64_t r, const Block& block) {
  if (rest == R) {
    block(std::integral_constant<int, R>{}, r);
  } else if constexpr (R > 1) {
    ForTail<R - 1>(rest, r, block);
  }
}

// Calls block(std::integral_constant<int, R>{}, r) for consecutive blocks of R rows
// starting at r = 0: blocks of kMax rows, then one block of the rest.
template <int kMax, typename Block>
inline void ForBlocks(int64_t batch, const Block& block) {
  int64_t r = 0;
  for (; r + kMax <= batch; r += kMax) block(std::integral_constant<int, kMax>{}, r);
  if (r == batch) return;
  if constexpr (kMax > 1) {
    ForTail<kMax - 1>(batch - r, r, block);
  }
}

inline Vec LoadN(const float* p, int n) { return n == kLanes ? Load(p) : LoadPart(p, n); }
inline void StoreN(float* p, Vec v, int n) {
  if (n == kLanes) Store(p, v); else StorePart(p, v, n);
}

// Rows per block of a product with G accumulator vectors a row (1 or 4): 8 x 1, or 6 x 4
// (with the 3 or 4 weight vectors of a step in k, within AVX-512's 32 registers; 4 x 4
// made the LSTM's forward loop 1.5x slower at T=1000, B=32, H=128).
// Without AVX-512 a vector takes 2 or 4 registers, and the blocks are smaller (not
// measured: this project's machines have AVX-512).
#if defined(__AVX512F__)
template <int G>
constexpr int kBlockRows = G == 1 ? 8 : 6;
#else
template <int G>
constexpr int kBlockRows = G == 1 ? 4 : 2;
#endif

// One panel m of a step's product (PackPanels' layout: x's depth rows of XSlots' vectors,
// then h's of HSlots'; by default G vectors each): for every row r, G accumulators from
// start(r, acc), plus [x[r], h[r]] @ m, each vector of m adding into its slot, then
// finish(r, acc).
template <int G, typename XSlots = std::make_integer_sequence<int, G>,
          typename HSlots = XSlots, typename Start, typename Finish>
void WidePanel(Rows x, Rows h, const float* m, int64_t batch, const Start& start,
               const Finish& finish) {
  ForBlocks<kBlockRows<G>>(batch, [&](auto rows, int64_t r) {
    constexpr int R = decltype(rows)::value;
    Vec acc[R][G];
    for (int i = 0; i < R; ++i) start(r + i, acc[i]);
    if (x.depth > 0) Product(x.a + r * x.depth, x.depth, m, x.depth, acc, XSlots{});
    Product(h.a + r * h.depth, h.depth, m + x.depth * XSlots::size() * kLanes, h.depth, acc,
            HSlots{});
    for (int i = 0; i < R; ++i) finish(r + i, acc[i]);
  });
}

// Runs a loop whose steps each multiply rows by the stacked matrices `parts` (each
// (rows, cols)), in panels of one vector of 16 columns: panel(m, step, p) computes panel
// p of a step, m its packed weights (PackPanels, columns in order). Panels of 2 or 4
// vectors made the Elman cell's loops no faster in an A/B in one process, and
// forward+backward up to 20% slower (T=1000, B=32, H=128: 59.2 ms with 1,
// 62.3 with 2, 64.4 with 4 vectors; T=200, B=64, H=512: 208, 232, 248 ms), and the LSTM's
// backward loop at H=128 (202 against 232 ms with 4).
template <typename Panel>
void RunProduct(ffi::ThreadPool& pool, int64_t steps, int64_t cols,
                std::initializer_list<std::pair<const float*, int64_t>> parts,
                int64_t step_work, const Panel& panel) {
  const int64_t panels = (cols + kLanes - 1) / kLanes;
  int64_t depth = 0;
  for (const auto& part : parts) depth += part.second;
  const std::vector<float> packed = PackPanels(parts, cols, panels, 1, InOrder(cols));
  Run(pool, steps, panels, step_work, [&](int64_t step, int64_t p) {
    panel(packed.data() + p * depth * kLanes, step, p);
  });
}

// The forward loop of a gated cell (lstm.cc, gru.cc) over the inputs xs (T, B, I) from h0,
// writing its states to h (T, B, H), in time order or reversed: each step's product of
// [x_t, h_{t-1}] with [w_in; w] (each (., kGates * hidden), the gates side by side) runs
// in panels of the kGates gates of 16 hidden units (GateColumns), with G accumulators a
// row started from `starts` (G * hidden: accumulator q of unit j at q * hidden + j) and
// the gates' vectors adding into the XSlots (input rows) and HSlots (state rows) of them
// (WidePanel). finish(t, r, j, n, h_prev, acc) then writes row r's hidden units j..j+n-1
// of step t (h_prev: the step's input states, by rows of `hidden`).
template <int G, typename XSlots, typename HSlots, typename Finish>
void RunGatedForward(ffi::ThreadPool& pool, int64_t length, int64_t batch, int64_t inputs,
                     int64_t hidden, bool reverse, const float* xs, const float* w_in,
                     const float* w, const float* starts, const float* h0, const float* h,
                     const Finish& finish) {
  constexpr int kGates = static_cast<int>(XSlots::size());
  const int64_t panels = (hidden + kLanes - 1) / kLanes, size = batch * hidden;
  const std::vector<float> packed = PackPanels({{w_in, inputs}, {w, hidden}},
                                               kGates * hidden, panels, kGates,
                                               GateColumns(hidden));
  const std::vector<float> bias =
      PackPanels({{starts, 1}}, G * hidden, panels, G, GateColumns(hidden));
  auto panel = [&](int64_t step, int64_t p) {
    const int64_t t = reverse ? length - 1 - step : step;
    const float* prev = step == 0 ? h0 : h + (reverse ? t + 1 : t - 1) * size;
    const int64_t j = p * kLanes;
    const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j));
    auto start = [&](int64_t, auto& acc) {
      for (int q = 0; q < G; ++q) acc[q] = Load(bias.data() + (p * G + q) * kLanes);
    };
    auto finish_row = [&](int64_t r, auto& acc) { finish(t, r, j, n, prev, acc); };
    WidePanel<G, XSlots, HSlots>(Rows{xs + t * batch * inputs, inputs}, Rows{prev, hidden},
                                 packed.data() + p * (inputs + hidden) * kGates * kLanes,
                                 batch, start, finish_row);
  };
  Run(pool, length, panels, batch * (inputs + hidden) * kGates * hidden, panel);
}

// w_t (depth, hidden) packed for RunBackwardPacked (by panels of 16 columns, PackPanels).
inline std::vector<float> PackBackward(const float* w_t, int64_t depth, int64_t hidden) {
  return PackPanels({{w_t, depth}}, hidden, (hidden + kLanes - 1) / kLanes, 1,
                    InOrder(hidden));
}

// The backward loop of a cell, in the backward order of its steps s = 0, ..., length - 1:
// gate(s, r, j, n, d) turns the cotangent d of step s's output state (row r, columns
// j..j+n-1) into that step's pre-activation gradients, which source(s) holds by rows
// (`depth` of them a row) once every panel of step s - 1 is done; d_final gives step 0's
// d, the product source(s) @ w_t (w_t: (depth, hidden), given packed by PackBackward) step
// s + 1's, and after the last step it is d_h0. d_final and d_h0 may be the same buffer
// (a kernel that runs the loop over chunks of its steps, packing w_t once).
template <typename Source, typename Gate>
void RunBackwardPacked(ffi::ThreadPool& pool, int64_t length, int64_t batch, int64_t hidden,
                       int64_t depth, const float* packed, const float* d_final, float* d_h0,
                       const Source& source, const Gate& gate) {
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t j = 0; j < hidden; j += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j));
      gate(0, r, j, n, LoadN(d_final + r * hidden + j, n));
    }
  }
  auto panel = [&](int64_t step, int64_t p) {
    const int64_t j = p * kLanes;
    const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j));
    auto start = [](int64_t, auto& acc) { acc[0] = Vec{}; };
    auto finish = [&](int64_t r, auto& acc) {
      if (step + 1 < length) gate(step + 1, r, j, n, acc[0]);
      else StoreN(d_h0 + r * hidden + j, acc[0], n);
    };
    WidePanel<1>(Rows{nullptr, 0}, Rows{source(step), depth}, packed + p * depth * kLanes,
                 batch, start, finish);
  };
  Run(pool, length, (hidden + kLanes - 1) / kLanes, batch * depth * hidden, panel);
}

// RunBackwardPacked with w_t as it is.
template <typename Source, typename Gate>
void RunBackward(ffi::ThreadPool& pool, int64_t length, int64_t batch, int64_t hidden,
                 int64_t depth, const float* w_t, const float* d_final, float* d_h0,
                 const Source& source, const Gate& gate) {
  const std::vector<float> packed = PackBackward(w_t, depth, hidden);
  RunBackwardPacked(pool, length, batch, hidden, depth, packed.data(), d_final, d_h0, source,
                    gate);
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

// A cotangent of every step, `dims` (length, batch, hidden), or a zero one that jax_rnn
// passes as an array of no steps, (0, batch, hidden): an error as CheckShape's if neither.
ffi::Error CheckSteps(const char* kernel, const char* operand, ffi::Span<const int64_t> dims,
                      int64_t length, int64_t batch, int64_t hidden) {
  const int64_t steps = dims.size() == 3 && dims[0] == 0 ? 0 : length;
  return CheckShape(kernel, operand, dims, {steps, batch, hidden});
}

// A per-step cotangent's data, or nullptr for a zero one (no steps, CheckSteps).
inline const float* StepsOrNull(const ffi::Buffer<ffi::F32>& a) {
  return a.dimensions()[0] == 0 ? nullptr : a.typed_data();
}

// v + the n entries of a at `at`, or v where a is nullptr (a zero cotangent).
inline Vec PlusAt(Vec v, const float* a, int64_t at, int n) {
  return a == nullptr ? v : v + LoadN(a + at, n);
}

}  // namespace

#endif  // JAX_RNN_CSRC_COMMON_H_
