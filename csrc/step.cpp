// The cached sampler's pixel step on the CPU: the ops of fastpixel/sampling/engines/fused.py's step
// plan (the Triton kernels in kernels/), run in order over the same buffers; and, for the
// masked families (PixelCNN, Gated PixelCNN), a pixel's sub-step plans (fastpixel/sampling/caches/masked.py)
// as products and categorical draws, packed by fastpixel/sampling/engines/cext.py.
//
// A step is a flat array of op descriptors, packed once by fastpixel/sampling/engines/cext.py from the
// plan's bound launches: each op holds exactly the arguments its Triton kernel gets, with
// tensors as raw addresses and strides in elements. One call of fp_run_* runs a whole step,
// so a pixel costs one call from Python instead of hundreds of PyTorch operators.
//
// Exactness: built with -ffp-contract=off, so the mixture draw rounds every operation as
// PyTorch does (its products and sums are separate) with libm's exp, log, log1p and tanh;
// the convolutions ask for fused multiply-adds themselves (std::fma) and take e^x from the
// vectorisable functions below (a few ulps), which only changes their rounding, well
// within the cache's tolerances.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <unistd.h>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum Kind : int64_t {
    COLUMN_CONV = 0, COLUMN_COPY = 1, SAMPLE_PIXEL = 2, ADVANCE = 3, ROW_SHIFT = 4, ROW_WRITE = 5, ROW_CONV = 6,
    NONLOCAL = 7, PRODUCT = 8, CATEGORICAL_DRAW = 9
};
enum Nonlinearity : int64_t { IDENTITY = 0, ELU = 1, RELU = 2, CONCAT_ELU = 3 };
constexpr int SLOTS = 40;  // int64 slots of one op descriptor (kept in step with fastpixel/sampling/engines/cext.py)

// One op: its kind, then its arguments in the order of the Triton kernel's signature.
struct Op {
    int64_t kind;
    int64_t a[SLOTS - 1];
    template <class P> P* ptr(int i) const { return reinterpret_cast<P*>(a[i]); }
};

int64_t position(const Op& op, int slot) { return *op.ptr<const int32_t>(slot); }

// Each kind's slot of its batch size (the number of images; an advance has none).
constexpr int BATCH_SLOT[] = {17, 7, 5, -1, 2, 6, 26, 8, 2, 2};

// The images a thread works on. A call with enough images is one parallel region (see
// run): each thread runs every op of it on its own contiguous slice of the batch, so the
// threads meet only where the position advances. Outside it, the slice is the whole batch.
struct Share {
    int thread = 0, threads = 1;
    // This thread's images of the op's batch: the first, and how many.
    std::pair<int64_t, int64_t> of(const Op& op) const {
        const int64_t batch = op.a[BATCH_SLOT[op.kind]], b0 = batch * thread / threads;
        return {b0, batch * (thread + 1) / threads - b0};
    }
};

// p + b0 * stride, for an operand that may be absent (nullptr).
template <class P> P* from_image(P* p, int64_t stride, int64_t b0) { return p == nullptr ? p : p + b0 * stride; }

// Whether a single op may share its work among threads: it is big enough, and no
// parallel region (a call's shared batch) has the threads already.
bool worth_threads(bool big) {
#ifdef _OPENMP
    return big && !omp_in_parallel();
#else
    return big;
#endif
}

// e^x and e^x - 1 without libm calls, so that the loops over channels that use them
// vectorise: x = k ln2 + r (Cody-Waite: r exact), |r| <= ln2 / 2, e^r - 1 by its Taylor
// series to below an ulp, then e^x - 1 = 2^k (e^r - 1) + (2^k - 1), which has no
// cancellation (k = 0: e^r - 1 itself; k < 0: a result below -0.29). A few ulps in all;
// x is clamped where e^x leaves the normal numbers (the results there are 0, -1 or huge).
template <class T> struct ExpConstants;
template <> struct ExpConstants<float> {
    using Bits = int32_t;
    static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f, lowest = -87.0f, highest = 88.0f;
    static constexpr int degree = 9, bias = 127, mantissa = 23;
};
template <> struct ExpConstants<double> {
    using Bits = int64_t;
    static constexpr double ln2_hi = 0.693145751953125, ln2_lo = 1.42860682030941723212e-6, lowest = -708.0,
                            highest = 709.0;
    static constexpr int degree = 13, bias = 1023, mantissa = 52;
};

// x = k ln2 + r: returns e^r - 1 and sets scale = 2^k.
template <class T> inline T reduced_expm1(T x, T& scale) {
    using C = ExpConstants<T>;
    x = x < C::lowest ? C::lowest : (x > C::highest ? C::highest : x);
    const T k = std::nearbyint(x * T(1.44269504088896340736));
    const T r = (x - k * C::ln2_hi) - k * C::ln2_lo;
    const typename C::Bits bits = (static_cast<typename C::Bits>(k) + C::bias) << C::mantissa;
    std::memcpy(&scale, &bits, sizeof(T));
    T factorial = 1;
    for (int i = 2; i <= C::degree; ++i) factorial *= i;
    T q = T(1) / factorial;  // Horner on 1/i!, from i = degree down to 1
    for (int i = C::degree - 1; i >= 1; --i) {
        factorial /= (i + 1);
        q = q * r + T(1) / factorial;
    }
    return q * r;
}

template <class T> inline T fast_expm1(T x) {
    T scale;
    const T e = reduced_expm1(x, scale);
    return scale * e + (scale - T(1));
}

template <class T> inline T fast_exp(T x) {
    T scale;
    const T e = reduced_expm1(x, scale);
    return scale * (T(1) + e);
}

// nl(x) for one batch row: raw channels in, factor * raw channels out (concat_elu: [x, -x]).
template <class T> void fresh(const T* x, int64_t raw, int64_t kind, T* out) {
    if (kind == ELU || kind == CONCAT_ELU) {
        for (int64_t i = 0; i < raw; ++i) out[i] = x[i] > 0 ? x[i] : fast_expm1(x[i]);
        if (kind == CONCAT_ELU)
            for (int64_t i = 0; i < raw; ++i) out[raw + i] = -x[i] > 0 ? -x[i] : fast_expm1(-x[i]);
    } else if (kind == RELU) {
        for (int64_t i = 0; i < raw; ++i) out[i] = x[i] > 0 ? x[i] : T(0);
    } else {
        for (int64_t i = 0; i < raw; ++i) out[i] = x[i];
    }
}

