// The CPU kernels of syncbn's fused ops, one memory pass each, and the eager training step
// built from them with its autograd (step). The traced ops' contracts, fake kernels and
// autograd live in syncbn/ops.py; compiled graphs reach these kernels through the syncbn::
// ops.
//
//   moments(x)                               read x        -> float64 (n, Σx, Σx²)
//   forward_apply(x, stats, w, b, eps)       read x, write y = (x − mean)·w·invstd + b
//   update_running_stats(rm, rv, nbt, ...)   per channel only
//   statistics(stats, eps)                   per channel only: float64 mean and invstd
//   backward_reduce(dy, x, mean, invstd)     read dy and x -> float64 (Σdy, Σdy·(x − mean))
//   backward_apply(dy, x, ..., grad_sums)    read dy and x, write dx
//   step(x, w, b, running stats, ..., comm)  moments, all-reduce, forward_apply and the
//                                            update; backward: backward_reduce, all-reduce,
//                                            backward_apply
//
// Memory is walked in storage order: (n, c) planes when channels are outer (NC... contiguous),
// rows of C values when they are innermost (channels_last, channels_last_3d, (N, C)). Other
// strides are made dense first. Float32 and float64 passes larger than the last-level cache
// write their output with streaming stores (`streams`). Half and bfloat16 values are
// widened to float32 in registers (the row sums widen a tile at a time on the stack, with
// ATen's vectorized conversions); all arithmetic runs in float32 (float64 for float64
// input), and the sums in float64, the backward's products eight at a time in float32 first.
//
// Thread count: elementwise passes write each output once, so they are exact on any number
// of threads. Sums are taken in an order fixed by the shape alone: over (n, c) planes each
// channel belongs to one task that adds its planes in order, in 16 lanes added up at the
// end; over rows, the rows are cut into at most 64 blocks whose size depends only on the
// shape (rows of fewer than 64 values taken several at a time), each block is summed in an
// order fixed by its rows into its own partial sums, and the partials are added in block
// order. The result is bit-identical on 1 or 64 threads.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <torch/python.h>

// x86-64 with AVX2 at least: torch's AVX2 and AVX512 builds of ATen's `Vectorized`.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define SYNCBN_X86_AVX2
#include <immintrin.h>
#endif

// The build keeps the compiler's own loops at 256-bit vectors, which were as fast or faster
// for every pass but one: the moments' row sums (`moments_rows`), bound by their float64
// conversions and adds, took 0.92-0.94x as long at 512 bits in float32 (0.93-1.00x in half
// precision), the same bits. Not inlined, as GCC would build the inlined copy for its
// caller's width.
#if defined(CPU_CAPABILITY_AVX512)
#define SYNCBN_WIDE __attribute__((target("prefer-vector-width=512"), noinline))
#else
#define SYNCBN_WIDE
#endif

#include <algorithm>
#include <cmath>
#include <fstream>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
using opmath = at::opmath_type<T>;

constexpr int64_t kTile = 256;  // elements widened at a time, on the stack
constexpr int64_t kRows = 8;    // rows the row sums add up together before the per-channel sums

// n values at src as opmath values: src itself when no conversion is needed, else buf.
template <typename T>
inline const opmath<T>* widen(const T* src, opmath<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, opmath<T>>) {
    return src;
  } else {
    using Vec = at::vec::Vectorized<T>;
    using FVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Vec::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + FVec::size());
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

#define SYNCBN_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

struct Layout {
  at::Tensor x;  // dense, in one of the two walks
  int64_t N, C;
  int64_t inner;  // values per (n, c) plane when channels are outer
  bool channels_innermost;
  int64_t rows() const { return x.numel() / C; }
};

Layout layout(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "expected at least 2D input (got ", input.dim(), "D input)");
  const auto format = input.suggest_memory_format();
  const int64_t N = input.size(0), C = input.size(1), planes = N * C;
  const int64_t inner = planes == 0 ? 0 : input.numel() / planes;
  return {input.contiguous(format), N, C, inner, format != at::MemoryFormat::Contiguous || inner == 1};
}

// t in the layout's memory format (a gradient may arrive with other strides).
at::Tensor like(const at::Tensor& t, const Layout& l) {
  TORCH_CHECK(t.sizes() == l.x.sizes() && t.scalar_type() == l.x.scalar_type(),
              "expected grad_output of the input's size and dtype (got ", t.sizes(), " ", t.scalar_type(), ")");
  return t.contiguous(l.x.suggest_memory_format());
}

// The output with the strides empty_like(input) gives, as the fake kernels promise.
at::Tensor as_output(const at::Tensor& input, const at::Tensor& dense) {
  if (dense.strides() == input.strides() || input.numel() == 0) return dense;
  return at::empty_like(input).copy_(dense);
}

