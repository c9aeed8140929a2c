// Ternary matmul for CPUs: int8 activations x [M, K] times I2-packed ternary weights
// (nanochat_jax/ternary/packing.py: byte (i, n) holds rows i + j*K4, j = 0..3, as w + 1
// in bits 2j..2j+1) -> the exact int32 accumulator [M, Np], as an XLA FFI handler.
//
// Why by hand: XLA:CPU has no fast path for this product. Measured on a 2-core AVX-512
// host (BUILD.md "CPU decode kernel"): an s8 x s8 -> s32 dot of 768x2048 runs at 374 us
// against 121 us for float32 (XNNPACK/oneDNN/YNNPACK fusion flags do not change that),
// bf16 matrix-vector products are slower still, and an unpack-multiply-reduce fusion takes
// 8 ms; float32 weights cost 4 bytes each. Here the weights stay at 2 bits and are widened
// in registers.
//
// Each 32-bit lane handles one output column n: the packed byte (i, n) is spread to the
// four bytes (w0+1, w1+1, w2+1, w3+1) of the lane, and one u8 x s8 dot-product step
// (AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd) multiplies them with the four
// activations x[i + j*K4] of one row, broadcast to every lane. Since the stored codes are
// w + 1, the accumulator holds sum((w + 1) x) and the row sum of x is subtracted at the end.
// Two traversals: for a few rows (decode) the weights are streamed row after row, each work
// unit a contiguous range of packed rows with its own partial sums (the stream is what the
// memory system prefetches best; the weights are read once and are the whole cost); for many
// rows (prefill) each unit is a block of columns whose widened weights serve every row from
// registers. Units are shared with XLA's intra-op thread pool: whichever thread (the caller
// included) claims a unit computes it, so nothing waits on a busy pool.
//
// Built for the host it runs on (-march=native) by nanochat_jax/ternary/cpu_kernel.py.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---- one vector of int32 lanes per instruction set ------------------------------------------
// Widen(p): kLanes packed bytes -> kLanes lanes, each holding its byte's four 2-bit fields
// (w + 1 for the rows i + j K4) in its four bytes. Dot(acc, w, x): acc + the u8 x s8
// dot product of each lane's four bytes with x's four bytes.

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
using Vec = __m512i;
constexpr int64_t kLanes = 16;
const char* kPath = "avx512-vnni";
inline Vec Zero() { return _mm512_setzero_si512(); }
inline Vec Set1(int32_t v) { return _mm512_set1_epi32(v); }
inline Vec Load(const int32_t* p) { return _mm512_loadu_si512(p); }
inline void Store(int32_t* p, Vec v) { _mm512_storeu_si512(p, v); }
inline Vec Sub(Vec a, Vec b) { return _mm512_sub_epi32(a, b); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_epi32(a, b); }
inline Vec Widen(const uint8_t* p) {
  const Vec b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#if defined(__AVX512VBMI__)
  // Each qword holds two packed bytes (bits 0-7 and 32-39): byte j of each dword takes the
  // 8 bits at offset 2j of its packed byte (vpmultishiftqb), masked to the 2-bit field.
  const Vec offsets = _mm512_set1_epi64(0x2624222006040200LL);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(offsets, b),
                          _mm512_set1_epi32(0x03030303));
#else
  const Vec spread = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 6),
                                               _mm512_slli_epi32(b, 12), 0xFE);  // a|b|c
  return _mm512_ternarylogic_epi32(spread, _mm512_slli_epi32(b, 18),
                                   _mm512_set1_epi32(0x03030303), 0xA8);  // (a|b)&c
#endif
}
inline Vec Dot(Vec acc, Vec w, Vec x) { return _mm512_dpbusd_epi32(acc, w, x); }

