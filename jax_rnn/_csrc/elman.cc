// The Elman cell's two sequential loops on CPUs, as XLA FFI custom calls, and the backward
// loop with the weight gradients (ElmanGrads, below).
//
// jax_rnn/_kernels.py calls these for a float32 Elman cell with tanh or ReLU (see its
// docstring for when). Each call runs a whole loop over time:
//
//   forward:  h_t = act(x_t @ w_in + b + h_{t-1} @ w)
//   backward: d_g_t = act'(h_t) (d_h_t + d_state_t) + d_pre_t,  d_h_{t-1} = d_g_t @ w_t
//
// (w_t is w transposed, passed in by the caller; d_state and d_pre have no steps where
// they are zero, common.h's CheckSteps), in time order or reversed. A step is
// split into panels of 16 output columns. Where a step is large enough, the panels are
// shared by the calling thread and tasks on XLA's own intra-op thread pool (see Run):
// XLA's CPU loops run such per-step products on one core. Work is claimed from one counter
// over all (step, panel) pairs, and a panel waits only for the panels of the step before
// it, so a task that starts late (or never, when the pool is busy) only means that the
// calling thread does more panels; the call never waits for a task to start.
//
// The products accumulate in float32 over the input columns in order (x's, then h's),
// starting from b (forward) or zero (backward), with fused multiply-adds where the
// target has them (-march=native on x86-64 since Haswell). tanh is the kernels' own
// (common.h).

#include "common.h"

// The thread rule of every kernel here (common.h), for the tests.
extern "C" int64_t JaxRnnThreads(int64_t step_work, int64_t panels, int64_t pool_threads) {
  return Threads(step_work, panels, pool_threads);
}

namespace {

// The forward loop from the inputs xs: each step's product is [x_t, h_{t-1}] @ [w_in; w],
// plus b. Only the states are written: jax_rnn recomputes the pre-activations with one
// XLA product, which XLA drops where they are unused (writing them here cost 4.5 ms of
// 21 at T=1000, B=32, I=64, H=128: fresh memory).
ffi::Error ElmanForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                            ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> b,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0,
                            ffi::Result<ffi::Buffer<ffi::F32>> h, int32_t activation,
                            int32_t reverse, int32_t huge_pages, int32_t pretouch) {
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
  const float *xs_p = xs.typed_data(), *b_p = b.typed_data();
  float* h_p = h->typed_data();
  PrepareResults(pool, huge_pages, pretouch, h);
  const int64_t size = batch * hidden;
  auto panel = [&](const float* m, int64_t step, int64_t p) {
    const int64_t t = reverse ? length - 1 - step : step;
    const float* prev = step == 0 ? h0.typed_data() : h_p + (reverse ? t + 1 : t - 1) * size;
    float* h_t = h_p + t * size;
    const int64_t j = p * kLanes;
    const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - j));
    auto start = [&](int64_t, auto& acc) { acc[0] = LoadN(b_p + j, n); };
    auto finish = [&](int64_t r, auto& acc) {
      StoreN(h_t + r * hidden + j, activation == kTanh ? Tanh(acc[0]) : Relu(acc[0]), n);
    };
    WidePanel<1>(Rows{xs_p + t * batch * inputs, inputs}, Rows{prev, hidden}, m, batch, start,
                 finish);
  };
  RunProduct(pool, length, hidden, {{w_in.typed_data(), inputs}, {w.typed_data(), hidden}},
             batch * (inputs + hidden) * hidden, panel);
  return ffi::Error::Success();
}

// act'(h) d from the activation's output h.
inline Vec Back(int32_t activation, Vec h, Vec d) {
  return activation == kTanh ? d * (1.0f - h * h) : (h > 0.0f ? d : Splat(0.0f));
}

// d_g = act'(h) (d + d_state) + d_pre at `at` (n entries) from the cotangent d of the
// state h there; d_state, d_pre: nullptr where zero.
inline Vec Gate(int32_t activation, const float* h, const float* d_state, const float* d_pre,
                int64_t at, int n, Vec d) {
  return PlusAt(Back(activation, LoadN(h + at, n), PlusAt(d, d_state, at, n)), d_pre, at, n);
}

