// The deployed linear-angular attention on CPU (branch off, inference), one native operator:
//
//   out = normalize(w/π · q̂(k̂ᵀv) + 0.5·v) + DWConv_seq(v)      per head, q, k, v (B, H, N, d)
//
// Two passes over blocks of tokens, the blocks spread over PyTorch's intra-op threads, each
// block read token by token with all heads together (one sequential sweep of the qkv buffer; a
// head's rows alone lie 3·H·d elements apart, a new memory page per row):
//   1. k̂ᵀv per head (d × d, fp32): the block's k rows normalised into fp32 scratch as they are
//      read, then one GEMM per head into the thread's partial sum; the partials are added.
//   2. q·(w·k̂ᵀv) per head by one GEMM per block, then one loop over the block's tokens and
//      heads that forms q·(w·k̂ᵀv) + (π/2)·‖q‖·v (π·‖q‖ times the sum above: the
//      normalisation is scale-free), normalises it, adds the 1D convolution's taps over v's
//      neighbouring tokens and writes the token once, in the output's dtype.
// With fp32 inputs the GEMMs read q and v where the projection left them; bf16 and fp16 blocks
// are widened to fp32 first. Every product is fp32 whatever the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

// The BLAS PyTorch links (MKL on x86), called directly: a block's GEMMs are small (d × d × 256)
// and there are 2·H per block, so at::mm's per-call cost (dispatch, a view per operand) was a
// measurable share of the operator.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr double kPi = 3.14159265358979323846;

// Row-major C (m × n, ld_c) = beta·C + A (m × kk) · B (kk × n), A transposed in memory (kk × m,
// ld_a) when `a_transposed`. BLAS is column-major: it computes Cᵀ = Bᵀ·Aᵀ.
inline void gemm_row_major(bool a_transposed, int64_t m, int64_t n, int64_t kk, const float* a, int64_t ld_a,
                           const float* b, int64_t ld_b, float beta, float* c, int64_t ld_c) {
  const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(kk);
  const int lda = static_cast<int>(ld_a), ldb = static_cast<int>(ld_b), ldc = static_cast<int>(ld_c);
  const float one = 1.f;
  sgemm_("N", a_transposed ? "T" : "N", &n_, &m_, &k_, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

template <typename T>
inline float squared_norm(const T* row, int64_t d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const float x = static_cast<float>(row[i]);
    sum += x * x;
  }
  return sum;
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& taps,
            const at::Tensor& linear_weight, double eps_d, int64_t block_tokens, bool accumulate,
            at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), tokens = q.size(2), d = q.size(3);
  const int64_t kernel = taps.size(1), pad = kernel / 2;
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  const float eps = static_cast<float>(eps_d);
  const bool fp32_input = q.scalar_type() == at::kFloat;
  const float* tap = taps.data_ptr<float>();
  const auto options = at::TensorOptions().dtype(at::kFloat);
  // The caller's thread-local state (inference mode, grad mode) for the tensor ops on worker threads.
  const at::ThreadLocalState caller_state;
  // Token n, head h of x[b] at x_b + n * x.stride(2) + h * x.stride(1).
  const int64_t qs = q.stride(2), qh = q.stride(1), ks = k.stride(2), kh = k.stride(1);
  const int64_t vs = v.stride(2), vh = v.stride(1);

  for (int64_t b = 0; b < batch; ++b) {
    const T* q_b = q.data_ptr<T>() + b * q.stride(0);
    const T* k_b = k.data_ptr<T>() + b * k.stride(0);
    const T* v_b = v.data_ptr<T>() + b * v.stride(0);
    T* out_b = out.data_ptr<T>() + b * tokens * heads * d;  // (N, H, d), contiguous

    // Pass 1: kv[h] = Σ_n k̂ᵀv over blocks of tokens, each thread into its own partial sum.
    at::Tensor partial = at::zeros({at::get_num_threads(), heads, d, d}, options);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      float* kv_data = partial[at::get_thread_num()].data_ptr<float>();
      at::Tensor k_hat = at::empty({block_tokens, heads, d}, options);
      at::Tensor v_wide = fp32_input ? at::Tensor() : at::empty({block_tokens, heads, d}, options);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t start = blk * block_tokens, size = std::min(block_tokens, tokens - start);
        float* k_dst = k_hat.data_ptr<float>();
        float* v_dst = fp32_input ? nullptr : v_wide.data_ptr<float>();
        for (int64_t n = 0; n < size; ++n) {  // one sequential sweep over the block's tokens
          for (int64_t h = 0; h < heads; ++h) {
            const T* k_row = k_b + (start + n) * ks + h * kh;
            const float scale = 1.f / std::max(std::sqrt(squared_norm(k_row, d)), eps);
            float* dst = k_dst + (n * heads + h) * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(k_row[i]) * scale;
            if (!fp32_input) {
              const T* v_row = v_b + (start + n) * vs + h * vh;
              float* v_to = v_dst + (n * heads + h) * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) v_to[i] = static_cast<float>(v_row[i]);
            }
          }
        }
        for (int64_t h = 0; h < heads; ++h) {  // kv[h] += k̂ᵀ (d × size) · v (size × d)
          const float* v_block = fp32_input ? reinterpret_cast<const float*>(v_b) + start * vs + h * vh
                                            : v_dst + h * d;
          gemm_row_major(true, d, d, size, k_dst + h * d, heads * d, v_block, fp32_input ? vs : heads * d,
                         1.f, kv_data + h * d * d, d);
        }
      }
    });
    at::Tensor kv = partial.sum(0);  // (H, d, d)
    if (linear_weight.defined()) kv.mul_(linear_weight.reshape({heads, 1, 1}));
    const float* kv_data = kv.data_ptr<float>();

    // Pass 2: per block, q·kv for every head, then one loop over the block's tokens and heads.
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      at::Tensor lin = at::empty({block_tokens, heads, d}, options);
      at::Tensor q_wide = fp32_input ? at::Tensor() : at::empty({block_tokens, heads, d}, options);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t start = blk * block_tokens, size = std::min(block_tokens, tokens - start);
        if (!fp32_input) {
          float* q_dst = q_wide.data_ptr<float>();
          for (int64_t n = 0; n < size; ++n) {
            for (int64_t h = 0; h < heads; ++h) {
              const T* q_row = q_b + (start + n) * qs + h * qh;
              float* dst = q_dst + (n * heads + h) * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(q_row[i]);
            }
          }
        }
        float* lin_data = lin.data_ptr<float>();
        const float* q_wide_data = fp32_input ? nullptr : q_wide.data_ptr<float>();
        for (int64_t h = 0; h < heads; ++h) {  // lin[:, h] = q (size × d) · kv[h] (d × d)
          const float* q_block = fp32_input ? reinterpret_cast<const float*>(q_b) + start * qs + h * qh
                                            : q_wide_data + h * d;
          gemm_row_major(false, size, d, d, q_block, fp32_input ? qs : heads * d, kv_data + h * d * d, d,
                         0.f, lin_data + h * d, heads * d);
        }
        for (int64_t n = 0; n < size; ++n) {
          const int64_t token = start + n;
          // Tap j reads token + j - pad, zero outside the sequence (as nn.Conv2d pads).
          const int64_t first = std::max<int64_t>(0, pad - token);
          const int64_t last = std::min<int64_t>(kernel, tokens - token + pad);
          for (int64_t h = 0; h < heads; ++h) {
            const T* v_row = v_b + token * vs + h * vh;
            const float q_sq = fp32_input ? squared_norm(q_b + token * qs + h * qh, d)
                                          : squared_norm(q_wide_data + (n * heads + h) * d, d);
            const float q_norm = std::max(std::sqrt(q_sq), eps);
            const float half_pi_norm = static_cast<float>(kPi / 2) * q_norm;
            float* total = lin_data + (n * heads + h) * d;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < d; ++i) {
              const float t = total[i] + half_pi_norm * static_cast<float>(v_row[i]);
              total[i] = t;
              sum += t * t;
            }
            const float inv = 1.f / std::max(std::sqrt(sum), static_cast<float>(kPi) * eps * q_norm);
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) total[i] *= inv;
            const float* tap_h = tap + h * kernel;
            for (int64_t j = first; j < last; ++j) {
              const T* src = v_b + (token + j - pad) * vs + h * vh;
              const float w = tap_h[j];
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) total[i] += w * static_cast<float>(src[i]);
            }
            T* dst = out_b + (token * heads + h) * d;
            if (accumulate) {
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(static_cast<float>(dst[i]) + total[i]);
            } else {
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(total[i]);
            }
          }
        }
      }
    });
  }
}

