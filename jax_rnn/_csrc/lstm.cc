// The LSTM cell's two sequential loops on CPUs, as XLA FFI custom calls (elman.cc's
// counterparts; jax_rnn/_fused.py's _kernel says when they run: a float32 LSTM, one
// batch axis or none, no masked, reset or cut steps).
// With a = [x_t, h_{t-1}] @ [w_in; w] + b split into the gates [i, f, g, o]:
//
//   forward:  c_t = s(f) c_{t-1} + s(i) tanh(g),  h_t = s(o) tanh(c_t)
//             (s: the logistic sigmoid)
//   backward: d h = d h_t + d state_t,  d c = d c_t + d h s(o) (1 - tanh(c_t)^2),
//             d a = [d c tanh(g) s(i)(1 - s(i)), d c c_{t-1} s(f)(1 - s(f)),
//                    d c s(i)(1 - tanh(g)^2) + d pre_t, d h tanh(c_t) s(o)(1 - s(o))],
//             d h_{t-1} = d a @ w.T,  d c_{t-1} = d c s(f)
//
// The forward loop computes a step's four gates of 16 hidden units together (a panel of
// 4 x 16 columns of the packed [w_in; w], in blocks of 6 rows: common.h), so that the
// cell's pointwise part runs on the product's registers. It writes the states h and g
// (the public pre-activation) and, for the backward pass (the "tape"), each step's s(i),
// s(f), s(o) and input cell state c_{t-1}, each an array of its own: glibc's malloc
// serves buffers of up to 32 MiB from memory it keeps, and larger ones from fresh pages
// (one (T, B, 4H) array of gates, 64 MiB at T=1000, B=32, H=128, made the forward loop
// 1.5-2x slower). The backward loop recomputes tanh(g) and tanh(c_t) from the tape, as
// jax_rnn's XLA loops do. Steps are shared with XLA's thread pool as in elman.cc
// (common.h's Run).

#include "common.h"