std::vector<double> per_channel(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.device().is_cpu(), "expected ", name, " of size ", C,
              " on the CPU (got ", t.sizes(), " on ", t.device(), ")");
  std::vector<double> values(C);
  SYNCBN_DISPATCH(t.scalar_type(), "syncbn_per_channel", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t c = 0; c < C; ++c) values[c] = static_cast<double>(data[c * stride]);
  });
  return values;
}

// Writes values into the (C,) tensor t, in its dtype.
void write_channels(const at::Tensor& t, const std::vector<double>& values) {
  SYNCBN_DISPATCH(t.scalar_type(), "syncbn_write_channels", [&] {
    scalar_t* data = t.mutable_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (size_t c = 0; c < values.size(); ++c) data[c * stride] = static_cast<scalar_t>(values[c]);
  });
}

// A new (C,) tensor of the given dtype holding values.
at::Tensor channel_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  write_channels(out, values);
  return out;
}

// Every channel's mean and biased variance from float64 (n, Σx, Σx²); the variance is
// clamped at 0, as rounding can dip below it. An empty batch gives 0 and 0. One branch-free
// loop, which the compiler vectorizes (divisions and square roots are slow one at a time).
std::pair<std::vector<double>, std::vector<double>> mean_var(const double* sums, int64_t C) {
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  const double n = sums[0];
  if (n == 0) return {mean, var};
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = sums[1 + c] / n;
    var[c] = std::max(sums[1 + C + c] / n - mean[c] * mean[c], 0.0);
  }
  return {mean, var};
}

// The global count's checks, where the kernels read it, with the messages of syncbn/ops.py: a
// NaN count is a peer's rejection, and one value per channel has no variance.
void check_count(double n, const at::Tensor* input) {
  TORCH_CHECK(n == n, "SyncBatchNorm: another rank of the group rejected its input (see its error)");
  if (n == 1 && input) {
    TORCH_CHECK_VALUE(false, "expected more than 1 value per channel in the global batch when training (got 1; "
                             "this rank's input size ", input->sizes(), ")");
  }
  TORCH_CHECK_VALUE(n != 1, "expected more than 1 value per channel in the global batch when training (got 1)");
}

const double* checked_sums(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() == numel,
              "expected ", name, " as ", numel, " contiguous float64 numbers on the CPU (got ", t.sizes(), " ",
              t.scalar_type(), ")");
  return t.const_data_ptr<double>();
}

#if defined(SYNCBN_X86_AVX2)
// Four values at p as float64, widened in registers.
inline __m256d load4(const double* p) { return _mm256_loadu_pd(p); }
inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
inline __m256d load4(const at::Half* p) {
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256d load4(const at::BFloat16* p) {
  const __m128i bits = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(bits, 16)));
}
#endif

// Float64 sums Σa and Σa·(b − m) (Σa² without kCentred) of a run of values, in 16
// independent lanes, so that the float64 adds do not wait on each other: four AVX2
// registers per sum where the build has AVX2, plain arrays otherwise. The lanes are added
// up in a fixed order by total().
struct Lanes {
#if defined(SYNCBN_X86_AVX2)
  __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256d t[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
#endif
  double sl[16] = {}, tl[16] = {};

  template <bool kCentred, typename V>
  inline void add(const V* a, const V* b, double m, int64_t n) {
    int64_t i = 0;
#if defined(SYNCBN_X86_AVX2)
    const __m256d mv = _mm256_set1_pd(m);
    for (; i + 16 <= n; i += 16) {
      for (int k = 0; k < 4; ++k) {
        const __m256d av = load4(a + i + 4 * k);
        s[k] = _mm256_add_pd(s[k], av);
        const __m256d bv = kCentred ? _mm256_sub_pd(load4(b + i + 4 * k), mv) : av;
        t[k] = _mm256_fmadd_pd(av, bv, t[k]);
      }
    }
#endif
    for (int64_t j = 0; i < n; ++i, j = (j + 1) & 15) {
      const double ai = static_cast<opmath<V>>(a[i]);
      sl[j] += ai;
      tl[j] += ai * (kCentred ? static_cast<opmath<V>>(b[i]) - m : ai);
    }
  }

  // Σa and Σa·(b − m) for float32 and half inputs, whose products float32 holds to one
  // rounding: each float32 lane adds eight values before they reach a float64 lane (the
  // order of the row sums' groups of eight rows; 512-bit vectors hold two float32 lanes per
  // float64 lane). Half the widening and a quarter of the float64 adds of `add`, which bound
  // the half-precision backward.
  template <typename V>
  inline void add_centred_in_float(const V* a, const V* b, float m, int64_t n) {
    using FVec = at::vec::Vectorized<float>;
    constexpr int64_t kStep = 2 * FVec::size(), kRun = 8 * kStep;
    static_assert(kStep % 16 == 0, "whole float64 lanes per step");
    const auto load = [](const V* p) {
      if constexpr (std::is_same_v<V, float>) {
        return std::make_tuple(FVec::loadu(p), FVec::loadu(p + FVec::size()));
      } else {
        return at::vec::convert_to_float<V>(at::vec::Vectorized<V>::loadu(p));
      }
    };
    const FVec mv(m);
    int64_t i = 0;
    for (; i + kStep <= n;) {
      FVec s0(0.f), s1(0.f), t0(0.f), t1(0.f);
      for (const int64_t stop = std::min(n - kStep, i + kRun - kStep); i <= stop; i += kStep) {
        const auto [a0, a1] = load(a + i);
        const auto [b0, b1] = load(b + i);
        s0 += a0, s1 += a1;
        t0 = at::vec::fmadd(a0, b0 - mv, t0), t1 = at::vec::fmadd(a1, b1 - mv, t1);
      }
      float fs[kStep], ft[kStep];
      s0.store(fs), s1.store(fs + FVec::size()), t0.store(ft), t1.store(ft + FVec::size());
      for (int64_t h = 0; h < kStep; h += 16) {
#pragma omp simd
        for (int64_t j = 0; j < 16; ++j) {
          sl[j] += fs[h + j];
          tl[j] += ft[h + j];
        }
      }
    }
    add<true>(a + i, b + i, m, n - i);
  }

  void total(double& s_out, double& t_out) {
#if defined(SYNCBN_X86_AVX2)
    for (int k = 0; k < 4; ++k) {
      double sv[4], tv[4];
      _mm256_storeu_pd(sv, s[k]);
      _mm256_storeu_pd(tv, t[k]);
      for (int j = 0; j < 4; ++j) {
        sl[4 * k + j] += sv[j];
        tl[4 * k + j] += tv[j];
      }
    }
#endif
    s_out = t_out = 0.0;
    for (int j = 0; j < 16; ++j) {
      s_out += sl[j];
      t_out += tl[j];
    }
  }
};

// s[i] += a[i] and t[i] += a[i]·(b[i] − m[i]) for one row, in the sums' type U.
template <typename V, typename U>
inline void add_centred(const V* a, const V* b, const U* m, U* s, U* t, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    s[i] += a[i];
    t[i] += a[i] * (static_cast<U>(b[i]) - m[i]);
  }
}

