// The two CPU passes of synchronized batch norm that stock PyTorch ops cannot fuse.
//
// moments(x): this rank's (n, Σx, Σx²) per channel as syncbn's 2C+1 float64 all-reduce
// buffer, in one read of (N, C, ...) contiguous x, the layout where torch's statistics
// kernel is a scalar loop. Accumulating in float64 keeps Σx² − (Σx)²/n within about
// 1e-16·(mean/std)² relative, so no shift is needed for any data float32 can hold.
//
// backward_elemt(dy, x, m, a, b, k): dx = a·dy + b·(x − m) + k per channel in one pass,
// where stock ops need an affine pass over x and an addcmul pass over dy. Centring x on the
// mean m first, as torch's own kernels do, keeps b·x and k from cancelling when
// |mean| ≫ std. It walks both dense layouts, channels outermost (NC... contiguous) and
// channels innermost (channels_last, channels_last_3d, (N, C)); others are made dense first.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

struct Dense {
  at::Tensor tensor;
  int64_t channels;
  int64_t batch;           // N
  int64_t inner;           // elements per (n, c) when channels are outer; 1 otherwise
  bool channels_innermost;
};

Dense dense(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "expected at least 2D input (got ", input.dim(), "D input)");
  const auto format = input.suggest_memory_format();
  Dense d{input.contiguous(format), input.size(1), input.size(0), 1, false};
  const int64_t slices = d.batch * d.channels;
  d.inner = slices == 0 ? 0 : input.numel() / slices;
  d.channels_innermost = format != at::MemoryFormat::Contiguous || d.inner == 1;
  return d;
}

// A value widened to float64 without rounding (half and bfloat16 through float).
template <typename scalar_t>
inline double widen(scalar_t v) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}

// Channels per task so that each task reads at least a grain's worth of elements.
int64_t channel_grain(const Dense& d) {
  const int64_t per_channel = d.batch * d.inner;
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_channel));
}

template <typename scalar_t>
void moments_kernel(const Dense& d, double* out) {
  const scalar_t* x = d.tensor.const_data_ptr<scalar_t>();
  const int64_t C = d.channels;
  at::parallel_for(0, C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double s = 0.0, q = 0.0;
      for (int64_t n = 0; n < d.batch; ++n) {
        const scalar_t* slice = x + (n * C + c) * d.inner;
#pragma omp simd reduction(+ : s, q)
        for (int64_t i = 0; i < d.inner; ++i) {
          const double v = widen(slice[i]);
          s += v;
          q += v * v;
        }
      }
      out[1 + c] = s;
      out[1 + C + c] = q;
    }
  });
}

at::Tensor moments(const at::Tensor& input) {
  // Channels-last input is left to torch's own statistics kernel, which is vectorized there.
  TORCH_CHECK(input.dim() >= 2 && input.is_contiguous(), "expected a contiguous input of at least 2 dimensions (got ",
              input.dim(), "D input with strides ", input.strides(), ")");
  const int64_t slices = input.size(0) * input.size(1);
  const Dense d{input, input.size(1), input.size(0), slices == 0 ? 0 : input.numel() / slices, false};
  at::Tensor out = at::empty({2 * d.channels + 1}, input.options().dtype(at::kDouble));
  double* data = out.mutable_data_ptr<double>();
  data[0] = static_cast<double>(d.batch * d.inner);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_moments", [&] {
    moments_kernel<scalar_t>(d, data);
  });
  return out;
}

template <typename scalar_t>
void backward_elemt_kernel(const Dense& d, const at::Tensor& dy_t, const at::Tensor& m_t, const at::Tensor& a_t,
                           const at::Tensor& b_t, const at::Tensor& k_t, at::Tensor& out_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = d.tensor.const_data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
  const acc_t* m = m_t.const_data_ptr<acc_t>();
  const acc_t* a = a_t.const_data_ptr<acc_t>();
  const acc_t* b = b_t.const_data_ptr<acc_t>();
  const acc_t* k = k_t.const_data_ptr<acc_t>();
  const int64_t C = d.channels;
  if (d.channels_innermost) {
    const int64_t rows = d.tensor.numel() / C;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / C);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t offset = r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t centred = static_cast<acc_t>(x[offset + c]) - m[c];
          const acc_t v = a[c] * static_cast<acc_t>(dy[offset + c]) + b[c] * centred + k[c];
          out[offset + c] = static_cast<scalar_t>(v);
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / d.inner);
    at::parallel_for(0, d.batch * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t c = s % C, offset = s * d.inner;
        const acc_t mc = m[c], ac = a[c], bc = b[c], kc = k[c];
#pragma omp simd
        for (int64_t i = 0; i < d.inner; ++i) {
          const acc_t v = ac * static_cast<acc_t>(dy[offset + i]) + bc * (static_cast<acc_t>(x[offset + i]) - mc) + kc;
          out[offset + i] = static_cast<scalar_t>(v);
        }
      }
    });
  }
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& m,
                          const at::Tensor& a, const at::Tensor& b, const at::Tensor& k) {
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              "expected grad_output of the input's size and dtype (got ", grad_output.sizes(), " ",
              grad_output.scalar_type(), ")");
  const Dense d = dense(input);
  const at::Tensor dy = grad_output.contiguous(d.tensor.suggest_memory_format());
  at::Tensor out = at::empty_like(d.tensor);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const at::Tensor* t : {&m, &a, &b, &k}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == d.channels && t->is_contiguous() &&
                      t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                  "expected contiguous per-channel coefficients of size ", d.channels, " and dtype ",
                  c10::CppTypeToScalarType<acc_t>::value, " (got ", t->sizes(), " ", t->scalar_type(), ")");
    }
    backward_elemt_kernel<scalar_t>(d, dy, m, a, b, k, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(syncbn, m) {
  m.def("moments(Tensor input) -> Tensor");
  m.def("backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor a, Tensor b, Tensor k) -> Tensor");
}

TORCH_LIBRARY_IMPL(syncbn, CPU, m) {
  m.impl("moments", &moments);
  m.impl("backward_elemt", &backward_elemt);
}