// The micro-kernel's tile of outputs, held in registers: ROWS rows by REGISTERS vector
// registers of REGISTER bytes (the instruction set's). The accumulators leave a register
// for each of the tile's weight vectors and one for the broadcast input; more spill to the
// stack on every multiply-add (AVX-512's tile of 24 registers of 64 bytes is 48 of AVX2's
// 16 registers of 32 bytes).
#if defined(__AVX512F__)
constexpr int REGISTER = 64;  // 32 registers
#elif defined(__AVX__)
constexpr int REGISTER = 32;  // 16 registers
#elif defined(__ARM_NEON)
constexpr int REGISTER = 16;  // 32 registers
#else
constexpr int REGISTER = 16;  // SSE2's 16 registers, or a guess
#endif
template <int ROWS_, int REGISTERS_> struct Tile {
    static constexpr int ROWS = ROWS_, REGISTERS = REGISTERS_;
    template <class T> static constexpr int COLUMNS = REGISTERS * REGISTER / sizeof(T);
};

// Per instruction set, a tile for a row's products (many rows) and one for a pixel's (a
// row per image). AVX-512's pixel tile is taller and narrower; one thread, 24 filters in
// turn, GFLOP/s with 6 x 4 registers against 12 x 2, each on panels of its own width: 8 x
// 640 @ 640 x 320 80 against 107, 16 x 640 @ 640 x 320 120 against 138, 8 x 256 @ 256 x
// 128 132 against 173. A row's 224 x 768 @ 768 x 128 gave 180 against 191 there, but 14 x 2
// tiles for both made whole samplings' rows 3 to 5% slower. With AVX2, 12 x 1 and 4 x 3
// lost to 6 x 2 everywhere.
#if defined(__AVX512F__)
using RowTile = Tile<6, 4>;     // 24 accumulators
using PixelTile = Tile<12, 2>;  // 24
#elif defined(__ARM_NEON)
using RowTile = Tile<6, 4>;  // 24 of 32
using PixelTile = RowTile;
#else
using RowTile = Tile<6, 2>;  // 12 of 16
using PixelTile = RowTile;
#endif

// A filter (k, n) as the tiles read it, laid out once by fastpixel/sampling/engines/cext.py
// (`engine_filter`): panels of `panel` columns (the width of the build's row or pixel tile,
// fp_panel_columns; each op says its filters' width), each k x panel contiguous, the last
// one narrower, so that a tile streams its weights in order. Row-major, a tile
// read a cache line every n values: the hardware prefetches that less well, and a
// power-of-two n maps the lines to a few cache sets. Measured on the project's Xeon, one
// thread, microseconds before and after, native and x86-64-v3: a pixel's product at batch 1
// (1 x 640 @ 640 x 320) 10.5 -> 8.0 and 20.7 -> 11.9; at batch 16 39.2 -> 35.6 and
// 67.7 -> 57.4; a row's (512 x 960 @ 960 x 320) 1791 -> 1691 and 2953 -> 2871.
template <class T> struct Filter {
    const T* w;
    int64_t k, n, panel;
    int64_t start(int64_t i) const { return i - i % panel; }                       // of column i's panel
    const T* column(int64_t i) const { return w + start(i) * k + (i - start(i)); }  // weight (0, i)
    int64_t stride(int64_t i) const { return std::min(panel, n - start(i)); }      // from (kk, i) to (kk + 1, i)
};

// GCC's tuning for AVX-512 CPUs prefers 256-bit vectors: the tile would take twice the
// registers there are. Asked for 512-bit ones, the tile runs 1.7 times as fast (a product
// of the rows, 448 x 768 @ 768 x 128, on the project's Xeon, one thread).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define TILE_TARGET __attribute__((target("prefer-vector-width=512")))
#else
#define TILE_TARGET
#endif

// How far ahead of the weights it multiplies a tile asks for the next ones (x86's
// prefetch never faults, past a filter's end included). A pixel's filters stream from
// memory once per pixel (14 to 42 MB for CIFAR's model), and an AVX2 tile waited for them:
// on the project's AMD EPYC (Zen, AVX-512 too), x86-64-v3 build, one thread, 24 filters in
// turn, GFLOP/s without and with: 8 x 640 @ 640 x 320 48, 49 -> 67, 60; 16 x 640 @ 640 x
// 320 74, 69 -> 87, 84; whole CIFAR samplings at batch 16, pixels 2.18 -> 1.61 s (medians
// of three side by side). The AVX-512 build there lost a little with it (CIFAR batch 16
// pixels 1.05 -> 1.16 s) and so goes without; other instruction sets were not measured.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t PREFETCH_BYTES = 2048;
#else
constexpr int64_t PREFETCH_BYTES = 0;
#endif

// A product's left operand, read where it lies: m rows, each `pieces` runs of `length`
// contiguous values, run p of row i at runs[p * m + i]. A row convolution's rows are its
// output positions' windows, a run per kernel row and column in the cache's rows: copying
// them out as an m x k matrix took a twentieth of a sampling's time.
template <class T> struct Windows {
    const T* const* runs;
    int64_t m, pieces, length;
};