// The moments' sums of rows [first, stop), W values each, added into ps (Σa) and pt (Σa²).
// The rows are cut into kRows runs of `sub` rows, and a group is the t-th row of every run,
// added up side by side in registers. Each row of the group walks its own run in storage
// order, from load instructions of its own (the unrolled loops), so the hardware
// prefetchers follow kRows sequential streams. Groups of adjacent rows instead jump back
// and forth in the same pages, which the prefetchers do not follow: 1.03-2.1x as long, cold
// or from the last-level cache. The rows left over (fewer than kRows) are added one at a time.
template <typename T>
SYNCBN_WIDE void moments_rows(const T* a, int64_t first, int64_t stop, int64_t W, double* ps, double* pt) {
  using acc = opmath<T>;
  acc abuf[kRows][kTile];
  const int64_t sub = (stop - first) / kRows;
  for (int64_t r = 0; r < sub + (stop - first) % kRows; ++r) {
    const bool whole = r < sub;
    for (int64_t c0 = 0; c0 < W; c0 += kTile) {
      const int64_t len = std::min(kTile, W - c0);
      if (whole) {
        const acc* av[kRows];
#pragma GCC unroll 8
        for (int64_t j = 0; j < kRows; ++j) av[j] = widen(a + (first + j * sub + r) * W + c0, abuf[j], len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          double sa = 0, ta = 0;
#pragma GCC unroll 8
          for (int64_t j = 0; j < kRows; ++j) {
            const double aj = av[j][i];
            sa += aj;
            ta += aj * aj;
          }
          ps[c0 + i] += sa;
          pt[c0 + i] += ta;
        }
      } else {
        const acc* av = widen(a + (first + (kRows - 1) * sub + r) * W + c0, abuf[0], len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const double ai = av[i];
          ps[c0 + i] += ai;
          pt[c0 + i] += ai * ai;
        }
      }
    }
  }
}

