// The Elman cell's two sequential loops on CPUs, as XLA FFI custom calls.
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
  for (auto error : {CheckSteps(name, "d_state", d_state.dimensions(), length, batch, hidden),
                     CheckSteps(name, "d_pre", d_pre.dimensions(), length, batch, hidden),
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
    const Vec g =
        PlusAt(Back(activation, LoadN(h_p + at, n), PlusAt(d, ds_p, at, n)), dp_p, at, n);
    StoreN(scratch.data() + (step % 2) * size + r * hidden + j, g, n);
    float* out = dgt_p + (j * length + t) * batch + r;
    for (int i = 0; i < n; ++i) out[i * length * batch] = g[i];
  };
  auto source = [&](int64_t step) { return scratch.data() + (step % 2) * size; };
  RunBackward(pool, length, batch, hidden, hidden, w_t.typed_data(), d_final.typed_data(),
              d_h0->typed_data(), source, gate);
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
