// The GRU cell's two sequential loops on CPUs, as XLA FFI custom calls (elman.cc's and
// lstm.cc's counterparts; jax_rnn/_fused.py's _kernel says when they run: a float32
// GRU, one batch axis or none, no masked, reset or cut steps). With the input and state
// products split into their thirds [r, z, n], gx = x_t @ w_in + b_in, gh = h_{t-1} @ w + b:
//
//   forward:  r = s(gx_r + gh_r),  z = s(gx_z + gh_z),  pre = gx_n + r gh_n,
//             n = tanh(pre),  h_t = (1 - z) n + z h_{t-1}   (s: the logistic sigmoid)
//   backward: d h = d h_t + d state_t,  d pre = d h (1 - z)(1 - n^2) + d pre_t,
//             d gx = [d pre gh_n r (1 - r), d h (h_{t-1} - n) z (1 - z), d pre],
//             d gh = [d gx_r, d gx_z, d pre r],  d h_{t-1} = d gh @ w.T + d h z
//
// The forward loop computes a step's gates of 16 hidden units together, in blocks of 6
// rows, as the LSTM's does (common.h's WidePanel): a panel holds the three gates' columns
// of [w_in; w], and its four accumulators per row are gx_r + gh_r, gx_z + gh_z, gx_n and
// gh_n (x's rows add into the first three, h's into the first, second and fourth), so no
// multiply-add is spent on zeros. It writes the states h and pre (the public
// pre-activation) and, for the backward pass (the "tape"), each step's r, z, n and gh_n,
// each an array of its own, as jax_rnn's XLA loops keep them. The backward loop writes
// d gx by steps, (T, B, 3H) (its product reads d gh from a scratch copy); d_state and d_pre
// have no steps where they are zero (common.h's CheckSteps). Steps are shared with XLA's
// thread pool as in elman.cc (common.h's Run).

#include "common.h"