// acc[m, i] += sum_k v[m, k] * w[k, i] for a ROWS x COLS tile held in registers while the
// whole k loop runs, so each weight row is read once per tile instead of once per row; k
// in order, run after run, as one loop over it would. The tile's weights start at
// w = weight (0, i0), each next k ldw further on (the tile lies within one panel).
// Not inlined: in a function of its own the compiler keeps the tile in registers.
template <class T, int ROWS, int COLS>
__attribute__((noinline)) TILE_TARGET void tile(const Windows<T>& v, const T* w, int64_t ldw, T* acc, int64_t lda,
                                                int64_t m0, int64_t i0) {
    T c[ROWS][COLS];
    for (int r = 0; r < ROWS; ++r)
        for (int j = 0; j < COLS; ++j) c[r][j] = acc[(m0 + r) * lda + i0 + j];
    const int64_t ahead = std::max<int64_t>(1, PREFETCH_BYTES / (ldw * int64_t(sizeof(T)))) * ldw;  // elements
    for (int64_t p = 0; p < v.pieces; ++p) {
        const T* vr[ROWS];
        for (int r = 0; r < ROWS; ++r) vr[r] = v.runs[p * v.m + m0 + r];
        const T* wp = w + p * v.length * ldw;
        for (int64_t kk = 0; kk < v.length; ++kk) {
            const T* wr = wp + kk * ldw;
            if constexpr (PREFETCH_BYTES > 0)  // every cache line of the tile's weights `ahead` on
                for (int line = 0; line < COLS * int(sizeof(T)); line += 64)
                    __builtin_prefetch(wr + ahead + line / int(sizeof(T)), 0, 2);
            for (int r = 0; r < ROWS; ++r)
#pragma omp simd  // GCC leaves a fully unrolled row of 16 or fewer columns scalar, 50x slower
                for (int j = 0; j < COLS; ++j) c[r][j] = std::fma(vr[r][kk], wr[j], c[r][j]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int j = 0; j < COLS; ++j) acc[(m0 + r) * lda + i0 + j] = c[r][j];
}

// Columns [i0, i0 + cols) of one panel, rows [m0, m0 + ROWS): tiles of COLS columns while
// they fit, then of half as many, down to single columns.
template <class T, int ROWS, int COLS>
void panel_columns(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda, int64_t m0, int64_t i0,
                   int64_t cols) {
    const int64_t end = i0 + cols, ldw = w.stride(i0);
    for (; i0 + COLS <= end; i0 += COLS) tile<T, ROWS, COLS>(v, w.column(i0), ldw, acc, lda, m0, i0);
    if constexpr (COLS > 1) panel_columns<T, ROWS, COLS / 2>(v, w, acc, lda, m0, i0, end - i0);
}

// Columns [i0, i0 + cols), panel by panel, so that no tile crosses a panel's edge.
template <class T, class S, int ROWS>
void tile_columns(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda, int64_t m0, int64_t i0,
                  int64_t cols) {
    for (const int64_t end = i0 + cols; i0 < end;) {
        const int64_t next = std::min(end, w.start(i0) + w.panel);
        panel_columns<T, ROWS, S::template COLUMNS<T>>(v, w, acc, lda, m0, i0, next - i0);
        i0 = next;
    }
}

// The last `rows` (fewer than a tile's) rows from m0, together.
template <class T, class S, int ROWS = S::ROWS - 1>
void last_rows(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda, int64_t m0, int64_t rows, int64_t i0,
               int64_t cols) {
    if constexpr (ROWS > 0) {
        if (rows == ROWS) return tile_columns<T, S, ROWS>(v, w, acc, lda, m0, i0, cols);
        last_rows<T, S, ROWS - 1>(v, w, acc, lda, m0, rows, i0, cols);
    }
}

// Rows [m0, end): a tile's rows at a time, the last few together.
template <class T, class S>
void tile_rows(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda, int64_t m0, int64_t end, int64_t i0,
               int64_t cols) {
    for (; m0 + S::ROWS <= end; m0 += S::ROWS) tile_columns<T, S, S::ROWS>(v, w, acc, lda, m0, i0, cols);
    last_rows<T, S>(v, w, acc, lda, m0, end - m0, i0, cols);
}

// A product is shared among OpenMP threads (PyTorch's own pool: the library links the
// libgomp that torch has loaded) when it has this many multiply-adds, or streams this many
// weights (a pixel's step at batch 1 is bound by reading them; two cores read twice as
// fast, and each keeps its half in its own cache). Below both, a parallel region costs more
// than it saves, and on a busy machine a descheduled thread stalls the others at its end.
constexpr int64_t PARALLEL_WORK = 1 << 20, PARALLEL_WEIGHTS = 1 << 14;
constexpr int64_t PARALLEL_ELEMENTS = 1 << 16;  // a row's gathers and epilogue: copies, a few operations each
constexpr int64_t FEW_TILES = 4;  // a product with no more tiles of rows is shared by its columns first

// acc (m, lda)[:, :n] += v (m, pieces * length) @ w (pieces * length, n), w laid out as a
// Filter, in tiles of shape S. The threads share tasks of a block of rows by a block of
// whole panels, at least 8 of them when the rows allow. A few rows (a pixel's, one per
// image): every task takes one tile of rows by a panel (half a panel, at least 128 bytes,
// from a single tile of rows), panel after panel, so that each thread streams about its
// share of the weights and the threads' tasks differ by one at most. Taking the whole
// batch's rows and splitting only the columns in blocks of 64, CIFAR's pixels at batch 16
// (16 rows, 320 columns) gave one thread three times the other's work.
template <class T, class S> void gemm_tiles(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda) {
    const int64_t m = v.m, k = v.pieces * v.length, n = w.n;
    [[maybe_unused]] const bool parallel = worth_threads(m * k * n >= PARALLEL_WORK || k * n >= PARALLEL_WEIGHTS);
    if (m <= FEW_TILES * S::ROWS) {
        const int64_t width = m <= S::ROWS ? std::max<int64_t>(w.panel / 2, 128 / sizeof(T)) : w.panel;
        const int64_t row_tiles = (m + S::ROWS - 1) / S::ROWS, tasks = row_tiles * ((n + width - 1) / width);
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t i0 = task / row_tiles * width, m0 = task % row_tiles * S::ROWS;
            tile_rows<T, S>(v, w, acc, lda, m0, std::min(m, m0 + S::ROWS), i0, std::min(width, n - i0));
        }
        return;
    }
    const int64_t column_block = w.panel * ((256 / static_cast<int64_t>(sizeof(T)) + w.panel - 1) / w.panel);
    const int64_t column_blocks = (n + column_block - 1) / column_block;
    const int64_t wanted = (8 + column_blocks - 1) / column_blocks;
    const int64_t row_block = S::ROWS * (((m + wanted - 1) / wanted + S::ROWS - 1) / S::ROWS);
    const int64_t row_blocks = (m + row_block - 1) / row_block;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
        for (int64_t cb = 0; cb < column_blocks; ++cb) {
            const int64_t i0 = cb * column_block, m0 = rb * row_block;
            tile_rows<T, S>(v, w, acc, lda, m0, std::min(m, m0 + row_block), i0, std::min(column_block, n - i0));
        }
    }
}