#elif defined(__AVX2__)
using Vec = __m256i;
constexpr int64_t kLanes = 8;
#if defined(__AVXVNNI__)
const char* kPath = "avx2-vnni";
#else
const char* kPath = "avx2";
#endif
inline Vec Zero() { return _mm256_setzero_si256(); }
inline Vec Set1(int32_t v) { return _mm256_set1_epi32(v); }
inline Vec Load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const Vec*>(p)); }
inline void Store(int32_t* p, Vec v) { _mm256_storeu_si256(reinterpret_cast<Vec*>(p), v); }
inline Vec Sub(Vec a, Vec b) { return _mm256_sub_epi32(a, b); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_epi32(a, b); }
inline Vec Widen(const uint8_t* p) {
  const Vec b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const Vec spread = _mm256_or_si256(_mm256_or_si256(b, _mm256_slli_epi32(b, 6)),
                                     _mm256_or_si256(_mm256_slli_epi32(b, 12),
                                                     _mm256_slli_epi32(b, 18)));
  return _mm256_and_si256(spread, _mm256_set1_epi32(0x03030303));
}
inline Vec Dot(Vec acc, Vec w, Vec x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  // u8 {0,1,2} x s8 [-127, 127]: pair sums |.| <= 508, no int16 saturation.
  const Vec pairs = _mm256_maddubs_epi16(w, x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

#else
struct Vec {
  int32_t v[8];
};
constexpr int64_t kLanes = 8;
const char* kPath = "portable";
inline Vec Zero() { return Vec{}; }
inline Vec Set1(int32_t x) {
  Vec r;
  for (int l = 0; l < 8; ++l) r.v[l] = x;
  return r;
}
inline Vec Load(const int32_t* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void Store(int32_t* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline Vec Sub(Vec a, Vec b) {
  for (int l = 0; l < 8; ++l) a.v[l] -= b.v[l];
  return a;
}
inline Vec Add(Vec a, Vec b) {
  for (int l = 0; l < 8; ++l) a.v[l] += b.v[l];
  return a;
}
inline Vec Widen(const uint8_t* p) {
  Vec r;
  for (int l = 0; l < 8; ++l) {
    const uint32_t b = p[l];
    r.v[l] = static_cast<int32_t>((b | (b << 6) | (b << 12) | (b << 18)) & 0x03030303u);
  }
  return r;
}
inline Vec Dot(Vec acc, Vec w, Vec x) {
  for (int l = 0; l < 8; ++l) {
    uint8_t wb[4];
    int8_t xb[4];
    std::memcpy(wb, &w.v[l], 4);
    std::memcpy(xb, &x.v[l], 4);
    for (int j = 0; j < 4; ++j) acc.v[l] += wb[j] * xb[j];
  }
  return acc;
}
#endif

// ---- the two traversals -------------------------------------------------------------------

constexpr int64_t kRowTile = 4;  // rows of x sharing one widening of the weights
constexpr int64_t kStreamRows = 8;  // up to this many rows of x: stream the weights
constexpr int64_t kStreamStep = 32;  // packed rows per stream unit (K4 is a multiple of 32)

// Stream: acc [R, Np] += the packed rows i0 .. i1 - 1 (all columns) times x's R rows.
template <int R>
void Stream(const int32_t* xi, int64_t k4, const uint8_t* codes, int64_t np, int64_t i0,
            int64_t i1, int32_t* acc) {
  for (int64_t i = i0; i < i1; i += 4) {
    Vec x[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) x[r][j] = Set1(xi[r * k4 + i + j]);
    const uint8_t* p = codes + i * np;
    for (int64_t n = 0; n < np; n += kLanes) {
      const Vec w0 = Widen(p + n), w1 = Widen(p + np + n);
      const Vec w2 = Widen(p + 2 * np + n), w3 = Widen(p + 3 * np + n);
      for (int r = 0; r < R; ++r) {
        Vec a = Load(acc + r * np + n);
        a = Dot(Dot(Dot(Dot(a, w0, x[r][0]), w1, x[r][1]), w2, x[r][2]), w3, x[r][3]);
        Store(acc + r * np + n, a);
      }
    }
  }
}

// Block: out [R, n0 .. n0 + C kLanes) = the whole K times x's R rows, minus the row sums.
template <int R, int C>
void Block(const int32_t* xi, int64_t k4, const uint8_t* codes, int64_t np, int64_t n0,
           const int32_t* row_sums, int32_t* out) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  for (int64_t i = 0; i < k4; ++i) {
    const uint8_t* p = codes + i * np + n0;
    Vec w[C];
    for (int c = 0; c < C; ++c) w[c] = Widen(p + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec x = Set1(xi[r * k4 + i]);
      for (int c = 0; c < C; ++c) acc[r][c] = Dot(acc[r][c], w[c], x);
    }
  }
  for (int r = 0; r < R; ++r) {
    const Vec sum = Set1(row_sums[r]);
    for (int c = 0; c < C; ++c) Store(out + r * np + n0 + c * kLanes, Sub(acc[r][c], sum));
  }
}

constexpr int64_t kBlock = 4 * kLanes;  // columns per block unit

template <int R>
void Columns(const int32_t* xi, int64_t k4, const uint8_t* codes, int64_t np, int64_t n0,
             const int32_t* row_sums, int32_t* out) {
  switch (std::min<int64_t>((np - n0) / kLanes, 4)) {
    case 4: return Block<R, 4>(xi, k4, codes, np, n0, row_sums, out);
    case 3: return Block<R, 3>(xi, k4, codes, np, n0, row_sums, out);
    case 2: return Block<R, 2>(xi, k4, codes, np, n0, row_sums, out);
    default: return Block<R, 1>(xi, k4, codes, np, n0, row_sums, out);
  }
}

// ---- one call: units shared by the caller and the pool ------------------------------------

struct Shared {
  std::vector<int32_t> xi, row_sums, partial;  // partial: [units, M, Np] (several streams)
  int64_t m, k4, np, units, stream_rows;
  bool stream;
  const uint8_t* codes;
  int32_t* out;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void Run(int64_t u) {
    if (stream) {  // packed rows u*stream_rows .. : partial sums of every row and column
      int32_t* acc = units == 1 ? out : partial.data() + u * m * np;
      const int64_t i0 = u * stream_rows, i1 = std::min(k4, i0 + stream_rows);
      for (int64_t r0 = 0; r0 < m; r0 += kRowTile) {
        const int32_t* x = xi.data() + r0 * k4;
        int32_t* a = acc + r0 * np;
        switch (std::min<int64_t>(m - r0, kRowTile)) {
          case 4: Stream<4>(x, k4, codes, np, i0, i1, a); break;
          case 3: Stream<3>(x, k4, codes, np, i0, i1, a); break;
          case 2: Stream<2>(x, k4, codes, np, i0, i1, a); break;
          default: Stream<1>(x, k4, codes, np, i0, i1, a); break;
        }
      }
      return;
    }
    for (int64_t r0 = 0; r0 < m; r0 += kRowTile) {  // columns u*kBlock .. of every row
      const int32_t* x = xi.data() + r0 * k4;
      const int32_t* sums = row_sums.data() + r0;
      int32_t* o = out + r0 * np;
      switch (std::min<int64_t>(m - r0, kRowTile)) {
        case 4: Columns<4>(x, k4, codes, np, u * kBlock, sums, o); break;
        case 3: Columns<3>(x, k4, codes, np, u * kBlock, sums, o); break;
        case 2: Columns<2>(x, k4, codes, np, u * kBlock, sums, o); break;
        default: Columns<1>(x, k4, codes, np, u * kBlock, sums, o); break;
      }
    }
  }

  // Claim and run units until none are left.
  void Work() {
    for (int64_t u; (u = next.fetch_add(1)) < units;) {
      Run(u);
      if (finished.fetch_add(1) + 1 == units) {
        std::lock_guard<std::mutex> lock(mutex);
        all_done.notify_all();
      }
    }
  }

  // out = the sum of the stream units' partials (one unit: out itself), minus the row
  // sums of x.
  void Reduce() {
    for (int64_t r = 0; r < m; ++r) {
      const Vec sum = Set1(row_sums[r]);
      for (int64_t n = 0; n < np; n += kLanes) {
        Vec a = Sub(units == 1 ? Load(out + r * np + n) : Zero(), sum);
        for (int64_t u = 0; units > 1 && u < units; ++u)
          a = Add(a, Load(partial.data() + (u * m + r) * np + n));
        Store(out + r * np + n, a);
      }
    }
  }
};

ffi::Error TernaryMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                             ffi::Buffer<ffi::U8> codes, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("ternary matmul wants x [M, K] and codes [K4, Np]");
  const int64_t m = xd[0], k = xd[1], k4 = cd[0], np = cd[1];
  if (k > 4 * k4 || np % kLanes != 0 || k4 % 4 != 0)
    return ffi::Error::InvalidArgument("ternary matmul: K > 4 K4, or Np not a multiple of the "
                                       "vector width, or K4 not a multiple of 4");
  auto shared = std::make_shared<Shared>();
  shared->m = m, shared->k4 = k4, shared->np = np, shared->codes = codes.typed_data();
  shared->out = out->typed_data();
  // Share the work with the pool only when the call is long: handing a unit to a pool
  // thread costs more than a decode-sized product (measured: 84 batch-1 products of the
  // 125m geometry took 5.2 ms with helpers, 3.1-3.9 ms without). Alone, the stream is one
  // unit accumulating straight into `out`.
  const bool threaded = m * k4 * np >= (int64_t{1} << 22) && pool.num_threads() > 0;
  shared->stream = m <= kStreamRows;
  shared->stream_rows = threaded ? kStreamStep : k4;
  shared->units = shared->stream ? (k4 + shared->stream_rows - 1) / shared->stream_rows
                                 : (np + kBlock - 1) / kBlock;
  if (shared->stream && shared->units > 1) shared->partial.assign(shared->units * m * np, 0);
  if (shared->stream && shared->units == 1) std::fill(shared->out, shared->out + m * np, 0);
  // x [M, K] -> xi [M, K4]: lane i of row r packs x[r, i + j*K4] for j = 0..3 (0 past K).
  shared->xi.assign(m * k4, 0);
  shared->row_sums.assign(m, 0);
  const int8_t* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r) {
    int32_t sum = 0;
    auto* bytes = reinterpret_cast<int8_t*>(shared->xi.data() + r * k4);
    for (int64_t j = 0; j < 4; ++j) {
      for (int64_t i = 0; i < k4 && i + j * k4 < k; ++i) {
        const int8_t v = xs[r * k + i + j * k4];
        bytes[4 * i + j] = v;
        sum += v;
      }
    }
    shared->row_sums[r] = sum;
  }
  const int64_t helpers =
      threaded ? std::min<int64_t>(pool.num_threads(), shared->units - 1) : 0;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  {
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->all_done.wait(lock, [&] { return shared->finished.load() == shared->units; });
  }
  if (shared->stream) shared->Reduce();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatTernaryMatmul, TernaryMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

extern "C" const char* NanochatTernaryPath() { return kPath; }