// The operands both backward kernels share, against the states' dims (T, B, H).
ffi::Error CheckBackward(const char* name, ffi::Span<const int64_t> dims,
                         const ffi::Buffer<ffi::F32>& d_state, const ffi::Buffer<ffi::F32>& d_pre,
                         const ffi::Buffer<ffi::F32>& w_t, const ffi::Buffer<ffi::F32>& d_final) {
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  for (auto error : {CheckSteps(name, "d_state", d_state.dimensions(), length, batch, hidden),
                     CheckSteps(name, "d_pre", d_pre.dimensions(), length, batch, hidden),
                     CheckShape(name, "w_t", w_t.dimensions(), {hidden, hidden}),
                     CheckShape(name, "d_final", d_final.dimensions(), {batch, hidden})}) {
    if (error.failure()) return error;
  }
  return ffi::Error::Success();
}

// The backward loop. d_g is written transposed, (H, T, B): XLA's CPU products take it
// as it is for the weight gradients (d_w^T = d_g^T @ h_in), where the (T, B, H) layout
// needed transposed copies of the states and inputs. The loop itself reads each step's
// d_g by rows, from a scratch copy.
ffi::Error ElmanBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                             ffi::Buffer<ffi::F32> d_state, ffi::Buffer<ffi::F32> d_pre,
                             ffi::Buffer<ffi::F32> w_t, ffi::Buffer<ffi::F32> d_final,
                             ffi::ResultBuffer<ffi::F32> d_g_t, ffi::ResultBuffer<ffi::F32> d_h0,
                             int32_t activation, int32_t reverse, int32_t huge_pages,
                             int32_t pretouch) {
  const char* name = "jax_rnn_elman_backward";
  const auto dims = h.dimensions();
  if (dims.size() != 3) return CheckShape(name, "h", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  for (auto error : {CheckBackward(name, dims, d_state, d_pre, w_t, d_final),
                     CheckShape(name, "d_g_t", d_g_t->dimensions(), {hidden, length, batch})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  if (batch == 0 || hidden == 0) return ffi::Error::Success();
  if (length == 0) {
    std::memcpy(d_h0->typed_data(), d_final.typed_data(), size * sizeof(float));
    return ffi::Error::Success();
  }
  const float *h_p = h.typed_data(), *ds_p = StepsOrNull(d_state), *dp_p = StepsOrNull(d_pre);
  float* dgt_p = d_g_t->typed_data();
  PrepareResults(pool, huge_pages, pretouch, d_g_t);
  // Step s of the loop's d_g by rows: scratch[s % 2] (step s + 1 writes the other half
  // only once every panel of step s is done).
  std::vector<float> scratch(2 * size);
  // The backward order visits t = order(0), order(1), ...; d_g of the first from d_final.
  auto order = [&](int64_t step) { return reverse ? step : length - 1 - step; };
  // d_g at step s (time t = order(s)), row r, columns j:j+n, from the cotangent d of h_t.
  auto gate = [&](int64_t step, int64_t r, int64_t j, int n, Vec d) {
    const int64_t t = order(step), at = t * size + r * hidden + j;
    const Vec g = Gate(activation, h_p, ds_p, dp_p, at, n, d);
    StoreN(scratch.data() + (step % 2) * size + r * hidden + j, g, n);
    float* out = dgt_p + (j * length + t) * batch + r;
    for (int i = 0; i < n; ++i) out[i * length * batch] = g[i];
  };
  auto source = [&](int64_t step) { return scratch.data() + (step % 2) * size; };
  RunBackward(pool, length, batch, hidden, hidden, w_t.typed_data(), d_final.typed_data(),
              d_h0->typed_data(), source, gate);
  return ffi::Error::Success();
}

// Steps per chunk of the backward loop with its weight gradients (ElmanGrads): about
// kChunkFloats floats of d_g (256 KiB), so that the chunk's contractions read them from
// the cache.
constexpr int64_t kChunkFloats = int64_t{1} << 16;

// Rows of the output (d_w_in's, then d_w's) per block of the chunks' contractions:
// kGradRows x 2 vectors of accumulators (16 of AVX-512's 32 registers).
#if defined(__AVX512F__)
constexpr int kGradRows = 8;
#else
constexpr int kGradRows = 2;
#endif

// out[i0 + q, j0 : j0 + 32] (q < R; rows of out `cols` long, columns j0 + n on zero
// past `cols`) += sum over the chunk's steps s and batch rows r of a_s[r, q] * g[s, r, j0 :
// j0 + 32], where a_s = step_rows(s) points at entry i0 of row 0 of step s's inputs (or
// input states; rows `lda` apart), and g holds the chunk's d_g by rows of `cols`
// (readable 32 floats past each row's column j0).
template <int R, typename StepRows>
inline void GradBlock(float* out, int64_t cols, int64_t j0, const float* g, int64_t steps,
                      int64_t batch, int64_t lda, const StepRows& step_rows) {
  const int n0 = static_cast<int>(std::min<int64_t>(kLanes, cols - j0));
  const int n1 = static_cast<int>(std::clamp<int64_t>(cols - j0 - kLanes, 0, kLanes));
  Vec acc[R][2] = {};  // the chunk's sums, added to out at the end (fewer roundings
                      // than adding each row into out's running sum)
  for (int64_t s = 0; s < steps; ++s) {
    const float* a = step_rows(s);
    const float* gs = g + s * batch * cols + j0;
    for (int64_t r = 0; r < batch; ++r, a += lda, gs += cols) {
      const Vec g0 = Load(gs), g1 = Load(gs + kLanes);
      for (int q = 0; q < R; ++q) {
        acc[q][0] += a[q] * g0;
        acc[q][1] += a[q] * g1;
      }
    }
  }
  for (int q = 0; q < R; ++q) {
    float* o = out + q * cols + j0;
    StoreN(o, LoadN(o, n0) + acc[q][0], n0);
    if (n1 > 0) StoreN(o + kLanes, LoadN(o + kLanes, n1) + acc[q][1], n1);
  }
}

// The backward loop as ElmanBackward's, with the weight gradients instead of d_g: in
// chunks of steps, the loop over a chunk's steps writes their d_g into a scratch buffer
// (by rows), and the chunk's contractions add d_g^T-weighted sums of the steps' inputs
// and input states into d_w_in and d_w (and d_g's sum into d_b) while it is in the
// cache. No (T, B, H) array is written: jax_rnn calls it where the inputs are not
// differentiated (their gradient would need every step's d_g). Each output entry is
// summed by one thread, in the steps' backward order.
ffi::Error ElmanGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                          ffi::Buffer<ffi::F32> d_state, ffi::Buffer<ffi::F32> d_pre,
                          ffi::Buffer<ffi::F32> w_t, ffi::Buffer<ffi::F32> d_final,
                          ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0,
                          ffi::ResultBuffer<ffi::F32> d_w_in, ffi::ResultBuffer<ffi::F32> d_b,
                          ffi::ResultBuffer<ffi::F32> d_w, ffi::ResultBuffer<ffi::F32> d_h0,
                          int32_t activation, int32_t reverse, int32_t huge_pages,
                          int32_t pretouch) {
  const char* name = "jax_rnn_elman_grads";
  const auto dims = h.dimensions();
  if (dims.size() != 3) return CheckShape(name, "h", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  const int64_t inputs = xs.dimensions().size() == 3 ? xs.dimensions()[2] : -1;
  for (auto error : {CheckBackward(name, dims, d_state, d_pre, w_t, d_final),
                     CheckShape(name, "xs", xs.dimensions(), {length, batch, inputs}),
                     CheckShape(name, "h0", h0.dimensions(), {batch, hidden}),
                     CheckShape(name, "d_w_in", d_w_in->dimensions(), {inputs, hidden}),
                     CheckShape(name, "d_b", d_b->dimensions(), {hidden}),
                     CheckShape(name, "d_w", d_w->dimensions(), {hidden, hidden}),
                     CheckShape(name, "d_h0", d_h0->dimensions(), {batch, hidden})}) {
    if (error.failure()) return error;
  }
  (void)huge_pages;  // the results are small: nothing to prepare
  (void)pretouch;
  const int64_t size = batch * hidden;
  float *dwi_p = d_w_in->typed_data(), *db_p = d_b->typed_data(), *dw_p = d_w->typed_data();
  std::fill(dwi_p, dwi_p + inputs * hidden, 0.0f);
  std::fill(db_p, db_p + hidden, 0.0f);
  std::fill(dw_p, dw_p + hidden * hidden, 0.0f);
  if (batch == 0 || hidden == 0) return ffi::Error::Success();
  float* carry = d_h0->typed_data();  // d of the chunk's last state in, d_h0 at the end
  std::memcpy(carry, d_final.typed_data(), size * sizeof(float));
  if (length == 0) return ffi::Error::Success();
  const float *h_p = h.typed_data(), *ds_p = StepsOrNull(d_state), *dp_p = StepsOrNull(d_pre);
  const float *xs_p = xs.typed_data(), *h0_p = h0.typed_data();
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / size, 1, length);
  // The chunk's d_g by rows, and one row's 32 floats of slack for GradBlock's reads.
  std::vector<float> g(chunk * size + 2 * kLanes, 0.0f);
  auto order = [&](int64_t step) { return reverse ? step : length - 1 - step; };
  // Step t's input state: the step before it in time order (after it for reverse).
  auto h_in = [&](int64_t t) {
    const int64_t before = reverse ? t + 1 : t - 1;
    return before < 0 || before >= length ? h0_p : h_p + before * size;
  };
  const std::vector<float> packed = PackBackward(w_t.typed_data(), hidden, hidden);
  const int64_t pairs = (hidden + 2 * kLanes - 1) / (2 * kLanes);
  const int64_t x_blocks = (inputs + kGradRows - 1) / kGradRows;
  const int64_t h_blocks = (hidden + kGradRows - 1) / kGradRows;
  for (int64_t first = 0; first < length; first += chunk) {
    const int64_t steps = std::min(chunk, length - first);
    auto gate = [&](int64_t s, int64_t r, int64_t j, int n, Vec d) {
      const Vec v = Gate(activation, h_p, ds_p, dp_p, order(first + s) * size + r * hidden + j,
                         n, d);
      StoreN(g.data() + s * size + r * hidden + j, v, n);
    };
    auto source = [&](int64_t s) { return g.data() + s * size; };
    RunBackwardPacked(pool, steps, batch, hidden, hidden, packed.data(), carry, carry, source,
                      gate);
    // The contractions: items (block of kGradRows output rows, pair of column vectors),
    // d_w_in's blocks, then d_w's, then one item per pair for d_b.
    Run(pool, 1, (x_blocks + h_blocks + 1) * pairs, steps * batch * (inputs + hidden) * hidden,
        [&](int64_t, int64_t item) {
          const int64_t block = item / pairs, j0 = (item % pairs) * 2 * kLanes;
          if (block == x_blocks + h_blocks) {  // d_b
            const int n0 = static_cast<int>(std::min<int64_t>(kLanes, hidden - j0));
            const int n1 = static_cast<int>(std::clamp<int64_t>(hidden - j0 - kLanes, 0, kLanes));
            Vec b0 = {}, b1 = {};
            for (int64_t k = 0; k < steps * batch; ++k) {
              b0 += Load(g.data() + k * hidden + j0);
              b1 += Load(g.data() + k * hidden + j0 + kLanes);
            }
            StoreN(db_p + j0, LoadN(db_p + j0, n0) + b0, n0);
            if (n1 > 0) StoreN(db_p + j0 + kLanes, LoadN(db_p + j0 + kLanes, n1) + b1, n1);
            return;
          }
          const bool x = block < x_blocks;
          const int64_t i0 = (x ? block : block - x_blocks) * kGradRows;
          const int64_t rows = x ? inputs : hidden;
          float* out = (x ? dwi_p : dw_p) + i0 * hidden;
          // Entry i0 of row 0 of the inputs (input states) of the chunk's step s.
          auto step_rows = [&](int64_t s) {
            const int64_t t = order(first + s);
            return x ? xs_p + t * batch * inputs + i0 : h_in(t) + i0;
          };
          ForTail<kGradRows>(std::min<int64_t>(kGradRows, rows - i0), 0, [&](auto r, int64_t) {
            GradBlock<decltype(r)::value>(out, hidden, j0, g.data(), steps, batch,
                                          x ? inputs : hidden, step_rows);
          });
        });
  }
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
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnElmanBackward, ElmanBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_state (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pre (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_t (H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_final (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_g^T (H, T, B)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0 (B, H)
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnElmanGrads, ElmanGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_state (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pre (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_t (H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_final (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (T, B, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w_in (I, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_b (H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w (H, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0 (B, H)
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));