namespace {

constexpr int kGates = 3;  // r, z, n

// The forward loop. With the tape, r, z, n and gh_n are (T, B, H); without, (0, B, H).
ffi::Error GruForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                          ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> b_in,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                          ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> h,
                          ffi::ResultBuffer<ffi::F32> pre, ffi::ResultBuffer<ffi::F32> r,
                          ffi::ResultBuffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> n,
                          ffi::ResultBuffer<ffi::F32> gh_n, int32_t reverse, int32_t tape,
                          int32_t huge_pages, int32_t pretouch) {
  const char* name = "jax_rnn_gru_forward";
  const auto dims = xs.dimensions();
  if (dims.size() != 3) return CheckShape(name, "xs", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], inputs = dims[2];
  const int64_t hidden = w.dimensions().size() == 2 ? w.dimensions()[0] : -1;
  const int64_t kept = tape ? length : 0;
  for (auto error : {CheckShape(name, "w", w.dimensions(), {hidden, kGates * hidden}),
                     CheckShape(name, "w_in", w_in.dimensions(), {inputs, kGates * hidden}),
                     CheckShape(name, "b_in", b_in.dimensions(), {kGates * hidden}),
                     CheckShape(name, "b", b.dimensions(), {kGates * hidden}),
                     CheckShape(name, "h0", h0.dimensions(), {batch, hidden}),
                     CheckShape(name, "h", h->dimensions(), {length, batch, hidden}),
                     CheckShape(name, "pre", pre->dimensions(), {length, batch, hidden}),
                     CheckShape(name, "r", r->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "z", z->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "n", n->dimensions(), {kept, batch, hidden}),
                     CheckShape(name, "gh_n", gh_n->dimensions(), {kept, batch, hidden})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  if (length == 0 || size == 0) return ffi::Error::Success();
  PrepareResults(pool, huge_pages, pretouch, h, pre, r, z, n, gh_n);
  // The accumulators' starting values: [b_in_r + b_r, b_in_z + b_z, b_in_n, b_n].
  std::vector<float> starts(4 * hidden);
  const float *bi_p = b_in.typed_data(), *b_p = b.typed_data();
  for (int64_t j = 0; j < hidden; ++j) {
    starts[j] = bi_p[j] + b_p[j];
    starts[hidden + j] = bi_p[hidden + j] + b_p[hidden + j];
    starts[2 * hidden + j] = bi_p[2 * hidden + j];
    starts[3 * hidden + j] = b_p[2 * hidden + j];
  }
  float *h_p = h->typed_data(), *pre_p = pre->typed_data(), *r_p = r->typed_data();
  float *z_p = z->typed_data(), *n_p = n->typed_data(), *ghn_p = gh_n->typed_data();
  auto finish = [&](int64_t t, int64_t row, int64_t j, int count, const float* prev,
                    auto& acc) {
    const int64_t at = (t * batch + row) * hidden + j;
    const Vec rg = Sigmoid(acc[0]), zg = Sigmoid(acc[1]);
    const Vec a = acc[2] + rg * acc[3];
    const Vec ng = Tanh(a);
    const Vec h_prev = LoadN(prev + row * hidden + j, count);
    StoreN(h_p + at, (1.0f - zg) * ng + zg * h_prev, count);
    StoreN(pre_p + at, a, count);
    if (tape) {
      StoreN(r_p + at, rg, count);
      StoreN(z_p + at, zg, count);
      StoreN(n_p + at, ng, count);
      StoreN(ghn_p + at, acc[3], count);
    }
  };
  using XSlots = std::integer_sequence<int, 0, 1, 2>;  // gx_r, gx_z, gx_n
  using HSlots = std::integer_sequence<int, 0, 1, 3>;  // gh_r, gh_z, gh_n
  RunGatedForward<4, XSlots, HSlots>(pool, length, batch, inputs, hidden, reverse,
                                     xs.typed_data(), w_in.typed_data(), w.typed_data(),
                                     starts.data(), h0.typed_data(), h_p, finish);
  return ffi::Error::Success();
}

// The backward loop, from the forward loop's tape and each step's input state h_in.
ffi::Error GruBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h_in,
                           ffi::Buffer<ffi::F32> r, ffi::Buffer<ffi::F32> z,
                           ffi::Buffer<ffi::F32> n, ffi::Buffer<ffi::F32> gh_n,
                           ffi::Buffer<ffi::F32> d_state, ffi::Buffer<ffi::F32> d_pre,
                           ffi::Buffer<ffi::F32> w_t, ffi::Buffer<ffi::F32> d_final,
                           ffi::ResultBuffer<ffi::F32> d_gx, ffi::ResultBuffer<ffi::F32> d_h0,
                           int32_t reverse, int32_t huge_pages, int32_t pretouch) {
  const char* name = "jax_rnn_gru_backward";
  const auto dims = h_in.dimensions();
  if (dims.size() != 3) return CheckShape(name, "h_in", dims, {-1, -1, -1});
  const int64_t length = dims[0], batch = dims[1], hidden = dims[2];
  const int64_t width = kGates * hidden;
  for (auto error : {CheckShape(name, "r", r.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "z", z.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "n", n.dimensions(), {length, batch, hidden}),
                     CheckShape(name, "gh_n", gh_n.dimensions(), {length, batch, hidden}),
                     CheckSteps(name, "d_state", d_state.dimensions(), length, batch, hidden),
                     CheckSteps(name, "d_pre", d_pre.dimensions(), length, batch, hidden),
                     CheckShape(name, "w_t", w_t.dimensions(), {width, hidden}),
                     CheckShape(name, "d_final", d_final.dimensions(), {batch, hidden}),
                     CheckShape(name, "d_gx", d_gx->dimensions(), {length, batch, width}),
                     CheckShape(name, "d_h0", d_h0->dimensions(), {batch, hidden})}) {
    if (error.failure()) return error;
  }
  const int64_t size = batch * hidden;
  if (size == 0) return ffi::Error::Success();
  float* dh0_p = d_h0->typed_data();
  if (length == 0) {
    std::memcpy(dh0_p, d_final.typed_data(), size * sizeof(float));
    return ffi::Error::Success();
  }
  const float *hi_p = h_in.typed_data(), *r_p = r.typed_data(), *z_p = z.typed_data();
  const float *n_p = n.typed_data(), *ghn_p = gh_n.typed_data();
  const float *ds_p = StepsOrNull(d_state), *dp_p = StepsOrNull(d_pre);
  float* dgx_p = d_gx->typed_data();
  PrepareResults(pool, huge_pages, pretouch, d_gx);
  // d gh of step s by rows: scratch[s % 2] (as elman.cc's d_g). dz holds d h z of the
  // last step visited, the part of d h_{t-1} that does not go through the product.
  std::vector<float> scratch(2 * batch * width), dz(size, 0.0f);
  auto order = [&](int64_t step) { return reverse ? step : length - 1 - step; };
  // Step s (time t = order(s)), row r, hidden units j:j+k, from the cotangent d_next of
  // h_t that the later steps pass back through the product.
  auto gate = [&](int64_t step, int64_t row, int64_t j, int k, Vec d_next) {
    const int64_t t = order(step), at = (t * batch + row) * hidden + j;
    const Vec rg = LoadN(r_p + at, k), zg = LoadN(z_p + at, k), ng = LoadN(n_p + at, k);
    float* dz_row = dz.data() + row * hidden + j;
    const Vec dh = PlusAt(d_next + LoadN(dz_row, k), ds_p, at, k);
    const Vec da = PlusAt(dh * (1.0f - zg) * (1.0f - ng * ng), dp_p, at, k);
    const Vec dr = da * LoadN(ghn_p + at, k) * rg * (1.0f - rg);
    const Vec dzg = dh * (LoadN(hi_p + at, k) - ng) * zg * (1.0f - zg);
    StoreN(dz_row, dh * zg, k);
    float* out = dgx_p + (t * batch + row) * width + j;
    StoreN(out, dr, k);
    StoreN(out + hidden, dzg, k);
    StoreN(out + 2 * hidden, da, k);
    float* gh = scratch.data() + ((step % 2) * batch + row) * width + j;
    StoreN(gh, dr, k);
    StoreN(gh + hidden, dzg, k);
    StoreN(gh + 2 * hidden, da * rg, k);
  };
  auto source = [&](int64_t step) { return scratch.data() + (step % 2) * batch * width; };
  RunBackward(pool, length, batch, hidden, width, w_t.typed_data(), d_final.typed_data(),
              dh0_p, source, gate);
  for (int64_t i = 0; i < size; ++i) dh0_p[i] += dz[i];  // d h_{-1} = d gh @ w.T + d h z
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (T, B, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in (I, 3H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_in (3H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (H, 3H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b (3H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h (T, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pre (T, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // r (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // z (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // n (T or 0, B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gh_n (T or 0, B, H)
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("tape")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRnnGruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h_in (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // r (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // n (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gh_n (T, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_state (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pre (T or 0, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_t (3H, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_final (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_gx (T, B, 3H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0 (B, H)
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("huge_pages")
                                  .Attr<int32_t>("pretouch"));