// The same in the tiles whose width the filter's panels have (the row tile's otherwise).
template <class T> void gemm(const Windows<T>& v, const Filter<T>& w, T* acc, int64_t lda) {
    if (w.panel == PixelTile::COLUMNS<T>) return gemm_tiles<T, PixelTile>(v, w, acc, lda);
    gemm_tiles<T, RowTile>(v, w, acc, lda);
}

// The same, v a matrix (m, ldv)[:, :w.k].
template <class T> void gemm(const T* v, int64_t m, int64_t ldv, const Filter<T>& w, T* acc, int64_t lda) {
    thread_local std::vector<const T*> rows;  // grown once, reused by every later product
    rows.resize(m);
    for (int64_t i = 0; i < m; ++i) rows[i] = v + i * ldv;
    gemm(Windows<T>{rows.data(), m, 1, w.k}, w, acc, lda);
}

// One output position's accumulated values into its output: with a residual x, the gate
// x + a * sigmoid(b) of the halves (a, b) of its 2n values; without, its n values as they are.
template <class T> void epilogue(const T* row, const T* x, int64_t n, T* out) {
    if (x != nullptr) {
        for (int64_t i = 0; i < n; ++i) out[i] = x[i] + row[i] * (T(1) / (T(1) + fast_exp(-row[n + i])));
    } else {
        std::memcpy(out, row, n * sizeof(T));
    }
}

// kernels/column_conv.py: one output column of a shifted convolution for the thread's images.
template <class T> void column_conv(const Op& op, const Share& share, std::vector<T>& acc, std::vector<T>& scratch) {
    const int64_t* a = op.a;
    const auto [b0, batch] = share.of(op);
    const int64_t scb = a[2], scc = a[3];
    T* cache = from_image(op.ptr<T>(1), scb, b0);
    const T* weight = op.ptr<const T>(4);
    const int64_t stb = a[6], stc = a[7];
    const T* term = from_image(op.ptr<const T>(5), stb, b0);
    const int64_t sxb = a[9];
    const T* x = from_image(op.ptr<const T>(8), sxb, b0);
    const int64_t ssb = a[11];
    const T* skip = from_image(op.ptr<const T>(10), ssb, b0);
    const T* skip_w = op.ptr<const T>(12);
    const int64_t srb = a[14];
    const T* res = from_image(op.ptr<const T>(13), srb, b0);
    const int64_t sob = a[16];
    T* out = from_image(op.ptr<T>(15), sob, b0);
    const int64_t n = a[18], cin = a[19], x_raw = a[20], s_raw = a[21],
                  width = a[22], col_shift = a[23];
    const int64_t kw = a[24], stride = a[25], level = a[26], has_x = a[27], store = a[28], nlk = a[29],
                  has_skip = a[30], skip_nl = a[31], gate = a[32], panel = a[33];

    const int64_t col = (position(op, 0) % width) >> level;
    const int64_t first = stride * col + col_shift;
    const int64_t n_out = gate ? 2 * n : n;
    acc.resize(batch * n_out);
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < n_out; ++i) acc[b * n_out + i] = term[b * stb + col * stc + i];

    // The windows (batch, kw * cin): the cache's columns (zeros left of the padding), then
    // with x the fresh column nl(x), also stored into the cache when asked.
    const int64_t s_channels = skip_nl == CONCAT_ELU ? 2 * s_raw : s_raw;
    const int64_t window = kw * cin;
    scratch.resize(batch * (window > s_channels ? window : s_channels));
    T* columns = scratch.data();
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t j = 0; j < kw; ++j) {
            const int64_t at = first + j;
            T* dst = columns + b * window + j * cin;
            if (has_x && j == kw - 1) {
                fresh(x + b * sxb, x_raw, nlk, dst);
                if (store) std::memcpy(cache + b * scb + at * scc, dst, cin * sizeof(T));
            } else if (at < 0) {
                std::memset(dst, 0, cin * sizeof(T));
            } else {
                std::memcpy(dst, cache + b * scb + at * scc, cin * sizeof(T));
            }
        }
    }
    gemm(columns, batch, window, Filter<T>{weight, window, n_out, panel}, acc.data(), n_out);

    if (has_skip) {  // + nl(skip) @ skip_weight, a 1x1 layer on another input (never with the gate)
        for (int64_t b = 0; b < batch; ++b) fresh(skip + b * ssb, s_raw, skip_nl, columns + b * s_channels);
        gemm(columns, batch, s_channels, Filter<T>{skip_w, s_channels, n, panel}, acc.data(), n_out);
    }

    for (int64_t b = 0; b < batch; ++b) epilogue(acc.data() + b * n_out, gate ? res + b * srb : nullptr, n, out + b * sob);
}

// kernels/column_copy.py: a column's channels from one buffer to another.
int64_t column_at(int64_t p, int64_t width, const int64_t* f) {  // level, scale, offset, row_mask, row_columns
    return f[1] * ((p % width) >> f[0]) + f[2] + (((p / width) >> f[0]) & f[3]) * f[4];
}

template <class T> void column_copy(const Op& op, const Share& share) {
    const int64_t* a = op.a;
    const int64_t ssb = a[2], ssc = a[3], sdb = a[5], sdc = a[6], count = a[8], width = a[9];
    const auto [b0, batch] = share.of(op);
    const T* src = from_image(op.ptr<const T>(1), ssb, b0);
    T* dst = from_image(op.ptr<T>(4), sdb, b0);
    const int64_t p = position(op, 0);
    const int64_t s = column_at(p, width, a + 10), d = column_at(p, width, a + 15);
    for (int64_t b = 0; b < batch; ++b) {
        const T* from = src + b * ssb + s * ssc;
        T* to = dst + b * sdb + d * sdc;
        for (int64_t i = 0; i < count; ++i) to[i] = from[i];
    }
}

