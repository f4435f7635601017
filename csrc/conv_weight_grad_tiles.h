// The register tiles of expseg_fast::conv3d_weight_grad's CPU kernel (conv_weight_grad.cpp), included
// there once per instruction set, each time inside its own namespace and target (so no include guard, and
// no includes: the including file has them). GCC's vector extensions: the vectors are 8 and 4 floats.

typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

template <typename L, typename S>
EXPSEG_VEC L lanes_load(const S* p) {
  L v;
  std::memcpy(&v, p, sizeof(L));
  return v;
}

template <typename L, typename S>
EXPSEG_VEC void lanes_store(S* p, L v) {
  std::memcpy(p, &v, sizeof(L));
}

// Every lane x: x - 0 is x for every x (-0.0 too), so the subtraction folds away and one broadcast load
// is left (L{} + x would keep an addition, which turns -0.0 into +0.0).
template <typename L, typename S>
EXPSEG_VEC L splat(S x) {
  return x - L{};
}

// out[r][lanes] (OB rows `cb` apart) += sum over `count` voxels of A[v * ca + r] * B[v * cb + lanes]: the
// lanes are NV vectors of L, then, with Q, one vector of four floats (one lane where L is S).
template <typename S, typename L, int OB, int NV, bool Q = false>
EXPSEG_VEC void tile(const S* A, int64_t ca, const S* B, int64_t cb, int64_t count, S* out) {
  constexpr int n = sizeof(L) / sizeof(S);
  L acc[OB][NV];
  v4f quad[OB];
#pragma GCC unroll 4
  for (int r = 0; r < OB; ++r) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) acc[r][j] = lanes_load<L>(out + r * cb + j * n);
    if constexpr (Q) quad[r] = lanes_load<v4f>(out + r * cb + NV * n);
  }
  for (int64_t v = 0; v < count; ++v) {
    const S* a = A + v * ca;
    const S* b = B + v * cb;
    L bv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) bv[j] = lanes_load<L>(b + j * n);
    v4f bq{};
    if constexpr (Q) bq = lanes_load<v4f>(b + NV * n);
#pragma GCC unroll 4
    for (int r = 0; r < OB; ++r) {
      const L s = splat<L>(a[r]);
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[r][j] += s * bv[j];
      if constexpr (Q) quad[r] += splat<v4f>(a[r]) * bq;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < OB; ++r) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) lanes_store(out + r * cb + j * n, acc[r][j]);
    if constexpr (Q) lanes_store(out + r * cb + NV * n, quad[r]);
  }
}

// OB of A's channels against all of B's: 24 lanes at a time, the rest of four in one pass, then one.
template <typename S, int OB>
EXPSEG_VEC void tile_row(const S* A, int64_t ca, const S* B, int64_t cb, int64_t count, S* out) {
  int64_t b0 = 0;
  if constexpr (std::is_same_v<S, float>) {
    for (; b0 + 24 <= cb; b0 += 24) tile<S, v8f, OB, 3>(A, ca, B + b0, cb, count, out + b0);
    switch ((cb - b0) / 4) {  // the last 4 to 20 lanes in one pass
      case 5: tile<S, v8f, OB, 2, true>(A, ca, B + b0, cb, count, out + b0); b0 += 20; break;
      case 4: tile<S, v8f, OB, 2>(A, ca, B + b0, cb, count, out + b0); b0 += 16; break;
      case 3: tile<S, v8f, OB, 1, true>(A, ca, B + b0, cb, count, out + b0); b0 += 12; break;
      case 2: tile<S, v8f, OB, 1>(A, ca, B + b0, cb, count, out + b0); b0 += 8; break;
      case 1: tile<S, v4f, OB, 1>(A, ca, B + b0, cb, count, out + b0); b0 += 4; break;
      default: break;
    }
  }
  for (; b0 < cb; ++b0) tile<S, S, OB, 1>(A, ca, B + b0, cb, count, out + b0);
}

// out (ca x cb, rows cb apart) += A^T B over `count` voxels: A's rows ca apart, B's cb apart (accumulate; not
// inlined into it, which has no target).
template <typename S>
void accumulate_rows(const S* A, int64_t ca, const S* B, int64_t cb, int64_t count, S* out) {
  int64_t a0 = 0;
  for (; a0 + 4 <= ca; a0 += 4) tile_row<S, 4>(A + a0, ca, B, cb, count, out + a0 * cb);
  switch (ca - a0) {
    case 3: tile_row<S, 3>(A + a0, ca, B, cb, count, out + a0 * cb); break;
    case 2: tile_row<S, 2>(A + a0, ca, B, cb, count, out + a0 * cb); break;
    case 1: tile_row<S, 1>(A + a0, ca, B, cb, count, out + a0 * cb); break;
    default: break;
  }
}
