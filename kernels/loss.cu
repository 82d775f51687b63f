// Softmax cross-entropy with mean reduction over the batch, and its gradient:
//   loss = mean_n (log sum_j exp(z_nj - max_n) + max_n - z_n,t_n)
//   dlogits_nj = (exp(z_nj - max_n) / sum_j exp(z_nj - max_n) - [j == t_n]) / n
// Subtracting the row maximum keeps exp in range for any logits. The loss of a row is
// formed as log1p(s) + (max - z_t), where 1 + s is the sum (s over the classes other than
// the first maximum), so that neither large logits nor confident rows lose precision.
// With label smoothing e (PyTorch's label_smoothing) the target distribution is
// q = (1 - e) onehot(t) + e / classes: dlogits = (softmax(z) - q) / n, and a row's loss is
// log1p(s) + (1 - e) (max - z_t) + e (max - mean_j z_j); e = 0 is the plain loss, bit for bit. A target
// outside [0, classes) makes its row's loss and gradients NaN (and so the mean loss).
// One block: warp w handles rows w, w + warps, ...; the row losses are summed in f64, per
// warp in row order and then over the warps in order, so the result is deterministic.
// CPU version: src/cpu/layers/loss.rs; wrapper: src/ops/layers/loss.rs.
#include "layers.cuh"

#define LOSS_MAX_WARPS 32

PK_KERNEL(softmax_cross_entropy_f32, PkLossParams) {
  __shared__ double s_loss[LOSS_MAX_WARPS];
  const int lane = (int)(threadIdx.x % 32), warp = (int)(threadIdx.x / 32);
  const int warps = (int)(blockDim.x / 32);
  const float inv_n = 1.0f / (float)p.n;
  const float nan = __int_as_float(0x7fc00000);
  double total = 0.0;
  for (int row = warp; row < p.n; row += warps) {
    const float* z = p.logits + (int64_t)row * p.classes;
    float* dz = p.dlogits + (int64_t)row * p.classes;
    const int t = p.targets[row];
    const bool valid = t >= 0 && t < p.classes;
    // The row maximum and its first index.
    float mx = __int_as_float((int)0xff800000u);
    int am = INT_MAX;
    for (int j = lane; j < p.classes; j += 32) {
      const float v = z[j];
      if (v > mx) {
        mx = v;
        am = j;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float omx = __shfl_xor_sync(0xffffffffu, mx, o);
      const int oam = __shfl_xor_sync(0xffffffffu, am, o);
      if (omx > mx || (omx == mx && oam < am)) {
        mx = omx;
        am = oam;
      }
    }
    // sum_j exp(z_j - max) = 1 + s, s over the other classes: log1p(s) keeps the loss of a
    // confident row (s << 1) accurate.
    float s = 0.0f;
    for (int j = lane; j < p.classes; j += 32)
      if (j != am) s += expf(z[j] - mx);
    s = warp_sum(s);
    const float inv_s = 1.0f / (1.0f + s);
    const float e = p.smoothing, on = 1.0f - e, off = e / (float)p.classes;
    float zsum = 0.0f;
    if (e > 0.0f) {  // uniform over the block: every lane takes the same branch
      for (int j = lane; j < p.classes; j += 32) zsum += z[j];
      zsum = warp_sum(zsum);
    }
    for (int j = lane; j < p.classes; j += 32) {
      const float prob = expf(z[j] - mx) * inv_s;
      dz[j] = valid ? (prob - ((j == t ? on : 0.0f) + off)) * inv_n : nan;
    }
    if (lane == 0) {
      double row = (double)nan;
      if (valid)
        row = e > 0.0f ? (double)(log1pf(s) + on * (mx - z[t]) + e * (mx - zsum / (float)p.classes))
                       : (double)(log1pf(s) + (mx - z[t]));
      total += row;
    }
  }
  if (lane == 0) s_loss[warp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int w = 0; w < warps; ++w) sum += s_loss[w];
    p.loss[0] = (float)(sum / (double)p.n);
  }
}