// kernels/mixture_sample.py (fastpixel.mixture.sample on one pixel): uniforms clamped and
// transformed in float64, Gumbel-max with the first index of the largest (or of a NaN),
// each channel's coupled mean in PyTorch's order, snapped with round-half-to-even.
double uniform(double u) {
    const double low = 2.2250738585072014e-308, high = 1.0 - 0x1p-53;
    return u < low ? low : (u > high ? high : u);  // keeps NaN, as clamp does
}

template <class T> T snap(T y) {
    T z = (y + T(1)) * T(127.5);
    z = std::nearbyint(z);  // round half to even in the default rounding mode
    z = z < T(0) ? T(0) : (z > T(255) ? T(255) : z);
    return z / T(127.5) - T(1);
}

template <class T> void sample_pixel(const Op& op, const Share& share) {
    const int64_t* a = op.a;
    const int64_t k = a[6], pixels = a[7], channels = a[8], has_image = a[9];
    const auto [b0, batch] = share.of(op);
    const int64_t p = position(op, 2);
    const int64_t num_params = k * (1 + 2 * channels + (channels == 3 ? 3 : 0));
    const T* params = from_image(op.ptr<const T>(0), num_params, b0);
    const double* noise = from_image(op.ptr<const double>(1), (k + channels) * pixels, b0);
    T* out = from_image(op.ptr<T>(3), channels, b0);
    T* image = from_image(op.ptr<T>(4), channels * pixels, b0);
    for (int64_t b = 0; b < batch; ++b) {
        const T* prm = params + b * num_params;
        const double* u = noise + b * (k + channels) * pixels + p;
        int64_t comp = -1;
        T best = T(0);
        for (int64_t i = 0; i < k; ++i) {
            const T v = prm[i] + static_cast<T>(-std::log(-std::log(uniform(u[i * pixels]))));
            if (v != v) { comp = i; break; }  // argmax returns the first NaN
            if (comp < 0 || v > best) { comp = i; best = v; }
        }
        T x[3];
        for (int64_t c = 0; c < channels; ++c) {
            const T mean = prm[k * (1 + c) + comp];
            T log_scale = prm[k * (1 + channels + c) + comp];
            log_scale = log_scale < T(-7) ? T(-7) : log_scale;
            const T scale = static_cast<T>(std::exp(static_cast<double>(log_scale)));
            const double uc = uniform(u[(k + c) * pixels]);
            const T logistic = static_cast<T>(std::log(uc) - std::log1p(-uc));
            T coupled = mean;
            if (c == 1) {
                coupled = mean + static_cast<T>(std::tanh(static_cast<double>(prm[k * 7 + comp]))) * x[0];
            } else if (c == 2) {
                const T beta = static_cast<T>(std::tanh(static_cast<double>(prm[k * 8 + comp])));
                const T gamma = static_cast<T>(std::tanh(static_cast<double>(prm[k * 9 + comp])));
                coupled = (mean + beta * x[0]) + gamma * x[1];
            }
            x[c] = snap(coupled + scale * logistic);
            out[b * channels + c] = x[c];
            if (has_image) image[(b * channels + c) * pixels + p] = x[c];
        }
    }
}

// ---------------------------------------------------------------- the per-row work
// CachedNetwork.start_row (fastpixel/sampling/caches/pixelcnnpp.py) as ops (packed by engines/cext.py):
// whole rows of the u stream and the per-row terms of the ul stream, as shifts of the
// caches' rows, writes of a fresh row, and row convolutions.

// _ConvCache.new_row: every row moves up one, the newest becomes zeros. rows (B, kh, row).
template <class T> void row_shift(const Op& op, const Share& share) {
    const int64_t sb = op.a[1], kh = op.a[3], row = op.a[4];
    const auto [b0, batch] = share.of(op);
    T* rows = from_image(op.ptr<T>(0), sb, b0);
    for (int64_t b = 0; b < batch; ++b) {
        T* r = rows + b * sb;
        if (kh > 1) std::memmove(r, r + row, (kh - 1) * row * sizeof(T));
        std::memset(r + (kh - 1) * row, 0, row * sizeof(T));
    }
}

// _ConvCache.write of a whole row: dst[b, j] = nl(x[b, j]) for the row's columns.
template <class T> void row_write(const Op& op, const Share& share) {
    const int64_t* a = op.a;
    const int64_t sxb = a[1], sxj = a[2], sdb = a[4], sdj = a[5], width = a[7], raw = a[8], nl = a[9];
    const auto [b0, batch] = share.of(op);
    const T* x = from_image(op.ptr<const T>(0), sxb, b0);
    T* dst = from_image(op.ptr<T>(3), sdb, b0);
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t j = 0; j < width; ++j) fresh(x + b * sxb + j * sxj, raw, nl, dst + b * sdb + j * sdj);
}

