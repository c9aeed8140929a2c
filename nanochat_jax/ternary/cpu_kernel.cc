// Ternary matmul for CPUs: int8 activations x [M, K] times ternary weights held as 2-bit codes
// in CPU tiles (below) -> the exact int32 accumulator [M, 64 NB], as an XLA FFI handler.
//
// Why by hand: XLA:CPU has no fast path for this product. Measured on a 2-core AVX-512
// host (BUILD.md#the-ternary-kernel): an s8 x s8 -> s32 dot of 768x2048 runs at 374 us
// against 121 us for float32 (XNNPACK/oneDNN/YNNPACK fusion flags do not change that),
// bf16 matrix-vector products are slower still, and an unpack-multiply-reduce fusion takes
// 8 ms; float32 weights cost 4 bytes each. Here the weights stay at 2 bits and are widened
// in registers.
//
// CPU tiles (nanochat_jax/ternary/packing.py: cpu_tiles) are the bytes of the I2 codes
// (byte (i, n) holds rows i + j*K4, j = 0..3, as w + 1 in bits 2j..2j+1), reordered:
// tiles [NB, G = K4/4, 256] where tiles[b, g, 4*c + t] = I2 byte (4g + t, 64b + c) for the
// 64 columns c of block b and the 4 packed rows t of group g. So each 32-bit lane (one
// column) holds the bytes of 4 consecutive packed rows, and field j of the lane, taken with
// one shift and one mask ((lane >> 2j) & 0x03030303, no shuffle), is the four weights of
// rows 4g + t + j*K4, t = 0..3, which one u8 x s8 dot-product step (AVX-512 VNNI vpdpbusd,
// AVX-VNNI, or AVX2 vpmaddubsw + vpmaddwd) multiplies with those rows' four activations,
// broadcast to every lane. Since the stored codes are w + 1, the accumulator holds
// sum((w + 1) x) and the row sum of x is subtracted at the end.
//
// A block's 64 columns are contiguous over all of K (G x 256 bytes, 12 KiB at K = 768), so
// one pass over a block reads the weights as one stream with its accumulators in registers:
// at batch 1 that runs near the host's read bandwidth (BUILD.md: 84 products of the 125m
// geometry in 0.66 ms against 2.0 ms for the I2 order with a shuffle per 16 bytes). Work
// units (a block and a range of rows) are shared with XLA's intra-op thread pool when a call
// is long enough to pay for the hand-off: whichever thread (the caller included) claims a
// unit computes it, so nothing waits on a busy pool.
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
// Load(p): kLanes lanes of 4 bytes. Field<j>(v): each byte's 2-bit field j (bits 2j..2j+1).
// Dot(acc, w, x): acc + the u8 x s8 dot product of each lane's four bytes with x's four bytes.

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
using Vec = __m512i;
constexpr int64_t kLanes = 16;
const char* kPath = "avx512-vnni";
inline Vec Zero() { return _mm512_setzero_si512(); }
inline Vec Set1(int32_t v) { return _mm512_set1_epi32(v); }
inline Vec Load(const void* p) { return _mm512_loadu_si512(p); }
inline void Store(int32_t* p, Vec v) { _mm512_storeu_si512(p, v); }
inline Vec Sub(Vec a, Vec b) { return _mm512_sub_epi32(a, b); }
template <int J>
inline Vec Field(Vec v) {
  const Vec shifted = J == 0 ? v : _mm512_srli_epi16(v, 2 * J);
  return _mm512_and_si512(shifted, _mm512_set1_epi8(3));
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
inline Vec Load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const Vec*>(p)); }
inline void Store(int32_t* p, Vec v) { _mm256_storeu_si256(reinterpret_cast<Vec*>(p), v); }
inline Vec Sub(Vec a, Vec b) { return _mm256_sub_epi32(a, b); }
template <int J>
inline Vec Field(Vec v) {
  const Vec shifted = J == 0 ? v : _mm256_srli_epi16(v, 2 * J);
  return _mm256_and_si256(shifted, _mm256_set1_epi8(3));
}
inline Vec Dot(Vec acc, Vec w, Vec x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  // u8 {0,1,2} x s8 [-128, 127]: pair sums |.| <= 512, no int16 saturation.
  const Vec pairs = _mm256_maddubs_epi16(w, x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

#else
struct Vec {
  uint32_t v[8];
};
constexpr int64_t kLanes = 8;
const char* kPath = "portable";
inline Vec Zero() { return Vec{}; }
inline Vec Set1(int32_t x) {
  Vec r;
  for (int l = 0; l < 8; ++l) r.v[l] = static_cast<uint32_t>(x);
  return r;
}
inline Vec Load(const void* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void Store(int32_t* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline Vec Sub(Vec a, Vec b) {
  for (int l = 0; l < 8; ++l) a.v[l] -= b.v[l];
  return a;
}
template <int J>
inline Vec Field(Vec v) {
  for (int l = 0; l < 8; ++l) v.v[l] = (v.v[l] >> (2 * J)) & 0x03030303u;
  return v;
}
inline Vec Dot(Vec acc, Vec w, Vec x) {
  for (int l = 0; l < 8; ++l) {
    uint8_t wb[4];
    int8_t xb[4];
    std::memcpy(wb, &w.v[l], 4);
    std::memcpy(xb, &x.v[l], 4);
    int32_t sum = 0;
    for (int j = 0; j < 4; ++j) sum += wb[j] * xb[j];
    acc.v[l] += static_cast<uint32_t>(sum);
  }
  return acc;
}
#endif

// ---- one block of 64 columns ------------------------------------------------------------------

constexpr int64_t kBlockColumns = 64;  // columns per block (the tile layout's unit)
constexpr int64_t kGroupBytes = 4 * kBlockColumns;  // bytes of one packed-row group in a block
constexpr int64_t kPassVectors = 4;  // vectors of accumulators per row in one pass
constexpr int64_t kRowTile = 4;  // rows of x sharing one load of the weights

// out [R, C0 .. C0 + kPassVectors kLanes) = x's R rows times the block's columns C0.. (block
// offset `first` vectors), minus the row sums. xg: [R][G][4] int32, the activations of rows
// 4g + t + j K4 (t = 0..3) packed as bytes for field j.
template <int R>
void Pass(const int32_t* xg, int64_t groups, const uint8_t* block, int64_t first,
          const int32_t* row_sums, int32_t* out, int64_t out_stride) {
  Vec acc[R][kPassVectors];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPassVectors; ++c) acc[r][c] = Zero();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = block + g * kGroupBytes + first * kLanes * 4;
    for (int c = 0; c < kPassVectors; ++c) {
      const Vec v = Load(p + c * kLanes * 4);
      const Vec w0 = Field<0>(v), w1 = Field<1>(v), w2 = Field<2>(v), w3 = Field<3>(v);
      for (int r = 0; r < R; ++r) {
        const int32_t* x = xg + (r * groups + g) * 4;
        acc[r][c] = Dot(Dot(Dot(Dot(acc[r][c], w0, Set1(x[0])), w1, Set1(x[1])), w2, Set1(x[2])),
                        w3, Set1(x[3]));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const Vec sum = Set1(row_sums[r]);
    for (int c = 0; c < kPassVectors; ++c)
      Store(out + r * out_stride + (first + c) * kLanes, Sub(acc[r][c], sum));
  }
}

// out [R, 64 columns of block] for x's R rows.
template <int R>
void Block(const int32_t* xg, int64_t groups, const uint8_t* block, const int32_t* row_sums,
           int32_t* out, int64_t out_stride) {
  for (int64_t first = 0; first < kBlockColumns / kLanes; first += kPassVectors)
    Pass<R>(xg, groups, block, first, row_sums, out, out_stride);
}

// ---- one call: units shared by the caller and the pool ------------------------------------

constexpr int64_t kUnitRows = 16;  // rows of x per work unit (units: blocks x row ranges)

struct Shared {
  std::vector<int32_t> xg, row_sums;  // xg: [M, G, 4]
  int64_t m, groups, blocks, units;
  const uint8_t* tiles;
  int32_t* out;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void Run(int64_t u) {  // block u % blocks, rows (u / blocks) * kUnitRows ..
    const int64_t b = u % blocks, r_end = std::min(m, (u / blocks + 1) * kUnitRows);
    const uint8_t* block = tiles + b * groups * kGroupBytes;
    const int64_t np = blocks * kBlockColumns;
    for (int64_t r0 = (u / blocks) * kUnitRows; r0 < r_end; r0 += kRowTile) {
      const int32_t* x = xg.data() + r0 * groups * 4;
      const int32_t* sums = row_sums.data() + r0;
      int32_t* o = out + r0 * np + b * kBlockColumns;
      switch (std::min<int64_t>(r_end - r0, kRowTile)) {
        case 4: Block<4>(x, groups, block, sums, o, np); break;
        case 3: Block<3>(x, groups, block, sums, o, np); break;
        case 2: Block<2>(x, groups, block, sums, o, np); break;
        default: Block<1>(x, groups, block, sums, o, np); break;
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
};

ffi::Error TernaryMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                             ffi::Buffer<ffi::U8> tiles, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto td = tiles.dimensions();
  if (xd.size() != 2 || td.size() != 3 || td[2] != kGroupBytes)
    return ffi::Error::InvalidArgument("ternary matmul wants x [M, K] and tiles [NB, G, 256]");
  const int64_t m = xd[0], k = xd[1], blocks = td[0], groups = td[1], k4 = 4 * groups;
  if (k > 4 * k4)
    return ffi::Error::InvalidArgument("ternary matmul: x has more columns than the tiles rows");
  auto shared = std::make_shared<Shared>();
  shared->m = m, shared->groups = groups, shared->blocks = blocks;
  shared->tiles = tiles.typed_data(), shared->out = out->typed_data();
  shared->units = blocks * ((m + kUnitRows - 1) / kUnitRows);
  // x [M, K] -> xg [M, G, 4]: int32 (r, g, j) packs x[r, 4g + t + j K4] for t = 0..3 (0 past K).
  shared->xg.assign(m * k4, 0);
  shared->row_sums.assign(m, 0);
  const int8_t* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r) {
    int32_t sum = 0;
    auto* bytes = reinterpret_cast<int8_t*>(shared->xg.data() + r * k4);
    for (int64_t j = 0; j < 4; ++j) {
      for (int64_t i = 0; i < k4 && i + j * k4 < k; ++i) {
        const int8_t v = xs[r * k + i + j * k4];
        bytes[16 * (i / 4) + 4 * j + i % 4] = v;
        sum += v;
      }
    }
    shared->row_sums[r] = sum;
  }
  // Share the work with the pool only when the call is long: handing a unit to a pool
  // thread costs more than a decode-sized product (measured with the I2 kernel: 84 batch-1
  // products of the 125m geometry took 5.2 ms with helpers, 3.1-3.9 ms without).
  const bool threaded = m * k4 * blocks * kBlockColumns >= (int64_t{1} << 22);
  const int64_t helpers =
      threaded ? std::min<int64_t>(pool.num_threads(), shared->units - 1) : 0;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->finished.load() == shared->units; });
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