// Per channel, in float64: s[c] = Σ a and t[c] = Σ a·(b − m[c]) over the values of channel c.
// Without kCentred, b is a itself and m is 0: t[c] = Σ a² (the moments).
//
// Float64 adds, not memory, bound these loops: over (n, c) planes each channel keeps 16
// independent lanes (`Lanes`), which the backward's sums reach eight float32 values per
// lane at a time (`add_centred_in_float`); over rows, groups of eight rows are added up
// before they touch the per-channel float64 sums. Both orders are fixed by the shape alone.
template <typename T, bool kCentred>
void reduce_kernel(const Layout& l, const T* a, const T* b, const double* m, double* s, double* t) {
  using acc = opmath<T>;
  const int64_t C = l.C;
  if (!l.channels_innermost) {
    const int64_t per_channel = std::max<int64_t>(1, l.N * l.inner);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_channel);
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Lanes lanes;
        const double mc = kCentred ? m[c] : 0.0;
        for (int64_t n = 0; n < l.N; ++n) {
          const int64_t base = (n * C + c) * l.inner;
          if constexpr (kCentred && std::is_same_v<acc, float>) {
            lanes.add_centred_in_float(a + base, b + base, static_cast<float>(mc), l.inner);
          } else {
            lanes.add<kCentred>(a + base, b + base, mc, l.inner);
          }
        }
        lanes.total(s[c], t[c]);
      }
    });
    return;
  }
  // Rows of fewer than 64 values go `group` rows at a time, as one row of W values in which
  // channel c sits at every c + k·C (as in apply_kernel): short rows cost more in loop
  // overhead than in memory. The W sums are folded per channel at the end, and the rows
  // left over (fewer than `group`) are added last.
  const int64_t group = std::max<int64_t>(1, 64 / C), W = group * C;
  const int64_t rows = l.rows() / group, left = l.rows() % group;
  // A block holds at least one grain of torch's parallel_for (GRAIN_SIZE values, below which
  // torch does not split work either): each block's partial sums are zeroed and added up on
  // the calling thread, and against blocks of 16k values the passes took 0.73-0.93x as long
  // at (256, 1024) and (512, 2048).
  const int64_t min_rows = std::max<int64_t>(kRows, at::internal::GRAIN_SIZE / W);
  const int64_t block = std::max(min_rows, (rows + 63) / 64);
  const int64_t blocks = (rows + block - 1) / block;
  std::vector<double> partial((blocks + 1) * 2 * W, 0.0);  // the last for the rows left over
  std::vector<double> mw(kCentred ? W : 0);
  std::vector<acc> mf(kCentred ? W : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(mw.size()); ++i) mf[i] = static_cast<acc>(mw[i] = m[i % C]);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    acc abuf[kTile], bbuf[kTile];  // the backward's widened rows
    std::vector<acc> gs(kCentred ? W : 0), gt(kCentred ? W : 0);
    for (int64_t k = begin; k < end; ++k) {
      double* ps = partial.data() + k * 2 * W;
      double* pt = ps + W;
      const int64_t stop = std::min(rows, (k + 1) * block);
      if constexpr (kCentred) {
        // The backward's sums: a whole group's rows one after another into sums in the
        // input's op math (float32 for float32), then into float64. Each product is exact
        // to one rounding and nothing cancels after it; reading row after row keeps one
        // stream per tensor, which the hardware prefetcher follows. The group's first row
        // sets the sums and its last adds them into float64 as it goes, rather than
        // zeroing them before and reading them again after (0.82-0.97x the time, the same
        // bits). A short last group goes straight into float64.
        for (int64_t r = k * block; r < stop; r += kRows) {
          const bool whole = r + kRows <= stop;
          for (int64_t j = r; j < std::min(stop, r + kRows); ++j) {
            for (int64_t c0 = 0; c0 < W; c0 += kTile) {
              const int64_t len = std::min(kTile, W - c0);
              const acc *av = widen(a + j * W + c0, abuf, len), *bv = widen(b + j * W + c0, bbuf, len);
              const acc* m0 = mf.data() + c0;
              acc *s0 = gs.data() + c0, *t0 = gt.data() + c0;
              if (!whole) {
                add_centred(av, bv, mw.data() + c0, ps + c0, pt + c0, len);
              } else if (j == r) {
#pragma omp simd
                for (int64_t i = 0; i < len; ++i) {
                  s0[i] = av[i];
                  t0[i] = av[i] * (bv[i] - m0[i]);
                }
              } else if (j < r + kRows - 1) {
                add_centred(av, bv, m0, s0, t0, len);
              } else {
#pragma omp simd
                for (int64_t i = 0; i < len; ++i) {
                  ps[c0 + i] += s0[i] + av[i];
                  pt[c0 + i] += t0[i] + av[i] * (bv[i] - m0[i]);
                }
              }
            }
          }
        }
      } else {
        moments_rows(a, k * block, stop, W, ps, pt);
      }
    }
  });
  double* ps = partial.data() + blocks * 2 * W;
  double* pt = ps + W;
  for (int64_t i = 0, off = rows * W; i < left * C; ++i) {
    const double ai = static_cast<double>(a[off + i]);
    ps[i] += ai;
    if constexpr (kCentred) {
      pt[i] += ai * (static_cast<double>(b[off + i]) - mw[i]);
    } else {
      pt[i] += ai * ai;
    }
  }
  std::fill(s, s + C, 0.0);
  std::fill(t, t + C, 0.0);
  for (int64_t k = 0; k <= blocks; ++k) {
    for (int64_t i = 0; i < W; i += C) {
      const double *fs = partial.data() + k * 2 * W + i, *ft = fs + W;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        s[c] += fs[c];
        t[c] += ft[c];
      }
    }
  }
}