// A row of a shifted convolution (or of the transposed one's 2x2 blocks): for each output
// column j, out[b, j] = bias[b] + sum over the kernel's rows and columns t of
// src[b, row, stride * j + t] @ w[row, t] (columns at or past src_cols read as zeros),
// + nl(skip[b, j]) @ skip_w; then the gate x + a * sigmoid(b) with x = res[b, j], and
// out += that with `accumulate`. Columns of all images make the rows of one product.
template <class T> void row_conv(const Op& op, const Share& share, std::vector<T>& acc, std::vector<T>& scratch) {
    const int64_t* a = op.a;
    const int64_t ssb = a[1], ssr = a[2], ssj = a[3], nrows = a[4], cin = a[5], kw = a[6], stride = a[7],
                  src_cols = a[8];
    const auto [b0, batch] = share.of(op);
    const T* src = from_image(op.ptr<const T>(0), ssb, b0);
    const T* weight = op.ptr<const T>(9);
    const int64_t sbb = a[11];
    const T* bias = from_image(op.ptr<const T>(10), sbb, b0);
    const int64_t skb = a[13], skj = a[14], s_raw = a[15], skip_nl = a[16];
    const T* skip = from_image(op.ptr<const T>(12), skb, b0);
    const T* skip_w = op.ptr<const T>(17);
    const int64_t srb = a[19], srj = a[20], gate = a[21];
    const T* res = from_image(op.ptr<const T>(18), srb, b0);
    const int64_t sob = a[23], soj = a[24], accumulate = a[25], width = a[27], n = a[28], panel = a[29];
    T* out = from_image(op.ptr<T>(22), sob, b0);

    const int64_t m = batch * width, n_out = gate ? 2 * n : n, k = nrows * kw * cin, pieces = nrows * kw;
    const int64_t s_channels = skip_w ? (skip_nl == CONCAT_ELU ? 2 * s_raw : s_raw) : 0;
    acc.resize(m * n_out);
    scratch.resize(m * s_channels);
    thread_local std::vector<const T*> runs;  // grown once, reused by every later row
    thread_local std::vector<T> zeros;        // the runs of columns past the source's (its padding)
    runs.resize(pieces * m);
    if (static_cast<int64_t>(zeros.size()) < cin) zeros.resize(cin);
    const T** run = runs.data();  // the threads below see other thread_local vectors: these are this one's
    const T* zero = zeros.data();
    [[maybe_unused]] const bool parallel = worth_threads(m * (k > n_out ? k : n_out) >= PARALLEL_ELEMENTS);  // unread without OpenMP
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t at = 0; at < m; ++at) {
        const int64_t b = at / width, j = at % width;
        for (int64_t i = 0; i < n_out; ++i)
            acc[at * n_out + i] = bias[b * sbb + i] + (accumulate && i < n ? out[b * sob + j * soj + i] : T(0));
        for (int64_t r = 0; r < nrows; ++r)
            for (int64_t t = 0; t < kw; ++t) {
                const int64_t column = stride * j + t;
                run[(r * kw + t) * m + at] = column < src_cols ? src + b * ssb + r * ssr + column * ssj : zero;
            }
    }
    gemm(Windows<T>{run, m, pieces, cin}, Filter<T>{weight, k, n_out, panel}, acc.data(), n_out);

    if (skip_w) {
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t at = 0; at < m; ++at)
            fresh(skip + (at / width) * skb + (at % width) * skj, s_raw, skip_nl, scratch.data() + at * s_channels);
        gemm(scratch.data(), m, s_channels, Filter<T>{skip_w, s_channels, n, panel}, acc.data(), n_out);
    }

#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t at = 0; at < m; ++at) {
        const int64_t b = at / width, j = at % width;
        epilogue(acc.data() + at * n_out, gate ? res + b * srb + j * srj : nullptr, n, out + b * sob + j * soj);
    }
}

// ---------------------------------------------------------------- the non-local block
// engines/fused.py GraphableNonLocal (caches/pixelcnnpp.py CachedNonLocal): the key and value
// of the newest position into the cache, attention over the positions reached so far.
template <class T> void affine(const T* x, int64_t in, const T* w, const T* bias, int64_t outs, T* y) {
    for (int64_t i = 0; i < outs; ++i) y[i] = bias[i];
    for (int64_t c = 0; c < in; ++c)
        for (int64_t i = 0; i < outs; ++i) y[i] = std::fma(x[c], w[c * outs + i], y[i]);
}

template <class T> void nonlocal_block(const Op& op, const Share& share, std::vector<T>& scratch) {
    const int64_t* a = op.a;
    const int64_t width = a[1], level = a[2], row_columns = a[3], sxb = a[5], sob = a[7], channels = a[9],
                  inner = a[10], positions = a[21];
    const auto [b0, batch] = share.of(op);
    const int64_t p = position(op, 0);
    const int64_t at = ((p / width) >> level) * row_columns + ((p % width) >> level);
    const T* x = from_image(op.ptr<const T>(4), sxb, b0);
    T* out = from_image(op.ptr<T>(6), sob, b0);
    T* keys = from_image(op.ptr<T>(19), positions * inner, b0);
    T* values = from_image(op.ptr<T>(20), positions * inner, b0);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(inner)));
    scratch.resize(2 * inner + positions);
    T* query = scratch.data();
    T* y = query + inner;
    T* weights = y + inner;
    for (int64_t b = 0; b < batch; ++b) {
        const T* xb = x + b * sxb;
        T* kb = keys + b * positions * inner;
        T* vb = values + b * positions * inner;
        affine(xb, channels, op.ptr<const T>(11), op.ptr<const T>(12), inner, query);
        affine(xb, channels, op.ptr<const T>(13), op.ptr<const T>(14), inner, kb + at * inner);
        affine(xb, channels, op.ptr<const T>(15), op.ptr<const T>(16), inner, vb + at * inner);
        T largest = -INFINITY;
        for (int64_t j = 0; j <= at; ++j) {
            T score = 0;
            for (int64_t i = 0; i < inner; ++i) score = std::fma(kb[j * inner + i], query[i], score);
            weights[j] = score * scale;
            largest = weights[j] > largest ? weights[j] : largest;
        }
        T total = 0;
        for (int64_t j = 0; j <= at; ++j) total += (weights[j] = std::exp(weights[j] - largest));
        for (int64_t i = 0; i < inner; ++i) y[i] = 0;
        for (int64_t j = 0; j <= at; ++j)
            for (int64_t i = 0; i < inner; ++i) y[i] = std::fma(weights[j] / total, vb[j * inner + i], y[i]);
        T* ob = out + b * sob;
        affine(y, inner, op.ptr<const T>(17), op.ptr<const T>(18), channels, ob);
        for (int64_t c = 0; c < channels; ++c) ob[c] += xb[c];
    }
}

// ---------------------------------------------------------------- the masked families
// fastpixel/sampling/caches/masked.py's sub-step plan (PixelCNN, Gated PixelCNN; packed by
// fastpixel/sampling/engines/cext.py): products of an image's values at the current column with a
// weight matrix, and the categorical draw. The column is the pixel position's, mod width.

