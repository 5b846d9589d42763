// y = x W^T (+ b) (+ residual) for a few rows of x, over weights in nn.Linear's own [N, K] layout.
//
// A decode step multiplies one row (a token; two or so when verifying a short draft) by every weight of the model,
// so it is bound by how fast the weights stream from memory. Each weight row is read once, for all rows of x (held
// in L1), as U independent FMA chains; a group of weights (q/k/v, gate/up) is one call writing its outputs side by
// side, its rows split between the threads of torch's intra-op pool. Every output is summed in one fixed order, so a
// row's result never depends on how many rows share the call. Reference: kernels/linear_reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// 16 floats: one AVX-512 register, or two AVX2 / four SSE ones, whatever -march=native gives the compiler.
typedef float vec __attribute__((vector_size(64)));
constexpr int L = 16;
// Accumulators per output: 16-float chunk c of k goes to accumulator c % U (independent FMA chains).
constexpr int U = 4;
// Rows of x per pass over a weight row (their U accumulators stay in registers); more rows re-read it from L1.
constexpr int CHUNK = 4;
// Rows of x per call to the kernels below; a longer x is done this many rows at a time.
constexpr int MAX_ROWS = 8;

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The 16 lanes summed as a fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1).
inline float total(vec v) {
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  const half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// out[t] = dot(x[t], w) for T <= CHUNK rows of x: accumulators (0 + 1) + (2 + 3), then the lanes' tree, then the
// scalar tail of k.
template <int T>
inline void dots(const float* x, int64_t K, const float* w, float* out) {
  const int64_t KV = K - K % L, KU = K - K % (U * L);
  vec acc[T][U];
  for (int t = 0; t < T; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = vec{};
  for (int64_t k = 0; k < KU; k += U * L) {
    vec wv[U];
    for (int u = 0; u < U; ++u) wv[u] = load(w + k + u * L);
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < U; ++u) acc[t][u] += wv[u] * load(x + t * K + k + u * L);
  }
  for (int64_t k = KU; k < KV; k += L) {  // chunks left over go to accumulator c % U, as in the loop
    const int u = static_cast<int>((k - KU) / L);
    const vec wv = load(w + k);
    for (int t = 0; t < T; ++t) acc[t][u] += wv * load(x + t * K + k);
  }
  for (int t = 0; t < T; ++t) {
    float s = total((acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3]));
    for (int64_t k = KV; k < K; ++k) s += w[k] * x[t * K + k];
    out[t] = s;
  }
}

struct Out {
  float* y;           // [T, ldy], this weight's first column
  int64_t ldy;
  const float* bias;  // [N] or null
  const float* res;   // [T, ldy] at the same column, or null
};

// Weight rows [n0, n1) against T <= MAX_ROWS rows of x.
template <int T>
void span(const float* x, int64_t K, const float* W, int64_t n0, int64_t n1, const Out& o) {
  float out[T];
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = W + n * K;
    if constexpr (T <= CHUNK) {
      dots<T>(x, K, w, out);
    } else {
      dots<CHUNK>(x, K, w, out);
      dots<T - CHUNK>(x + CHUNK * K, K, w, out + CHUNK);
    }
    for (int t = 0; t < T; ++t) {
      float s = out[t];
      if (o.bias) s += o.bias[n];
      if (o.res) s += o.res[t * o.ldy + n];
      o.y[t * o.ldy + n] = s;
    }
  }
}

using Span = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const Out&);

Span pick(int64_t rows) {
  static constexpr Span spans[MAX_ROWS] = {span<1>, span<2>, span<3>, span<4>, span<5>, span<6>, span<7>, span<8>};
  return spans[rows - 1];
}

at::Tensor linear(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                  const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "decodelab::linear: x must be float32 on cpu");
  TORCH_CHECK(!weights.empty(), "decodelab::linear: no weights");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "decodelab::linear: one bias per weight, or none");
  const int64_t K = x.size(-1);
  std::vector<int64_t> first(weights.size() + 1, 0);
  for (size_t g = 0; g < weights.size(); ++g) {
    const at::Tensor& w = weights[g];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                w.device().is_cpu(), "decodelab::linear: weight ", g, " must be contiguous float32 [N, ", K, "] on cpu");
    if (!biases.empty())
      TORCH_CHECK(biases[g].is_contiguous() && biases[g].numel() == w.size(0) && biases[g].scalar_type() == at::kFloat,
                  "decodelab::linear: bias ", g, " must be contiguous float32 [", w.size(0), "]");
    first[g + 1] = first[g] + w.size(0);
  }
  const int64_t N = first.back();
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->numel() == M * N && residual->scalar_type() == at::kFloat,
                "decodelab::linear: residual must be float32 with ", M * N, " elements");
    res = residual->reshape({M, N}).contiguous();
  }
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; m += MAX_ROWS) {
    const Span run = pick(std::min<int64_t>(MAX_ROWS, M - m));
    // The group's rows split between the threads; each piece is cut at the weights' boundaries.
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (size_t g = 0; g + 1 < first.size(); ++g) {
        const int64_t lo = std::max(begin, first[g]), hi = std::min(end, first[g + 1]);
        if (lo >= hi) continue;
        const Out o{yp + m * N + first[g], N, biases.empty() ? nullptr : biases[g].data_ptr<float>(),
                    res.defined() ? res.data_ptr<float>() + m * N + first[g] : nullptr};
        run(xp + m * K, K, weights[g].data_ptr<float>(), lo - first[g], hi - first[g], o);
      }
    });
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(decodelab, m) {
  m.def("linear(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? residual) -> Tensor", &linear);
}