// A run's coefficients: one per value (kPerValue), or one for the whole run, held in a local
// so that the compiler need not reload it after every store to the output.
template <bool kPerValue, typename U>
struct Coef {
  const U* c;
  U one;
  explicit Coef(const U* c) : c(c), one(c[0]) {}
  U operator[](int64_t i) const {
    if constexpr (kPerValue) {
      return c[i];
    } else {
      return one;
    }
  }
};

// out = p·(x − m) + q·dy + r over a run of n values, in opmath; without dy when dy is null.
// Half and bfloat16 values are widened and narrowed in registers, a vector at a time.
template <bool kPerValue, typename T>
inline void apply_run(const T* x, const T* dy, T* out, int64_t n, const opmath<T>* m, const opmath<T>* p,
                      const opmath<T>* q, const opmath<T>* r) {
  using acc = opmath<T>;
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, acc>) {
    using Vec = at::vec::Vectorized<T>;
    using FVec = at::vec::Vectorized<float>;
    constexpr int64_t h = FVec::size();
    const auto v = [](const float* c, int64_t j) { return kPerValue ? FVec::loadu(c + j) : FVec(c[0]); };
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [x0, x1] = at::vec::convert_to_float<T>(Vec::loadu(x + i));
      FVec o0 = v(p, i) * (x0 - v(m, i)), o1 = v(p, i + h) * (x1 - v(m, i + h));
      if (dy) {
        auto [d0, d1] = at::vec::convert_to_float<T>(Vec::loadu(dy + i));
        o0 = o0 + v(q, i) * d0, o1 = o1 + v(q, i + h) * d1;
      }
      at::vec::convert_from_float<T>(o0 + v(r, i), o1 + v(r, i + h)).store(out + i);
    }
  }
  const Coef<kPerValue, acc> mc(m), pc(p), qc(q), rc(r);
  if (dy) {
#pragma omp simd
    for (int64_t j = i; j < n; ++j) {
      out[j] = static_cast<T>(pc[j] * (static_cast<acc>(x[j]) - mc[j]) + qc[j] * static_cast<acc>(dy[j]) + rc[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = i; j < n; ++j) out[j] = static_cast<T>(pc[j] * (static_cast<acc>(x[j]) - mc[j]) + rc[j]);
  }
}

#if defined(SYNCBN_X86_AVX2)
// The last-level cache's size as Linux reports it (what lscpu shows), 0 where unknown.
// (glibc's sysconf reads it from cpuid, which in virtual machines can be off tenfold.)
int64_t last_level_cache() {
  int64_t largest = 0;
  for (int i = 0;; ++i) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    int64_t size = 0;
    std::string unit;
    if (!(file >> size)) return largest;
    file >> unit;
    largest = std::max(largest, size << (unit == "K" ? 10 : unit == "M" ? 20 : 0));
  }
}

// Whether an elementwise pass over float32 or float64 values, reading and writing `bytes`
// in all and writing `out_bytes` of them, writes its output with streaming stores, which go
// around the caches without first reading the output's lines: a third less memory traffic
// for the forward's pass, a quarter less for the backward's. Only when the pass exceeds the
// last-level cache, so that the output could not stay there anyway, and while the output
// is under 32 MB: glibc maps larger blocks afresh at every allocation, and there ordinary
// stores win (streaming took 1.03-1.19x as long at (64, 64, 56, 56)), presumably as the
// kernel's zeroing of each new page leaves it in the cache. Half-precision passes are bound
// by their conversions; streaming them took 1.04-1.26x as long.
bool streams(int64_t bytes, int64_t out_bytes) {
  static const int64_t cache = last_level_cache();
  return cache > 0 && bytes > cache && out_bytes < (int64_t{32} << 20);
}

inline void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
#if defined(CPU_CAPABILITY_AVX512)
inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
#endif

// apply_run for float32 and float64 with streaming stores, from the output's first
// vector-aligned value on (streaming stores must be aligned). The last vector and the
// values before the first aligned one go through apply_run; where they fall depends on the
// shape alone (ATen aligns every allocation to 64 bytes), so the thread count changes no bit.
template <bool kPerValue, typename T>
inline void apply_run_streamed(const T* x, const T* dy, T* out, int64_t n, const T* m, const T* p, const T* q,
                               const T* r) {
  using Vec = at::vec::Vectorized<T>;
  const auto at = [](const T* c, int64_t i) { return kPerValue ? c + i : c; };
  const auto v = [](const T* c, int64_t i) { return kPerValue ? Vec::loadu(c + i) : Vec(c[0]); };
  const int64_t head = std::min<int64_t>(n, (-reinterpret_cast<uintptr_t>(out) % sizeof(Vec)) / sizeof(T));
  if (head > 0) apply_run<kPerValue>(x, dy, out, head, m, p, q, r);
  int64_t i = head;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec o = v(p, i) * (Vec::loadu(x + i) - v(m, i));
    if (dy) o = o + v(q, i) * Vec::loadu(dy + i);
    stream(out + i, o + v(r, i));
  }
  if (i < n) apply_run<kPerValue>(x + i, dy ? dy + i : nullptr, out + i, n - i, at(m, i), at(p, i), at(q, i), at(r, i));
}
#endif