// An image's values at column j: `count` runs of `length` contiguous elements, `gap` apart,
// from ptr + b * batch_stride + j * column_stride (six slots: ptr, batch_stride,
// column_stride, count, gap, length).
template <class T> struct Runs {
    T* ptr;
    int64_t batch_stride, column_stride, count, gap, length;
    // Image b0's first: b0 is where a thread's slice of the batch begins.
    Runs(const Op& op, int slot, int64_t b0)
        : ptr(from_image(op.ptr<T>(slot), op.a[slot + 1], b0)), batch_stride(op.a[slot + 1]),
          column_stride(op.a[slot + 2]), count(op.a[slot + 3]), gap(op.a[slot + 4]), length(op.a[slot + 5]) {}
    T* at(int64_t b, int64_t j) const { return ptr + b * batch_stride + j * column_stride; }
    bool contiguous() const { return count == 1 || gap == length; }
    // The values of image b into dst (count * length of them), through ReLU when asked.
    void gather(int64_t b, int64_t j, bool relu, T* dst) const {
        for (int64_t r = 0; r < count; ++r) {
            const T* src = at(b, j) + r * gap;
            T* to = dst + r * length;
            if (relu) {
                for (int64_t i = 0; i < length; ++i) to[i] = src[i] > 0 ? src[i] : T(0);
            } else {
                std::memcpy(to, src, length * sizeof(T));
            }
        }
    }
    void scatter(int64_t b, int64_t j, const T* src) const {
        for (int64_t r = 0; r < count; ++r) std::memcpy(at(b, j) + r * gap, src + r * length, length * sizeof(T));
    }
};

enum Epilogue : int64_t { EPILOGUE_NONE = 0, EPILOGUE_RELU = 1, EPILOGUE_GATE = 2 };  // masked.EPILOGUES

// out = epilogue(init + bias + a @ w) for every image, at the position's column: a (K
// values, through ReLU with relu_a) and init (N values) are Runs, w (K, N) and bias (N)
// plain; the gate's N values are halves (x, y) giving N / 2 outputs tanh(x) * sigmoid(y),
// from fast_expm1 and fast_exp like the other gates.
template <class T> void product(const Op& op, const Share& share, std::vector<T>& acc, std::vector<T>& scratch) {
    const int64_t* a = op.a;
    const int64_t width = a[1];
    const auto [b0, batch] = share.of(op);
    const Runs<T> v(op, 3, b0), init(op, 12, b0);
    const bool relu_a = a[9];
    const T* w = op.ptr<const T>(10);
    const int64_t n = a[11];
    const T* bias = op.ptr<const T>(18);
    const int64_t epilogue = a[19];
    const Runs<T> out(op, 20, b0);
    const int64_t j = position(op, 0) % width, k = v.count * v.length;
    const Filter<T> filter{w, k, n, a[26]};

    acc.resize(batch * n);
    for (int64_t b = 0; b < batch; ++b) {
        T* row = acc.data() + b * n;
        if (init.ptr != nullptr) init.gather(b, j, false, row);
        else std::memset(row, 0, n * sizeof(T));
        if (bias != nullptr)
            for (int64_t i = 0; i < n; ++i) row[i] += bias[i];
    }
    if (v.contiguous() && !relu_a) {  // the images' values straight from their buffer
        gemm(v.at(0, j), batch, v.batch_stride, filter, acc.data(), n);
    } else {
        scratch.resize(batch * k);
        for (int64_t b = 0; b < batch; ++b) v.gather(b, j, relu_a, scratch.data() + b * k);
        gemm(scratch.data(), batch, k, filter, acc.data(), n);
    }
    const int64_t half = n / 2;
    for (int64_t b = 0; b < batch; ++b) {
        T* row = acc.data() + b * n;
        if (epilogue == EPILOGUE_RELU) {
            for (int64_t i = 0; i < n; ++i) row[i] = row[i] > 0 ? row[i] : T(0);
        } else if (epilogue == EPILOGUE_GATE) {  // tanh(x) = expm1(2x) / (expm1(2x) + 2): no cancellation near 0
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const T e = fast_expm1(2 * row[i]);
                row[i] = e / ((e + T(2)) * (T(1) + fast_exp(-row[half + i])));  // one division
            }
        }
        out.scatter(b, j, row);
    }
}

// fastpixel.models.masked.categorical.draw for every image: the softmax of the N logits in float64, its
// cumulative sum, the number of entries below the image's uniform (the first at or above
// it: the sum never decreases), clamped to N - 1; e^x from fast_exp, so the sums agree with
// PyTorch's to rounding, as a cached sampler's logits do. Then the level (int64) and its row of
// the input features table (N, F) go to their buffers at the position's column; the
// uniform is at noise + b * noise_stride + position (one colour's plane of the image).
template <class T> void categorical_draw(const Op& op, const Share& share, std::vector<double>& probabilities) {
    const int64_t* a = op.a;
    const int64_t p = position(op, 0), width = a[1];
    const auto [b0, batch] = share.of(op);
    const int64_t logits_stride = a[4], n = a[5];
    const T* logits = from_image(op.ptr<const T>(3), logits_stride, b0);
    const int64_t noise_stride = a[7];
    const double* noise = from_image(op.ptr<const double>(6), noise_stride, b0);
    const T* table = op.ptr<const T>(8);
    const Runs<T> features(op, 9, b0);
    const int64_t level_stride = a[16], level_column = a[17];
    int64_t* level = from_image(op.ptr<int64_t>(15), level_stride, b0);
    const int64_t j = p % width;
    probabilities.resize(n);
    double* e = probabilities.data();
    for (int64_t b = 0; b < batch; ++b) {
        const T* x = logits + b * logits_stride;
        double largest = -INFINITY, total = 0;
#pragma omp simd reduction(max : largest)
        for (int64_t i = 0; i < n; ++i) largest = x[i] > largest ? x[i] : largest;
#pragma omp simd reduction(+ : total)  // vectorised: e^x is most of a draw's time
        for (int64_t i = 0; i < n; ++i) total += (e[i] = fast_exp(static_cast<double>(x[i]) - largest));
        const double u = noise[b * noise_stride + p];
        double cdf = 0;
        int64_t drawn = 0;
        while (drawn < n - 1 && (cdf += e[drawn] / total) < u) ++drawn;
        level[b * level_stride + j * level_column] = drawn;
        features.scatter(b, j, table + drawn * features.count * features.length);
    }
}