namespace {

constexpr int kGates = 4;  // i, f, g, o

// The forward loop. c_final holds the running cell state (c0 at first, updated in place:
// each panel owns its columns). With the tape, g, i, f, o and c_in are (T, B, H); without,
// (0, B, H): jax_rnn recomputes the public pre-activations g from the states with one XLA
// product, which XLA drops where they are unused (writing them here cost fresh memory).
ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                           ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> b,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> h,
                           ffi::ResultBuffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> i,
                           ffi::ResultBuffer<ffi::F32> f, ffi::ResultBuffer<ffi::F32> o,
                           ffi::ResultBuffer<ffi::F32> c_in, ffi::ResultBuffer<ffi::F32> c_final,
                           int32_t reverse, int32_t tape, int32_t huge_pages,
                           int32_t pretouch) {
  const char* name = "jax_rnn_lstm_forward";
  const auto dims = xs.dimensions();
  if (dims.size() != 3) return CheckShape(name, "xs", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], inputs = dims[2];
  const int64_t hidden = w.dimensions().size() == 2 ? w.dimensions()[0] : -1;
  const int64_t kept = tape ? length : 0;
  for (auto error : {CheckShape(name, "w", w.dimensions(), {hidden, kGates * hidden}),
                     CheckShape(name, "w_in", w_in.dimensions(), {inputs, kGates * hidden}),
                     CheckShape(name, "b", b.dimensions(), {kGates * hidden}),
                     CheckShape(name, "h0", h0.dimensions(), {batch, hidden}),
                     CheckShape(name, "c0", c0.dimensions(), {batch, hidden}),
                     CheckShape(name, "h", h->dimensions(), {length, batch, hidden}),
                     CheckShape(name, "g", g->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "i", i->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "f", f->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "o", o->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "c_in", c_in->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "c_final", c_final->dimensions(), {batch, hidden})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  float* c_p = c_final->typed_data();
  if (size > 0) std::memcpy(c_p, c0.typed_data(), size * sizeof(float));
  if (length == 0 || size == 0) return ffi::Error::Success();
  PrepareResults(pool, huge_pages, pretouch, h, g, i, f, o, c_in);
  float *h_p = h->typed_data(), *g_p = g->typed_data(), *i_p = i->typed_data();
  float *f_p = f->typed_data(), *o_p = o->typed_data(), *ci_p = c_in->typed_data();
  auto finish = [&](int64_t t, int64_t r, int64_t j, int n, const float*, auto& acc) {
    const int64_t at = (t * batch + r) * hidden + j;
    const Vec ig = Sigmoid(acc[0]), fg = Sigmoid(acc[1]), og = Sigmoid(acc[3]);
    float* c_row = c_p + r * hidden + j;
    const Vec c_prev = LoadN(c_row, n);
    const Vec c = fg * c_prev + ig * Tanh(acc[2]);
    StoreN(c_row, c, n);
    StoreN(h_p + at, og * Tanh(c), n);
    if (tape) {
      StoreN(g_p + at, acc[2], n);
      StoreN(i_p + at, ig, n);
      StoreN(f_p + at, fg, n);
      StoreN(o_p + at, og, n);
      StoreN(ci_p + at, c_prev, n);
    }
  };
  using Gates = std::make_integer_sequence<int, kGates>;  // i, f, g, o: one slot each
  RunGatedForward<kGates, Gates, Gates>(pool, length, batch, inputs, hidden, reverse,
                                        xs.typed_data(), w_in.typed_data(), w.typed_data(),
                                        b.typed_data(), h0.typed_data(), h_p, finish);
  return ffi::Error::Success();
}

// The backward loop, from the forward loop's tape. d_c0 holds the running cell-state
// gradient (d_c at first, updated in place). d_state and d_pre have no steps where they
// are zero (common.h's CheckSteps). d_a is written by steps, (T, B, 4H), and
// each step's product reads it from there. (Written transposed, (4H, T, B), as elman.cc's
// d_g, its scattered stores made the loop 2x slower at T=1000, B=32, H=128.)
ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                            ffi::Buffer<ffi::F32> i, ffi::Buffer<ffi::F32> f,
                            ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> c_in,
                            ffi::Buffer<ffi::F32> d_state,
                            ffi::Buffer<ffi::F32> d_pre, ffi::Buffer<ffi::F32> w_t,
                            ffi::Buffer<ffi::F32> d_h, ffi::Buffer<ffi::F32> d_c,
                            ffi::ResultBuffer<ffi::F32> d_a, ffi::ResultBuffer<ffi::F32> d_h0,
                            ffi::ResultBuffer<ffi::F32> d_c0, int32_t reverse,
                            int32_t huge_pages, int32_t pretouch) {
  const char* name = "jax_rnn_lstm_backward";
  const auto dims = c_in.dimensions();
  if (dims.size() != 3) return CheckShape(name, "c_in", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  const int64_t width = kGates * hidden;
  for (auto error : {CheckShape(name, "g", g.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "i", i.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "f", f.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "o", o.dimensions(), {length, batch, hidden}),
                     CheckSteps(name, "d_state", d_state.dimensions(), length, batch, hidden),
                     CheckSteps(name, "d_pre", d_pre.dimensions(), length, batch, hidden),
                     CheckShape(name, "w_t", w_t.dimensions(), {width, hidden}),
                     CheckShape(name, "d_h", d_h.dimensions(), {batch, hidden}),
                     CheckShape(name, "d_c", d_c.dimensions(), {batch, hidden}),
                     CheckShape(name, "d_a", d_a->dimensions(), {length, batch, width}),
                     CheckShape(name, "d_h0", d_h0->dimensions(), {batch, hidden}),
                     CheckShape(name, "d_c0", d_c0->dimensions(), {batch, hidden})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  if (size == 0) return ffi::Error::Success();
  float *dh0_p = d_h0->typed_data(), *dc_p = d_c0->typed_data();
  std::memcpy(dc_p, d_c.typed_data(), size * sizeof(float));
  if (length == 0) {
    std::memcpy(dh0_p, d_h.typed_data(), size * sizeof(float));
    return ffi::Error::Success();
  }
  const float *g_p = g.typed_data(), *i_p = i.typed_data(), *f_p = f.typed_data();
  const float *o_p = o.typed_data(), *ci_p = c_in.typed_data();
  const float *ds_p = StepsOrNull(d_state), *dp_p = StepsOrNull(d_pre);
  float* da_p = d_a->typed_data();
  PrepareResults(pool, huge_pages, pretouch, d_a);
  auto order = [&](int64_t step) { return reverse ? step : length - 1 - step; };
  // d_a at step s (time t = order(s)), row r, hidden units j:j+n, from the cotangent
  // d_next of h_t that the later steps pass back.
  auto gate = [&](int64_t step, int64_t r, int64_t j, int n, Vec d_next) {
    const int64_t t = order(step), at = (t * batch + r) * hidden + j;
    const Vec ig = LoadN(i_p + at, n), fg = LoadN(f_p + at, n), og = LoadN(o_p + at, n);
    const Vec tg = Tanh(LoadN(g_p + at, n));
    const Vec c_prev = LoadN(ci_p + at, n);
    const Vec tc = Tanh(fg * c_prev + ig * tg);
    const Vec dh = PlusAt(d_next, ds_p, at, n);
    float* dc_row = dc_p + r * hidden + j;
    const Vec dc = LoadN(dc_row, n) + dh * og * (1.0f - tc * tc);
    StoreN(dc_row, dc * fg, n);
    float* out = da_p + (t * batch + r) * width + j;
    StoreN(out, dc * tg * ig * (1.0f - ig), n);
    StoreN(out + hidden, dc * c_prev * fg * (1.0f - fg), n);
    StoreN(out + 2 * hidden, PlusAt(dc * ig * (1.0f - tg * tg), dp_p, at, n), n);
    StoreN(out + 3 * hidden, dh * tc * og * (1.0f - og), n);
  };
  auto source = [&](int64_t step) { return da_p + order(step) * batch * width; };
  RunBackward(pool, length, batch, hidden, width, w_t.typed_data(), d_h.typed_data(), dh0_p,
              source, gate);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (T, B, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in (I, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b (4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (H, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g (T, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s(i) (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s(f) (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s(o) (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_in (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_final (B, H)
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("tape")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s(i) (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s(f) (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s(o) (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c_in (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_state (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pre (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_t (4H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_h (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_c (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_a (T, B, 4H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_c0 (B, H)
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));