// apply_run, or apply_run_streamed when kStream.
template <bool kStream, bool kPerValue, typename T>
inline void apply_run_to(const T* x, const T* dy, T* out, int64_t n, const opmath<T>* m, const opmath<T>* p,
                         const opmath<T>* q, const opmath<T>* r) {
#if defined(SYNCBN_X86_AVX2)
  if constexpr (kStream) {
    apply_run_streamed<kPerValue>(x, dy, out, n, m, p, q, r);
    return;
  }
#endif
  apply_run<kPerValue>(x, dy, out, n, m, p, q, r);
}

// Orders this thread's streaming stores before whatever reads the output next.
template <bool kStream>
inline void fence() {
#if defined(SYNCBN_X86_AVX2)
  if constexpr (kStream) _mm_sfence();
#endif
}

// out = p[c]·(x − m[c]) + q[c]·dy + r[c] per value, in opmath; without dy when dy is null.
template <typename T, bool kStream>
void apply_kernel(const Layout& l, const T* x, const T* dy, const std::vector<double>& m64,
                  const std::vector<double>& p64, const std::vector<double>& q64, const std::vector<double>& r64,
                  T* out) {
  using acc = opmath<T>;
  const int64_t C = l.C;
  const std::vector<acc> m(m64.begin(), m64.end()), p(p64.begin(), p64.end()), q(q64.begin(), q64.end()),
      r(r64.begin(), r64.end());
  if (!l.channels_innermost) {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / l.inner);
    at::parallel_for(0, l.N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % C, base = plane * l.inner;
        apply_run_to<kStream, false>(x + base, dy ? dy + base : nullptr, out + base, l.inner, &m[c], &p[c], &q[c],
                                     &r[c]);
      }
      fence<kStream>();
    });
    return;
  }
  // Rows of fewer than kTile values go `group` rows at a time, with the coefficients repeated
  // to match, so that each run is at least kTile values long.
  const int64_t group = std::max<int64_t>(1, kTile / C), width = group * C;
  std::vector<acc> mg, pg, qg, rg;
  for (int64_t k = 0; k < group; ++k) {
    mg.insert(mg.end(), m.begin(), m.end()), pg.insert(pg.end(), p.begin(), p.end());
    qg.insert(qg.end(), q.begin(), q.end()), rg.insert(rg.end(), r.begin(), r.end());
  }
  const int64_t rows = l.rows(), groups = (rows + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / width);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t off = g * width, span = (std::min(rows, (g + 1) * group) - g * group) * C;
      apply_run_to<kStream, true>(x + off, dy ? dy + off : nullptr, out + off, span, mg.data(), pg.data(),
                                  qg.data(), rg.data());
    }
    fence<kStream>();
  });
}

// [Σa, Σa·(b − m)] per channel into out (2C float64 numbers); [Σa, Σa²] without b.
void reduce(const Layout& l, const at::Tensor& a, const at::Tensor* b, const std::vector<double>& m, double* out) {
  std::fill(out, out + 2 * l.C, 0.0);
  if (l.x.numel() == 0) return;
  SYNCBN_DISPATCH(l.x.scalar_type(), "syncbn_reduce", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    if (b) {
      reduce_kernel<scalar_t, true>(l, ap, b->const_data_ptr<scalar_t>(), m.data(), out, out + l.C);
    } else {
      reduce_kernel<scalar_t, false>(l, ap, ap, nullptr, out, out + l.C);
    }
  });
}

at::Tensor apply(const at::Tensor& input, const Layout& l, const at::Tensor* dy, const std::vector<double>& m,
                 const std::vector<double>& p, const std::vector<double>& q, const std::vector<double>& r) {
  at::Tensor out = at::empty_like(l.x);
  if (out.numel() == 0) return as_output(input, out);
  SYNCBN_DISPATCH(l.x.scalar_type(), "syncbn_apply", [&] {
    const scalar_t *xp = l.x.const_data_ptr<scalar_t>(), *dp = dy ? dy->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
#if defined(SYNCBN_X86_AVX2)
    if constexpr (std::is_same_v<scalar_t, opmath<scalar_t>>) {
      const int64_t bytes = out.nbytes() * (dy ? 3 : 2);
      if (streams(bytes, out.nbytes())) return apply_kernel<scalar_t, true>(l, xp, dp, m, p, q, r, op);
    }
#endif
    apply_kernel<scalar_t, false>(l, xp, dp, m, p, q, r, op);
  });
  return as_output(input, out);
}