// The ops in order, on this thread's share of the images.
template <class T> void run_share(const Op* ops, int64_t count, const Share& share) {
    thread_local std::vector<T> acc, scratch;  // grown once, reused by every later step
    thread_local std::vector<double> probabilities;
    for (int64_t i = 0; i < count; ++i) {
        const Op& op = ops[i];
        switch (op.kind) {
            case COLUMN_CONV: column_conv<T>(op, share, acc, scratch); break;
            case COLUMN_COPY: column_copy<T>(op, share); break;
            case SAMPLE_PIXEL: sample_pixel<T>(op, share); break;
            case ADVANCE: {  // every thread is past the ops that read the position before it moves
#pragma omp barrier
#pragma omp single
                *op.ptr<int32_t>(0) += 1;
                break;
            }
            case ROW_SHIFT: row_shift<T>(op, share); break;
            case ROW_WRITE: row_write<T>(op, share); break;
            case ROW_CONV: row_conv<T>(op, share, acc, scratch); break;
            case NONLOCAL: nonlocal_block<T>(op, share, scratch); break;
            case PRODUCT: product<T>(op, share, acc, scratch); break;
            case CATEGORICAL_DRAW: categorical_draw<T>(op, share, probabilities); break;
        }
    }
}

// An op's filter elements (its products' k x n; 0 for ops without), and the rows each
// product has: a pixel's, one per image; a row's, one per image and output column.
int64_t filter_elements(const Op& op) {
    const int64_t* a = op.a;
    if (op.kind == COLUMN_CONV) {  // window x outputs (doubled by the gate), and the skip's
        const int64_t n = a[18], skip = a[30] ? (a[31] == CONCAT_ELU ? 2 * a[21] : a[21]) * n : 0;
        return a[24] * a[19] * (a[32] ? 2 * n : n) + skip;
    }
    if (op.kind == ROW_CONV) {  // kernel rows x columns x channels x outputs, and the skip's
        const int64_t n = a[28], skip = a[17] ? (a[16] == CONCAT_ELU ? 2 * a[15] : a[15]) * n : 0;
        return a[4] * a[6] * a[5] * (a[21] ? 2 * n : n) + skip;
    }
    return op.kind == PRODUCT ? a[6] * a[8] * a[11] : 0;  // runs x length x outputs
}

int64_t product_rows(const Op& op) { return op.a[BATCH_SLOT[op.kind]] * (op.kind == ROW_CONV ? op.a[27] : 1); }

// The threads share a call's images (each thread's slice through every op, no barrier
// between ops) when each has at least SHARED_IMAGES of them and the call at least
// SHARED_WORK multiply-adds: a small call gains less than the threads' meeting costs, and
// beside other programs a thread that has lost its core makes every call wait for a time
// slice. Nor when a pixel's filters are several times a core's cache and the slices have
// fewer than 8 images: every thread would stream all of them from memory, where sharing
// each product's columns (gemm) halves what each one reads. Measured on CIFAR's 5/160
// model (14 to 42 MB of filters a pixel), seconds of its pixels, products shared against
// images shared (AVX-512 pixels in 6 x 4 tiles then): batch 4, 0.80 against 0.91
// (x86-64-v3 build: 0.79 against 0.97); batch 8, 1.04 against 1.17 (1.14 against 1.12);
// batch 16, 1.48 against 1.35 (1.80 against 1.71).
// The MNIST-size model (4 MB at most) gains from shared images at every batch. Otherwise
// each op shares its own work when it is big enough (gemm, row_conv). Images are
// independent in every op, and each output is summed in one order by one thread either
// way: the same results.
constexpr int64_t SHARED_IMAGES = 2, SHARED_WORK = PARALLEL_WORK, SHARED_STREAMING = 8,
                  CACHES_OF_FILTERS = 4;

int64_t core_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
    static const int64_t bytes = sysconf(_SC_LEVEL2_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL2_CACHE_SIZE) : (1 << 20);
#else
    static const int64_t bytes = 1 << 20;
#endif
    return bytes;
}

template <class T> void run(const Op* ops, int64_t count) {
    int64_t batch = 0, work = 0, pixel_filters = 0;
    for (int64_t i = 0; i < count; ++i) {
        const Op& op = ops[i];
        if (BATCH_SLOT[op.kind] < 0) continue;
        batch = std::max(batch, op.a[BATCH_SLOT[op.kind]]);
        work += product_rows(op) * filter_elements(op);
        if (op.kind != ROW_CONV) pixel_filters += filter_elements(op);
    }
#ifdef _OPENMP
    const int64_t threads = std::min<int64_t>(omp_get_max_threads(), batch / SHARED_IMAGES);
    const bool streaming = pixel_filters * static_cast<int64_t>(sizeof(T)) > CACHES_OF_FILTERS * core_cache_bytes();
    if (threads > 1 && work >= SHARED_WORK && (!streaming || batch / threads >= SHARED_STREAMING)) {
#pragma omp parallel num_threads(threads)
        run_share<T>(ops, count, Share{omp_get_thread_num(), omp_get_num_threads()});
        return;
    }
#endif
    run_share<T>(ops, count, Share{});
}

}  // namespace

extern "C" {
int fp_op_slots() { return SLOTS; }
// The width of the panels (Filter) of a row's filters, or with `pixel` of a pixel's, for
// float32 (element_bytes 4) or float64 (8).
int fp_panel_columns(int element_bytes, int pixel) {
    if (pixel) return element_bytes == 8 ? PixelTile::COLUMNS<double> : PixelTile::COLUMNS<float>;
    return element_bytes == 8 ? RowTile::COLUMNS<double> : RowTile::COLUMNS<float>;
}
// Built with OpenMP (-fopenmp): large products share PyTorch's threads; without (a compiler
// that has none, built with -fopenmp-simd), the engine runs on one thread.
int fp_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
void fp_run_float32(const Op* ops, int64_t count) { run<float>(ops, count); }
void fp_run_float64(const Op* ops, int64_t count) { run<double>(ops, count); }
}