// q, k, v: (B, H, N, d) CPU tensors of one floating dtype (fp32, bf16 or fp16), unit last
// stride. taps: (H, K) fp32, the 1D convolution's taps (K = 0 for none).
// linear_weight: (H,) fp32 or undefined. out: (B, N, H, d) contiguous in q's dtype, written, or
// added to when `accumulate` (a convolution computed elsewhere).
void linear_angular_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& taps, const c10::optional<at::Tensor>& linear_weight,
                                  double eps, int64_t block_tokens, bool accumulate, at::Tensor out) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v: one (B, H, N, d) shape");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v need a unit last stride");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(), "q, k, v and out: one dtype");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == q.size(0) && out.size(1) == q.size(2) &&
                  out.size(2) == q.size(1) && out.size(3) == q.size(3), "out: contiguous (B, N, H, d)");
  TORCH_CHECK(taps.scalar_type() == at::kFloat && taps.is_contiguous() && taps.dim() == 2 &&
                  taps.size(0) == q.size(1), "taps: contiguous fp32 (H, K)");
  TORCH_CHECK(block_tokens > 0, "block_tokens must be positive");
  at::Tensor weight;
  if (linear_weight.has_value()) {
    weight = linear_weight->contiguous();
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == q.size(1), "linear_weight: fp32, one per head");
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      attend<float>(q, k, v, taps, weight, eps, block_tokens, accumulate, out);
      break;
    case at::kBFloat16:
      attend<c10::BFloat16>(q, k, v, taps, weight, eps, block_tokens, accumulate, out);
      break;
    case at::kHalf:
      attend<c10::Half>(q, k, v, taps, weight, eps, block_tokens, accumulate, out);
      break;
    default:
      TORCH_CHECK(false, "linear_angular_attention_cpu: fp32, bf16 or fp16, got ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(castling_det_cpu, m) {
  m.def("linear_angular_attention(Tensor q, Tensor k, Tensor v, Tensor taps, Tensor? linear_weight, "
        "float eps, int block_tokens, bool accumulate, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(castling_det_cpu, CPU, m) {
  m.impl("linear_angular_attention", &linear_angular_attention_cpu);
}