at::Tensor moments(const at::Tensor& input) {
  const Layout l = layout(input);
  at::Tensor out = at::empty({2 * l.C + 1}, input.options().dtype(at::kDouble));
  double* data = out.mutable_data_ptr<double>();
  data[0] = static_cast<double>(l.x.numel() / std::max<int64_t>(1, l.C));
  reduce(l, l.x, nullptr, {}, data + 1);
  return out;
}

// The global mean and invstd from the packed stats of C channels, after the count's checks
// (the one-value error names this rank's input when there is one).
std::pair<std::vector<double>, std::vector<double>> mean_invstd(const at::Tensor& stats, int64_t C, double eps,
                                                                const at::Tensor* input) {
  const double* sums = checked_sums(stats, 2 * C + 1, "stats");
  check_count(sums[0], input);
  auto [mean, invstd] = mean_var(sums, C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(invstd[c] + eps);
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_apply(const at::Tensor& input, const at::Tensor& stats,
                                                             const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias, double eps) {
  const Layout l = layout(input);
  const int64_t C = l.C;
  const auto [mean, invstd] = mean_invstd(stats, C, eps, &input);
  std::vector<double> scale(C), shift(C, 0.0);
  const std::vector<double> w = weight ? per_channel(*weight, C, "weight") : std::vector<double>(C, 1.0);
  if (bias) shift = per_channel(*bias, C, "bias");
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) scale[c] = w[c] * invstd[c];
  const at::Tensor y = apply(input, l, nullptr, mean, scale, std::vector<double>(C, 0.0), shift);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {y, channel_tensor(mean, acc), channel_tensor(invstd, acc)};
}

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& num_batches_tracked, const at::Tensor& stats,
                          std::optional<double> momentum) {
  const int64_t C = running_mean.numel();
  const double* sums = checked_sums(stats, 2 * C + 1, "stats");
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.device().is_cpu(),
              "expected num_batches_tracked as one int64 on the CPU (got ", num_batches_tracked.sizes(), " ",
              num_batches_tracked.scalar_type(), " on ", num_batches_tracked.device(), ")");
  check_count(sums[0], nullptr);  // before anything moves
  const int64_t batches = ++*num_batches_tracked.mutable_data_ptr<int64_t>();  // written like the running stats
  const double n = sums[0];
  if (n == 0) return;  // an empty global batch counts as a batch, as in nn.BatchNorm, but moves nothing
  const double factor = momentum ? *momentum : 1.0 / static_cast<double>(batches);
  const auto [batch_mean, biased] = mean_var(sums, C);
  std::vector<double> mean = per_channel(running_mean, C, "running_mean");
  std::vector<double> var = per_channel(running_var, C, "running_var");
  for (int64_t c = 0; c < C; ++c) {
    mean[c] += factor * (batch_mean[c] - mean[c]);
    var[c] += factor * (biased[c] * (n / (n - 1)) - var[c]);
  }
  write_channels(running_mean, mean);
  write_channels(running_var, var);
}

// The global stats' count checks and float64 mean and invstd, for the traced step, whose
// elementwise passes are stock ops (syncbn::statistics).
std::tuple<at::Tensor, at::Tensor> statistics(const at::Tensor& stats, double eps) {
  const auto [mean, invstd] = mean_invstd(stats, (stats.numel() - 1) / 2, eps, nullptr);
  return {channel_tensor(mean, at::kDouble), channel_tensor(invstd, at::kDouble)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                               const at::Tensor& input, const at::Tensor& mean,
                                                               const at::Tensor& invstd) {
  const Layout l = layout(input);
  const at::Tensor dy = like(grad_output, l);
  const int64_t C = l.C;
  at::Tensor sums = at::empty({2 * C}, input.options().dtype(at::kDouble));
  double* g = sums.mutable_data_ptr<double>();
  reduce(l, dy, &l.x, per_channel(mean, C, "mean"), g);
  const std::vector<double> s = per_channel(invstd, C, "invstd");
  std::vector<double> grad_weight(C), grad_bias(g, g + C);
  for (int64_t c = 0; c < C; ++c) grad_weight[c] = g[C + c] * s[c];
  return {sums, channel_tensor(grad_weight, invstd.scalar_type()), channel_tensor(grad_bias, invstd.scalar_type())};
}

at::Tensor backward_apply(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                          const at::Tensor& grad_sums) {
  const Layout l = layout(input);
  const int64_t C = l.C;
  const at::Tensor dy = like(grad_output, l);
  const double n = checked_sums(stats, 2 * C + 1, "stats")[0];
  const double* g = checked_sums(grad_sums, 2 * C, "grad_sums");
  const std::vector<double> m = per_channel(mean, C, "mean"), s = per_channel(invstd, C, "invstd");
  const std::vector<double> w = weight ? per_channel(*weight, C, "weight") : std::vector<double>(C, 1.0);
  // dx = w·invstd·(dy − Σdy/n − (x − mean)·invstd²·Σdy·(x − mean)/n)
  std::vector<double> p(C), q(C), r(C);
  for (int64_t c = 0; c < C; ++c) {
    q[c] = w[c] * s[c];
    r[c] = n > 0 ? -q[c] * g[c] / n : 0.0;
    p[c] = n > 0 ? -q[c] * s[c] * s[c] * g[C + c] / n : 0.0;
  }
  return apply(input, l, &dy, m, p, q, r);
}

// The step's collective: syncbn/comm.py's in-place all-reduce by name, handed over once by
// syncbn/ops.py (set_all_reduce). Never freed, so that no Python object is released after
// the interpreter has gone.
py::object* all_reduce_by_key = nullptr;

// The sum of a message of the step's own over the communicator that syncbn.comm named
// `comm`, in place. Called straight through pybind11: the same call through the
// syncbn::all_reduce op (dispatcher, boxing and a Python kernel) cost about 4 us more, twice
// a step.
at::Tensor all_reduce(const at::Tensor& message, const std::string& comm) {
  TORCH_CHECK(all_reduce_by_key, "syncbn's C++ step has no all-reduce: call set_all_reduce first");
  py::gil_scoped_acquire gil;
  return (*all_reduce_by_key)(message, comm).cast<at::Tensor>();
}

// syncbn::check_finite's Python kernel raises FloatingPointError on every rank.
at::Tensor check_finite(const at::Tensor& stats) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("syncbn::check_finite", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(stats);
}

// The whole eager step as one autograd node in C++: a Python autograd.Function over the same
// kernels cost 0.12-0.15 ms more a step, in Function.apply and in the engine's Python node
// (15-17% of nn.BatchNorm1d's fwd+bwd on a (256, 1024) tensor). Both all-reduces still go
// through syncbn/comm.py.
struct Step : torch::autograd::Function<Step> {
  using Optional = std::optional<at::Tensor>;

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const Optional& weight,
                            const Optional& bias, const Optional& running_mean, const Optional& running_var,
                            const Optional& num_batches_tracked, std::optional<double> momentum, double eps,
                            const std::string& comm, bool finite) {
    // Before any collective, so that every rank raises alike and none waits on another.
    TORCH_CHECK(!running_mean || (running_var && num_batches_tracked),
                "expected running_var and num_batches_tracked with running_mean");
    const at::Tensor stats = all_reduce(moments(input), comm);
    // forward_apply checks the count first, naming this rank's input; the non-finite check
    // comes after it and before the running stats move.
    auto [output, mean, invstd] = forward_apply(input, stats, weight, bias, eps);
    if (finite) check_finite(stats);
    if (running_mean) update_running_stats(*running_mean, *running_var, *num_batches_tracked, stats, momentum);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), stats, mean, invstd});
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["bias"] = bias.has_value();
    return output;
  }

  // One gradient per argument of forward. Those of absent or frozen tensors are dropped by
  // autograd (needs_input_grad counts only the tensors given, so it serves input alone).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &stats = saved[2], &mean = saved[3], &invstd = saved[4];
    const Optional w = weight.defined() ? Optional(weight) : std::nullopt;
    auto [sums, grad_weight, grad_bias] = backward_reduce(grads[0], input, mean, invstd);
    torch::autograd::variable_list out(10);
    if (ctx->needs_input_grad(0)) {
      const at::Tensor global = all_reduce(sums, ctx->saved_data["comm"].toStringRef());
      out[0] = backward_apply(grads[0], input, mean, invstd, w, stats, global);
    }
    // float32 (float64) per-channel gradients; autograd casts them to the parameters' dtype.
    if (w) out[1] = grad_weight;
    if (ctx->saved_data["bias"].toBool()) out[2] = grad_bias;
    return out;
  }
};

at::Tensor step(const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum, double eps,
                const std::string& comm, bool check_finite) {
  return Step::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, comm,
                     check_finite);
}

}  // namespace

// The kernels as ops, for syncbn/ops.py and the tests; schemas inferred from the signatures.
TORCH_LIBRARY(syncbn_cpu, m) {
  m.def("moments", &moments);
  m.def("forward_apply", &forward_apply);
  m.def("update_running_stats", &update_running_stats);
  m.def("backward_reduce", &backward_reduce);
  m.def("backward_apply", &backward_apply);
}

// The public syncbn:: ops' CPU kernels (syncbn/ops.py defines the ops and imports first), so
// that a compiled graph calls them without a Python kernel in between.
TORCH_LIBRARY_IMPL(syncbn, CPU, m) {
  m.impl("moments", &moments);
  m.impl("statistics", &statistics);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("backward_reduce", &backward_reduce);
}

// The eager step, called from syncbn/ops.py through pybind11 rather than as an op: the
// dispatcher's boxed call from Python (its arguments parsed against the schema) cost about
// 14 us more a step. The GIL is released while it runs, as torch's own ops do; the
// all-reduce takes it back.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_all_reduce", [](py::object f) { all_reduce_by_key = new py::object(std::move(f)); });
  m.def("step", &step, py::call_guard<py::gil_scoped_release>());
}
