// samreg_rt._ext: native kernels for mask bookkeeping and ROI matching.
//
// Every function validates the dtype, number of dimensions, shape and C-contiguity of each array
// it receives and raises TypeError (not an ndarray, wrong dtype) or ValueError (wrong ndim,
// shape, layout, values) before touching memory. The loops run with the GIL released.
// Each function has a numpy twin in tests/twins.py that defines its exact semantics.
//
// Packed masks: uint64[N, ceil(H*W/64)]; bit i of word w is pixel w*64+i of the row-major
// flattened H x W mask; padding bits past H*W are zero (kernels that count bits rely on it).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

// pack8/unpack8 move 8 mask bytes through one uint64 and assume byte k is its k-th lowest byte.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "samreg_rt._ext assumes little-endian");

namespace {

// ------------------------------------------------------------------------------------------------
// Validation

std::string shape_str(const py::array &a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        s += std::to_string(a.shape(d));
        if (d + 1 < a.ndim() || a.ndim() == 1) s += ",";
        if (d + 1 < a.ndim()) s += " ";
    }
    return s + ")";
}

// Returns `obj` as an array after checking it is a numpy.ndarray of dtype T with `ndim`
// dimensions, C-contiguous and aligned; `name` and `dtype_name` appear in the messages.
template <typename T>
py::array require(py::handle obj, const char *name, const char *dtype_name, py::ssize_t ndim) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(name) + ": expected a numpy.ndarray of dtype " +
                             dtype_name + ", got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!arr.dtype().equal(py::dtype::of<T>())) {
        throw py::type_error(std::string(name) + ": expected dtype " + dtype_name + ", got " +
                             std::string(py::str(arr.dtype())));
    }
    if (arr.ndim() != ndim) {
        throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                              " dimensions, got " + std::to_string(arr.ndim()) + " with shape " +
                              shape_str(arr));
    }
    const int flags = arr.flags();
    if (!(flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) {
        throw py::value_error(std::string(name) +
                              ": array is not C-contiguous (pass numpy.ascontiguousarray(...))");
    }
    if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_) ||
        reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(T) != 0) {
        throw py::value_error(std::string(name) + ": array data is not aligned for " + dtype_name);
    }
    return arr;
}

// Number of uint64 words that hold `pixels` bits.
inline std::int64_t words_for(std::int64_t pixels) { return (pixels + 63) / 64; }

// The CPUs this process may run on (its affinity mask, which taskset and cgroup cpusets set), at least 1.
std::int64_t usable_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
}

// Raises unless threads >= 0 (a kernel's thread limit; 0: usable_cpus()).
void check_threads(const char *kernel, std::int64_t threads) {
    if (threads < 0)
        throw py::value_error(std::string(kernel) + ": threads must be >= 0 (0: the CPUs this process may run on), got " +
                              std::to_string(threads));
}

// Runs f(begin, end) over [0, n) on up to max_threads threads (0: usable_cpus()) when the total work
// (n * cost_per_item, in rough element operations) makes threads worth starting.
template <typename F>
void parallel_for(std::int64_t n, double cost_per_item, std::int64_t max_threads, F f) {
    constexpr double kMinWorkPerThread = 2.0e5;
    const std::int64_t limit = max_threads > 0 ? max_threads : usable_cpus();
    const auto by_work = static_cast<std::int64_t>(n * cost_per_item / kMinWorkPerThread);
    const std::int64_t threads = std::max<std::int64_t>(1, std::min({limit, n, by_work}));
    if (threads <= 1) {
        f(std::int64_t{0}, n);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    const std::int64_t chunk = (n + threads - 1) / threads;
    for (std::int64_t t = 1; t < threads; ++t) {
        const std::int64_t b = t * chunk, e = std::min(n, b + chunk);
        if (b < e) pool.emplace_back(f, b, e);
    }
    f(std::int64_t{0}, std::min(n, chunk));
    for (auto &th : pool) th.join();
}

// ------------------------------------------------------------------------------------------------
// Popcount kernels, compiled twice: with the POPCNT instruction and without, chosen at run time.

using PairCountFn = void (*)(const std::uint64_t *, const std::uint64_t *, std::int64_t,
                             std::int64_t, std::int64_t, std::int64_t, std::int64_t *);
using RowCountFn = void (*)(const std::uint64_t *, std::int64_t, std::int64_t, std::int64_t,
                            std::int64_t *);

// out[i * nb + j] = popcount(a[i] & b[j]) for rows i in [i0, i1).
__attribute__((always_inline)) inline void pair_counts_body(const std::uint64_t *a,
                                                            const std::uint64_t *b,
                                                            std::int64_t nb, std::int64_t words,
                                                            std::int64_t i0, std::int64_t i1,
                                                            std::int64_t *out) {
    for (std::int64_t i = i0; i < i1; ++i) {
        const std::uint64_t *ra = a + i * words;
        for (std::int64_t j = 0; j < nb; ++j) {
            const std::uint64_t *rb = b + j * words;
            std::int64_t c = 0;
            for (std::int64_t w = 0; w < words; ++w) c += __builtin_popcountll(ra[w] & rb[w]);
            out[i * nb + j] = c;
        }
    }
}

// out[i] = popcount(a[i]) for rows i in [i0, i1).
__attribute__((always_inline)) inline void row_counts_body(const std::uint64_t *a,
                                                           std::int64_t words, std::int64_t i0,
                                                           std::int64_t i1, std::int64_t *out) {
    for (std::int64_t i = i0; i < i1; ++i) {
        const std::uint64_t *ra = a + i * words;
        std::int64_t c = 0;
        for (std::int64_t w = 0; w < words; ++w) c += __builtin_popcountll(ra[w]);
        out[i] = c;
    }
}

__attribute__((target("popcnt"))) void pair_counts_popcnt(const std::uint64_t *a,
                                                          const std::uint64_t *b, std::int64_t nb,
                                                          std::int64_t words, std::int64_t i0,
                                                          std::int64_t i1, std::int64_t *out) {
    pair_counts_body(a, b, nb, words, i0, i1, out);
}
void pair_counts_generic(const std::uint64_t *a, const std::uint64_t *b, std::int64_t nb,
                         std::int64_t words, std::int64_t i0, std::int64_t i1, std::int64_t *out) {
    pair_counts_body(a, b, nb, words, i0, i1, out);
}
__attribute__((target("popcnt"))) void row_counts_popcnt(const std::uint64_t *a,
                                                         std::int64_t words, std::int64_t i0,
                                                         std::int64_t i1, std::int64_t *out) {
    row_counts_body(a, words, i0, i1, out);
}
void row_counts_generic(const std::uint64_t *a, std::int64_t words, std::int64_t i0,
                        std::int64_t i1, std::int64_t *out) {
    row_counts_body(a, words, i0, i1, out);
}

bool have_popcnt() {
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("popcnt") != 0;
    }();
    return has;
}

// Counts |A_i ∩ B_j| into out (int64[na, nb]) and, when given, |A_i|, |B_j| into areas_a/areas_b.
void count_pairs(const std::uint64_t *a, std::int64_t na, const std::uint64_t *b, std::int64_t nb,
                 std::int64_t words, std::int64_t *out, std::int64_t *areas_a,
                 std::int64_t *areas_b) {
    const PairCountFn pair_fn = have_popcnt() ? pair_counts_popcnt : pair_counts_generic;
    const RowCountFn row_fn = have_popcnt() ? row_counts_popcnt : row_counts_generic;
    parallel_for(na, static_cast<double>(nb) * words, 0, [&](std::int64_t i0, std::int64_t i1) {
        pair_fn(a, b, nb, words, i0, i1, out);
        if (areas_a) row_fn(a, words, i0, i1, areas_a);
    });
    if (areas_b) row_fn(b, words, 0, nb, areas_b);
}

void require_same_words(const py::array &a, const py::array &b) {
    if (a.shape(1) != b.shape(1)) {
        throw py::value_error("a_packed and b_packed have mismatched word counts: " +
                              std::to_string(a.shape(1)) + " and " + std::to_string(b.shape(1)) +
                              " (masks of different sizes?)");
    }
}

// ------------------------------------------------------------------------------------------------
// Bit packing

// Packs 8 bool bytes (any non-zero byte is true) into 8 bits, byte k -> bit k.
inline std::uint64_t pack8(const std::uint8_t *p) {
    std::uint64_t x;
    std::memcpy(&x, p, 8);
    constexpr std::uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
    x = (((x & low7) + low7) | x) & 0x8080808080808080ULL;  // 0x80 in each non-zero byte
    x >>= 7;                                               // 0x01 in each non-zero byte
    return (x * 0x0102040810204080ULL) >> 56;              // byte k -> bit k
}

// Spreads 8 bits into 8 bytes of 0/1, bit k -> byte k (little-endian byte order).
inline std::uint64_t unpack8(std::uint8_t bits) {
    // Multiplying by 0x0002040810204081 puts copies of the byte at shifts 0, 7, 14, ..., 49,
    // so bit k of the byte lands at bit 8k; the mask keeps exactly those bits.
    const std::uint64_t b = bits;
    const std::uint64_t spread = ((b & 0x7f) * 0x0002040810204081ULL) & 0x0101010101010101ULL;
    return spread | ((b >> 7) << 56);
}

py::array_t<std::uint64_t> pack_masks(py::handle masks_obj) {
    const py::array masks = require<bool>(masks_obj, "masks", "bool", 3);
    const std::int64_t n = masks.shape(0), pixels = masks.shape(1) * masks.shape(2);
    const std::int64_t words = words_for(pixels);
    py::array_t<std::uint64_t> out({n, words});
    const auto *src = static_cast<const std::uint8_t *>(masks.data());
    std::uint64_t *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        parallel_for(n, static_cast<double>(pixels) / 4, 0, [&](std::int64_t i0, std::int64_t i1) {
            for (std::int64_t i = i0; i < i1; ++i) {
                const std::uint8_t *m = src + i * pixels;
                std::uint64_t *o = dst + i * words;
                const std::int64_t full = pixels / 64;
                for (std::int64_t w = 0; w < full; ++w) {
                    std::uint64_t word = 0;
                    for (int k = 0; k < 8; ++k) word |= pack8(m + w * 64 + k * 8) << (8 * k);
                    o[w] = word;
                }
                if (full < words) {
                    std::uint64_t word = 0;
                    for (std::int64_t p = full * 64; p < pixels; ++p)
                        word |= static_cast<std::uint64_t>(m[p] != 0) << (p - full * 64);
                    o[full] = word;
                }
            }
        });
    }
    return out;
}

py::array_t<bool> unpack_masks(py::handle packed_obj, std::int64_t height, std::int64_t width) {
    const py::array packed = require<std::uint64_t>(packed_obj, "packed", "uint64", 2);
    if (height < 0 || width < 0) {
        throw py::value_error("unpack_masks: height and width must be >= 0, got " +
                              std::to_string(height) + " and " + std::to_string(width));
    }
    if (width != 0 && height > std::numeric_limits<std::int64_t>::max() / 2 / width) {
        throw py::value_error("unpack_masks: height * width overflows");
    }
    const std::int64_t n = packed.shape(0), pixels = height * width;
    const std::int64_t words = words_for(pixels);
    if (packed.shape(1) != words) {
        throw py::value_error("packed: " + std::to_string(packed.shape(1)) +
                              " words per mask, but a " + std::to_string(height) + "x" +
                              std::to_string(width) + " mask needs " + std::to_string(words));
    }
    py::array_t<bool> out({n, height, width});
    const auto *src = static_cast<const std::uint64_t *>(packed.data());
    auto *dst = reinterpret_cast<std::uint8_t *>(out.mutable_data());
    {
        py::gil_scoped_release release;
        parallel_for(n, static_cast<double>(pixels) / 4, 0, [&](std::int64_t i0, std::int64_t i1) {
            for (std::int64_t i = i0; i < i1; ++i) {
                const std::uint64_t *m = src + i * words;
                std::uint8_t *o = dst + i * pixels;
                const std::int64_t full_bytes = pixels / 8;
                for (std::int64_t k = 0; k < full_bytes; ++k) {
                    const auto byte = static_cast<std::uint8_t>(m[k >> 3] >> (8 * (k & 7)));
                    const std::uint64_t bytes = unpack8(byte);
                    std::memcpy(o + 8 * k, &bytes, 8);
                }
                for (std::int64_t p = full_bytes * 8; p < pixels; ++p)
                    o[p] = static_cast<std::uint8_t>((m[p >> 6] >> (p & 63)) & 1U);
            }
        });
    }
    return out;
}

py::array_t<std::int64_t> mask_areas(py::handle packed_obj) {
    const py::array packed = require<std::uint64_t>(packed_obj, "packed", "uint64", 2);
    const std::int64_t n = packed.shape(0), words = packed.shape(1);
    py::array_t<std::int64_t> out(n);
    const auto *src = static_cast<const std::uint64_t *>(packed.data());
    std::int64_t *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        const RowCountFn row_fn = have_popcnt() ? row_counts_popcnt : row_counts_generic;
        row_fn(src, words, 0, n, dst);
    }
    return out;
}

// ------------------------------------------------------------------------------------------------
// Pairwise overlap matrices

py::array_t<std::int64_t> intersection_matrix(py::handle a_obj, py::handle b_obj) {
    const py::array a = require<std::uint64_t>(a_obj, "a_packed", "uint64", 2);
    const py::array b = require<std::uint64_t>(b_obj, "b_packed", "uint64", 2);
    require_same_words(a, b);
    const std::int64_t na = a.shape(0), nb = b.shape(0), words = a.shape(1);
    py::array_t<std::int64_t> out({na, nb});
    const auto *pa = static_cast<const std::uint64_t *>(a.data());
    const auto *pb = static_cast<const std::uint64_t *>(b.data());
    std::int64_t *po = out.mutable_data();
    {
        py::gil_scoped_release release;
        count_pairs(pa, na, pb, nb, words, po, nullptr, nullptr);
    }
    return out;
}

// Shared body of iou_matrix and containment_matrix: ratio(inter, area_a, area_b) -> double.
template <typename Ratio>
py::array_t<float> overlap_matrix(py::handle a_obj, py::handle b_obj, Ratio ratio) {
    const py::array a = require<std::uint64_t>(a_obj, "a_packed", "uint64", 2);
    const py::array b = require<std::uint64_t>(b_obj, "b_packed", "uint64", 2);
    require_same_words(a, b);
    const std::int64_t na = a.shape(0), nb = b.shape(0), words = a.shape(1);
    py::array_t<float> out({na, nb});
    const auto *pa = static_cast<const std::uint64_t *>(a.data());
    const auto *pb = static_cast<const std::uint64_t *>(b.data());
    float *po = out.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<std::int64_t> inter(static_cast<std::size_t>(na * nb)), area_a(na), area_b(nb);
        count_pairs(pa, na, pb, nb, words, inter.data(), area_a.data(), area_b.data());
        for (std::int64_t i = 0; i < na; ++i)
            for (std::int64_t j = 0; j < nb; ++j)
                po[i * nb + j] = static_cast<float>(ratio(inter[i * nb + j], area_a[i], area_b[j]));
    }
    return out;
}

py::array_t<float> iou_matrix(py::handle a_obj, py::handle b_obj) {
    return overlap_matrix(a_obj, b_obj, [](std::int64_t inter, std::int64_t sa, std::int64_t sb) {
        const std::int64_t uni = sa + sb - inter;
        return uni > 0 ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
    });
}

py::array_t<float> containment_matrix(py::handle a_obj, py::handle b_obj) {
    return overlap_matrix(a_obj, b_obj, [](std::int64_t inter, std::int64_t sa, std::int64_t sb) {
        const std::int64_t small = std::min(sa, sb);
        return small > 0 ? static_cast<double>(inter) / static_cast<double>(small) : 0.0;
    });
}

// ------------------------------------------------------------------------------------------------
// Box NMS (torchvision.ops.nms on CPU, float32)

py::array_t<std::int64_t> box_nms(py::handle boxes_obj, py::handle scores_obj,
                                  double iou_thresh) {
    const py::array boxes_arr = require<float>(boxes_obj, "boxes", "float32", 2);
    const py::array scores_arr = require<float>(scores_obj, "scores", "float32", 1);
    if (boxes_arr.shape(1) != 4) {
        throw py::value_error("boxes: expected shape (N, 4) in x1, y1, x2, y2, got " +
                              shape_str(boxes_arr));
    }
    const std::int64_t n = boxes_arr.shape(0);
    if (scores_arr.shape(0) != n) {
        throw py::value_error("scores: expected " + std::to_string(n) +
                              " scores (one per box), got " + std::to_string(scores_arr.shape(0)));
    }
    if (std::isnan(iou_thresh)) throw py::value_error("box_nms: iou_thresh is NaN");
    const auto *boxes = static_cast<const float *>(boxes_arr.data());
    const auto *scores = static_cast<const float *>(scores_arr.data());
    for (std::int64_t i = 0; i < 4 * n; ++i)
        if (!std::isfinite(boxes[i])) throw py::value_error("boxes: contains NaN or infinity");
    for (std::int64_t i = 0; i < n; ++i)
        if (!std::isfinite(scores[i])) throw py::value_error("scores: contains NaN or infinity");

    std::vector<std::int64_t> keep;
    {
        py::gil_scoped_release release;
        std::vector<std::int64_t> order(n);
        for (std::int64_t i = 0; i < n; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(),
                         [&](std::int64_t p, std::int64_t q) { return scores[p] > scores[q]; });
        // Boxes gathered in visiting order so the inner loop is contiguous and branch-free.
        std::vector<float> x1(n), y1(n), x2(n), y2(n), area(n);
        for (std::int64_t k = 0; k < n; ++k) {
            const float *b = boxes + 4 * order[k];
            x1[k] = b[0];
            y1[k] = b[1];
            x2[k] = b[2];
            y2[k] = b[3];
            area[k] = (x2[k] - x1[k]) * (y2[k] - y1[k]);
        }
        // torchvision compares the float IoU with the double threshold: double(ovr) > t holds
        // exactly when ovr > the largest float <= t.
        float thr = static_cast<float>(iou_thresh);
        if (static_cast<double>(thr) > iou_thresh)
            thr = std::nextafter(thr, -std::numeric_limits<float>::infinity());
        // A suppressed box is still tested (harmless: suppression only ever turns on).
        std::vector<std::uint8_t> suppressed(n, 0);
        for (std::int64_t i = 0; i < n; ++i) {
            if (suppressed[i]) continue;
            keep.push_back(order[i]);
            const float ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
            for (std::int64_t j = i + 1; j < n; ++j) {
                const float xx1 = ix1 < x1[j] ? x1[j] : ix1, yy1 = iy1 < y1[j] ? y1[j] : iy1;
                const float xx2 = x2[j] < ix2 ? x2[j] : ix2, yy2 = y2[j] < iy2 ? y2[j] : iy2;
                const float dw = xx2 - xx1, dh = yy2 - yy1;
                const float w = dw > 0.0f ? dw : 0.0f, h = dh > 0.0f ? dh : 0.0f;
                const float inter = w * h;
                const float ovr = inter / (iarea + area[j] - inter);
                suppressed[j] |= static_cast<std::uint8_t>(ovr > thr);
            }
        }
    }
    py::array_t<std::int64_t> out(static_cast<py::ssize_t>(keep.size()));
    std::copy(keep.begin(), keep.end(), out.mutable_data());
    return out;
}

// ------------------------------------------------------------------------------------------------
// Stability score (segment_anything.utils.amg.calculate_stability_score)

py::array_t<float> stability_scores(py::handle logits_obj, double mask_threshold, double offset,
                                    std::int64_t threads) {
    check_threads("stability_scores", threads);
    const py::array logits = require<float>(logits_obj, "logits", "float32", 3);
    if (std::isnan(mask_threshold) || std::isnan(offset)) {
        throw py::value_error("stability_scores: mask_threshold and offset must not be NaN");
    }
    const std::int64_t n = logits.shape(0), pixels = logits.shape(1) * logits.shape(2);
    // Like torch comparing a float32 tensor with a Python scalar: thresholds rounded to float32.
    const auto hi = static_cast<float>(mask_threshold + offset);
    const auto lo = static_cast<float>(mask_threshold - offset);
    py::array_t<float> out(n);
    const auto *src = static_cast<const float *>(logits.data());
    float *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        parallel_for(n, static_cast<double>(pixels), threads, [&](std::int64_t i0, std::int64_t i1) {
            for (std::int64_t i = i0; i < i1; ++i) {
                const float *m = src + i * pixels;
                std::int64_t n_hi = 0, n_lo = 0;
                constexpr std::int64_t kBlock = 1 << 20;  // int32 block counters vectorise well
                for (std::int64_t b = 0; b < pixels; b += kBlock) {
                    const std::int64_t e = std::min(pixels, b + kBlock);
                    std::int32_t c_hi = 0, c_lo = 0;
                    for (std::int64_t p = b; p < e; ++p) {
                        c_hi += m[p] > hi;
                        c_lo += m[p] > lo;
                    }
                    n_hi += c_hi;
                    n_lo += c_lo;
                }
                // float32 / float32 like torch's int32 / int32 true division: 0/0 gives NaN.
                dst[i] = static_cast<float>(n_hi) / static_cast<float>(n_lo);
            }
        });
    }
    return out;
}

// ------------------------------------------------------------------------------------------------
// Greedy one-to-one matching (SAMReg RoiMatching._roi_match)

py::tuple greedy_match(py::handle sim_obj, double threshold, std::int64_t max_pairs) {
    const py::array sim_arr = require<float>(sim_obj, "sim", "float32", 2);
    if (std::isnan(threshold)) throw py::value_error("greedy_match: threshold is NaN");
    const std::int64_t n1 = sim_arr.shape(0), n2 = sim_arr.shape(1);
    const auto *sim = static_cast<const float *>(sim_arr.data());
    for (std::int64_t k = 0; k < n1 * n2; ++k)
        if (std::isnan(sim[k])) throw py::value_error("sim: contains NaN");

    std::vector<std::int64_t> rows, cols;
    std::vector<float> values;
    {
        py::gil_scoped_release release;
        // Like torch comparing a float32 tensor with a Python scalar: threshold rounded to float32.
        const auto thr = static_cast<float>(threshold);
        std::vector<std::int64_t> cand;
        for (std::int64_t k = 0; k < n1 * n2; ++k)
            if (sim[k] > thr) cand.push_back(k);
        // Descending value, then row-major index: the order argmax would visit them in.
        std::stable_sort(cand.begin(), cand.end(),
                         [&](std::int64_t p, std::int64_t q) { return sim[p] > sim[q]; });
        std::vector<std::uint8_t> row_used(n1, 0), col_used(n2, 0);
        const std::int64_t limit = max_pairs > 0 ? max_pairs : std::min(n1, n2);
        for (const std::int64_t k : cand) {
            if (static_cast<std::int64_t>(rows.size()) >= limit) break;
            const std::int64_t i = k / n2, j = k % n2;
            if (row_used[i] || col_used[j]) continue;
            row_used[i] = col_used[j] = 1;
            rows.push_back(i);
            cols.push_back(j);
            values.push_back(sim[k]);
        }
    }
    const auto k = static_cast<py::ssize_t>(rows.size());
    py::array_t<std::int64_t> pairs({k, py::ssize_t{2}});
    py::array_t<float> out_sim(k);
    std::int64_t *pp = pairs.mutable_data();
    float *ps = out_sim.mutable_data();
    for (py::ssize_t t = 0; t < k; ++t) {
        pp[2 * t] = rows[t];
        pp[2 * t + 1] = cols[t];
        ps[t] = values[t];
    }
    return py::make_tuple(pairs, out_sim);
}


// ------------------------------------------------------------------------------------------------
// Separable linear resizing of mask logits (SAM's postprocess_masks as two banded matrices)

// For each row of m [rows, cols], the band [first, last + 1) of its non-zero entries ([0, 0) when
// the row is zero).
void row_bands(const float *m, std::int64_t rows, std::int64_t cols, std::vector<std::int64_t> &lo,
               std::vector<std::int64_t> &hi) {
    lo.assign(rows, 0);
    hi.assign(rows, 0);
    for (std::int64_t i = 0; i < rows; ++i) {
        const float *row = m + i * cols;
        std::int64_t a = 0, b = cols;
        while (a < cols && row[a] == 0.f) ++a;
        while (b > a && row[b - 1] == 0.f) --b;
        if (a < b) lo[i] = a, hi[i] = b;
    }
}

py::array_t<float> resize_logits(py::handle low_obj, py::handle ry_obj, py::handle rx_obj, std::int64_t threads) {
    check_threads("resize_logits", threads);
    const py::array low = require<float>(low_obj, "low", "float32", 3);
    const py::array ry_arr = require<float>(ry_obj, "ry", "float32", 2);
    const py::array rx_arr = require<float>(rx_obj, "rx", "float32", 2);
    const std::int64_t n = low.shape(0), h = low.shape(1), w = low.shape(2);
    const std::int64_t out_h = ry_arr.shape(0), out_w = rx_arr.shape(0);
    if (ry_arr.shape(1) != h || rx_arr.shape(1) != w) {
        throw py::value_error("resize_logits: ry " + shape_str(ry_arr) + " and rx " + shape_str(rx_arr) +
                              " must have as many columns as low " + shape_str(low) + " has rows and columns");
    }
    const auto *ry = static_cast<const float *>(ry_arr.data());
    const auto *rx = static_cast<const float *>(rx_arr.data());
    std::vector<std::int64_t> y_lo, y_hi, x_lo, x_hi;
    row_bands(ry, out_h, h, y_lo, y_hi);
    row_bands(rx, out_w, w, x_lo, x_hi);
    py::array_t<float> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(out_h),
                            static_cast<py::ssize_t>(out_w)});
    const auto *src = static_cast<const float *>(low.data());
    float *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        parallel_for(n, static_cast<double>(h * w + out_h * out_w) * 4, threads, [&](std::int64_t i0, std::int64_t i1) {
            std::vector<float> tmp(static_cast<std::size_t>(out_h * w));  // ry @ low[m]
            for (std::int64_t m = i0; m < i1; ++m) {
                const float *lm = src + m * h * w;
                for (std::int64_t y = 0; y < out_h; ++y) {  // rows: whole rows of low, vectorised
                    float *t = tmp.data() + y * w;
                    std::fill(t, t + w, 0.f);
                    for (std::int64_t r = y_lo[y]; r < y_hi[y]; ++r) {
                        const float wy = ry[y * h + r];
                        const float *row = lm + r * w;
                        for (std::int64_t c = 0; c < w; ++c) t[c] += wy * row[c];
                    }
                }
                float *om = dst + m * out_h * out_w;
                for (std::int64_t y = 0; y < out_h; ++y) {  // columns: a short dot product per pixel
                    const float *t = tmp.data() + y * w;
                    for (std::int64_t x = 0; x < out_w; ++x) {
                        float acc = 0.f;
                        for (std::int64_t c = x_lo[x]; c < x_hi[x]; ++c) acc += t[c] * rx[x * w + c];
                        om[y * out_w + x] = acc;
                    }
                }
            }
        });
    }
    return out;
}

// ------------------------------------------------------------------------------------------------
// Mask upscaling of SAM's decoder, fused (decoder_masks.onnx without ONNX Runtime): per input pixel,
// the first stride-2 transposed convolution (C -> 2x2 x C1), LayerNorm over C1 and GELU on each of
// its 2x2 output pixels, the second transposed convolution (C1 -> 2x2 x C2) and GELU, and the dot
// products with each kept mask's hypernetwork row, written into the mask logits. Consecutive input
// pixels share the vector lanes (16 with AVX-512, 8 with AVX2); no intermediate tensor leaves the core's
// caches. Layouts of several pixels (the factored inputs) come in blocks of kLanes = 16 pixels.

typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

constexpr int kChannels = 256;  // image-token channels (SAM's transformer width)
constexpr int kC1 = 64;         // channels after the first transposed convolution
constexpr int kC2 = 32;         // channels after the second (= hypernetwork width)
constexpr int kLanes = 16;      // input pixels per vector
constexpr int kMaxMasks = 4;    // SAM's mask tokens per prompt

__attribute__((always_inline)) inline v16f load16(const float *p) {
    v16f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

template <typename V>
constexpr int lanes_of = sizeof(V) / sizeof(float);

template <typename V>
__attribute__((always_inline)) inline V load_vec(const float *p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// GELU 0.5 x (1 + erf(x / sqrt 2)) with erf as Eigen's rational approximation on [-4, 4]
// (float32 absolute error below 5e-7 against the exact erf).
template <typename V>
__attribute__((always_inline)) inline V gelu(V x) {
    const V four = V{} + 4.f, minus_four = V{} - 4.f;
    V t = x * 0.70710678118654752f;
    t = t > four ? four : t;
    t = t < minus_four ? minus_four : t;
    const V t2 = t * t;
    V p = t2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = p * t2 + -2.10102402082508e-06f;
    p = p * t2 + -5.69250639462346e-05f;
    p = p * t2 + -7.34990630326855e-04f;
    p = p * t2 + -2.95459980854025e-03f;
    p = p * t2 + -1.60960333262415e-02f;
    p = p * t;
    V q = t2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = q * t2 + -1.68282697438203e-03f;
    q = q * t2 + -7.37332916720468e-03f;
    q = q * t2 + -1.42647390514189e-02f;
    return 0.5f * x * (1.f + p / q);
}

// In-place transpose of 16 vectors (rows) of 16 lanes: swaps each bit of the row index with the
// same bit of the lane index, one bit per round (shuffle patterns spelled out as constants: a loop
// that computes them is not always folded away).
__attribute__((always_inline)) inline void transpose16(v16f *r) {
    const v16i lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16i lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const v16i hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const v16i lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const v16i hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const v16i lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const v16i hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    const v16i *los[4] = {&lo8, &lo4, &lo2, &lo1}, *his[4] = {&hi8, &hi4, &hi2, &hi1};
    for (int round = 0, s = 8; round < 4; ++round, s /= 2) {
        for (int i = 0; i < 16; ++i) {
            if (i & s) continue;
            const v16f a = r[i], b = r[i + s];
            r[i] = __builtin_shuffle(a, b, *los[round]);
            r[i + s] = __builtin_shuffle(a, b, *his[round]);
        }
    }
}

// The same for 8 vectors of 8 lanes (AVX2).
__attribute__((always_inline)) inline void transpose8(v8f *r) {
    const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
    const v8i *los[3] = {&lo4, &lo2, &lo1}, *his[3] = {&hi4, &hi2, &hi1};
    for (int round = 0, s = 4; round < 3; ++round, s /= 2) {
        for (int i = 0; i < 8; ++i) {
            if (i & s) continue;
            const v8f a = r[i], b = r[i + s];
            r[i] = __builtin_shuffle(a, b, *los[round]);
            r[i + s] = __builtin_shuffle(a, b, *his[round]);
        }
    }
}
__attribute__((always_inline)) inline void transpose_lanes(v16f *r) { transpose16(r); }
__attribute__((always_inline)) inline void transpose_lanes(v8f *r) { transpose8(r); }

// out[g][t] = bias[col0 + t] + sum_k x[g][k] * w[k, col0 + t] for kCols output channels t of G products with
// the pixels in the lanes (x[g]: G groups of a vector's pixels; w row-major with kStride columns). Each broadcast
// weight serves the G groups: with one group, a weight load per FMA kept the load ports as busy as the FMA
// units. Prefetches the weight row kPrefetchRows ahead (w is larger than L1).
constexpr int kPrefetchRows = 8;
template <int kStride, int G, int kCols, typename V>
__attribute__((always_inline)) inline void product_tile(V *const (&out)[G], const V *const (&x)[G], int count,
                                                        const float *w, const float *bias, int col0) {
    V acc[G][kCols];
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < kCols; ++t) acc[g][t] = V{} + bias[col0 + t];
    const float *wr = w + col0;
    for (int k = 0; k < count; ++k, wr += kStride) {
        __builtin_prefetch(wr + kPrefetchRows * kStride);
        V xk[G];
        for (int g = 0; g < G; ++g) xk[g] = x[g][k];
        for (int t = 0; t < kCols; ++t) {
            const float wt = wr[t];
            for (int g = 0; g < G; ++g) acc[g][t] += xk[g] * wt;
        }
    }
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < kCols; ++t) out[g][t] = acc[g][t];
}

struct UpscaleArgs {
    const float *tokens;             // [B, hw, C]: image tokens, pixel-major
    const std::int64_t *rows;        // [R]: the prompts (rows of tokens) to upscale
    const float *w1;                 // [C, 4*C1]
    const float *b1;                 // [4*C1]
    const float *ln_weight;          // [C1]
    const float *ln_bias;            // [C1]
    float eps;
    const float *w2;                 // [C1, 4*C2]
    const float *b2;                 // [4*C2]
    const float *hyper;              // [M, C2]
    const std::int64_t *mask_start;  // [R+1]: prompt r's masks are rows mask_start[r]..[r+1]-1
    std::int64_t height, width;      // input grid (h, w)
    std::int64_t out_rows;           // its first rows that are upscaled (out has 4 out_rows rows)
    float *out;                      // [M, 4h, 4w]
    // factored first convolution (mask_upscaling_factored; tokens, w1 and b1 are then unused)
    const float *e_t;                // [hw/16, 4*C1, 16]
    const float *probs1, *probs2;    // [B, hw/16, J, 16]
    const float *rstd1, *rstd2;      // [B, hw]
    const float *first;              // [B, 2J+2, 4*C1]
    int factor_tokens;               // J
};

// Groups g..g+G-1 of a vector's consecutive input pixels (L of them) of the r-th prompt, kCols output channels
// per register tile (each pixel in the same order of operations as alone, whatever the vector width).
// kFactored: the first convolution's output from the factors (mask_upscaling_factored).
template <typename V, int G, int kCols, bool kFactored>
__attribute__((always_inline)) inline void upscale_groups(const UpscaleArgs &a, std::int64_t r, std::int64_t g) {
    constexpr int L = lanes_of<V>;
    const std::int64_t hw = a.height * a.width, out_w = 4 * a.width, out_plane = 16 * a.out_rows * a.width;
    const std::int64_t m0 = a.mask_start[r], masks = a.mask_start[r + 1] - m0;
    V x[G][kChannels];  // each group's image tokens (or factors), channel k in x[.][k] (pixels in lanes)
    V act[G][kC1];
    V logits[G][kMaxMasks];
    const V *xs[G];
    V *acts[G];
    V scale[G];            // factored: rstd1 * rstd2 of the group's pixels, the weight of e_t
    const float *et[G];    // factored: the group's e_t rows (e_t may not be 64-byte aligned: load_vec)
    const int depth = kFactored ? 2 * a.factor_tokens + 2 : kChannels;
    const float *w1 = a.w1, *b1 = a.b1;
    static constexpr float kZeros[4 * kC1] = {};
    for (int u = 0; u < G; ++u) {
        if constexpr (kFactored) {
            // pixel p0 of block p0 / kLanes of the [.., kLanes] layouts, at lane p0 % kLanes
            const std::int64_t b = a.rows[r], p0 = (g + u) * L, J = a.factor_tokens;
            const std::int64_t block = b * hw / kLanes + p0 / kLanes, lane = p0 % kLanes;
            const V r2 = load_vec<V>(a.rstd2 + b * hw + p0);
            scale[u] = load_vec<V>(a.rstd1 + b * hw + p0) * r2;
            const float *p1 = a.probs1 + block * J * kLanes + lane;
            const float *p2 = a.probs2 + block * J * kLanes + lane;
            for (std::int64_t j = 0; j < J; ++j) {
                x[u][j] = load_vec<V>(p1 + j * kLanes) * scale[u];
                x[u][J + j] = load_vec<V>(p2 + j * kLanes) * r2;
            }
            x[u][2 * J] = r2;
            x[u][2 * J + 1] = V{} + 1.f;
            et[u] = a.e_t + (p0 / kLanes) * 4 * kC1 * kLanes + lane;
            w1 = a.first + b * depth * 4 * kC1;
            b1 = kZeros;
        } else {
            const float *tok = a.tokens + (a.rows[r] * hw + (g + u) * L) * kChannels;
            for (int k0 = 0; k0 < kChannels; k0 += L) {
                for (int l = 0; l < L; ++l) x[u][k0 + l] = load_vec<V>(tok + l * kChannels + k0);
                transpose_lanes(x[u] + k0);
            }
        }
        xs[u] = x[u];
    }
    for (int s1 = 0; s1 < 4; ++s1) {  // output pixel (di, dj) of the first convolution
        for (int c0 = 0; c0 < kC1; c0 += kCols) {
            for (int u = 0; u < G; ++u) acts[u] = act[u] + c0;
            product_tile<4 * kC1, G, kCols>(acts, xs, depth, w1, b1, s1 * kC1 + c0);
        }
        if constexpr (kFactored)
            for (int u = 0; u < G; ++u)
                for (int c = 0; c < kC1; ++c) act[u][c] += scale[u] * load_vec<V>(et[u] + (s1 * kC1 + c) * kLanes);
        for (int u = 0; u < G; ++u) {
            V mean = V{};
            for (int c = 0; c < kC1; ++c) mean += act[u][c];
            mean *= 1.f / kC1;
            V var = V{};
            for (int c = 0; c < kC1; ++c) {
                act[u][c] -= mean;
                var += act[u][c] * act[u][c];
            }
            V inv;
            for (int l = 0; l < L; ++l) inv[l] = 1.f / std::sqrt(var[l] * (1.f / kC1) + a.eps);
            for (int c = 0; c < kC1; ++c) act[u][c] = gelu(act[u][c] * inv * a.ln_weight[c] + a.ln_bias[c]);
        }
        const V *as[G];
        for (int u = 0; u < G; ++u) as[u] = act[u];
        const int di = s1 / 2, dj = s1 % 2;
        for (int s2 = 0; s2 < 4; ++s2) {  // output pixel (di2, dj2) of the second convolution
            for (int u = 0; u < G; ++u)
                for (std::int64_t m = 0; m < masks; ++m) logits[u][m] = V{};
            for (int c0 = 0; c0 < kC2; c0 += kCols) {  // kCols of its C2 channels at a time
                V acc[G][kCols];
                V *accs[G];
                for (int u = 0; u < G; ++u) accs[u] = acc[u];
                product_tile<4 * kC2, G, kCols>(accs, as, kC1, a.w2, a.b2, s2 * kC2 + c0);
                for (int u = 0; u < G; ++u) {
                    for (int t = 0; t < kCols; ++t) acc[u][t] = gelu(acc[u][t]);
                    for (std::int64_t m = 0; m < masks; ++m) {
                        const float *hm = a.hyper + (m0 + m) * kC2 + c0;
                        V s = logits[u][m];
                        for (int t = 0; t < kCols; ++t) s += hm[t] * acc[u][t];
                        logits[u][m] = s;
                    }
                }
            }
            for (int u = 0; u < G; ++u) {
                const std::int64_t p0 = (g + u) * L, i = p0 / a.width, j0 = p0 % a.width;
                const std::int64_t row = 4 * i + 2 * di + s2 / 2, col = 4 * j0 + 2 * dj + s2 % 2;
                for (std::int64_t m = 0; m < masks; ++m) {
                    float *o = a.out + (m0 + m) * out_plane + row * out_w + col;
                    for (int l = 0; l < L; ++l) o[4 * l] = logits[u][m][l];
                }
            }
        }
    }
}

// Groups [g0, g1) of a vector's consecutive input pixels of the r-th prompt, G at a time.
template <typename V, int G, int kCols>
__attribute__((always_inline)) inline void upscale_body(const UpscaleArgs &a, std::int64_t r,
                                                        std::int64_t g0, std::int64_t g1) {
    std::int64_t g = g0;
    if (a.first) {
        for (; g + G <= g1; g += G) upscale_groups<V, G, kCols, true>(a, r, g);
        for (; g < g1; ++g) upscale_groups<V, 1, kCols, true>(a, r, g);
    } else {
        for (; g + G <= g1; g += G) upscale_groups<V, G, kCols, false>(a, r, g);
        for (; g < g1; ++g) upscale_groups<V, 1, kCols, false>(a, r, g);
    }
}

using UpscaleFn = void (*)(const UpscaleArgs &, std::int64_t, std::int64_t, std::int64_t);

// Register tiles (groups x channels): 3 x 8 accumulators of the 32 zmm registers; 3 x 4 of AVX2's 16 ymm
// registers (of 1x4, 1x8, 2x4, 2x8, 3x4 and 4x2 the fastest on an Ice Lake Xeon, by a margin within its noise
// over 2x4 and 2x8; benchmarks/results/kernels.md has the builds' GFLOP/s).
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void upscale_avx512(
    const UpscaleArgs &a, std::int64_t r, std::int64_t g0, std::int64_t g1) {
    upscale_body<v16f, 3, 8>(a, r, g0, g1);
}
__attribute__((target("avx2,fma"))) void upscale_avx2(const UpscaleArgs &a, std::int64_t r, std::int64_t g0,
                                                      std::int64_t g1) {
    upscale_body<v8f, 3, 4>(a, r, g0, g1);
}
void upscale_generic(const UpscaleArgs &a, std::int64_t r, std::int64_t g0, std::int64_t g1) {
    upscale_body<v16f, 3, 8>(a, r, g0, g1);
}

bool have_avx512() {
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma");
    }();
    return has;
}

bool have_avx2() {
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return has;
}

// The builds of a kernel with an AVX2 one: AVX-512, AVX2 (with FMA) and portable (widest first).
enum class Isa { avx512, avx2, generic };

// The widest build the environment variable SAMREG_RT_CPU_BUILD allows: unset, empty or "avx512": any; "avx2" or
// "generic" cap the kernels (and the engine's choices) at that build, so that an AVX-512 CPU can run and measure
// what an AVX2 or older one runs, as ONEDNN_MAX_CPU_ISA caps oneDNN. Checked when the module loads.
Isa cpu_build_cap() {
    const char *value = std::getenv("SAMREG_RT_CPU_BUILD");
    const std::string cap = value ? value : "";
    if (cap.empty() || cap == "avx512") return Isa::avx512;
    if (cap == "avx2") return Isa::avx2;
    if (cap == "generic") return Isa::generic;
    throw py::value_error("SAMREG_RT_CPU_BUILD: expected 'avx512', 'avx2' or 'generic' (or unset), got '" + cap + "'");
}

// The best build of this CPU within SAMREG_RT_CPU_BUILD's cap.
Isa best_isa() {
    static const Isa best = [] {
        const Isa cpu = have_avx512() ? Isa::avx512 : have_avx2() ? Isa::avx2 : Isa::generic;
        return std::max(cpu, cpu_build_cap());
    }();
    return best;
}

// isa "auto": the CPU's best build; "avx2" (so that tests can run it on AVX-512 CPUs too) or "generic".
Isa kernel_isa(const std::string &isa, const char *kernel) {
    if (isa == "auto") return best_isa();
    if (isa == "generic") return Isa::generic;
    if (isa == "avx2") {
        if (!have_avx2()) throw py::value_error(std::string(kernel) + ": isa 'avx2': this CPU has no AVX2 and FMA");
        return Isa::avx2;
    }
    throw py::value_error(std::string(kernel) + ": isa must be 'auto', 'avx2' or 'generic', got '" + isa + "'");
}

// Which of three things, one per build (a kernel's functions, names), `build` picks.
template <typename Fn>
Fn for_build(Isa build, Fn avx512, Fn avx2, Fn generic) {
    return build == Isa::avx512 ? avx512 : build == Isa::avx2 ? avx2 : generic;
}

void require_shape(const py::array &a, const char *name, const std::vector<py::ssize_t> &shape) {
    py::ssize_t d = 0;
    for (const py::ssize_t size : shape) {
        if (a.shape(d++) != size) {
            std::string want = "(";
            for (const py::ssize_t s : shape) want += std::to_string(s) + ", ";
            want.resize(want.size() - 2);
            throw py::value_error(std::string(name) + ": expected shape " + want + "), got " + shape_str(a));
        }
    }
}

// Raises when the memory of the output `out` (named `out_name`) overlaps that of the array `arr` (named `name`).
void require_disjoint(const py::array &out, const py::array &arr, const char *name, const char *out_name = "out") {
    const auto *o = static_cast<const char *>(out.data()), *x = static_cast<const char *>(arr.data());
    if (out.nbytes() > 0 && arr.nbytes() > 0 && o < x + arr.nbytes() && x < o + out.nbytes())
        throw py::value_error(std::string(out_name) + ": must not overlap " + name);
}

// A kernel's out=: None gives a new float32 array of `shape`; else the given array, which must be C-contiguous
// float32 of `shape`, writable and overlap none of `inputs` (array, name).
py::array_t<float> checked_out(py::handle out_obj, const std::vector<py::ssize_t> &shape,
                               std::initializer_list<std::pair<const py::array &, const char *>> inputs) {
    if (out_obj.is_none()) return py::array_t<float>(shape);
    auto out = py::reinterpret_borrow<py::array_t<float>>(
        require<float>(out_obj, "out", "float32", static_cast<py::ssize_t>(shape.size())));
    require_shape(out, "out", shape);
    if (!out.writeable()) throw py::value_error("out: array is read-only");
    for (const auto &[arr, name] : inputs) require_disjoint(out, arr, name);
    return out;
}

// Validates the arguments that mask_upscaling and mask_upscaling_factored share (those after the first
// convolution, rows of a batch of `batch` prompts of hw pixels, the grid rows to upscale (-1: all) and out), sets
// them in args and returns out.
py::array_t<float> upscale_common(UpscaleArgs &args, const char *kernel, std::int64_t batch, std::int64_t hw,
                                  py::handle rows_obj, py::handle ln_weight_obj, py::handle ln_bias_obj, double eps,
                                  py::handle w2_obj, py::handle b2_obj, py::handle hyper_obj,
                                  py::handle mask_start_obj, std::int64_t width, std::int64_t grid_rows,
                                  py::handle out_obj) {
    const py::array rows_arr = require<std::int64_t>(rows_obj, "rows", "int64", 1);
    const py::array ln_weight = require<float>(ln_weight_obj, "ln_weight", "float32", 1);
    const py::array ln_bias = require<float>(ln_bias_obj, "ln_bias", "float32", 1);
    const py::array w2 = require<float>(w2_obj, "w2", "float32", 2);
    const py::array b2 = require<float>(b2_obj, "b2", "float32", 1);
    const py::array hyper = require<float>(hyper_obj, "hyper", "float32", 2);
    const py::array mask_start = require<std::int64_t>(mask_start_obj, "mask_start", "int64", 1);
    const std::int64_t prompts = rows_arr.shape(0), m_total = hyper.shape(0);
    require_shape(ln_weight, "ln_weight", {kC1});
    require_shape(ln_bias, "ln_bias", {kC1});
    require_shape(w2, "w2", {kC1, 4 * kC2});
    require_shape(b2, "b2", {4 * kC2});
    require_shape(hyper, "hyper", {m_total, kC2});
    require_shape(mask_start, "mask_start", {prompts + 1});
    if (width <= 0 || width % kLanes != 0 || hw % width != 0) {
        throw py::value_error(std::string(kernel) + ": width " + std::to_string(width) + " must be a positive multiple of " +
                              std::to_string(kLanes) + " dividing the " + std::to_string(hw) + " pixels");
    }
    if (!(eps > 0) || !std::isfinite(eps)) throw py::value_error(std::string(kernel) + ": eps must be positive and finite");
    const auto *rows = static_cast<const std::int64_t *>(rows_arr.data());
    for (std::int64_t r = 0; r < prompts; ++r) {
        if (rows[r] < 0 || rows[r] >= batch) {
            throw py::value_error("rows: " + std::to_string(rows[r]) + " is not a prompt of the batch (" +
                                  std::to_string(batch) + " prompts)");
        }
    }
    const auto *start = static_cast<const std::int64_t *>(mask_start.data());
    if (start[0] != 0 || start[prompts] != m_total) {
        throw py::value_error("mask_start: must start at 0 and end at hyper's " + std::to_string(m_total) + " rows");
    }
    for (std::int64_t r = 0; r < prompts; ++r) {
        if (start[r + 1] < start[r] || start[r + 1] - start[r] > kMaxMasks) {
            throw py::value_error("mask_start: prompt " + std::to_string(r) + " has " +
                                  std::to_string(start[r + 1] - start[r]) + " masks; expected 0.." +
                                  std::to_string(kMaxMasks) + " (non-decreasing offsets)");
        }
    }
    const std::int64_t height = hw / width, out_rows = grid_rows == -1 ? height : grid_rows;
    if (out_rows < 1 || out_rows > height) {
        throw py::value_error(std::string(kernel) + ": grid_rows " + std::to_string(grid_rows) + " must be -1 or 1.." +
                              std::to_string(height) + " (the grid's rows)");
    }
    py::array_t<float> out = checked_out(out_obj, {m_total, 4 * out_rows, 4 * width}, {});
    args.rows = rows;
    args.ln_weight = static_cast<const float *>(ln_weight.data());
    args.ln_bias = static_cast<const float *>(ln_bias.data());
    args.eps = static_cast<float>(eps);
    args.w2 = static_cast<const float *>(w2.data());
    args.b2 = static_cast<const float *>(b2.data());
    args.hyper = static_cast<const float *>(hyper.data());
    args.mask_start = start;
    args.height = height;
    args.width = width;
    args.out_rows = out_rows;
    args.out = out.mutable_data();
    return out;
}

// Runs the upscaling of args' `prompts` rows, kChunks work items per prompt (so that one prompt fills the threads).
void upscale_run(const UpscaleArgs &args, std::int64_t prompts, Isa isa, std::int64_t threads) {
    const UpscaleFn fn = for_build<UpscaleFn>(isa, upscale_avx512, upscale_avx2, upscale_generic);
    constexpr std::int64_t kChunks = 4;
    const std::int64_t groups = args.out_rows * args.width / (isa == Isa::avx2 ? 8 : kLanes);
    py::gil_scoped_release release;
    parallel_for(prompts * kChunks, static_cast<double>(groups) * 1e5 / kChunks, threads,
                 [&](std::int64_t t0, std::int64_t t1) {
                     for (std::int64_t t = t0; t < t1; ++t) {
                         const std::int64_t r = t / kChunks, c = t % kChunks;
                         if (args.mask_start[r + 1] == args.mask_start[r]) continue;
                         fn(args, r, groups * c / kChunks, groups * (c + 1) / kChunks);
                     }
                 });
}

py::array_t<float> mask_upscaling(py::handle tokens_obj, py::handle rows_obj, py::handle w1_obj,
                                  py::handle b1_obj, py::handle ln_weight_obj, py::handle ln_bias_obj,
                                  double eps, py::handle w2_obj, py::handle b2_obj, py::handle hyper_obj,
                                  py::handle mask_start_obj, std::int64_t width, std::int64_t grid_rows,
                                  py::handle out_obj, const std::string &isa, std::int64_t threads) {
    const Isa build = kernel_isa(isa, "mask_upscaling");
    check_threads("mask_upscaling", threads);
    const py::array tokens = require<float>(tokens_obj, "tokens", "float32", 3);
    const py::array w1 = require<float>(w1_obj, "w1", "float32", 2);
    const py::array b1 = require<float>(b1_obj, "b1", "float32", 1);
    const std::int64_t batch = tokens.shape(0), hw = tokens.shape(1);
    require_shape(tokens, "tokens", {batch, hw, kChannels});
    require_shape(w1, "w1", {kChannels, 4 * kC1});
    require_shape(b1, "b1", {4 * kC1});
    UpscaleArgs args{};
    args.tokens = static_cast<const float *>(tokens.data());
    args.w1 = static_cast<const float *>(w1.data());
    args.b1 = static_cast<const float *>(b1.data());
    py::array_t<float> out = upscale_common(args, "mask_upscaling", batch, hw, rows_obj, ln_weight_obj, ln_bias_obj,
                                            eps, w2_obj, b2_obj, hyper_obj, mask_start_obj, width, grid_rows,
                                            out_obj);
    upscale_run(args, py::len(rows_obj), build, threads);
    return out;
}

py::array_t<float> mask_upscaling_factored(py::handle e_t_obj, py::handle probs1_obj, py::handle rstd1_obj,
                                           py::handle probs2_obj, py::handle rstd2_obj, py::handle first_obj,
                                           py::handle rows_obj, py::handle ln_weight_obj, py::handle ln_bias_obj,
                                           double eps, py::handle w2_obj, py::handle b2_obj, py::handle hyper_obj,
                                           py::handle mask_start_obj, std::int64_t width, std::int64_t grid_rows,
                                           py::handle out_obj, const std::string &isa, std::int64_t threads) {
    const Isa build = kernel_isa(isa, "mask_upscaling_factored");
    check_threads("mask_upscaling_factored", threads);
    const py::array e_t = require<float>(e_t_obj, "e_t", "float32", 3);
    const py::array probs1 = require<float>(probs1_obj, "probs1", "float32", 4);
    const py::array rstd1 = require<float>(rstd1_obj, "rstd1", "float32", 2);
    const py::array probs2 = require<float>(probs2_obj, "probs2", "float32", 4);
    const py::array rstd2 = require<float>(rstd2_obj, "rstd2", "float32", 2);
    const py::array first = require<float>(first_obj, "first", "float32", 3);
    const std::int64_t groups = e_t.shape(0), hw = groups * kLanes, batch = probs1.shape(0), tokens = probs1.shape(2);
    require_shape(e_t, "e_t", {groups, 4 * kC1, kLanes});
    if (tokens < 1 || 2 * tokens + 2 > kChannels)
        throw py::value_error("probs1: " + std::to_string(tokens) + " tokens; expected 1.." + std::to_string(kChannels / 2 - 1));
    require_shape(probs1, "probs1", {batch, groups, tokens, kLanes});
    require_shape(probs2, "probs2", {batch, groups, tokens, kLanes});
    require_shape(rstd1, "rstd1", {batch, hw});
    require_shape(rstd2, "rstd2", {batch, hw});
    require_shape(first, "first", {batch, 2 * tokens + 2, 4 * kC1});
    UpscaleArgs args{};
    args.e_t = static_cast<const float *>(e_t.data());
    args.probs1 = static_cast<const float *>(probs1.data());
    args.probs2 = static_cast<const float *>(probs2.data());
    args.rstd1 = static_cast<const float *>(rstd1.data());
    args.rstd2 = static_cast<const float *>(rstd2.data());
    args.first = static_cast<const float *>(first.data());
    args.factor_tokens = static_cast<int>(tokens);
    py::array_t<float> out = upscale_common(args, "mask_upscaling_factored", batch, hw, rows_obj, ln_weight_obj,
                                            ln_bias_obj, eps, w2_obj, b2_obj, hyper_obj, mask_start_obj, width, grid_rows,
                                            out_obj);
    upscale_run(args, py::len(rows_obj), build, threads);
    return out;
}

// ------------------------------------------------------------------------------------------------
// Image side of one layer of SAM's two-way transformer, fused, per prompt: the image->token
// attention update of the image tokens (logits against the prompt's tokens, softmax within each
// head, value rows), the residual and LayerNorm, then the softmax pooling of the new image tokens
// by the next layer's token->image logits (a softmax over all pixels, per token). Blocks of
// kTwVecs * 16 pixels go through all four products with the pixels in the vector lanes (channels
// and tokens as arrays of vectors); the pooling runs online (running max, sum and weighted sum
// per token, flash-attention style) per work item, and the work items of a prompt are merged at
// the end. Only keys_out and the pooled rows leave the caches.

constexpr int kTwVecs = 3;                   // pixel vectors per block
constexpr int kTwBlock = kTwVecs * kLanes;   // pixels per block
constexpr int kTwMaxTokens = 64;             // J and J2 limit
constexpr int kTwTokenBlock = 8;             // tokens per register tile; J, J2 padded to a multiple
constexpr int kTwChannelBlock = kTwTokenBlock;  // channels per register tile of the value product (tw_tile)
// Pixel vectors per block (channel-major tiles [rows][vecs_of<V>]: vector v holds pixels v L .. v L + L - 1 of
// the block, L = lanes_of<V>; the same bytes with either width)
template <typename V>
constexpr int vecs_of = kTwBlock / lanes_of<V>;
// Register tiles of the products (tw_tile, tw_pool), columns x pixel vectors of accumulators: 8 x 3 of AVX-512's
// 32 zmm registers; 4 x 3 of AVX2's 16 ymm registers (with the 3 vectors of a row and a broadcast: all 16)
template <typename V>
constexpr int tile_cols = std::is_same_v<V, v16f> ? kTwTokenBlock : 4;
constexpr int kTileVecs = 3;

// exp of each lane: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial, about
// 1 ulp); 0 below -87.3 (and for -inf), clamped at 88.7. V: v16f or v8f (the same per lane).
template <typename V>
using int_vec = std::conditional_t<std::is_same_v<V, v16f>, v16i, v8i>;

template <typename V>
__attribute__((always_inline)) inline V exp_vec(V x) {
    using I = int_vec<V>;
    const V lo = V{} - 87.3365447f, hi = V{} + 88.7228391f;
    const I under = x < lo;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    const V magic = V{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    V n = x * 1.44269504088896341f + magic;
    n = n - magic;
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    const V y = p * scale;
    return under ? V{} : y;
}

struct TwoWayArgs {
    const float *keys;           // [Bk, P, C]
    std::int64_t keys_step;      // floats from one prompt's keys to the next (0: shared)
    const float *pe;             // [P, C]
    const v16f *pe_t;            // pe in channel-major blocks [blocks][C][kTwVecs] (tw_transpose)
    const v16f *keys_t;          // the same of keys when they are shared (Bk 1), else null
    const float *kq;             // [B, J, C]
    const float *koff;           // [B, J]
    const float *vwo;            // [B, J, C]
    const float *ln_weight;      // [C]
    const float *ln_bias;        // [C]
    float eps;
    const float *qk;             // [B, J2, C]
    std::int64_t pixels;         // P
    int tokens, tokens2, heads;  // J, J2, heads
    float *out;                  // [B, P, C]
    const v16f *qproj_t;         // projected logits mode: qproj in channel-major blocks [blocks][D][kTwVecs], else null
    int head_dim;                // d = D / heads in that mode (kq is then [B, J, d])
};

constexpr std::int64_t kTwTile = kChannels * kTwVecs;
constexpr std::int64_t kTwTokenTile = kTwMaxTokens * kTwVecs;
constexpr int kTwGroup = 4;  // prompts per work item when they share keys
// The per-prompt part of a work item's scratch, in floats: the transposed logits matrices [C][64] (kq, qk)
// and koff[64].
constexpr std::int64_t kTwPromptFloats = 2 * kChannels * kTwMaxTokens + kTwMaxTokens;
// Scratch of one work item, in vectors: channel-major pixel tiles [C][kTwVecs] (keys, x, y), the block's new
// image tokens pixel-major [kTwBlock][C], token tiles [64][kTwVecs] (logits, s), and the per-prompt part of
// each prompt of a group.
constexpr std::int64_t kTwScratch = 4 * kTwTile + 2 * kTwTokenTile + kTwGroup * kTwPromptFloats / kLanes;
// Running pooling state of one work item, in floats: max[64], sum[64], weighted sum[64][C].
constexpr std::int64_t kTwState = 2 * kTwMaxTokens + kTwMaxTokens * kChannels;

// dst[c * vecs_of<V> + g] = channel c of pixels L g .. L g + L - 1 (L = lanes_of<V>) of the pixel-major rows
// src[n][width] (zero past row n): a block's channel-major tile, the same bytes with either V.
template <typename V>
__attribute__((always_inline)) inline void tw_load_t(V *dst, const float *src, int n, int width = kChannels) {
    constexpr int L = lanes_of<V>, kVecs = vecs_of<V>;
    if (width % L != 0) {  // one float at a time
        for (int c = 0; c < width; ++c)
            for (int g = 0; g < kVecs; ++g)
                for (int l = 0; l < L; ++l) {
                    const int p = g * L + l;
                    dst[c * kVecs + g][l] = p < n ? src[static_cast<std::int64_t>(p) * width + c] : 0.f;
                }
        return;
    }
    V x[L];
    for (int g = 0; g < kVecs; ++g) {
        for (int c0 = 0; c0 < width; c0 += L) {
            for (int l = 0; l < L; ++l) {
                const int p = g * L + l;
                x[l] = p < n ? load_vec<V>(src + static_cast<std::int64_t>(p) * width + c0) : V{};
            }
            transpose_lanes(x);
            for (int l = 0; l < L; ++l) dst[(c0 + l) * kVecs + g] = x[l];
        }
    }
}

// acc[t][v] += sum_{k < count} x[k * kVecs + v] * w[k * ld + t] for the kCols columns t of acc (x: rows of
// kVecs = vecs_of<V> pixel vectors, w: row-major with ld floats per row), one register tile of at most
// tile_cols<V> columns x kTileVecs vectors at a time, each over all k: the part from column kT0 and vector
// kV0, then the rest (AVX-512: the whole of acc in one part). With kPrefetch, also prefetches count cache
// lines from `prefetch`, one per row, during the first part. x and w advance as pointers, row by row: the
// broadcasts of w then take constant offsets from one register (with indices, the compiler kept one address
// per column, spilled them and recomputed them every row, and the integer work slowed the FMAs).
template <bool kPrefetch = false, int kCols, typename V, int kT0 = 0, int kV0 = 0>
__attribute__((always_inline)) inline void tw_tile(V (&acc)[kCols][vecs_of<V>], const V *x, const float *w,
                                                   std::ptrdiff_t ld, int count, const char *prefetch = nullptr) {
    constexpr int kVecs = vecs_of<V>, kC = std::min(kCols - kT0, tile_cols<V>), kN = std::min(kVecs - kV0, kTileVecs);
    const V *xp = x + kV0;
    const float *wp = w + kT0;
    for (int k = 0; k < count; ++k, xp += kVecs, wp += ld) {
        if (kPrefetch) {
            __builtin_prefetch(prefetch);
            prefetch += 64;
        }
        V xk[kN];
        for (int v = 0; v < kN; ++v) xk[v] = xp[v];
        for (int t = 0; t < kC; ++t) {
            const float wt = wp[t];
            for (int v = 0; v < kN; ++v) acc[kT0 + t][kV0 + v] += xk[v] * wt;
        }
    }
    if constexpr (kV0 + kN < kVecs)
        tw_tile<false, kCols, V, kT0, kV0 + kN>(acc, x, w, ld, count);
    else if constexpr (kT0 + kC < kCols)
        tw_tile<false, kCols, V, kT0 + kC, 0>(acc, x, w, ld, count);
}

// out[(j0 + t) * kVecs + v] (+)= sum_{c0 <= c < c1} xt[c * kVecs + v] * wt[c * ld + j0 + t] for
// kTwTokenBlock tokens t (kVecs = vecs_of<V>), starting from bias[j0 + t] when `first`, else from out. With
// kPrefetch, also prefetches the c1 - c0 cache lines from `prefetch`.
template <bool kPrefetch, typename V>
__attribute__((always_inline)) inline void tw_logits_tile(V *out, const V *xt, const float *wt, int ld, int j0,
                                                          int c0, int c1, bool first, const float *bias,
                                                          const char *prefetch) {
    constexpr int kVecs = vecs_of<V>;
    V acc[kTwTokenBlock][kVecs];
    for (int t = 0; t < kTwTokenBlock; ++t)
        for (int v = 0; v < kVecs; ++v) acc[t][v] = first ? V{} + bias[j0 + t] : out[(j0 + t) * kVecs + v];
    tw_tile<kPrefetch>(acc, xt + c0 * kVecs, wt + c0 * ld + j0, ld, c1 - c0, prefetch);
    for (int t = 0; t < kTwTokenBlock; ++t)
        for (int v = 0; v < kVecs; ++v) out[(j0 + t) * kVecs + v] = acc[t][v];
}

// out[j * kVecs + v] = bias[j] + sum_c xt[c * kVecs + v] * wt[c * ld + j] for the ld tokens j (a
// [pixels x C] x [C x ld] product; kVecs = vecs_of<V>), over half the channels at a time so that that half of
// xt stays in L1 for all token blocks. Prefetches the two 48 KiB tiles at pf0 and pf1 (when not null), a
// cache line per channel step.
template <typename V>
__attribute__((always_inline)) inline void tw_logits(V *out, const V *xt, const float *wt, int ld, const float *bias,
                                                     const char *pf0, const char *pf1) {
    constexpr int kHalf = kChannels / 2, kLines = kTwTile * sizeof(v16f) / 64;
    int line = 0;
    for (int c0 = 0; c0 < kChannels; c0 += kHalf) {
        for (int j0 = 0; j0 < ld; j0 += kTwTokenBlock, line += kHalf) {
            const char *pf = line < kLines ? pf0 + line * 64 : pf1 + (line - kLines) * 64;
            if (pf0 && line < 2 * kLines)
                tw_logits_tile<true>(out, xt, wt, ld, j0, c0, c0 + kHalf, c0 == 0, bias, pf);
            else
                tw_logits_tile<false>(out, xt, wt, ld, j0, c0, c0 + kHalf, c0 == 0, bias, nullptr);
        }
    }
}

// Projected logits mode: out[(j0 + t) * kVecs + v] = koff[j0 + t] + sum_{c < d} qt[c * kVecs + v] * kqh[c * ld + t]
// for the kCols tokens t from j0, all of one head (qt: that head's d channels of qproj as kVecs = vecs_of<V>
// pixel vectors per row, kqh: its tokens' kq rows transposed, ld floats apart).
template <int kCols, typename V>
__attribute__((always_inline)) inline void tw_head_logits(V *out, const V *qt, const float *kqh, int ld, int d, int j0,
                                                          const float *koff) {
    constexpr int kVecs = vecs_of<V>;
    V acc[kCols][kVecs];
    for (int t = 0; t < kCols; ++t)
        for (int v = 0; v < kVecs; ++v) acc[t][v] = V{} + koff[j0 + t];
    tw_tile(acc, qt, kqh, ld, d);
    for (int t = 0; t < kCols; ++t)
        for (int v = 0; v < kVecs; ++v) out[(j0 + t) * kVecs + v] = acc[t][v];
}

// The same for the `count` <= kTwTokenBlock tokens from j0: a register tile of exactly that many columns (a head's
// T tokens are often fewer than kTwTokenBlock: 6 image-to-token, 4 in SAM's final attention of multimask outputs).
template <typename V>
__attribute__((always_inline)) inline void tw_head_logits(V *out, const V *qt, const float *kqh, int ld, int d, int j0,
                                                          int count, const float *koff) {
    static_assert(kTwTokenBlock == 8, "one case per count below kTwTokenBlock");
    switch (count) {
        case 1: return tw_head_logits<1>(out, qt, kqh, ld, d, j0, koff);
        case 2: return tw_head_logits<2>(out, qt, kqh, ld, d, j0, koff);
        case 3: return tw_head_logits<3>(out, qt, kqh, ld, d, j0, koff);
        case 4: return tw_head_logits<4>(out, qt, kqh, ld, d, j0, koff);
        case 5: return tw_head_logits<5>(out, qt, kqh, ld, d, j0, koff);
        case 6: return tw_head_logits<6>(out, qt, kqh, ld, d, j0, koff);
        case 7: return tw_head_logits<7>(out, qt, kqh, ld, d, j0, koff);
        default: return tw_head_logits<kTwTokenBlock>(out, qt, kqh, ld, d, j0, koff);
    }
}

// yt[c] = kt[c] + sum_{j < tokens} at[j] * vwo[j, c] for the kTwChannelBlock channels c from c0 (rows of
// vecs_of<V> pixel vectors).
template <typename V>
__attribute__((always_inline)) inline void tw_update(V *yt, const V *kt, const V *at, const float *vwo, int tokens,
                                                     int c0) {
    constexpr int kVecs = vecs_of<V>;
    V acc[kTwChannelBlock][kVecs];
    for (int t = 0; t < kTwChannelBlock; ++t)
        for (int v = 0; v < kVecs; ++v) acc[t][v] = kt[(c0 + t) * kVecs + v];
    tw_tile(acc, at, vwo + c0, kChannels, tokens);
    for (int t = 0; t < kTwChannelBlock; ++t)
        for (int v = 0; v < kVecs; ++v) yt[(c0 + t) * kVecs + v] = acc[t][v];
}

// acc[(j0 + t) * acc_ld + L (cv0 + s) + lane] += sum_{p < n} w[(j0 + t) * kTwBlock + p] * z[p * z_ld + L (cv0 + s) + lane]
// for tile_cols<V> tokens t and kVecs channel vectors s of L = lanes_of<V> floats: one tile of the
// [J2 x pixels] x [pixels x C] pooling product.
template <int kVecs, typename V>
__attribute__((always_inline)) inline void tw_pool(float *acc, int acc_ld, const float *w, const float *z, int z_ld,
                                                   int n, int j0, int cv0) {
    constexpr int L = lanes_of<V>, kCols = tile_cols<V>;
    V sum[kCols][kVecs];
    for (int t = 0; t < kCols; ++t)
        for (int s = 0; s < kVecs; ++s) sum[t][s] = load_vec<V>(acc + (j0 + t) * acc_ld + (cv0 + s) * L);
    const float *wj = w + j0 * kTwBlock, *zp = z + cv0 * L;   // pointers, as in tw_tile
    for (std::ptrdiff_t p = 0; p < n; ++p, zp += z_ld) {
        V zv[kVecs];
        for (int s = 0; s < kVecs; ++s) zv[s] = load_vec<V>(zp + s * L);
        for (int t = 0; t < kCols; ++t) {
            const float wt = wj[t * kTwBlock + p];
            for (int s = 0; s < kVecs; ++s) sum[t][s] += zv[s] * wt;
        }
    }
    for (int t = 0; t < kCols; ++t)
        for (int s = 0; s < kVecs; ++s) std::memcpy(acc + (j0 + t) * acc_ld + (cv0 + s) * L, &sum[t][s], sizeof(V));
}

// acc[:, :cols] (+)= the pooling product of the n pixel rows z (z_ld floats apart) for the J2p tokens, over
// the first cols floats of z (a multiple of 16), kTileVecs vectors of V at a time.
template <typename V>
__attribute__((always_inline)) inline void tw_pool_rows(float *acc, int acc_ld, const float *w, const float *z, int z_ld,
                                                        int n, int J2p, int cols) {
    constexpr int kCols = tile_cols<V>;
    const int vecs = cols / lanes_of<V>;
    int cv0 = 0;
    for (; cv0 + kTileVecs <= vecs; cv0 += kTileVecs)
        for (int j0 = 0; j0 < J2p; j0 += kCols) tw_pool<kTileVecs, V>(acc, acc_ld, w, z, z_ld, n, j0, cv0);
    for (; cv0 < vecs; ++cv0)
        for (int j0 = 0; j0 < J2p; j0 += kCols) tw_pool<1, V>(acc, acc_ld, w, z, z_ld, n, j0, cv0);
}

// A pooling state (kTwState floats) before its first block: running max -inf, running sum 0, acc rows 0.
__attribute__((always_inline)) inline void tw_init_state(float *state) {
    std::fill(state, state + kTwMaxTokens, -std::numeric_limits<float>::infinity());
    std::fill(state + kTwMaxTokens, state + kTwState, 0.f);
}

// Softmax within each head of the logits tile l [heads * T][vecs_of<V>] (head h: rows h T .. h T + T - 1), in place.
template <typename V>
__attribute__((always_inline)) inline void tw_head_softmax(V *lt, int heads, int T) {
    constexpr int kVecs = vecs_of<V>;
    for (int h = 0; h < heads; ++h) {
        V *l = lt + h * T * kVecs;
        for (int v = 0; v < kVecs; ++v) {
            V m = l[v];
            for (int t = 1; t < T; ++t) m = l[t * kVecs + v] > m ? l[t * kVecs + v] : m;
            V sum = V{};
            for (int t = 0; t < T; ++t) {
                const V e = exp_vec(l[t * kVecs + v] - m);
                l[t * kVecs + v] = e;
                sum += e;
            }
            const V inv = 1.f / sum;
            for (int t = 0; t < T; ++t) l[t * kVecs + v] *= inv;
        }
    }
}

// One block of the online softmax over the pixels, per token j < J2p: st [J2p][vecs_of<V>] holds the logits of
// the block's n pixels; in place, it becomes the weights exp(s - running max) as floats w[j][kTwBlock]
// (zero past n). When a token's running max grows, its running sum and its acc row (acc_ld floats, a
// multiple of 16) are rescaled first. L = lanes_of<V> tokens at a time: their block maxima and sums across the
// lanes come from one transpose each instead of a chain of scalar operations per token (run_max and run_sum hold
// kTwMaxTokens floats, so their vectors from any j0 < J2p are in bounds).
template <typename V>
__attribute__((always_inline)) inline void tw_online_softmax(V *st, int J2p, int n, float *run_max, float *run_sum,
                                                             float *acc, int acc_ld) {
    constexpr int L = lanes_of<V>, kVecs = vecs_of<V>;
    constexpr float kInf = std::numeric_limits<float>::infinity();
    float *w = reinterpret_cast<float *>(st);
    for (int j0 = 0; j0 < J2p; j0 += L) {
        const int count = std::min(L, J2p - j0);
        V r[L];
        for (int t = 0; t < L; ++t) {
            r[t] = V{} - kInf;
            if (t >= count) continue;
            float *s = w + (j0 + t) * kTwBlock;
            for (int p = n; p < kTwBlock; ++p) s[p] = -kInf;
            for (int v = 0; v < kVecs; ++v) {
                const V x = st[(j0 + t) * kVecs + v];
                r[t] = x > r[t] ? x : r[t];
            }
        }
        transpose_lanes(r);
        V block_max = r[0];
        for (int t = 1; t < L; ++t) block_max = r[t] > block_max ? r[t] : block_max;
        const V old_max = load_vec<V>(run_max + j0);
        const V new_max = block_max > old_max ? block_max : old_max;   // max is exact in any order
        for (int t = 0; t < count; ++t) {
            if (!(new_max[t] > old_max[t])) continue;
            const float scale = std::exp(old_max[t] - new_max[t]);  // 0 for the first block
            run_sum[j0 + t] *= scale;
            for (int c = 0; c < acc_ld; c += L) {  // (vectors: the compiler left it scalar)
                const V x = load_vec<V>(acc + (j0 + t) * acc_ld + c) * scale;
                std::memcpy(acc + (j0 + t) * acc_ld + c, &x, sizeof x);
            }
        }
        std::memcpy(run_max + j0, &new_max, sizeof new_max);
        for (int t = 0; t < L; ++t) {
            r[t] = V{};
            for (int v = 0; t < count && v < kVecs; ++v) {
                const V e = exp_vec(st[(j0 + t) * kVecs + v] - new_max[t]);
                st[(j0 + t) * kVecs + v] = e;
                r[t] += e;
            }
        }
        transpose_lanes(r);
        V block_sum = load_vec<V>(run_sum + j0);
        for (int t = 0; t < L; ++t) block_sum += r[t];
        std::memcpy(run_sum + j0, &block_sum, sizeof block_sum);
    }
}

// Non-temporal store of x to dst (aligned to sizeof x), in the AVX-512 and AVX2 builds.
__attribute__((always_inline)) inline void stream_vec(float *dst, v16f x) {
    __builtin_ia32_movntps512(dst, x);
}
__attribute__((always_inline)) inline void stream_vec(float *dst, v8f x) {
    __builtin_ia32_movntps256(dst, x);
}

// dst[i] = src[i] for i < count with non-temporal stores where dst is aligned to a vector V (keys_out is
// written once and read only by the next pass: the stores neither read its lines from memory first nor
// evict the block's working set). The fence orders them before the stores that follow (these are weakly
// ordered: another thread could otherwise see the pass finish before them).
template <typename V>
__attribute__((always_inline)) inline void tw_stream(float *dst, const float *src, int count) {
    constexpr int L = lanes_of<V>;
    int head = static_cast<int>((sizeof(V) - reinterpret_cast<std::uintptr_t>(dst) % sizeof(V)) % sizeof(V) / sizeof(float));
    head = std::min(head, count);
    std::memcpy(dst, src, head * sizeof(float));
    int i = head;
    for (; i + L <= count; i += L) stream_vec(dst + i, load_vec<V>(src + i));
    std::memcpy(dst + i, src + i, (count - i) * sizeof(float));
    __builtin_ia32_sfence();
}
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void tw_stream_avx512(float *dst, const float *src,
                                                                                    int count) {
    tw_stream<v16f>(dst, src, count);
}
__attribute__((target("avx2,fma"))) void tw_stream_avx2(float *dst, const float *src, int count) {
    tw_stream<v8f>(dst, src, count);
}

using TwStoreFn = void (*)(float *, const float *, int);

// Prompt b's scratch w (kqt: kq transposed [C][Jp], or per head [D][Tp] in the projected logits mode; qkt:
// qk transposed [C][J2p]; koff, zero past J) and its initial pooling state.
__attribute__((always_inline)) inline void tw_setup(const TwoWayArgs &a, std::int64_t b, float *w, float *state) {
    const int J = a.tokens, J2 = a.tokens2, T = J / a.heads;
    const int Jp = (J + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    const int J2p = (J2 + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    const int d = a.head_dim, Tp = (T + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    float *kqt = w, *qkt = kqt + kChannels * kTwMaxTokens, *koff = qkt + kChannels * kTwMaxTokens;
    const float *kq = a.kq + b * J * (a.qproj_t ? d : kChannels), *qk = a.qk + b * J2 * kChannels;
    for (int c = 0; c < kChannels; ++c)
        for (int j = 0; j < J2p; ++j) qkt[c * J2p + j] = j < J2 ? qk[j * kChannels + c] : 0.f;
    if (a.qproj_t) {  // per head h, its tokens' kq rows transposed: kqt[(h d + c) Tp + t] = kq[h T + t, c]
        for (int h = 0; h < a.heads; ++h)
            for (int c = 0; c < d; ++c)
                for (int t = 0; t < Tp; ++t) kqt[(h * d + c) * Tp + t] = t < T ? kq[(h * T + t) * d + c] : 0.f;
    } else {
        for (int c = 0; c < kChannels; ++c)
            for (int j = 0; j < Jp; ++j) kqt[c * Jp + j] = j < J ? kq[j * kChannels + c] : 0.f;
    }
    for (int j = 0; j < kTwMaxTokens; ++j) koff[j] = j < J ? a.koff[b * J + j] : 0.f;
    tw_init_state(state);
}

// Pixel blocks [blk0, blk1) of prompts [b0, b1), block by block (each block's keys, pe and qproj tiles
// serve all the prompts while they are in the caches); pools into the prompts' states (see kTwState),
// state_step floats apart, which it initialises. store, when not null, writes each block's keys_out rows
// from a scratch copy. V: v16f (AVX-512, portable) or v8f (AVX2), kVecs = vecs_of<V> pixel vectors of
// L = lanes_of<V> pixels per block (tiles and scratch in the same bytes either way).
template <typename V>
__attribute__((always_inline)) inline void two_way_body(const TwoWayArgs &a, std::int64_t b0, std::int64_t b1,
                                                        std::int64_t blk0, std::int64_t blk1, v16f *scratch,
                                                        float *state, std::int64_t state_step, TwStoreFn store) {
    constexpr int L = lanes_of<V>, kVecs = vecs_of<V>, kTile = kChannels * kVecs, kTokenTile = kTwMaxTokens * kVecs;
    const int J = a.tokens, J2 = a.tokens2, T = J / a.heads;
    const int Jp = (J + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    const int J2p = (J2 + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    V *kload = reinterpret_cast<V *>(scratch), *xt = kload + kTile, *yt = xt + kTile;
    V *lt = yt + kTile, *st = lt + kTokenTile;
    float *zbuf = reinterpret_cast<float *>(st + kTokenTile);                      // [kTwBlock][C]
    float *prompts = zbuf + kTwBlock * kChannels;                                  // kTwPromptFloats per prompt
    const int d = a.head_dim, Tp = (T + kTwTokenBlock - 1) / kTwTokenBlock * kTwTokenBlock;
    for (std::int64_t b = b0; b < b1; ++b) tw_setup(a, b, prompts + (b - b0) * kTwPromptFloats, state + (b - b0) * state_step);
    const float zeros[kTwMaxTokens] = {};
    for (std::int64_t blk = blk0; blk < blk1; ++blk) {
        const std::int64_t p0 = blk * kTwBlock;
        const int n = static_cast<int>(std::min<std::int64_t>(kTwBlock, a.pixels - p0));
        const V *pt = reinterpret_cast<const V *>(a.pe_t) + blk * kTile;
        for (std::int64_t b = b0; b < b1; ++b) {
            const bool first = b == b0;  // prefetches the next block's tiles for all
            const float *kqt = prompts + (b - b0) * kTwPromptFloats, *qkt = kqt + kChannels * kTwMaxTokens;
            const float *koff = qkt + kChannels * kTwMaxTokens, *vwo = a.vwo + b * J * kChannels;
            float *run_max = state + (b - b0) * state_step, *run_sum = run_max + kTwMaxTokens;
            float *acc = run_sum + kTwMaxTokens;
            const float *keys = a.keys + b * a.keys_step;
            const V *kt = kload;
            if (a.keys_t)
                kt = reinterpret_cast<const V *>(a.keys_t) + blk * kTile;
            else
                tw_load_t(kload, keys + p0 * kChannels, n);
            // image -> token attention: logits, softmax within each head, value rows; residual
            if (a.qproj_t) {  // per head, d-channel dot products with the projected queries
                const V *qt = reinterpret_cast<const V *>(a.qproj_t) + blk * a.heads * d * kVecs;
                if (first && blk + 1 < blk1) {  // the next block's keys, pe and qproj tiles into L2 (the product is too short to spread them)
                    const char *nk = a.keys_t ? reinterpret_cast<const char *>(a.keys_t + (blk + 1) * kTwTile)
                                              : reinterpret_cast<const char *>(keys + (p0 + kTwBlock) * kChannels);
                    const char *np_ = reinterpret_cast<const char *>(a.pe_t + (blk + 1) * kTwTile);
                    const char *nq = reinterpret_cast<const char *>(a.qproj_t + (blk + 1) * a.heads * d * kTwVecs);
                    for (int i = 0; i < kTwTile; ++i) {
                        __builtin_prefetch(nk + 64 * i, 0, 2);
                        __builtin_prefetch(np_ + 64 * i, 0, 2);
                    }
                    for (int i = 0; i < a.heads * d * kTwVecs; ++i) __builtin_prefetch(nq + 64 * i, 0, 2);
                }
                for (int h = 0; h < a.heads; ++h)
                    for (int t0 = 0; t0 < T; t0 += kTwTokenBlock)
                        tw_head_logits(lt, qt + h * d * kVecs, kqt + h * d * Tp + t0, Tp, d, h * T + t0,
                                       std::min(kTwTokenBlock, T - t0), koff);
            } else {
                for (std::int64_t i = 0; i < kTile; ++i) xt[i] = kt[i] + pt[i];
                // the next block's keys and pe tiles (48 KiB each) come into the caches during the first product
                const char *next_keys = nullptr, *next_pe = nullptr;
                if (first && blk + 1 < blk1) {
                    next_keys = a.keys_t ? reinterpret_cast<const char *>(a.keys_t + (blk + 1) * kTwTile)
                                         : reinterpret_cast<const char *>(keys + (p0 + kTwBlock) * kChannels);
                    next_pe = reinterpret_cast<const char *>(a.pe_t + (blk + 1) * kTwTile);
                }
                tw_logits(lt, xt, kqt, Jp, koff, next_keys, next_pe);
            }
            tw_head_softmax(lt, a.heads, T);
            for (int c0 = 0; c0 < kChannels; c0 += kTwChannelBlock) tw_update(yt, kt, lt, vwo, J, c0);
            // LayerNorm over the channels (two passes); z into zrows (pixel-major, L channels of L pixels
            // at a time: keys_out, or zbuf when `store` copies them there), which the pooling then sums, and
            // z + pe for the next logits
            // (the sums over the channels run for the kVecs pixel vectors side by side: several
            // dependency chains instead of one at a time, each in the same order)
            float *zrows = store ? zbuf : a.out + (b * a.pixels + p0) * kChannels;
            V mean[kVecs] = {}, var[kVecs] = {};
            for (int c = 0; c < kChannels; ++c)
                for (int v = 0; v < kVecs; ++v) mean[v] += yt[c * kVecs + v];
            for (int v = 0; v < kVecs; ++v) mean[v] *= 1.f / kChannels;
            for (int c = 0; c < kChannels; ++c)
                for (int v = 0; v < kVecs; ++v) {
                    const V d = yt[c * kVecs + v] - mean[v];
                    var[v] += d * d;
                }
            for (int v = 0; v < kVecs; ++v) {
                V inv;
                for (int l = 0; l < L; ++l) inv[l] = 1.f / std::sqrt(var[v][l] * (1.f / kChannels) + a.eps);
                for (int c0 = 0; c0 < kChannels; c0 += L) {
                    V z[L];
                    for (int l = 0; l < L; ++l) {
                        const int c = c0 + l;
                        z[l] = (yt[c * kVecs + v] - mean[v]) * inv * a.ln_weight[c] + a.ln_bias[c];
                        xt[c * kVecs + v] = z[l] + pt[c * kVecs + v];
                    }
                    transpose_lanes(z);
                    for (int l = 0; l < L && v * L + l < n; ++l)
                        std::memcpy(zrows + (v * L + l) * kChannels + c0, &z[l], sizeof(V));
                }
            }
            // token -> image logits of the new image tokens
            tw_logits(st, xt, qkt, J2p, zeros, nullptr, nullptr);
            // online softmax over the pixels: new running max, rescaled sums, this block's weights
            tw_online_softmax(st, J2p, n, run_max, run_sum, acc, kChannels);
            tw_pool_rows<V>(acc, kChannels, reinterpret_cast<const float *>(st), zrows, kChannels, n, J2p, kChannels);
            if (store) store(a.out + (b * a.pixels + p0) * kChannels, zbuf, n * kChannels);
        }
    }
}

// dst[blk] = the channel-major tile of pixel block blk of src [pixels][width] (zero past the end) for
// blocks [blk0, blk1), written as vectors V (the same bytes with either width).
template <typename V>
__attribute__((always_inline)) inline void tw_transpose_body(v16f *dst, const float *src, std::int64_t pixels,
                                                             int width, std::int64_t blk0, std::int64_t blk1) {
    for (std::int64_t blk = blk0; blk < blk1; ++blk) {
        const std::int64_t p0 = blk * kTwBlock;
        tw_load_t(reinterpret_cast<V *>(dst + blk * width * kTwVecs), src + p0 * width,
                  static_cast<int>(std::min<std::int64_t>(kTwBlock, pixels - p0)), width);
    }
}

using TwTransposeFn = void (*)(v16f *, const float *, std::int64_t, int, std::int64_t, std::int64_t);

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void tw_transpose_avx512(
    v16f *dst, const float *src, std::int64_t pixels, int width, std::int64_t blk0, std::int64_t blk1) {
    tw_transpose_body<v16f>(dst, src, pixels, width, blk0, blk1);
}
__attribute__((target("avx2,fma"))) void tw_transpose_avx2(v16f *dst, const float *src, std::int64_t pixels, int width,
                                                           std::int64_t blk0, std::int64_t blk1) {
    tw_transpose_body<v8f>(dst, src, pixels, width, blk0, blk1);
}
void tw_transpose_generic(v16f *dst, const float *src, std::int64_t pixels, int width, std::int64_t blk0,
                          std::int64_t blk1) {
    tw_transpose_body<v16f>(dst, src, pixels, width, blk0, blk1);
}

// `vecs` vectors in buf, 64-byte aligned (v16f loads and stores assume it; operator new does not
// give it).
v16f *aligned_vecs(std::vector<float> &buf, std::int64_t vecs) {
    buf.resize(static_cast<std::size_t>((vecs + 1) * kLanes));
    void *start = buf.data();
    std::size_t space = buf.size() * sizeof(float);
    return static_cast<v16f *>(std::align(sizeof(v16f), vecs * sizeof(v16f), start, space));
}

using TwoWayFn = void (*)(const TwoWayArgs &, std::int64_t, std::int64_t, std::int64_t, std::int64_t, v16f *, float *,
                          std::int64_t);

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void two_way_avx512(
    const TwoWayArgs &a, std::int64_t b0, std::int64_t b1, std::int64_t blk0, std::int64_t blk1, v16f *scratch,
    float *state, std::int64_t state_step) {
    // in place, keys_out's lines are already in the caches (the block's keys): plain stores there
    two_way_body<v16f>(a, b0, b1, blk0, blk1, scratch, state, state_step,
                       a.out == a.keys ? nullptr : tw_stream_avx512);
}
__attribute__((target("avx2,fma"))) void two_way_avx2(const TwoWayArgs &a, std::int64_t b0, std::int64_t b1,
                                                      std::int64_t blk0, std::int64_t blk1, v16f *scratch, float *state,
                                                      std::int64_t state_step) {
    two_way_body<v8f>(a, b0, b1, blk0, blk1, scratch, state, state_step, a.out == a.keys ? nullptr : tw_stream_avx2);
}
void two_way_generic(const TwoWayArgs &a, std::int64_t b0, std::int64_t b1, std::int64_t blk0, std::int64_t blk1,
                     v16f *scratch, float *state, std::int64_t state_step) {
    two_way_body<v16f>(a, b0, b1, blk0, blk1, scratch, state, state_step, nullptr);
}

// pooled[b, j, :width] = prompt b's pooling states of its `chunks` chunks (kTwState floats each: running max,
// running sum, acc rows acc_ld floats apart) merged: rescaled to the largest running max, divided by the total.
void tw_merge(const float *states, std::int64_t batch, std::int64_t chunks, std::int64_t tokens2, int acc_ld, int width,
              float *pooled) {
    for (std::int64_t b = 0; b < batch; ++b) {
        for (std::int64_t j = 0; j < tokens2; ++j) {
            float m = -std::numeric_limits<float>::infinity();
            for (std::int64_t c = 0; c < chunks; ++c) m = std::max(m, states[(b * chunks + c) * kTwState + j]);
            float *dst = pooled + (b * tokens2 + j) * width;
            std::fill(dst, dst + width, 0.f);
            float total = 0.f;
            for (std::int64_t c = 0; c < chunks; ++c) {
                const float *st = states + (b * chunks + c) * kTwState;
                const float scale = std::exp(st[j] - m);
                total += scale * st[kTwMaxTokens + j];
                const float *acc = st + 2 * kTwMaxTokens + j * acc_ld;
                for (int k = 0; k < width; ++k) dst[k] += scale * acc[k];
            }
            const float inv = 1.f / total;
            for (int k = 0; k < width; ++k) dst[k] *= inv;
        }
    }
}

// Runs a pass's work items, (group of `group` prompts, chunk of pixel blocks), on up to `threads` threads:
// item(scratch, b0, b1, blk0, blk1, state, state_step) pools prompts [b0, b1) over blocks [blk0, blk1) into
// their states of that chunk (scratch: a buffer of the thread's, kept across its items). At least kMinItems
// chunks of prompts in all so that few prompts still fill the threads evenly (the chunks depend on the
// prompts alone, not on the groups). Then merges each prompt's chunks into pooled [B, tokens2, width].
template <typename Item>
void tw_pool_items(std::int64_t batch, std::int64_t blocks, std::int64_t group, double flops_per_block,
                   std::int64_t threads, std::int64_t tokens2, int acc_ld, int width, float *pooled, const Item &item) {
    constexpr std::int64_t kMinItems = 16;
    const std::int64_t chunks = batch > 0 ? std::min(blocks, (kMinItems + batch - 1) / batch) : 1;
    const std::int64_t groups = (batch + group - 1) / group;
    std::vector<float> states(static_cast<std::size_t>(batch * chunks * kTwState));
    parallel_for(groups * chunks, flops_per_block * blocks / chunks * group, threads, [&](std::int64_t t0, std::int64_t t1) {
        std::vector<float> scratch;
        for (std::int64_t t = t0; t < t1; ++t) {
            const std::int64_t b0 = t / chunks * group, b1 = std::min(batch, b0 + group), c = t % chunks;
            item(scratch, b0, b1, blocks * c / chunks, blocks * (c + 1) / chunks,
                 states.data() + (b0 * chunks + c) * kTwState, chunks * kTwState);
        }
    });
    tw_merge(states.data(), batch, chunks, tokens2, acc_ld, width, pooled);
}

py::tuple two_way_pass(py::handle keys_obj, py::handle pe_obj, py::handle kq_obj, py::handle koff_obj,
                       py::handle vwo_obj, py::handle ln_weight_obj, py::handle ln_bias_obj, double eps,
                       py::handle qk_obj, std::int64_t heads, py::handle out_obj, const std::string &isa,
                       py::handle qproj_obj, std::int64_t threads) {
    check_threads("two_way_pass", threads);
    const py::array keys = require<float>(keys_obj, "keys", "float32", 3);
    const py::array pe = require<float>(pe_obj, "pe", "float32", 2);
    const py::array kq = require<float>(kq_obj, "kq", "float32", 3);
    const py::array koff = require<float>(koff_obj, "koff", "float32", 2);
    const py::array vwo = require<float>(vwo_obj, "vwo", "float32", 3);
    const py::array ln_weight = require<float>(ln_weight_obj, "ln_weight", "float32", 1);
    const py::array ln_bias = require<float>(ln_bias_obj, "ln_bias", "float32", 1);
    const py::array qk = require<float>(qk_obj, "qk", "float32", 3);
    const bool projected = !qproj_obj.is_none();
    const py::array qproj = projected ? require<float>(qproj_obj, "qproj", "float32", 2) : py::array();
    const std::int64_t shared = keys.shape(0), pixels = keys.shape(1);
    const std::int64_t batch = kq.shape(0), tokens = kq.shape(1), tokens2 = qk.shape(1);
    require_shape(keys, "keys", {shared, pixels, kChannels});
    if (!projected) require_shape(kq, "kq", {batch, tokens, kChannels});
    if (shared != 1 && shared != batch) {
        throw py::value_error("keys: " + std::to_string(shared) + " prompts; expected 1 (shared) or kq's " +
                              std::to_string(batch));
    }
    if (pixels < 1) throw py::value_error("keys: expected at least one pixel, got shape " + shape_str(keys));
    require_shape(pe, "pe", {pixels, kChannels});
    require_shape(koff, "koff", {batch, tokens});
    require_shape(vwo, "vwo", {batch, tokens, kChannels});
    require_shape(ln_weight, "ln_weight", {kChannels});
    require_shape(ln_bias, "ln_bias", {kChannels});
    require_shape(qk, "qk", {batch, tokens2, kChannels});
    if (tokens < 1 || tokens > kTwMaxTokens) {
        throw py::value_error("kq: " + std::to_string(tokens) + " tokens; expected 1.." +
                              std::to_string(kTwMaxTokens));
    }
    if (tokens2 < 1 || tokens2 > kTwMaxTokens) {
        throw py::value_error("qk: " + std::to_string(tokens2) + " tokens; expected 1.." +
                              std::to_string(kTwMaxTokens));
    }
    if (heads < 1 || tokens % heads != 0) {
        throw py::value_error("two_way_pass: heads " + std::to_string(heads) + " must be >= 1 and divide kq's " +
                              std::to_string(tokens) + " tokens");
    }
    std::int64_t qdim = 0, head_dim = 0;  // projected logits mode: D, d
    if (projected) {
        qdim = qproj.shape(1);
        require_shape(qproj, "qproj", {pixels, qdim});
        if (qdim < 1 || qdim > kChannels || qdim % heads != 0) {
            throw py::value_error("qproj: " + std::to_string(qdim) + " columns; expected a multiple of heads " +
                                  std::to_string(heads) + " in 1.." + std::to_string(kChannels));
        }
        head_dim = qdim / heads;
        require_shape(kq, "kq", {batch, tokens, head_dim});
    }
    if (!(eps > 0) || !std::isfinite(eps)) throw py::value_error("two_way_pass: eps must be positive and finite");
    const Isa build = kernel_isa(isa, "two_way_pass");
    // the inputs no output may overlap
    const std::vector<std::pair<const py::array *, const char *>> inputs{
        {&keys, "keys"}, {&pe, "pe"}, {&kq, "kq"}, {&koff, "koff"}, {&vwo, "vwo"}, {&ln_weight, "ln_weight"},
        {&ln_bias, "ln_bias"}, {&qk, "qk"}};
    py::array_t<float> out;
    if (out_obj.is_none()) {
        out = py::array_t<float>({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(pixels),
                                  static_cast<py::ssize_t>(kChannels)});
    } else {
        out = py::reinterpret_borrow<py::array_t<float>>(require<float>(out_obj, "out", "float32", 3));
        require_shape(out, "out", {batch, pixels, kChannels});
        if (!out.writeable()) throw py::value_error("out: array is read-only");
        // out may be keys itself (per-prompt keys, updated in place): a work item reads a block's keys
        // rows before it writes that block's rows, and no other item touches them.
        const bool in_place = shared == batch && out.data() == keys.data();
        for (const auto &[arr, name] : inputs)
            if (!(in_place && arr == &keys)) require_disjoint(out, *arr, name);
        if (projected) require_disjoint(out, qproj, "qproj");
    }
    py::array_t<float> pooled({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(tokens2),
                               static_cast<py::ssize_t>(kChannels)});
    const TwoWayFn fn = for_build<TwoWayFn>(build, two_way_avx512, two_way_avx2, two_way_generic);
    const TwTransposeFn transpose = for_build<TwTransposeFn>(build, tw_transpose_avx512, tw_transpose_avx2,
                                                             tw_transpose_generic);
    const std::int64_t blocks = (pixels + kTwBlock - 1) / kTwBlock;
    // pe (and shared keys) in the channel-major block layout once, for all prompts
    std::vector<float> pe_buffer, keys_buffer, qproj_buffer;
    v16f *pe_t = aligned_vecs(pe_buffer, blocks * kTwTile);
    v16f *keys_t = shared == 1 && batch > 1 ? aligned_vecs(keys_buffer, blocks * kTwTile) : nullptr;
    v16f *qproj_t = projected ? aligned_vecs(qproj_buffer, blocks * qdim * kTwVecs) : nullptr;
    const TwoWayArgs args{static_cast<const float *>(keys.data()), shared == 1 ? 0 : pixels * kChannels,
                          static_cast<const float *>(pe.data()), pe_t, keys_t, static_cast<const float *>(kq.data()),
                          static_cast<const float *>(koff.data()), static_cast<const float *>(vwo.data()),
                          static_cast<const float *>(ln_weight.data()), static_cast<const float *>(ln_bias.data()),
                          static_cast<float>(eps), static_cast<const float *>(qk.data()), pixels,
                          static_cast<int>(tokens), static_cast<int>(tokens2), static_cast<int>(heads),
                          out.mutable_data(), qproj_t, static_cast<int>(head_dim)};
    // Prompts share a work item only when they share keys (per-prompt keys leave nothing to share); shared
    // keys pool exactly as the same keys repeated.
    const std::int64_t group = keys_t ? kTwGroup : 1;
    {
        py::gil_scoped_release release;
        parallel_for(blocks, 4.0 * kTwTile * kLanes, threads, [&](std::int64_t b0, std::int64_t b1) {
            transpose(pe_t, args.pe, pixels, kChannels, b0, b1);
            if (keys_t) transpose(keys_t, args.keys, pixels, kChannels, b0, b1);
            if (qproj_t) transpose(qproj_t, static_cast<const float *>(qproj.data()), pixels, static_cast<int>(qdim), b0, b1);
        });
        const double flops_per_block = projected ? 2.0 * kTwBlock * (tokens * head_dim + kChannels * (tokens + 2 * tokens2))
                                                 : 8.0 * kTwBlock * kChannels * (tokens + tokens2);
        tw_pool_items(batch, blocks, group, flops_per_block, threads, tokens2, kChannels, kChannels,
                      pooled.mutable_data(), [&](std::vector<float> &scratch, std::int64_t b0, std::int64_t b1,
                                                 std::int64_t blk0, std::int64_t blk1, float *state, std::int64_t step) {
            fn(args, b0, b1, blk0, blk1, aligned_vecs(scratch, kTwScratch), state, step);
        });
    }
    return py::make_tuple(out, pooled);
}

// ------------------------------------------------------------------------------------------------
// A layer of SAM's two-way transformer on the image side with its image tokens in factored form
// (two_way_factored), and the next token->image pooling. The first layer's y1 = e + A1 V1 lies, per
// pixel, in the span of the image's own token e and the J value rows V1 of the prompt, the second's
// y2 = LayerNorm_1(y1) + A2 V2 in that of e and 2J + 1 rows; so every product of these tokens with a
// prompt's vectors splits into a product of per-image features (computed once per image) with a head's
// d-vector, plus products of inner width J or 2J + 1 with the attention weights: no image token of C
// channels is formed per prompt. Blocks of kTwBlock pixels with the pixels in the vector lanes, as
// two_way_pass; see its docstring for the formulas.

struct FactoredArgs {
    const v16f *image;       // [blocks][F][kTwVecs]: per-image features (F = 7 D + 4), the block layout
    const float *probs1;     // [B, P/16, J, 16]: the previous layer's, or null (the first layer)
    const float *rstd1;      // [B, P], or null with probs1
    const float *k, *vh1, *vh2;  // [B, J, d]
    const float *qf;         // [B, J2, d]
    const float *n;          // [B, J, J]
    const float *m1;         // [B, J]
    const float *gram;       // [B, K, K]
    const float *mf;         // [B, K, J2]
    float eps;
    std::int64_t pixels;     // P
    int tokens, tokens2, heads, head_dim;  // J, J2, heads, d
    float *probs2;           // [B, P/16, J, 16]
    float *rstd2;            // [B, P]
    bool prev() const { return probs1 != nullptr; }
};

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// The padded sizes of a factored pass: Jp, J2p (multiples of kTwTokenBlock), K rows of the coefficients c
// (2J + 1 after a previous layer, else J), Kp (of kTwTokenBlock), Kc (of kLanes: the rows of the coefficient
// tile), T = J / heads, Tp, T2 = J2 / heads, T2p.
struct FactoredSizes {
    int J, J2, K, Jp, J2p, Kp, Kc, T, Tp, T2, T2p, d, D;
    explicit FactoredSizes(const FactoredArgs &a)
        : J(a.tokens), J2(a.tokens2), K(a.prev() ? 2 * a.tokens + 1 : a.tokens), Jp(round_up(J, kTwTokenBlock)),
          J2p(round_up(J2, kTwTokenBlock)), Kp(round_up(K, kTwTokenBlock)), Kc(round_up(K, kLanes)),
          T(J / a.heads), Tp(round_up(T, kTwTokenBlock)), T2(J2 / a.heads), T2p(round_up(T2, kTwTokenBlock)),
          d(a.head_dim), D(a.heads * a.head_dim) {}
    // per-prompt scratch floats: k, vh1, vh2 per head transposed [heads][d][Tp], qf [heads][d][T2p], n [J][Jp],
    // gram [K][Kp], mf [K][J2p], m1 [64]
    std::int64_t prompt_floats() const { return 3 * D * Tp + D * T2p + J * Jp + K * Kp + K * J2p + kTwMaxTokens; }
    // per-item tile scratch, in vectors: a1, two temporaries, x1, x2, st [64][kTwVecs], c [Kc][kTwVecs] (which
    // holds r1 a1 and a2 in its rows), and the pixel-major pooling rows zv [kTwBlock][D], zc [kTwBlock][Kc]
    std::int64_t tile_vecs() const { return 6 * kTwTokenTile + Kc * kTwVecs + kTwBlock * (D + Kc) / kLanes; }
    int acc_ld() const { return d + Kc; }
};

// out[j] = sum_{c < d} img[h(j) d + c] * u[j, c] for the J = heads * T tokens (h(j) = j / T; img: D rows of a
// channel-major tile, ut: per head the tokens' rows transposed [heads][d][Tp]).
template <typename V>
__attribute__((always_inline)) inline void tw_head_dots(V *out, const V *img, const float *ut, int heads, int T, int Tp,
                                                        int d) {
    static constexpr float kZeros[kTwMaxTokens] = {};
    for (int h = 0; h < heads; ++h)
        for (int t0 = 0; t0 < T; t0 += kTwTokenBlock)
            tw_head_logits(out, img + h * d * vecs_of<V>, ut + h * d * Tp + t0, Tp, d, h * T + t0,
                           std::min(kTwTokenBlock, T - t0), kZeros);
}

// acc[j * ld + c] += sum_{p < n} w[j * kTwBlock + p] * z[p * D + h(j) d + c] for c < d and tokens j < count
// (h(j) = j / T): each token pools its own head's d columns of the pixel rows z, a vector V at a time.
template <typename V>
__attribute__((always_inline)) inline void tw_pool_heads(float *acc, int ld, const float *w, const float *z, int D,
                                                         int n, int count, int T, int d) {
    for (int j = 0; j < count; ++j) {
        const float *zj = z + (j / T) * d, *wj = w + j * kTwBlock;
        for (int c = 0; c < d; c += lanes_of<V>) {
            V s[4] = {load_vec<V>(acc + j * ld + c), V{}, V{}, V{}};  // four chains (n is a multiple of 16)
            for (int p = 0; p < n; p += 4)
                for (int u = 0; u < 4; ++u) s[u] += load_vec<V>(zj + (p + u) * D + c) * wj[p + u];
            const V r = (s[0] + s[1]) + (s[2] + s[3]);
            std::memcpy(acc + j * ld + c, &r, sizeof r);
        }
    }
}

// dst[p * ld + c] = scale[p] * src[c][p] for the n pixels p of a channel-major tile src [rows][vecs_of<V>] and
// rows c < rows (a multiple of 16): the tile's rows as pixel-major rows, each pixel scaled.
template <typename V>
__attribute__((always_inline)) inline void tw_rows_scaled(float *dst, int ld, const V *src, int rows,
                                                          const V (&scale)[vecs_of<V>], int n) {
    constexpr int L = lanes_of<V>, kVecs = vecs_of<V>;
    for (int v = 0; v * L < n; ++v)
        for (int c0 = 0; c0 < rows; c0 += L) {
            V z[L];
            for (int l = 0; l < L; ++l) z[l] = src[(c0 + l) * kVecs + v] * scale[v];
            transpose_lanes(z);
            for (int l = 0; l < L; ++l) std::memcpy(dst + (v * L + l) * ld + c0, &z[l], sizeof(V));
        }
}

// Prompt b's scratch (see FactoredSizes::prompt_floats) and initial pooling state.
__attribute__((always_inline)) inline void tf_setup(const FactoredArgs &a, const FactoredSizes &z, std::int64_t b,
                                                    float *w, float *state) {
    const int d = z.d;
    auto heads_t = [&](float *dst, const float *src, int T, int Tp) {  // src [heads*T][d] -> [heads][d][Tp]
        for (int h = 0; h < a.heads; ++h)
            for (int c = 0; c < d; ++c)
                for (int t = 0; t < Tp; ++t) dst[(h * d + c) * Tp + t] = t < T ? src[(h * T + t) * d + c] : 0.f;
    };
    auto padded = [](float *dst, const float *src, int rows, int cols, int ld) {  // [rows][cols] -> [rows][ld]
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < ld; ++c) dst[r * ld + c] = c < cols ? src[r * cols + c] : 0.f;
    };
    const std::int64_t J = z.J, J2 = z.J2, K = z.K;
    float *qf = w + 3 * z.D * z.Tp, *n = qf + z.D * z.T2p, *g = n + z.J * z.Jp, *mf = g + z.K * z.Kp;
    float *m1 = mf + z.K * z.J2p;
    heads_t(w, a.k + b * J * d, z.T, z.Tp);
    heads_t(w + 2 * z.D * z.Tp, a.vh2 + b * J * d, z.T, z.Tp);
    heads_t(qf, a.qf + b * J2 * d, z.T2, z.T2p);
    padded(g, a.gram + b * K * K, z.K, z.K, z.Kp);
    padded(mf, a.mf + b * K * J2, z.K, z.J2, z.J2p);
    if (a.prev()) {
        heads_t(w + z.D * z.Tp, a.vh1 + b * J * d, z.T, z.Tp);
        padded(n, a.n + b * J * J, z.J, z.J, z.Jp);
        for (int j = 0; j < kTwMaxTokens; ++j) m1[j] = j < z.J ? a.m1[b * J + j] : 0.f;
    }
    tw_init_state(state);
}

// Pixel blocks [blk0, blk1) of prompts [b0, b1), block by block; pools into the prompts' states. V: v16f (AVX-512,
// portable) or v8f (AVX2), kVecs = vecs_of<V> pixel vectors of L = lanes_of<V> pixels per block (tiles in the
// same bytes either way). kStream: probs2 (aligned to sizeof(V)) is written with non-temporal stores: written once
// here and read by the next pass, it would otherwise be read from memory before each write and evict the block's
// working set.
template <typename V, bool kStream>
__attribute__((always_inline)) inline void two_way_factored_body(const FactoredArgs &a, std::int64_t b0, std::int64_t b1,
                                                                 std::int64_t blk0, std::int64_t blk1, V *tiles,
                                                                 float *prompts, float *state, std::int64_t state_step) {
    constexpr int L = lanes_of<V>, kVecs = vecs_of<V>, kTokenTile = kTwMaxTokens * kVecs;
    const FactoredSizes z(a);
    const int J = z.J, J2 = z.J2, K = z.K, D = z.D, d = z.d, F = 7 * D + 4, ld = z.acc_ld();
    const int J1 = a.prev() ? J : 0;  // rows of r1 a1 in the coefficients c (then a2's J, then the constant 1)
    V *a1 = tiles, *t1 = a1 + kTokenTile, *t2 = t1 + kTokenTile, *x1 = t2 + kTokenTile;
    V *x2 = x1 + kTokenTile, *st = x2 + kTokenTile, *c = st + kTokenTile;
    V *ra = c, *a2 = c + J1 * kVecs;  // the coefficients c = [r1 a1, a2, 1] (the first layer: c = a2)
    float *zv = reinterpret_cast<float *>(c + z.Kc * kVecs), *zc = zv + kTwBlock * D;
    const std::int64_t pf = z.prompt_floats();
    for (std::int64_t b = b0; b < b1; ++b) tf_setup(a, z, b, prompts + (b - b0) * pf, state + (b - b0) * state_step);
    for (std::int64_t blk = blk0; blk < blk1; ++blk) {
        const std::int64_t p0 = blk * kTwBlock;
        const int n = static_cast<int>(std::min<std::int64_t>(kTwBlock, a.pixels - p0));
        const V *img = reinterpret_cast<const V *>(a.image) + blk * F * kVecs;
        const V *e2 = img + 7 * D * kVecs, *sigma = e2 + kVecs, *s1 = sigma + kVecs, *s0 = s1 + kVecs;
        for (std::int64_t b = b0; b < b1; ++b) {
            const float *kt = prompts + (b - b0) * pf, *vh1t = kt + D * z.Tp, *vh2t = vh1t + D * z.Tp;
            const float *qft = vh2t + D * z.Tp, *nw = qft + D * z.T2p, *gw = nw + J * z.Jp, *mfw = gw + K * z.Kp;
            const float *m1 = mfw + K * z.J2p;
            float *run_max = state + (b - b0) * state_step, *run_sum = run_max + kTwMaxTokens;
            float *acc = run_sum + kTwMaxTokens;
            // probs[b, p / 16, j, p % 16] of the first pixel p of vector v is at probs + offset(v) + 16 j
            auto offset = [&](int v) {
                const std::int64_t p = b * a.pixels + p0 + v * L;
                return p / kLanes * J * kLanes + p % kLanes;
            };
            V r1[kVecs], r2[kVecs], r12[kVecs];
            for (int v = 0; v < kVecs; ++v) {
                const bool valid = v * L < n;
                if (!a.prev()) {  // the first layer: r1 = 1, no previous weights
                    r1[v] = V{} + 1.f;
                    continue;
                }
                r1[v] = valid ? load_vec<V>(a.rstd1 + b * a.pixels + p0 + v * L) : V{};
                const float *src = a.probs1 + offset(v);
                for (int j = 0; j < J; ++j) {
                    a1[j * kVecs + v] = valid ? load_vec<V>(src + j * kLanes) : V{};
                    ra[j * kVecs + v] = a1[j * kVecs + v] * r1[v];
                }
            }
            // image->token attention: l = r1 (Q . k) + QP . k + (r1 a1) N, softmax within each head
            // (the first layer: l = Q . k, QP not read)
            tw_head_dots(J1 ? t1 : a2, img, kt, a.heads, z.T, z.Tp, d);
            if (J1) tw_head_dots(t2, img + D * kVecs, kt, a.heads, z.T, z.Tp, d);
            for (int j0 = 0; j0 < J1; j0 += kTwTokenBlock) {
                V acc8[kTwTokenBlock][kVecs];
                for (int t = 0; t < kTwTokenBlock; ++t)
                    for (int v = 0; v < kVecs; ++v)
                        acc8[t][v] = j0 + t < J ? t1[(j0 + t) * kVecs + v] * r1[v] + t2[(j0 + t) * kVecs + v] : V{};
                tw_tile(acc8, ra, nw + j0, z.Jp, J);
                for (int t = 0; t < kTwTokenBlock && j0 + t < J; ++t)
                    for (int v = 0; v < kVecs; ++v) a2[(j0 + t) * kVecs + v] = acc8[t][v];
            }
            tw_head_softmax(a2, a.heads, z.T);
            for (int v = 0; v * L < n; ++v) {
                float *dst = a.probs2 + offset(v);
                for (int j = 0; j < J; ++j) {
                    if constexpr (kStream)
                        stream_vec(dst + j * kLanes, a2[j * kVecs + v]);
                    else
                        std::memcpy(dst + j * kLanes, &a2[j * kVecs + v], sizeof(V));
                }
            }
            // the rows of c past r1 a1 and a2: the constant 1 of the row b1 - mean, then zero padding
            for (int k = J1 + J; k < z.Kc; ++k)
                for (int v = 0; v < kVecs; ++v) c[k * kVecs + v] = V{} + (k < K ? 1.f : 0.f);
            // |y - mean|^2 = r1^2 E2 + 2 r1 (c . X) + c G c
            if (J1) tw_head_dots(x1, img + 2 * D * kVecs, vh1t, a.heads, z.T, z.Tp, d);
            tw_head_dots(x2, img + 3 * D * kVecs, vh2t, a.heads, z.T, z.Tp, d);
            V cx[kVecs], cgc[kVecs];
            for (int v = 0; v < kVecs; ++v) {
                V s = J1 ? r1[v] * s1[v] + s0[v] : s0[v];
                for (int j = 0; j < J1; ++j) s += ra[j * kVecs + v] * (x1[j * kVecs + v] - sigma[v] * m1[j]);
                for (int j = 0; j < J; ++j) s += a2[j * kVecs + v] * x2[j * kVecs + v];
                cx[v] = s;
                cgc[v] = V{};
            }
            // (G symmetric: per block of 8 columns, its diagonal block once and the rows below it twice)
            for (int k0 = 0; k0 < K; k0 += kTwTokenBlock) {
                const int k1 = std::min(K, k0 + kTwTokenBlock);
                V diag[kTwTokenBlock][kVecs] = {}, below[kTwTokenBlock][kVecs] = {};
                tw_tile(diag, c + k0 * kVecs, gw + k0 * z.Kp + k0, z.Kp, k1 - k0);
                tw_tile(below, c + k1 * kVecs, gw + k1 * z.Kp + k0, z.Kp, K - k1);
                for (int t = 0; t < k1 - k0; ++t)
                    for (int v = 0; v < kVecs; ++v)
                        cgc[v] += (diag[t][v] + 2.f * below[t][v]) * c[(k0 + t) * kVecs + v];
            }
            for (int v = 0; v < kVecs; ++v) {
                const V sq = r1[v] * r1[v] * e2[v] + 2.f * r1[v] * cx[v] + cgc[v];
                for (int l = 0; l < L; ++l)
                    r2[v][l] = 1.f / std::sqrt(std::max(sq[l], 0.f) * (1.f / kChannels) + a.eps);
                r12[v] = r1[v] * r2[v];
                if (v * L < n) std::memcpy(a.rstd2 + b * a.pixels + p0 + v * L, &r2[v], sizeof(V));
            }
            // final token->image logits s = r1 r2 (Kf . q) + KPf . q + r2 (c Mf); online softmax over the pixels
            tw_head_dots(t1, img + 4 * D * kVecs, qft, a.heads, z.T2, z.T2p, d);
            tw_head_dots(t2, img + 5 * D * kVecs, qft, a.heads, z.T2, z.T2p, d);
            for (int j0 = 0; j0 < z.J2p; j0 += kTwTokenBlock) {
                V acc8[kTwTokenBlock][kVecs] = {};
                tw_tile(acc8, c, mfw + j0, z.J2p, K);
                for (int t = 0; t < kTwTokenBlock; ++t)
                    for (int v = 0; v < kVecs; ++v)
                        st[(j0 + t) * kVecs + v] = j0 + t < J2 ? r2[v] * acc8[t][v] + r12[v] * t1[(j0 + t) * kVecs + v] +
                                                                   t2[(j0 + t) * kVecs + v]
                                                             : V{};
            }
            tw_online_softmax(st, z.J2p, n, run_max, run_sum, acc, ld);
            // pool [r1 r2 V (the token's head), r2 c] over the block's pixels
            tw_rows_scaled(zv, D, img + 6 * D * kVecs, D, r12, n);
            tw_rows_scaled(zc, z.Kc, c, z.Kc, r2, n);
            const float *w = reinterpret_cast<const float *>(st);
            tw_pool_heads<V>(acc, ld, w, zv, D, n, J2, z.T2, d);
            tw_pool_rows<V>(acc + d, ld, w, zc, z.Kc, n, z.J2p, z.Kc);
        }
    }
    if constexpr (kStream) __builtin_ia32_sfence();  // the streamed probs2 before the stores that follow
}

using FactoredFn = void (*)(const FactoredArgs &, std::int64_t, std::int64_t, std::int64_t, std::int64_t, v16f *, float *,
                            float *, std::int64_t);

// The SIMD builds: the scratch tiles (64-byte aligned v16f) as vectors V; non-temporal stores of probs2 where
// it is aligned to a vector.
template <typename V>
__attribute__((always_inline)) inline void two_way_factored_simd(const FactoredArgs &a, std::int64_t b0, std::int64_t b1,
                                                                 std::int64_t blk0, std::int64_t blk1, v16f *tiles,
                                                                 float *prompts, float *state, std::int64_t state_step) {
    V *t = reinterpret_cast<V *>(tiles);
    if (reinterpret_cast<std::uintptr_t>(a.probs2) % sizeof(V) == 0)
        two_way_factored_body<V, true>(a, b0, b1, blk0, blk1, t, prompts, state, state_step);
    else
        two_way_factored_body<V, false>(a, b0, b1, blk0, blk1, t, prompts, state, state_step);
}
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void two_way_factored_avx512(
    const FactoredArgs &a, std::int64_t b0, std::int64_t b1, std::int64_t blk0, std::int64_t blk1, v16f *tiles,
    float *prompts, float *state, std::int64_t state_step) {
    two_way_factored_simd<v16f>(a, b0, b1, blk0, blk1, tiles, prompts, state, state_step);
}
__attribute__((target("avx2,fma"))) void two_way_factored_avx2(const FactoredArgs &a, std::int64_t b0, std::int64_t b1,
                                                               std::int64_t blk0, std::int64_t blk1, v16f *tiles,
                                                               float *prompts, float *state, std::int64_t state_step) {
    two_way_factored_simd<v8f>(a, b0, b1, blk0, blk1, tiles, prompts, state, state_step);
}
void two_way_factored_generic(const FactoredArgs &a, std::int64_t b0, std::int64_t b1, std::int64_t blk0,
                              std::int64_t blk1, v16f *tiles, float *prompts, float *state, std::int64_t state_step) {
    two_way_factored_body<v16f, false>(a, b0, b1, blk0, blk1, tiles, prompts, state, state_step);
}

py::array_t<float> two_way_factored(py::handle image_obj, py::handle probs1_obj, py::handle rstd1_obj, py::handle k_obj,
                                    py::handle vh1_obj, py::handle vh2_obj, py::handle qf_obj, py::handle n_obj,
                                    py::handle m1_obj, py::handle gram_obj, py::handle mf_obj, double eps,
                                    std::int64_t heads, py::handle probs2_obj, py::handle rstd2_obj,
                                    const std::string &isa, std::int64_t threads) {
    check_threads("two_way_factored", threads);
    const bool prev = !probs1_obj.is_none();  // after a previous layer (else the first layer)
    for (const py::handle obj : {rstd1_obj, vh1_obj, n_obj, m1_obj})
        if (obj.is_none() == prev)
            throw py::value_error("two_way_factored: probs1, rstd1, vh1, n and m1 go together (all given after a "
                                  "previous layer, all None for the first)");
    const py::array image = require<float>(image_obj, "image", "float32", 3);
    const py::array probs1 = prev ? require<float>(probs1_obj, "probs1", "float32", 4) : py::array();
    const py::array rstd1 = prev ? require<float>(rstd1_obj, "rstd1", "float32", 2) : py::array();
    const py::array k = require<float>(k_obj, "k", "float32", 3);
    const py::array vh1 = prev ? require<float>(vh1_obj, "vh1", "float32", 3) : py::array();
    const py::array vh2 = require<float>(vh2_obj, "vh2", "float32", 3);
    const py::array qf = require<float>(qf_obj, "qf", "float32", 3);
    const py::array n = prev ? require<float>(n_obj, "n", "float32", 3) : py::array();
    const py::array m1 = prev ? require<float>(m1_obj, "m1", "float32", 2) : py::array();
    const py::array gram = require<float>(gram_obj, "gram", "float32", 3);
    const py::array mf = require<float>(mf_obj, "mf", "float32", 3);
    const py::array rstd2_arr = require<float>(rstd2_obj, "rstd2", "float32", 2);
    const std::int64_t batch = k.shape(0), tokens = k.shape(1), head_dim = k.shape(2), tokens2 = qf.shape(1);
    const std::int64_t pixels = rstd2_arr.shape(1), K = prev ? 2 * tokens + 1 : tokens;
    if (tokens < 1 || tokens > kTwMaxTokens || tokens2 < 1 || tokens2 > kTwMaxTokens)
        throw py::value_error("two_way_factored: k has " + std::to_string(tokens) + " tokens and qf " +
                              std::to_string(tokens2) + "; expected 1.." + std::to_string(kTwMaxTokens) + " each");
    if (heads < 1 || tokens % heads != 0 || tokens2 % heads != 0)
        throw py::value_error("two_way_factored: heads " + std::to_string(heads) + " must be >= 1 and divide k's " +
                              std::to_string(tokens) + " and qf's " + std::to_string(tokens2) + " tokens");
    if (head_dim < kLanes || head_dim % kLanes != 0 || heads * head_dim > kChannels)
        throw py::value_error("k: head dimension " + std::to_string(head_dim) + "; expected a multiple of 16 with heads x d <= 256");
    if (pixels < 1 || pixels % kLanes != 0)
        throw py::value_error("rstd2: " + std::to_string(pixels) + " pixels; expected a positive multiple of 16");
    const std::int64_t blocks = (pixels + kTwBlock - 1) / kTwBlock, features = 7 * heads * head_dim + 4;
    require_shape(image, "image", {blocks, features, kTwBlock});
    if (prev) {
        require_shape(probs1, "probs1", {batch, pixels / kLanes, tokens, kLanes});
        require_shape(rstd1, "rstd1", {batch, pixels});
        require_shape(vh1, "vh1", {batch, tokens, head_dim});
        require_shape(n, "n", {batch, tokens, tokens});
        require_shape(m1, "m1", {batch, tokens});
    }
    require_shape(vh2, "vh2", {batch, tokens, head_dim});
    require_shape(qf, "qf", {batch, tokens2, head_dim});
    require_shape(gram, "gram", {batch, K, K});
    require_shape(mf, "mf", {batch, K, tokens2});
    if (!(eps > 0) || !std::isfinite(eps)) throw py::value_error("two_way_factored: eps must be positive and finite");
    if (reinterpret_cast<std::uintptr_t>(image.data()) % sizeof(v16f) != 0)
        throw py::value_error("image: must be 64-byte aligned (samreg_rt.two_way.factored_image allocates it so)");
    const Isa build = kernel_isa(isa, "two_way_factored");
    std::vector<std::pair<const py::array *, const char *>> inputs{
        {&image, "image"}, {&k, "k"}, {&vh2, "vh2"}, {&qf, "qf"}, {&gram, "gram"}, {&mf, "mf"}};
    if (prev) inputs.insert(inputs.end(), {{&probs1, "probs1"}, {&rstd1, "rstd1"}, {&vh1, "vh1"}, {&n, "n"}, {&m1, "m1"}});
    auto output = [&](py::handle obj, const char *name, int ndim, std::initializer_list<py::ssize_t> shape) {
        auto arr = py::reinterpret_borrow<py::array_t<float>>(require<float>(obj, name, "float32", ndim));
        require_shape(arr, name, shape);
        if (!arr.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
        for (const auto &[input, input_name] : inputs) require_disjoint(arr, *input, input_name, name);
        return arr;
    };
    py::array_t<float> probs2 = output(probs2_obj, "probs2", 4, {batch, pixels / kLanes, tokens, kLanes});
    py::array_t<float> rstd2 = output(rstd2_obj, "rstd2", 2, {batch, pixels});
    require_disjoint(rstd2, probs2, "probs2", "rstd2");
    auto data = [prev](const py::array &arr) { return prev ? static_cast<const float *>(arr.data()) : nullptr; };
    const FactoredArgs args{static_cast<const v16f *>(image.data()), data(probs1), data(rstd1),
                            static_cast<const float *>(k.data()), data(vh1), static_cast<const float *>(vh2.data()),
                            static_cast<const float *>(qf.data()), data(n), data(m1), static_cast<const float *>(gram.data()),
                            static_cast<const float *>(mf.data()), static_cast<float>(eps), pixels,
                            static_cast<int>(tokens), static_cast<int>(tokens2), static_cast<int>(heads),
                            static_cast<int>(head_dim), probs2.mutable_data(), rstd2.mutable_data()};
    const FactoredSizes sizes(args);
    const int width = static_cast<int>(head_dim + K);
    py::array_t<float> pooled({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(tokens2),
                               static_cast<py::ssize_t>(width)});
    const FactoredFn fn = for_build<FactoredFn>(build, two_way_factored_avx512, two_way_factored_avx2,
                                                two_way_factored_generic);
    const double flops_per_block = 2.0 * kTwBlock * (4 * tokens * head_dim + 2 * tokens2 * head_dim + tokens * tokens +
                                                     K * (K / 2 + tokens2) + tokens2 * (head_dim + K));
    // work items as two_way_pass's with shared keys; each thread's scratch: the tiles, then its prompts' part
    const std::int64_t tile_vecs = sizes.tile_vecs(), prompt_vecs = (kTwGroup * sizes.prompt_floats() + kLanes - 1) / kLanes;
    {
        py::gil_scoped_release release;
        tw_pool_items(batch, blocks, kTwGroup, flops_per_block, threads, tokens2, sizes.acc_ld(), width,
                      pooled.mutable_data(), [&](std::vector<float> &scratch, std::int64_t b0, std::int64_t b1,
                                                 std::int64_t blk0, std::int64_t blk1, float *state, std::int64_t step) {
            v16f *tiles = aligned_vecs(scratch, tile_vecs + prompt_vecs);
            fn(args, b0, b1, blk0, blk1, tiles, reinterpret_cast<float *>(tiles + tile_vecs), state, step);
        });
    }
    return pooled;
}

// ------------------------------------------------------------------------------------------------
// Linear layer out = x @ weight_t + bias (then ReLU when asked): the token side of SAM's decoder.
// A register tile of kLinRows rows x up to lin_vecs<V> vectors of out (64 columns in 24 zmm accumulators
// with AVX-512, 16 columns in 12 ymm ones with AVX2) lives in registers while k runs over a block of at most
// kLinDepth rows of weight_t: each step loads the tile's columns of one weight_t row and broadcasts x[m, k]
// of each of the tile's rows. The columns of weight_t go through a packed panel ([k][panel columns], zero
// past N) that stays in L2 for all the rows of a work item and reads contiguously (weight_t's own rows are
// often 8 or 16 KiB apart: the same cache sets). Work items are (chunk of rows, panel of columns); each packs
// its own panel, one block of k at a time, and a ragged last panel runs with as few vectors as it needs.

constexpr int kLinRows = 6;                       // rows per register tile
constexpr int kLinMaxPanel = 64;                  // columns per panel at most (floats per packed row)
constexpr std::int64_t kLinDepth = 256;           // k per block: a packed panel of at most 64 KiB
constexpr std::int64_t kLinMinItems = 8;          // work items at least (rows are split to get them)

template <typename V>
constexpr int lin_vecs = std::is_same_v<V, v16f> ? 4 : 2;              // vectors per panel
template <typename V>
constexpr int lin_panel_cols = lin_vecs<V> * lanes_of<V>;               // columns per panel

struct LinearArgs {
    const float *x;       // [M, K]
    const float *w;       // [K, N]
    const float *bias;    // [N]
    float *out;           // [M, N]
    std::int64_t m, k, n;
    bool relu;
};

// out[r, t] for R rows r and the `cols` <= NV L columns t of a tile (L lanes per vector V): starting from init
// (the bias, NV vectors) when `first`, else from out; plus sum_k x[r * ldx + k] * panel[k][t] over `depth` k;
// ReLU when `relu` (the last block of k).
template <typename V, int R, int NV>
__attribute__((always_inline)) inline void lin_tile(const float *x, std::int64_t ldx, const V *panel,
                                                   std::int64_t depth, const V *init, bool first, bool relu,
                                                   float *out, std::int64_t ldo, int cols) {
    constexpr int L = lanes_of<V>, kCols = NV * L;
    V acc[R][NV];
    for (int r = 0; r < R; ++r) {
        if (first) {
            for (int v = 0; v < NV; ++v) acc[r][v] = init[v];
        } else if (cols == kCols) {
            for (int v = 0; v < NV; ++v) acc[r][v] = load_vec<V>(out + r * ldo + v * L);
        } else {
            float row[kCols] = {};
            std::memcpy(row, out + r * ldo, cols * sizeof(float));
            for (int v = 0; v < NV; ++v) acc[r][v] = load_vec<V>(row + v * L);
        }
    }
    for (std::int64_t k = 0; k < depth; ++k) {
        V w[NV];
        for (int v = 0; v < NV; ++v) w[v] = panel[k * NV + v];
        for (int r = 0; r < R; ++r) {
            const float xr = x[r * ldx + k];
            for (int v = 0; v < NV; ++v) acc[r][v] += xr * w[v];
        }
    }
    for (int r = 0; r < R; ++r) {
        if (relu)
            for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] > 0.f ? acc[r][v] : V{};
        if (cols == kCols) {
            for (int v = 0; v < NV; ++v) std::memcpy(out + r * ldo + v * L, &acc[r][v], sizeof(V));
        } else {
            float row[kCols];
            std::memcpy(row, acc[r], sizeof row);
            std::memcpy(out + r * ldo, row, cols * sizeof(float));
        }
    }
}

// Rows [r0, r1) of the panel of columns n0..n0 + NV L - 1 (fewer at the right edge). buffer: NV + kLinDepth NV
// vectors (the padded bias, then the packed block of weight_t).
template <typename V, int NV>
__attribute__((always_inline)) inline void lin_panel(const LinearArgs &a, std::int64_t n0, std::int64_t r0,
                                                    std::int64_t r1, V *buffer) {
    constexpr int L = lanes_of<V>, kCols = NV * L;
    const int cols = static_cast<int>(std::min<std::int64_t>(kCols, a.n - n0));
    V *init = buffer, *panel = buffer + NV;
    float *bias = reinterpret_cast<float *>(init);
    for (int t = 0; t < kCols; ++t) bias[t] = t < cols ? a.bias[n0 + t] : 0.f;
    const std::int64_t blocks = std::max<std::int64_t>(1, (a.k + kLinDepth - 1) / kLinDepth);
    for (std::int64_t kb = 0; kb < blocks; ++kb) {
        const std::int64_t k0 = a.k * kb / blocks, depth = a.k * (kb + 1) / blocks - k0;
        float *packed = reinterpret_cast<float *>(panel);
        for (std::int64_t k = 0; k < depth; ++k) {
            const float *src = a.w + (k0 + k) * a.n + n0;
            float *dst = packed + k * kCols;
            if (cols == kCols) {
                std::memcpy(dst, src, kCols * sizeof(float));
            } else {
                std::memcpy(dst, src, cols * sizeof(float));
                std::fill(dst + cols, dst + kCols, 0.f);
            }
        }
        const bool first = kb == 0, relu = a.relu && kb + 1 == blocks;
        const float *x = a.x + k0;
        float *out = a.out + n0;
        std::int64_t m = r0;
        for (; m + kLinRows <= r1; m += kLinRows)
            lin_tile<V, kLinRows, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols);
        switch (r1 - m) {
            case 1: lin_tile<V, 1, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols); break;
            case 2: lin_tile<V, 2, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols); break;
            case 3: lin_tile<V, 3, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols); break;
            case 4: lin_tile<V, 4, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols); break;
            case 5: lin_tile<V, 5, NV>(x + m * a.k, a.k, panel, depth, init, first, relu, out + m * a.n, a.n, cols); break;
            default: break;
        }
    }
}

// The panel from column n0 with as few of its NV vectors as the columns left need.
template <typename V, int NV = lin_vecs<V>>
__attribute__((always_inline)) inline void linear_body(const LinearArgs &a, std::int64_t n0, std::int64_t r0,
                                                      std::int64_t r1, V *buffer) {
    if constexpr (NV > 1) {
        if (a.n - n0 <= (NV - 1) * lanes_of<V>) return linear_body<V, NV - 1>(a, n0, r0, r1, buffer);
    }
    lin_panel<V, NV>(a, n0, r0, r1, buffer);
}

using LinearFn = void (*)(const LinearArgs &, std::int64_t, std::int64_t, std::int64_t, v16f *);

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void linear_avx512(
    const LinearArgs &a, std::int64_t n0, std::int64_t r0, std::int64_t r1, v16f *buffer) {
    linear_body(a, n0, r0, r1, buffer);
}
__attribute__((target("avx2,fma"))) void linear_avx2(const LinearArgs &a, std::int64_t n0, std::int64_t r0,
                                                     std::int64_t r1, v16f *buffer) {
    linear_body(a, n0, r0, r1, reinterpret_cast<v8f *>(buffer));
}
void linear_generic(const LinearArgs &a, std::int64_t n0, std::int64_t r0, std::int64_t r1, v16f *buffer) {
    linear_body(a, n0, r0, r1, buffer);
}

// The result of a product x @ w + bias: a new float32 [rows, cols] array, or out_obj checked (float32, that shape,
// writeable, not overlapping x, w or bias).
py::array_t<float> product_out(py::handle out_obj, std::int64_t rows, std::int64_t cols, const py::array &x,
                               const py::array &w, const char *w_name, const py::array &bias) {
    return checked_out(out_obj, {rows, cols}, {{x, "x"}, {w, w_name}, {bias, "bias"}});
}

py::array_t<float> linear(py::handle x_obj, py::handle weight_t_obj, py::handle bias_obj, bool relu,
                          py::handle out_obj, const std::string &isa, std::int64_t threads) {
    check_threads("linear", threads);
    const py::array x = require<float>(x_obj, "x", "float32", 2);
    const py::array weight_t = require<float>(weight_t_obj, "weight_t", "float32", 2);
    const py::array bias = require<float>(bias_obj, "bias", "float32", 1);
    const std::int64_t rows = x.shape(0), depth = x.shape(1), cols = weight_t.shape(1);
    if (weight_t.shape(0) != depth) {
        throw py::value_error("weight_t: expected shape (" + std::to_string(depth) + ", N) (x has " +
                              std::to_string(depth) + " columns; weight_t is [K, N], the transpose of a [N, K] "
                              "Linear weight), got " + shape_str(weight_t));
    }
    require_shape(bias, "bias", {cols});
    const Isa build = kernel_isa(isa, "linear");
    py::array_t<float> out = product_out(out_obj, rows, cols, x, weight_t, "weight_t", bias);
    if (rows == 0 || cols == 0) return out;
    const LinearArgs args{static_cast<const float *>(x.data()), static_cast<const float *>(weight_t.data()),
                          static_cast<const float *>(bias.data()), out.mutable_data(), rows, depth, cols, relu};
    const LinearFn fn = for_build<LinearFn>(build, linear_avx512, linear_avx2, linear_generic);
    const std::int64_t panel_cols = build == Isa::avx2 ? lin_panel_cols<v8f> : lin_panel_cols<v16f>;
    const std::int64_t panels = (cols + panel_cols - 1) / panel_cols, tiles = (rows + kLinRows - 1) / kLinRows;
    const std::int64_t chunks = std::min(tiles, (kLinMinItems + panels - 1) / panels);
    const std::int64_t panel_depth = std::min(depth, kLinDepth);
    // cost in parallel_for's units: a tenth of a FLOP (threads for products of about 4 MFLOP and more:
    // starting and joining one costs tens of microseconds); writing an element of out counts 16 FLOPs
    const double item_flops = (2.0 * depth + 16.0) * static_cast<double>(rows) / chunks * panel_cols;
    {
        py::gil_scoped_release release;
        parallel_for(panels * chunks, item_flops / 10.0, threads, [&](std::int64_t i0, std::int64_t i1) {
            std::vector<float> storage;
            v16f *buffer = aligned_vecs(storage, kLinMaxPanel / kLanes * (1 + panel_depth));
            for (std::int64_t i = i0; i < i1; ++i) {
                const std::int64_t p = i / chunks, c = i % chunks;
                const std::int64_t r0 = tiles * c / chunks * kLinRows;
                const std::int64_t r1 = std::min(rows, tiles * (c + 1) / chunks * kLinRows);
                fn(args, p * panel_cols, r0, r1, buffer);
            }
        });
    }
    return out;
}


// ------------------------------------------------------------------------------------------------
// Softmax attention of query rows to keys shared by all of them (the first token->image attention of
// SAM's two-way transformer, whose image tokens are the image's own; a ViT encoder's global attention, with
// its decomposed relative position terms): per head, kSaRows query rows at a
// time, their logits against every key (pixels in the vector lanes, held in a per-thread scratch of
// kSaRows x P floats), the row maxima, exp and sums in place, then the exp-weighted sum of the value rows.
// The two passes over the logits stay in the core's L2 (192 KiB at P = 4096). The logits take two key
// vectors per broadcast query value (16 keys' d channels contiguous: one stream, no strided loads); the
// value sums take all the rows at a time, half of them when the rows have 3 or 4 value vectors (the
// accumulators of all would spill out of the 32 registers). Heads of 3 or 4 value vectors (a ViT's d = 64)
// take 12 rows per work item, so that each pass over the keys and values serves more rows; smaller heads
// (SAM's decoder, d = 16) take 8, which measured faster for them (benchmarks/kernels.py).

constexpr int kSaMaxVecs = 4;  // value vectors per row: head dimension up to 64

constexpr int sa_item_rows(std::int64_t nv) { return nv > 2 ? 12 : 8; }  // query rows per work item

struct SharedAttentionArgs {
    const float *q;       // [R, H, d]
    const v16f *kt;       // keys per head, 16 at a time channel-major, padded: [H][vecs][d]
    const v16f *v;        // values per head, pixel-major and padded: [H][vecs * 16][NV]
    float *out;           // [R, H, d]
    std::int64_t rows;    // R
    std::int64_t pixels;  // P
    std::int64_t vecs;    // ceil(P / 16)
    int heads, dim;       // H, d
    const float *rel_h;   // [R, H, kh] or null (no relative position terms)
    const float *rel_w;   // [R, H, kw]
    int kw;               // keys per row of the key grid (a multiple of 16)
};

// Query rows r0..r0 + kSaRows - 1 (those below R) of head h, kSaRows = sa_item_rows(NV), with vectors V of L
// lanes (v16f: AVX-512 or portable; v8f: AVX2, reading each 16-lane vector of the layouts as two halves).
// logits: kSaRows * vecs 16-lane vectors of scratch. The logits run kGroup rows at a time (all of them with
// 32 registers, 4 with AVX2's 16), the weighted values kPool rows at a time.
template <typename V, int NV>
__attribute__((always_inline)) inline void sa_rows(const SharedAttentionArgs &a, int h, std::int64_t r0,
                                                  v16f *logits16) {
    constexpr int L = lanes_of<V>, kSplit = kLanes / L, kSaRows = sa_item_rows(NV), NVV = NV * kSplit;
    constexpr bool kWide = std::is_same_v<V, v16f>;
    constexpr int kGroup = kWide ? kSaRows : 4;
    constexpr int kPool = kWide ? (NV > 2 ? kSaRows / 2 : kSaRows) : (NVV <= 2 ? 4 : NVV <= 6 ? 2 : 1);
    static_assert(kSaRows % kGroup == 0 && kSaRows % kPool == 0, "row groups must tile the item's rows");
    const int d = a.dim, n = static_cast<int>(std::min<std::int64_t>(kSaRows, a.rows - r0));
    const std::int64_t vecs = a.vecs * kSplit;  // key vectors of L lanes
    V *logits = reinterpret_cast<V *>(logits16);
    float q[kSaRows][kSaMaxVecs * kLanes] = {};  // rows past R stay zero (their results are not written)
    for (int r = 0; r < n; ++r) std::memcpy(q[r], a.q + ((r0 + r) * a.heads + h) * d, d * sizeof(float));
    const float *kt = reinterpret_cast<const float *>(a.kt + static_cast<std::int64_t>(h) * d * a.vecs);
    const float *rel_h[kSaRows] = {}, *rel_w[kSaRows] = {};  // each row's terms (rows past R: the last row's)
    if (a.rel_h)
        for (int r = 0; r < kSaRows; ++r) {
            const std::int64_t row = (r0 + std::min(r, n - 1)) * a.heads + h;
            rel_h[r] = a.rel_h + row * (a.pixels / a.kw);
            rel_w[r] = a.rel_w + row * a.kw;
        }
    constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
    V mx[kSaRows];
    for (int r = 0; r < kSaRows; ++r) mx[r] = V{} + kMinusInf;
    // the logits, two key vectors at a time (each broadcast query value serves both); key vector j (keys
    // L j..) is half j % kSplit of the 16-key vector j / kSplit, its channel c 16 floats after channel c - 1
    auto logit_vectors = [&](std::int64_t j, auto kv) {
        constexpr int KV = decltype(kv)::value;
        const float *kj[KV];
        for (int u = 0; u < KV; ++u) kj[u] = kt + (j + u) / kSplit * d * kLanes + (j + u) % kSplit * L;
        for (int g = 0; g < kSaRows; g += kGroup) {
            V acc[kGroup][KV] = {};
            for (int c = 0; c < d; ++c) {
                V k[KV];
                for (int u = 0; u < KV; ++u) k[u] = load_vec<V>(kj[u] + c * kLanes);
                for (int r = 0; r < kGroup; ++r)
                    for (int u = 0; u < KV; ++u) acc[r][u] += q[g + r][c] * k[u];
            }
            for (int u = 0; u < KV; ++u) {
                const std::int64_t ju = j + u;
                if (a.rel_h) {  // keys L ju.. lie in one row of the key grid
                    const std::int64_t kh = ju * L / a.kw, kw = ju * L % a.kw;
                    for (int r = 0; r < kGroup; ++r) acc[r][u] += rel_h[g + r][kh] + load_vec<V>(rel_w[g + r] + kw);
                }
                if ((ju + 1) * L > a.pixels)  // keys past P (the last vectors)
                    for (int r = 0; r < kGroup; ++r)
                        for (int l = 0; l < L; ++l)
                            if (ju * L + l >= a.pixels) acc[r][u][l] = kMinusInf;
                for (int r = 0; r < kGroup; ++r) {
                    logits[(g + r) * vecs + ju] = acc[r][u];
                    mx[g + r] = acc[r][u] > mx[g + r] ? acc[r][u] : mx[g + r];
                }
            }
        }
    };
    std::int64_t j = 0;
    for (; j + 2 <= vecs; j += 2) logit_vectors(j, std::integral_constant<int, 2>{});
    if (j < vecs) logit_vectors(j, std::integral_constant<int, 1>{});
    float sum[kSaRows];
    for (int r = 0; r < kSaRows; ++r) {
        float m = mx[r][0];
        for (int l = 1; l < L; ++l) m = std::max(m, mx[r][l]);
        V s = V{};
        V *row = logits + r * vecs;
        for (std::int64_t j = 0; j < vecs; ++j) {
            const V e = exp_vec(row[j] - m);
            row[j] = e;
            s += e;
        }
        sum[r] = 0.f;
        for (int l = 0; l < L; ++l) sum[r] += s[l];
    }
    // the weighted values, kPool rows at a time (their accumulators fit in the registers)
    const float *w = reinterpret_cast<const float *>(logits);
    const std::int64_t ld = a.vecs * kLanes;
    for (int g = 0; g < kSaRows && g < n; g += kPool) {
        V acc[kPool][NVV] = {};
        const V *v = reinterpret_cast<const V *>(a.v) + static_cast<std::int64_t>(h) * ld * NVV;
        for (std::int64_t p = 0; p < ld; ++p, v += NVV)
            for (int r = 0; r < kPool; ++r)
                for (int t = 0; t < NVV; ++t) acc[r][t] += w[(g + r) * ld + p] * v[t];
        for (int r = 0; r < kPool && g + r < n; ++r) {
            float row[NV * kLanes];
            std::memcpy(row, acc[r], sizeof row);
            float *dst = a.out + ((r0 + g + r) * a.heads + h) * d;
            for (int c = 0; c < d; ++c) dst[c] = row[c] / sum[g + r];
        }
    }
}

template <typename V>
__attribute__((always_inline)) inline void shared_attention_body(const SharedAttentionArgs &a, std::int64_t i0,
                                                                std::int64_t i1, v16f *logits) {
    const int nv = (a.dim + kLanes - 1) / kLanes, item_rows = sa_item_rows(nv);
    const std::int64_t blocks = (a.rows + item_rows - 1) / item_rows;
    for (std::int64_t i = i0; i < i1; ++i) {
        const int h = static_cast<int>(i / blocks);
        const std::int64_t r0 = i % blocks * item_rows;
        switch (nv) {
            case 1: sa_rows<V, 1>(a, h, r0, logits); break;
            case 2: sa_rows<V, 2>(a, h, r0, logits); break;
            case 3: sa_rows<V, 3>(a, h, r0, logits); break;
            default: sa_rows<V, 4>(a, h, r0, logits); break;
        }
    }
}

// Pixel vectors [j0, j1) of the keys and values [P, H, d] into the layouts of SharedAttentionArgs (zero past P
// and past d): 16 pixels' rows of each head are transposed in registers, 16 channels at a time.
__attribute__((always_inline)) inline void shared_attention_layout(const SharedAttentionArgs &a, const float *k,
                                                                  const float *v, std::int64_t j0, std::int64_t j1) {
    const int d = a.dim, nv = (d + kLanes - 1) / kLanes;
    auto *kt = const_cast<v16f *>(a.kt);
    auto *vp = reinterpret_cast<float *>(const_cast<v16f *>(a.v));
    for (std::int64_t j = j0; j < j1; ++j)
        for (std::int64_t h = 0; h < a.heads; ++h)
            for (int c0 = 0; c0 < d; c0 += kLanes) {
                const int width = std::min(kLanes, d - c0);
                v16f tile[kLanes];
                for (int l = 0; l < kLanes; ++l) {
                    const std::int64_t p = j * kLanes + l, src = (p * a.heads + h) * d + c0;
                    float *vdst = vp + ((h * a.vecs * kLanes + p) * nv + c0 / kLanes) * kLanes;
                    tile[l] = v16f{};
                    if (p < a.pixels) {
                        std::memcpy(&tile[l], k + src, width * sizeof(float));
                        std::memcpy(vdst, v + src, width * sizeof(float));
                        std::fill(vdst + width, vdst + kLanes, 0.f);
                    } else {
                        std::fill(vdst, vdst + kLanes, 0.f);
                    }
                }
                transpose16(tile);
                for (int c = 0; c < width; ++c) kt[(h * a.vecs + j) * d + c0 + c] = tile[c];
            }
}

using SharedAttentionFn = void (*)(const SharedAttentionArgs &, std::int64_t, std::int64_t, v16f *);
using SharedLayoutFn = void (*)(const SharedAttentionArgs &, const float *, const float *, std::int64_t,
                                std::int64_t);

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void shared_attention_avx512(
    const SharedAttentionArgs &a, std::int64_t i0, std::int64_t i1, v16f *logits) {
    shared_attention_body<v16f>(a, i0, i1, logits);
}
__attribute__((target("avx2,fma"))) void shared_attention_avx2(const SharedAttentionArgs &a, std::int64_t i0,
                                                               std::int64_t i1, v16f *logits) {
    shared_attention_body<v8f>(a, i0, i1, logits);
}
void shared_attention_generic(const SharedAttentionArgs &a, std::int64_t i0, std::int64_t i1, v16f *logits) {
    shared_attention_body<v16f>(a, i0, i1, logits);
}
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void shared_layout_avx512(
    const SharedAttentionArgs &a, const float *k, const float *v, std::int64_t j0, std::int64_t j1) {
    shared_attention_layout(a, k, v, j0, j1);
}
void shared_layout_generic(const SharedAttentionArgs &a, const float *k, const float *v, std::int64_t j0,
                           std::int64_t j1) {
    shared_attention_layout(a, k, v, j0, j1);
}

// The validated arguments of shared_attention and shared_attention_bf16.
struct AttentionInputs {
    py::array q, k, v, rel_h, rel_w;  // rel_h, rel_w: empty without relative position terms
    std::int64_t rows, heads, dim, pixels, kw;  // R, H, d, P, key grid width (0: no terms)
};

// The arrays of an attention call, checked: q [R, H, d], k and v [P, H, d], rel_h [R, H, kh] and rel_w [R, H, kw]
// with kh kw = P; with heads_first the first two axes of each swapped. any_grid: any kw (else a multiple of 16).
AttentionInputs attention_inputs(const char *kernel, py::handle q_obj, py::handle k_obj, py::handle v_obj,
                                 py::handle rel_h_obj, py::handle rel_w_obj, bool heads_first = false,
                                 bool any_grid = false) {
    AttentionInputs in;
    in.q = require<float>(q_obj, "q", "float32", 3);
    in.k = require<float>(k_obj, "k", "float32", 3);
    in.v = require<float>(v_obj, "v", "float32", 3);
    const int head_axis = heads_first ? 0 : 1, row_axis = 1 - head_axis;
    in.rows = in.q.shape(row_axis), in.heads = in.q.shape(head_axis), in.dim = in.q.shape(2);
    in.pixels = in.k.shape(row_axis);
    // the first two axes of an [R, H, n] array ([H, R, n] with heads_first)
    auto axis0 = [&](std::int64_t rows) { return heads_first ? in.heads : rows; };
    auto axis1 = [&](std::int64_t rows) { return heads_first ? rows : in.heads; };
    if (in.heads < 1 || in.dim < 1 || in.dim > kSaMaxVecs * kLanes)
        throw py::value_error(std::string("q: expected ") + (heads_first ? "[heads >= 1, R, d]" : "[R, heads >= 1, d]") +
                              " with 1 <= d <= " + std::to_string(kSaMaxVecs * kLanes) + ", got " + shape_str(in.q));
    if (in.pixels < 1) throw py::value_error("k: expected at least one key, got shape " + shape_str(in.k));
    require_shape(in.k, "k", {axis0(in.pixels), axis1(in.pixels), in.dim});
    require_shape(in.v, "v", {axis0(in.pixels), axis1(in.pixels), in.dim});
    if (rel_h_obj.is_none() != rel_w_obj.is_none())
        throw py::value_error(std::string(kernel) + ": rel_h and rel_w go together (both or neither)");
    in.kw = 0;
    if (!rel_h_obj.is_none()) {
        in.rel_h = require<float>(rel_h_obj, "rel_h", "float32", 3);
        in.rel_w = require<float>(rel_w_obj, "rel_w", "float32", 3);
        const std::int64_t kh = in.rel_h.shape(2);
        in.kw = in.rel_w.shape(2);
        require_shape(in.rel_h, "rel_h", {axis0(in.rows), axis1(in.rows), kh});
        require_shape(in.rel_w, "rel_w", {axis0(in.rows), axis1(in.rows), in.kw});
        if (kh * in.kw != in.pixels || (!any_grid && in.kw % kLanes != 0))
            throw py::value_error("rel_h, rel_w: a key grid of " + std::to_string(kh) + " x " + std::to_string(in.kw) +
                                  "; expected kh * kw = " + std::to_string(in.pixels) + " keys" +
                                  (any_grid ? "" : " and kw a multiple of 16"));
    }
    return in;
}

py::array_t<float> shared_attention(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle rel_h_obj,
                                    py::handle rel_w_obj, const std::string &isa, std::int64_t threads) {
    check_threads("shared_attention", threads);
    const AttentionInputs in = attention_inputs("shared_attention", q_obj, k_obj, v_obj, rel_h_obj, rel_w_obj);
    const py::array &q = in.q, &k = in.k, &v = in.v, &rel_h = in.rel_h, &rel_w = in.rel_w;
    const std::int64_t rows = in.rows, heads = in.heads, dim = in.dim, pixels = in.pixels, kw = in.kw;
    const Isa build = kernel_isa(isa, "shared_attention");
    py::array_t<float> out({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(heads),
                            static_cast<py::ssize_t>(dim)});
    if (rows == 0) return out;
    const std::int64_t vecs = (pixels + kLanes - 1) / kLanes, nv = (dim + kLanes - 1) / kLanes;
    std::vector<float> kt_buf, v_buf;
    v16f *kt = aligned_vecs(kt_buf, heads * dim * vecs), *vp = aligned_vecs(v_buf, heads * vecs * kLanes * nv);
    const auto *ks = static_cast<const float *>(k.data()), *vs = static_cast<const float *>(v.data());
    const SharedAttentionArgs args{static_cast<const float *>(q.data()), kt, vp, out.mutable_data(), rows, pixels,
                                   vecs, static_cast<int>(heads), static_cast<int>(dim),
                                   kw ? static_cast<const float *>(rel_h.data()) : nullptr,
                                   kw ? static_cast<const float *>(rel_w.data()) : nullptr, static_cast<int>(kw)};
    const SharedAttentionFn fn = for_build<SharedAttentionFn>(build, shared_attention_avx512, shared_attention_avx2,
                                                              shared_attention_generic);
    const int item_rows = sa_item_rows(nv);
    const std::int64_t items = heads * ((rows + item_rows - 1) / item_rows);
    // cost in parallel_for's units: the multiply-adds of an item's two products, its exps counting 16
    const double item_cost = static_cast<double>(item_rows) * vecs * kLanes * (dim + nv * kLanes + 16);
    {
        py::gil_scoped_release release;
        const SharedLayoutFn layout = build == Isa::avx512 ? shared_layout_avx512 : shared_layout_generic;
        parallel_for(vecs, kLanes * heads * (dim + nv * kLanes), threads,
                     [&](std::int64_t j0, std::int64_t j1) { layout(args, ks, vs, j0, j1); });
        parallel_for(items, item_cost, threads, [&](std::int64_t i0, std::int64_t i1) {
            std::vector<float> storage;
            v16f *logits = aligned_vecs(storage, item_rows * vecs);
            fn(args, i0, i1, logits);
        });
    }
    return out;
}

// ------------------------------------------------------------------------------------------------
// The same attention core in bfloat16 on AMX tiles (the global attention of int8 and bf16 encoders, and with
// heads_first the windowed attention of bf16 ones, batched over windows x heads): q, k and v rounded to bfloat16
// (nearest even), both products accumulated in float32 by the tile unit (TDPBF16PS), the softmax in float32 with its
// weights rounded to bfloat16 for the second product and their sum kept in float32. 16 query rows of one head at
// a time: their logits against every key (16 x P32 floats, P32 = P rounded up to 32), the relative position terms,
// maxima, exp and sums in place with AVX-512, the weights as bfloat16 rows that the value product loads as A tiles.
// Keys and values are laid out as B tiles (channel or key pairs interleaved, as TDPBF16PS reads them): once per call
// for all heads when heads have many rows (work items: blocks of 16 rows), else by the thread that runs a head
// (work items: heads; kAmxHeadItemRows). Linux lets a process use the tiles after asking for them
// (arch_prctl ARCH_REQ_XCOMP_PERM); has_amx_bf16 asks once.

constexpr int kAmxRows = 16;          // rows of a tile: query rows per work item
constexpr int kAmxDepth = 32;         // bfloat16 values in a tile row (64 bytes): one TDPBF16PS's reduction
constexpr int kAmxTile = 16 * 32;     // bfloat16 values in a tile
constexpr int kAmxLag = 4;            // key blocks between a logit tile's store and the vector loads of it

// AVX512-BF16 (VCVTNE2PS2BF16, VDPBF16PS): Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later.
bool has_avx512_bf16() {
    static const bool has = [] {
        unsigned a, b, c, d;
        return best_isa() == Isa::avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
    }();
    return has;
}

bool has_amx_bf16() {
    static const bool has = [] {
        unsigned a, b, c, d;
        if (!has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        if (!(d >> 24 & 1) || !(d >> 22 & 1)) return false;  // AMX-TILE, AMX-BF16
#ifdef SYS_arch_prctl
        constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
        return false;
#endif
    }();
    return has;
}

// float32 -> bfloat16 bits, rounding to nearest even (as VCVTNEPS2BF16 for finite values).
inline std::uint16_t to_bf16(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return static_cast<std::uint16_t>((bits + 0x7fffu + (bits >> 16 & 1u)) >> 16);
}

// A head's keys as B tiles: [P32 / 16][kc][16 channel pairs][16 keys][2]; its values: [P32 / 32][vc][16 key
// pairs][16 channels][2] (bf16_kv_layout).
// Where row r of head n of an attention operand starts, in its elements: the heads in batches of `group`,
// (n / group) batch + r row + (n % group) head. [R, H, d] (token-major): {H, 0, H d, d}; [H, R, d] (heads first):
// {1, R d, d, 0}; a window-batched qkv [B, L, 3, G, d]: {G, 3 L G d, 3 G d, d} from q's, k's or v's first value.
struct Bf16KvLayout {
    std::int64_t group, batch, row, head;
    std::int64_t at(std::int64_t n, std::int64_t r) const { return n / group * batch + r * row + n % group * head; }
};

struct Bf16AttentionArgs {
    const float *q, *k, *v;  // their layouts q_at, kv_at (k and v alike)
    float *out;              // out_at
    Bf16KvLayout q_at, kv_at, out_at;
    std::int64_t rows, pixels, padded;  // R, P, P32
    int heads, dim, kc, vc;  // H, d, ceil(d / 32) channel chunks of the logits, ceil(d / 16) value tiles
    const float *rel_h;      // the terms' arrays (rows of kh values at rel_at), or null
    const float *rel_w;      // (rows of kw values at rel_at)
    Bf16KvLayout rel_at;
    int kw;
    float scale;             // q's factor, applied in float32 before the rounding to bfloat16
    // or the terms from q and tables (relative position embeddings, SAM's get_rel_pos): query row r at (r / qw,
    // r % qw) of its grid, rel_h[a] = sum_c q[c] table_h[r / qw][c][a], rel_w[b] = sum_c q[c] table_w[r % qw][c][b]
    // (tables transposed [qh][d][kh16], [qw][d][kw16], kh16 and kw16 the sizes rounded up to 16), or null
    const float *table_h, *table_w;
    int qw, kh16, kw16;
    // or a dense bias of each head's logits: head n's [R, P] at bias + (n % bias_groups) R P (TinyViT's attention
    // biases, the same for every window), or null
    const float *bias = nullptr;
    std::int64_t bias_groups = 1;
    bool tiles = true;       // the products on AMX tiles (TDPBF16PS), else with AVX512-BF16's VDPBF16PS
};

#define AVX512_TARGET "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"
#define BF16_TARGET "avx512bf16," AVX512_TARGET
#define VNNI_TARGET "avx512vnni," AVX512_TARGET
#define AMX_TARGET "amx-tile,amx-bf16," BF16_TARGET

// float32 lanes -> their bfloat16 bits (to_bf16's rounding: nearest even) in the low 16 bits of each 32-bit lane.
__attribute__((always_inline, target(BF16_TARGET))) inline __m512i bf16_lanes(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
}

// The mask of the first `count` of 16 lanes (none for count <= 0, all for count >= 16).
inline __mmask16 first_lanes(std::int64_t count) {
    return count >= 16 ? 0xffff : count > 0 ? static_cast<__mmask16>((1u << count) - 1) : 0;
}

// The lanes of `count` floats from x (zeros past count; count may be <= 0).
__attribute__((always_inline, target(AVX512_TARGET))) inline __m512 load_first(const float *x, std::int64_t count) {
    return _mm512_maskz_loadu_ps(first_lanes(count), x);
}

// Head h's keys and values of pixel chunks [t0, t1) (32 pixels each) into its tile layouts kb, vb (zero past P and
// past d), rounded as to_bf16: a key's 32 channels of a chunk as 16 channel pairs scattered down a tile column, a
// pair of keys' 16 channels as one tile row of pairs.
__attribute__((target(BF16_TARGET))) void bf16_kv_layout(const Bf16AttentionArgs &a, std::int64_t h, std::int64_t t0,
                                                    std::int64_t t1, std::uint16_t *kb, std::uint16_t *vb) {
    const float *k = a.k, *v = a.v;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (std::int64_t t = t0; t < t1; ++t) {
        for (std::int64_t j = 2 * t; j < 2 * t + 2; ++j)
            for (int c = 0; c < a.kc; ++c) {
                auto *tile = reinterpret_cast<int *>(kb + (j * a.kc + c) * kAmxTile);
                const std::int64_t left = a.dim - c * kAmxDepth;
                for (int n = 0; n < 16; ++n) {
                    const std::int64_t p = j * 16 + n;
                    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                    if (p < a.pixels) {
                        const float *src = k + a.kv_at.at(h, p) + c * kAmxDepth;
                        lo = bf16_lanes(load_first(src, left));
                        hi = bf16_lanes(load_first(src + 16, left - 16));
                    }
                    const __m512i pairs = _mm512_or_si512(_mm512_permutex2var_epi32(lo, even, hi),
                                                          _mm512_slli_epi32(_mm512_permutex2var_epi32(lo, odd, hi), 16));
                    _mm512_i32scatter_epi32(tile + n, column, pairs, 4);  // element (pair i, key n): i * 16 + n
                }
            }
        for (int c = 0; c < a.vc; ++c) {
            auto *tile = reinterpret_cast<__m512i *>(vb + (t * a.vc + c) * kAmxTile);
            const std::int64_t left = a.dim - c * 16;
            for (int i = 0; i < 16; ++i) {
                const std::int64_t p = t * kAmxDepth + 2 * i;
                __m512i first = _mm512_setzero_si512(), second = _mm512_setzero_si512();
                if (p < a.pixels) first = bf16_lanes(load_first(v + a.kv_at.at(h, p) + c * 16, left));
                if (p + 1 < a.pixels) second = bf16_lanes(load_first(v + a.kv_at.at(h, p + 1) + c * 16, left));
                _mm512_store_si512(tile + i, _mm512_or_si512(first, _mm512_slli_epi32(second, 16)));
            }
        }
    }
}

struct alignas(64) AmxTileConfig {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {};
    std::uint8_t rows[16] = {};
};

// exp(x - m) for the weights: 2^t with t = x log2(e) + shift (shift = -m log2(e)), as 2^round(t) p(t - round(t)),
// p the degree-4 minimax polynomial of 2^f on [-0.5, 0.5] (relative error 2.7e-6: the weights are rounded to
// bfloat16, 2^-9, after it). kAmxMasked gives 0 (where -inf would give NaN).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kAmxMasked = -1e30f;

__attribute__((always_inline, target(AMX_TARGET))) inline v16f softmax_exp(v16f x, __m512 shift) {
    const __m512 t = _mm512_fmadd_ps(reinterpret_cast<__m512>(x), _mm512_set1_ps(kLog2e), shift);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00957007f), f, _mm512_set1_ps(0.05591777f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024744f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312185f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999993f));
    return reinterpret_cast<v16f>(_mm512_scalef_ps(p, n));
}

// A query row's relative position terms from a transposed table (Bf16AttentionArgs::table_h or table_w):
// out[a] = sum_c q[c] table[c][a] for a < n16, in float32 (table and out 64-byte aligned, n16 a multiple of 16).
__attribute__((target(BF16_TARGET))) void rel_table_terms(const float *q, int d, const float *table, int n16,
                                                         float *out) {
    for (int a = 0; a < n16; a += kLanes) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < d; ++c)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_load_ps(table + c * n16 + a), acc);
        _mm512_store_ps(out + a, acc);
    }
}

// Query rows r0..r0 + 15 (those below R) of head h, whose keys and values kb, vb hold (bf16_kv_layout). logits: 16 rows
// of P32 + 16 floats; probs: 16 rows of P32 + 32 bfloat16 (rows 64 bytes past a multiple of 4 KiB, so that a tile's
// 16 rows do not share one set of the L1 cache), both 64-byte aligned. terms: null, or (a key grid whose width kw is
// not a multiple of 16, or a.bias) 16 rows of P32 floats, zero past P, for the rows' relative position terms or
// bias. Tiles (the products on the AMX tiles) 0-1: q; 2-3: logits; 4-7: keys. Then 0-3: the value sums; 4: weights;
// 5-7: values. Without Tiles the same products by VDPBF16PS on the tiles' rows as vectors.
template <int KC, int VC, bool Tiles>
__attribute__((target(AMX_TARGET))) void bf16_rows(const Bf16AttentionArgs &a, int h, std::int64_t r0,
                                                  const std::uint16_t *kb, const std::uint16_t *vb, float *logits,
                                                  std::uint16_t *probs, float *terms) {
    const int d = a.dim, n = static_cast<int>(std::min<std::int64_t>(kAmxRows, a.rows - r0));
    const std::int64_t ld = a.padded + kLanes, lp = a.padded + kAmxDepth;  // row strides off 4 KiB multiples
    const std::int64_t blocks = a.padded / kLanes, chunks = a.padded / kAmxDepth;
    alignas(64) std::uint16_t q[kAmxRows][KC * kAmxDepth] = {};
    const __m512 scale = _mm512_set1_ps(a.scale);
    for (int r = 0; r < n; ++r)
        for (int c = 0; c < KC * kAmxDepth; c += 16)
            _mm256_store_si256(reinterpret_cast<__m256i *>(&q[r][c]), _mm512_cvtepi32_epi16(bf16_lanes(_mm512_mul_ps(
                                   load_first(a.q + a.q_at.at(h, r0 + r) + c, d - c), scale))));
    if constexpr (Tiles) {
        _tile_loadd(0, &q[0][0], sizeof q[0]);
        if constexpr (KC == 2) _tile_loadd(1, &q[0][kAmxDepth], sizeof q[0]);
    }
    // the logits of each pair of key blocks, with the terms added and the row maxima taken while they are in L1
    const std::int64_t full = a.pixels / kLanes;  // key blocks with all 16 keys below P
    const float *rel_h[kAmxRows] = {}, *rel_w[kAmxRows] = {};  // rows past R: the last row's
    const std::int64_t kh = a.kw ? a.pixels / a.kw : 0;
    alignas(64) float rel_rows[kAmxRows][2][kSaMaxVecs * kLanes];  // the terms computed from the tables
    for (int r = 0; r < kAmxRows && a.kw; ++r) {
        const std::int64_t row = r0 + std::min(r, n - 1);
        if (a.table_h) {
            const float *qr = a.q + a.q_at.at(h, row);
            rel_table_terms(qr, d, a.table_h + row / a.qw * d * a.kh16, a.kh16, rel_rows[r][0]);
            rel_table_terms(qr, d, a.table_w + row % a.qw * d * a.kw16, a.kw16, rel_rows[r][1]);
            rel_h[r] = rel_rows[r][0], rel_w[r] = rel_rows[r][1];
        } else {
            rel_h[r] = a.rel_h + a.rel_at.at(h, row) * kh;
            rel_w[r] = a.rel_w + a.rel_at.at(h, row) * a.kw;
        }
    }
    if (terms && a.bias)  // the rows' bias
        for (int r = 0; r < kAmxRows; ++r) {
            const float *src = a.bias + (h % a.bias_groups * a.rows + r0 + std::min(r, n - 1)) * a.pixels;
            for (std::int64_t j = 0; j < a.pixels; j += kLanes)
                _mm512_mask_storeu_ps(terms + r * a.padded + j, first_lanes(a.pixels - j),
                                      load_first(src + j, a.pixels - j));
        }
    else if (terms)  // key p = i kw + j: rel_h[i] + rel_w[j]
        for (int r = 0; r < kAmxRows; ++r)
            for (std::int64_t i = 0; i < kh; ++i)
                for (std::int64_t j = 0; j < a.kw; j += kLanes)
                    _mm512_mask_storeu_ps(terms + r * a.padded + i * a.kw + j, first_lanes(a.kw - j),
                                          _mm512_add_ps(_mm512_set1_ps(rel_h[r][i]), load_first(rel_w[r] + j, a.kw - j)));
    v16f mx[kAmxRows];
    for (int r = 0; r < kAmxRows; ++r) mx[r] = v16f{} + kAmxMasked;
    std::int64_t grid_row = 0, grid_col = 0;  // of key block j's first key on the kh x kw grid
    auto finish = [&](std::int64_t j) {
        auto *block = reinterpret_cast<v16f *>(logits + j * kLanes);
        const std::int64_t step = ld / kLanes;
        for (int r = 0; r < kAmxRows; ++r) {
            v16f x = block[r * step];
            if (terms)
                x += load16(terms + r * a.padded + j * kLanes);
            else if (a.kw && j < full)  // kw a multiple of 16: the block lies on one row of the grid
                x += rel_h[r][grid_row] + load16(rel_w[r] + grid_col);
            if (j >= full)  // keys past P get weight 0
                for (std::int64_t l = 0; l < kLanes; ++l)
                    if (j * kLanes + l >= a.pixels) x[l] = kAmxMasked;
            block[r * step] = x;
            mx[r] = x > mx[r] ? x : mx[r];
        }
        if (a.kw && !terms && (grid_col += kLanes) == a.kw) grid_col = 0, ++grid_row;
    };
    if constexpr (!Tiles) {  // a block of 16 keys against the 16 rows: a vector of 16 keys per channel pair
        for (std::int64_t j = 0; j < blocks; ++j) {
            __m512 acc[kAmxRows];
            for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
            for (int i = 0; i < KC * 16; ++i) {  // chunk i / 16's pair i % 16: row i % 16 of tile (j, i / 16)
                const __m512bh keys = reinterpret_cast<__m512bh>(
                    _mm512_load_si512(kb + (j * KC + i / 16) * kAmxTile + i % 16 * kAmxDepth));
                for (int r = 0; r < kAmxRows; ++r) {
                    std::int32_t pair;  // row r's channels 2 i and 2 i + 1
                    std::memcpy(&pair, &q[r][2 * i], sizeof pair);
                    acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), keys);
                }
            }
            for (int r = 0; r < kAmxRows; ++r) _mm512_store_ps(logits + r * ld + j * kLanes, acc[r]);
            finish(j);
        }
    }
    for (std::int64_t j = 0; Tiles && j < blocks; j += 2, kb += 2 * KC * kAmxTile) {
        _tile_zero(2);
        _tile_zero(3);
        _tile_loadd(4, kb, 64);
        _tile_loadd(5, kb + KC * kAmxTile, 64);
        _tile_dpbf16ps(2, 0, 4);
        _tile_dpbf16ps(3, 0, 5);
        if constexpr (KC == 2) {
            _tile_loadd(6, kb + kAmxTile, 64);
            _tile_loadd(7, kb + 3 * kAmxTile, 64);
            _tile_dpbf16ps(2, 1, 6);
            _tile_dpbf16ps(3, 1, 7);
        }
        _tile_stored(2, logits + j * 16, ld * sizeof(float));
        _tile_stored(3, logits + (j + 1) * 16, ld * sizeof(float));
        if (j >= kAmxLag) finish(j - kAmxLag), finish(j - kAmxLag + 1);
    }
    for (std::int64_t j = std::max<std::int64_t>(0, blocks - kAmxLag); Tiles && j < blocks; ++j) finish(j);
    // exp, the sums, the weights in bfloat16
    float sum[kAmxRows] = {};
    for (int r = 0; r < n; ++r) {
        const auto *row = reinterpret_cast<const v16f *>(logits + r * ld);
        float top = mx[r][0];
        for (int l = 1; l < kLanes; ++l) top = std::max(top, mx[r][l]);
        const __m512 shift = _mm512_set1_ps(-top * kLog2e);
        v16f s = v16f{};
        auto *weights = reinterpret_cast<__m512i *>(probs + r * lp);
        for (std::int64_t j = 0; j < blocks; j += 2) {  // two vectors into one of 32 bfloat16
            const v16f e0 = softmax_exp(row[j], shift), e1 = softmax_exp(row[j + 1], shift);
            s += e0 + e1;
            _mm512_store_si512(weights + j / 2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(
                                                    reinterpret_cast<__m512>(e1), reinterpret_cast<__m512>(e0))));
        }
        for (int l = 0; l < kLanes; ++l) sum[r] += s[l];
    }
    alignas(64) float o[kAmxRows][VC * 16];
    if constexpr (Tiles) {
        _tile_zero(0);
        if constexpr (VC > 1) _tile_zero(1);
        if constexpr (VC > 2) _tile_zero(2);
        if constexpr (VC > 3) _tile_zero(3);
        for (std::int64_t t = 0; t < chunks; ++t, vb += VC * kAmxTile) {
            _tile_loadd(4, probs + t * kAmxDepth, lp * sizeof(std::uint16_t));
            _tile_loadd(5, vb, 64);
            _tile_dpbf16ps(0, 4, 5);
            if constexpr (VC > 1) {
                _tile_loadd(6, vb + kAmxTile, 64);
                _tile_dpbf16ps(1, 4, 6);
            }
            if constexpr (VC > 2) {
                _tile_loadd(7, vb + 2 * kAmxTile, 64);
                _tile_dpbf16ps(2, 4, 7);
            }
            if constexpr (VC > 3) {
                _tile_loadd(5, vb + 3 * kAmxTile, 64);
                _tile_dpbf16ps(3, 4, 5);
            }
        }
        _tile_stored(0, &o[0][0], sizeof o[0]);
        if constexpr (VC > 1) _tile_stored(1, &o[0][16], sizeof o[0]);
        if constexpr (VC > 2) _tile_stored(2, &o[0][32], sizeof o[0]);
        if constexpr (VC > 3) _tile_stored(3, &o[0][48], sizeof o[0]);
    } else {  // 4 rows at a time: a pair of keys' weights times a vector of 16 channel pairs (a row of tile (t, c))
        for (int g0 = 0; g0 < n; g0 += 4) {
            __m512 acc[4][VC];
            for (int r = 0; r < 4; ++r)
                for (int c = 0; c < VC; ++c) acc[r][c] = _mm512_setzero_ps();
            for (std::int64_t t = 0; t < chunks; ++t)
                for (int i = 0; i < 16; ++i) {
                    __m512bh values[VC];
                    for (int c = 0; c < VC; ++c)
                        values[c] = reinterpret_cast<__m512bh>(
                            _mm512_load_si512(vb + (t * VC + c) * kAmxTile + i * kAmxDepth));
                    for (int r = 0; r < 4; ++r) {
                        std::int32_t pair;  // the weights of keys 32 t + 2 i and the next
                        std::memcpy(&pair, probs + (g0 + r) * lp + t * kAmxDepth + 2 * i, sizeof pair);
                        const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
                        for (int c = 0; c < VC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, values[c]);
                    }
                }
            for (int r = 0; r < 4; ++r)
                for (int c = 0; c < VC; ++c) _mm512_store_ps(&o[g0 + r][c * 16], acc[r][c]);
        }
    }
    for (int r = 0; r < n; ++r) {
        float *dst = a.out + a.out_at.at(h, r0 + r);
        const __m512 total = _mm512_set1_ps(sum[r]);
        for (int c = 0; c < d; c += 16) {
            _mm512_mask_storeu_ps(dst + c, first_lanes(d - c), _mm512_div_ps(_mm512_load_ps(&o[r][c]), total));
        }
    }
}

// bf16_rows for a's channel chunks (kc, vc: d up to 16, 32, 48, 64).
template <bool Tiles>
__attribute__((target(AMX_TARGET))) void bf16_rows_of(const Bf16AttentionArgs &a, int h, std::int64_t r0,
                                                     const std::uint16_t *kb, const std::uint16_t *vb, float *logits,
                                                     std::uint16_t *probs, float *terms) {
    switch (a.kc * 4 + a.vc) {
        case 1 * 4 + 1: bf16_rows<1, 1, Tiles>(a, h, r0, kb, vb, logits, probs, terms); break;
        case 1 * 4 + 2: bf16_rows<1, 2, Tiles>(a, h, r0, kb, vb, logits, probs, terms); break;
        case 2 * 4 + 3: bf16_rows<2, 3, Tiles>(a, h, r0, kb, vb, logits, probs, terms); break;
        default: bf16_rows<2, 4, Tiles>(a, h, r0, kb, vb, logits, probs, terms); break;
    }
}

// Heads of at most this many query rows lay out their keys and values in the thread that runs all their rows (each
// head a work item: SAM ViT's windowed blocks, 196 rows); heads of more rows share one layout of all heads' keys and
// values among the threads, their blocks of 16 rows the work items (the global blocks, 4096 rows).
constexpr std::int64_t kAmxHeadItemRows = 256;

// Work items [i0, i1) with the tiles configured for this thread: heads (by_head: their keys and values laid out
// here, then each block of 16 rows), else blocks of 16 rows (head-major) of heads laid out in kb, vb.
__attribute__((target(AMX_TARGET))) void bf16_attention_items(const Bf16AttentionArgs &a, bool by_head,
                                                             const std::uint16_t *kb, const std::uint16_t *vb,
                                                             std::int64_t i0, std::int64_t i1) {
    const std::int64_t blocks = (a.rows + kAmxRows - 1) / kAmxRows, chunks = a.padded / kAmxDepth;
    const std::int64_t head_kb = a.padded / 16 * a.kc * kAmxTile, head_vb = chunks * a.vc * kAmxTile;
    std::vector<float> logit_buf, prob_buf, term_buf, kb_buf, vb_buf;  // (bfloat16 pairs in float-sized slots)
    float *logits = reinterpret_cast<float *>(aligned_vecs(logit_buf, kAmxRows * (a.padded + kLanes) / kLanes));
    auto *probs = reinterpret_cast<std::uint16_t *>(
        aligned_vecs(prob_buf, kAmxRows * (a.padded + kAmxDepth) / kLanes / 2));
    float *terms = a.kw % kLanes || a.bias
                       ? reinterpret_cast<float *>(aligned_vecs(term_buf, kAmxRows * a.padded / kLanes)) : nullptr;
    auto *own_kb = by_head ? reinterpret_cast<std::uint16_t *>(aligned_vecs(kb_buf, head_kb / 2 / kLanes)) : nullptr;
    auto *own_vb = by_head ? reinterpret_cast<std::uint16_t *>(aligned_vecs(vb_buf, head_vb / 2 / kLanes)) : nullptr;
    AmxTileConfig config;
    for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
    if (a.tiles) _tile_loadconfig(&config);
    auto rows = [&](int h, std::int64_t r0, const std::uint16_t *hkb, const std::uint16_t *hvb) {
        if (a.tiles)
            bf16_rows_of<true>(a, h, r0, hkb, hvb, logits, probs, terms);
        else
            bf16_rows_of<false>(a, h, r0, hkb, hvb, logits, probs, terms);
    };
    for (std::int64_t i = i0; i < i1; ++i) {
        if (by_head) {
            bf16_kv_layout(a, i, 0, chunks, own_kb, own_vb);
            for (std::int64_t r0 = 0; r0 < a.rows; r0 += kAmxRows) rows(static_cast<int>(i), r0, own_kb, own_vb);
        } else {
            const std::int64_t h = i / blocks;
            rows(static_cast<int>(h), i % blocks * kAmxRows, kb + h * head_kb, vb + h * head_vb);
        }
    }
    if (a.tiles) _tile_release();
}

// Runs the attention of `a` (arrays checked; a.tiles: the AMX tiles available, else AVX512-BF16) on up to `threads`
// threads.
void bf16_attention_run(const Bf16AttentionArgs &a, std::int64_t threads) {
    const std::int64_t chunks = a.padded / kAmxDepth;
    const bool by_head = a.rows <= kAmxHeadItemRows;
    const std::int64_t blocks = (a.rows + kAmxRows - 1) / kAmxRows;
    const std::int64_t head_kb = a.padded / 16 * a.kc * kAmxTile, head_vb = chunks * a.vc * kAmxTile;
    std::vector<float> kb_buf, vb_buf;  // all heads' keys and values when they are shared (bfloat16 pairs in floats)
    auto shared = [&](std::vector<float> &buf, std::int64_t per_head) {
        return by_head ? nullptr
                       : reinterpret_cast<std::uint16_t *>(aligned_vecs(buf, a.heads * per_head / 2 / kLanes));
    };
    std::uint16_t *kb = shared(kb_buf, head_kb), *vb = shared(vb_buf, head_vb);
    // cost of 16 rows: the exps (16 each) and the products (1/16 of their multiply-adds, as the tiles run them)
    const double rows_cost = kAmxRows * a.padded * (16.0 + 2.0 * a.dim / 16), layout_cost = a.padded * 2.0 * a.dim;
    {
        py::gil_scoped_release release;
        if (by_head) {
            parallel_for(a.heads, blocks * rows_cost + layout_cost, threads, [&](std::int64_t i0, std::int64_t i1) {
                bf16_attention_items(a, true, kb, vb, i0, i1);
            });
        } else {
            parallel_for(a.heads * chunks, layout_cost / chunks, threads, [&](std::int64_t u0, std::int64_t u1) {
                for (std::int64_t u = u0; u < u1; ++u)
                    bf16_kv_layout(a, u / chunks, u % chunks, u % chunks + 1, kb + u / chunks * head_kb,
                               vb + u / chunks * head_vb);
            });
            parallel_for(a.heads * blocks, rows_cost, threads, [&](std::int64_t i0, std::int64_t i1) {
                bf16_attention_items(a, false, kb, vb, i0, i1);
            });
        }
    }
}

// Whether the bfloat16 kernel `name` runs on AMX tiles (isa 'amx', or 'auto' where has_amx_bf16()) or with
// AVX512-BF16's VDPBF16PS ('avx512', or 'auto' without the tiles). ValueError for another isa, RuntimeError where
// the CPU lacks the instructions asked for.
bool bf16_tiles(const std::string &name, const std::string &isa) {
    if (isa != "auto" && isa != "amx" && isa != "avx512")
        throw py::value_error(name + ": isa must be 'auto', 'amx' or 'avx512', got '" + isa + "'");
    const bool amx = isa == "amx" || (isa == "auto" && has_amx_bf16());
    if (amx && !has_amx_bf16())
        throw std::runtime_error(name + ": this CPU or operating system gives no AMX-BF16 tiles "
                                        "(has_amx_bf16() is False); use isa 'avx512' or 'auto'");
    if (!amx && !has_avx512_bf16())
        throw std::runtime_error(name + ": this CPU has no AVX512-BF16 (has_avx512_bf16() is False)");
    return amx;
}

py::array_t<float> shared_attention_bf16(py::handle q_obj, py::handle k_obj, py::handle v_obj,
                                         py::handle rel_h_obj, py::handle rel_w_obj, std::int64_t threads,
                                         double scale, bool heads_first, py::handle out_obj,
                                         const std::string &isa) {
    check_threads("shared_attention_bf16", threads);
    const AttentionInputs in = attention_inputs("shared_attention_bf16", q_obj, k_obj, v_obj, rel_h_obj, rel_w_obj,
                                                heads_first, true);
    if (!std::isfinite(scale)) throw py::value_error("shared_attention_bf16: scale must be finite, got " +
                                                     std::to_string(scale));
    const auto rows = static_cast<py::ssize_t>(in.rows), heads = static_cast<py::ssize_t>(in.heads);
    const py::ssize_t axis0 = heads_first ? heads : rows, axis1 = heads_first ? rows : heads;
    py::array_t<float> out = checked_out(out_obj, {axis0, axis1, in.dim}, {{in.q, "q"}, {in.k, "k"}, {in.v, "v"},
                                                                          {in.rel_h, "rel_h"}, {in.rel_w, "rel_w"}});
    const bool tiles = bf16_tiles("shared_attention_bf16", isa);
    if (in.rows == 0) return out;
    const std::int64_t padded = (in.pixels + kAmxDepth - 1) / kAmxDepth * kAmxDepth;
    const int kc = static_cast<int>((in.dim + kAmxDepth - 1) / kAmxDepth), vc = static_cast<int>((in.dim + 15) / 16);
    const std::int64_t d = in.dim, h = in.heads;
    const Bf16KvLayout q_at = heads_first ? Bf16KvLayout{1, in.rows * d, d, 0} : Bf16KvLayout{h, 0, h * d, d};
    const Bf16KvLayout kv_at = heads_first ? Bf16KvLayout{1, in.pixels * d, d, 0} : Bf16KvLayout{h, 0, h * d, d};
    const Bf16KvLayout rel_at = heads_first ? Bf16KvLayout{1, in.rows, 1, 0} : Bf16KvLayout{h, 0, h, 1};
    const Bf16AttentionArgs args{static_cast<const float *>(in.q.data()), static_cast<const float *>(in.k.data()),
                                static_cast<const float *>(in.v.data()), out.mutable_data(), q_at, kv_at, q_at,
                                in.rows, in.pixels, padded, static_cast<int>(in.heads), static_cast<int>(in.dim), kc,
                                vc,
                                in.kw ? static_cast<const float *>(in.rel_h.data()) : nullptr,
                                in.kw ? static_cast<const float *>(in.rel_w.data()) : nullptr, rel_at,
                                static_cast<int>(in.kw), static_cast<float>(scale), nullptr, nullptr, 0, 0, 0,
                                nullptr, 1, tiles};
    bf16_attention_run(args, threads);
    return out;
}

// SAM ViT's windowed attention straight from the qkv product: qkv [B, L, 3, G, d] (B windows of L tokens, G heads),
// the relative position terms from q (unscaled) and the tables of get_rel_pos, table_h [qh, kh, d] and table_w
// [qw, kw, d] (qh qw = L = kh kw: each window attends to itself) -> [B, L, G, d].
py::array_t<float> window_attention_bf16(py::handle qkv_obj, py::handle table_h_obj, py::handle table_w_obj,
                                         double scale, py::handle out_obj, std::int64_t threads,
                                         const std::string &isa) {
    check_threads("window_attention_bf16", threads);
    const py::array qkv = require<float>(qkv_obj, "qkv", "float32", 5);
    const py::array table_h = require<float>(table_h_obj, "table_h", "float32", 3);
    const py::array table_w = require<float>(table_w_obj, "table_w", "float32", 3);
    const std::int64_t b = qkv.shape(0), length = qkv.shape(1), g = qkv.shape(3), d = qkv.shape(4);
    if (qkv.shape(2) != 3 || g < 1 || d < 1 || d > kSaMaxVecs * kLanes)
        throw py::value_error("qkv: expected [B, L, 3, heads >= 1, d] with 1 <= d <= " +
                              std::to_string(kSaMaxVecs * kLanes) + ", got " + shape_str(qkv));
    const std::int64_t qh = table_h.shape(0), kh = table_h.shape(1), qw = table_w.shape(0), kw = table_w.shape(1);
    require_shape(table_h, "table_h", {qh, kh, d});
    require_shape(table_w, "table_w", {qw, kw, d});
    if (qh * qw != length || kh * kw != length || kh > kSaMaxVecs * kLanes || kw > kSaMaxVecs * kLanes)
        throw py::value_error("table_h, table_w: a query grid of " + std::to_string(qh) + " x " + std::to_string(qw) +
                              " and a key grid of " + std::to_string(kh) + " x " + std::to_string(kw) +
                              "; expected both of L = " + std::to_string(length) + " tokens, each side at most 64");
    if (!std::isfinite(scale)) throw py::value_error("window_attention_bf16: scale must be finite, got " +
                                                     std::to_string(scale));
    py::array_t<float> out = checked_out(out_obj, {b, length, g, d},
                                         {{qkv, "qkv"}, {table_h, "table_h"}, {table_w, "table_w"}});
    const bool tiles = bf16_tiles("window_attention_bf16", isa);
    if (b * length == 0) return out;
    // the tables transposed: [qh][d][kh16], [qw][d][kw16], zero past kh, kw
    const int kh16 = static_cast<int>((kh + kLanes - 1) / kLanes * kLanes);
    const int kw16 = static_cast<int>((kw + kLanes - 1) / kLanes * kLanes);
    std::vector<float> th_buf, tw_buf;
    float *th = reinterpret_cast<float *>(aligned_vecs(th_buf, qh * d * kh16 / kLanes));
    float *tw = reinterpret_cast<float *>(aligned_vecs(tw_buf, qw * d * kw16 / kLanes));
    const auto *h_src = static_cast<const float *>(table_h.data()), *w_src = static_cast<const float *>(table_w.data());
    for (std::int64_t i = 0; i < qh; ++i)
        for (std::int64_t a = 0; a < kh; ++a)
            for (std::int64_t c = 0; c < d; ++c) th[(i * d + c) * kh16 + a] = h_src[(i * kh + a) * d + c];
    for (std::int64_t j = 0; j < qw; ++j)
        for (std::int64_t a = 0; a < kw; ++a)
            for (std::int64_t c = 0; c < d; ++c) tw[(j * d + c) * kw16 + a] = w_src[(j * kw + a) * d + c];
    const auto *q = static_cast<const float *>(qkv.data());
    const Bf16KvLayout qkv_at{g, length * 3 * g * d, 3 * g * d, d}, out_at{g, length * g * d, g * d, d};
    const Bf16AttentionArgs args{q, q + g * d, q + 2 * g * d, out.mutable_data(), qkv_at, qkv_at, out_at,
                                length, length, (length + kAmxDepth - 1) / kAmxDepth * kAmxDepth,
                                static_cast<int>(b * g), static_cast<int>(d),
                                static_cast<int>((d + kAmxDepth - 1) / kAmxDepth), static_cast<int>((d + 15) / 16),
                                nullptr, nullptr, Bf16KvLayout{1, 0, 0, 0}, static_cast<int>(kw),
                                static_cast<float>(scale), th, tw, static_cast<int>(qw), kh16, kw16, nullptr, 1,
                                tiles};
    bf16_attention_run(args, threads);
    return out;
}

// TinyViT's windowed attention straight from the qkv product: qkv [B, L, G, 3, d] (B windows of L tokens, G heads,
// each head's q, k, v side by side), bias [G, L, L] (the attention biases, the same for every window) ->
// out[b, l, g] = softmax(scale q k^T + bias[g]) v of window b's head g: [B, L, G, d].
py::array_t<float> biased_attention_bf16(py::handle qkv_obj, py::handle bias_obj, double scale, py::handle out_obj,
                                         std::int64_t threads, const std::string &isa) {
    check_threads("biased_attention_bf16", threads);
    const py::array qkv = require<float>(qkv_obj, "qkv", "float32", 5);
    const py::array bias = require<float>(bias_obj, "bias", "float32", 3);
    const std::int64_t b = qkv.shape(0), length = qkv.shape(1), g = qkv.shape(2), d = qkv.shape(4);
    if (qkv.shape(3) != 3 || g < 1 || d < 1 || d > kSaMaxVecs * kLanes)
        throw py::value_error("qkv: expected [B, L, heads >= 1, 3, d] with 1 <= d <= " +
                              std::to_string(kSaMaxVecs * kLanes) + ", got " + shape_str(qkv));
    require_shape(bias, "bias", {g, length, length});
    if (!std::isfinite(scale)) throw py::value_error("biased_attention_bf16: scale must be finite, got " +
                                                     std::to_string(scale));
    py::array_t<float> out = checked_out(out_obj, {b, length, g, d}, {{qkv, "qkv"}, {bias, "bias"}});
    const bool tiles = bf16_tiles("biased_attention_bf16", isa);
    if (b * length == 0) return out;
    const auto *q = static_cast<const float *>(qkv.data());
    const Bf16KvLayout qkv_at{g, length * g * 3 * d, g * 3 * d, 3 * d}, out_at{g, length * g * d, g * d, d};
    const Bf16AttentionArgs args{q, q + d, q + 2 * d, out.mutable_data(), qkv_at, qkv_at, out_at,
                                length, length, (length + kAmxDepth - 1) / kAmxDepth * kAmxDepth,
                                static_cast<int>(b * g), static_cast<int>(d),
                                static_cast<int>((d + kAmxDepth - 1) / kAmxDepth), static_cast<int>((d + 15) / 16),
                                nullptr, nullptr, Bf16KvLayout{1, 0, 0, 0}, 0, static_cast<float>(scale), nullptr,
                                nullptr, 0, 0, 0, static_cast<const float *>(bias.data()), g, tiles};
    bf16_attention_run(args, threads);
    return out;
}

// ------------------------------------------------------------------------------------------------
// A weight product in bfloat16: out[M, N] = x[M, K] w[K, N] + bias, x and w rounded to bfloat16 (nearest even),
// the exact products summed in float32, on AMX tiles (TDPBF16PS) or, on CPUs without them, by AVX512-BF16's
// VDPBF16PS. w comes packed once (pack_bf16_weight: panels of 32 columns, chunks of 32 rows, as two B tiles of
// 16 row pairs x 16 columns x 2; a tile row is one vector of 16 column pairs for VDPBF16PS).
// A work item is a band of rows: its x rows rounded into a bfloat16 copy (K padded to 32 with zeros), then, for
// each group of panels (lb_group: their weights stay in the core's L2), each block of rows against each panel of
// the group: on the tiles 32 rows, 2 x 2 accumulator tiles started from the bias and stored straight into out
// where the block is whole; with VDPBF16PS 8 rows, 8 x 2 vectors of 16 columns.

constexpr int kLbBlock = 32;  // rows of a block, columns of a panel, rows of w per chunk
constexpr int kLbGroup = 8;   // panels whose weights one pass over the row blocks of a band reuses: at most
constexpr std::int64_t kLbGroupBytes = 768 << 10;  // and at most this many bytes of them (at least one panel):
// 8 panels of a split K 3072 weight are 3 MiB, past a core's 2 MiB L2 (benchmarks/kernels.py, 4096x3072 -> 768:
// 26.9 ms with 8 panels a group, 20.4 ms with this budget's 2)
constexpr int kLbDpRows = 8;  // rows of a VDPBF16PS block: 8 x 2 accumulators, 2 or 4 weight vectors, 1 of x

struct LinearBf16Args {
    const float *x;            // [M, K]
    const std::uint16_t *w;    // [N32 / 32][K32 / 32][2][16][16][2]
    const float *bias_tiles;   // [N32 / 32][2][16][16]: each tile's 16 rows the bias of its 16 columns
    float *out;                // [M, N]
    std::int64_t m, k, n, kp, panels;  // kp = K32, panels = N32 / 32
    int parts;                         // B tiles per chunk: 2 (W in bfloat16), 4 (W as hi + lo, both bfloat16)
    bool gelu;                         // out = GELU(x w + bias) (lb_gelu)
    std::int64_t group;                // panels per group (lb_group)
};

// Panels per group: as many as kLbGroupBytes of packed weights hold (a panel of linear_bf16: K32 / 32 chunks of
// `parts` 1 KiB tiles; of linear_int8x3: K4 x 64 bytes), between 1 and kLbGroup.
std::int64_t lb_group(std::int64_t panel_bytes) {
    return std::clamp<std::int64_t>(kLbGroupBytes / panel_bytes, 1, kLbGroup);
}

// GELU(y) = y (1 + erf(y / sqrt 2)) / 2 on 16 lanes. With z = |y| / sqrt 2, q = 1 - erf(z) = poly(t) exp(-z^2),
// t = 1 / (1 + 0.3275911 z) (Abramowitz & Stegun 7.1.26: erf's absolute error below 1.5e-7), and 1 + erf(y / sqrt 2)
// = 2 - q for y >= 0, q for y < 0 (no cancellation in the negative tail); exp(-z^2) = 2^n p(f), n = round(s),
// f = s - n, s = -z^2 log2(e), p the degree-6 Taylor polynomial of 2^f (relative error below 2e-7 on |f| <= 1/2).
__attribute__((always_inline, target(AVX512_TARGET))) inline __m512 lb_gelu(__m512 y) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(0.70710678118654752f));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f),
                                                                        _mm512_set1_ps(1.f)));
    __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    // (s held above -200, where 2^s is 0 in float32 anyway: y = +inf gives inf, not inf - inf = NaN)
    const __m512 s = _mm512_max_ps(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-kLog2e)), _mm512_set1_ps(-200.f));
    const __m512 n = _mm512_roundscale_ps(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(s, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.5403530393381606e-4f), f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    const __m512 q = _mm512_mul_ps(poly, _mm512_scalef_ps(p, n));
    const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.f), q), q);
    return _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), one_plus_erf);
}

// A stored 32 x 32 block of results whose GELU is still to be applied (in place, row stride ld), in steps of a few
// vectors: lb_band applies it between the tile products of the next block, so that the vector units work while
// the tile unit does (applied right after the block's stores, it added as much time as ONNX Runtime's GELU took).
struct LbPendingGelu {
    float *o = nullptr;
    std::int64_t ld = 0;
    int next = 0;  // vectors done, of 64 (row v / 2, columns 16 (v % 2))

    __attribute__((always_inline, target(BF16_TARGET))) inline void step(int vectors) {
        for (const int end = std::min(64, next + vectors); o && next < end; ++next) {
            float *p = o + (next / 2) * ld + (next % 2) * 16;
            _mm512_storeu_ps(p, lb_gelu(_mm512_loadu_ps(p)));
        }
    }
};

// Rows [r0, r1) of x as bfloat16 into xb, zeros past K and past r1 up to a multiple of 32 rows. tiled: as AMX A
// tiles, each 32-row block's chunks of 32 columns in turn, each chunk two 16 x 32 tiles of 1 KB ([block][chunk][2][16][32]:
// the tile loads read contiguous memory); else rows of kp values.
__attribute__((target(BF16_TARGET))) void lb_round_rows(const LinearBf16Args &a, std::int64_t r0, std::int64_t r1,
                                                       std::uint16_t *xb, bool tiled) {
    const std::int64_t rows = (r1 - r0 + kLbBlock - 1) / kLbBlock * kLbBlock, chunks = a.kp / kLbBlock;
    for (std::int64_t r = 0; r < rows; ++r) {
        const float *src = a.x + (r0 + r) * a.k;
        for (std::int64_t c = 0; c < chunks; ++c) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            if (r0 + r < r1) {
                const std::int64_t left = a.k - c * kLbBlock;
                lo = load_first(src + c * kLbBlock, left);
                hi = load_first(src + c * kLbBlock + 16, left - 16);
            }
            std::uint16_t *dst = tiled ? xb + ((r / kLbBlock * chunks + c) * kLbBlock + r % kLbBlock) * kLbBlock
                                       : xb + r * a.kp + c * kLbBlock;
            _mm512_store_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
        }
    }
}

// The band of rows [r0, r1) (xb: their bfloat16 copy as A tiles, lb_round_rows), tiles configured.
__attribute__((target(AMX_TARGET))) void lb_band(const LinearBf16Args &a, std::int64_t r0, std::int64_t r1,
                                                 const std::uint16_t *xb) {
    const std::int64_t chunks = a.kp / kLbBlock;
    const int gelu_steps = static_cast<int>((64 + chunks - 1) / chunks);  // vectors of the pending GELU per chunk
    LbPendingGelu pending;
    alignas(64) float edge[kLbBlock][kLbBlock];
    for (std::int64_t g0 = 0; g0 < a.panels; g0 += a.group) {
        const std::int64_t g1 = std::min(a.panels, g0 + a.group);
        for (std::int64_t m0 = r0; m0 < r1; m0 += kLbBlock) {
            const std::uint16_t *xa = xb + (m0 - r0) * a.kp;  // the block's tiles: 1024 values per chunk
            for (std::int64_t p = g0; p < g1; ++p) {
                const float *bias = a.bias_tiles + p * 2 * 256;
                _tile_loadd(0, bias, 64);
                _tile_loadd(1, bias + 256, 64);
                _tile_loadd(2, bias, 64);
                _tile_loadd(3, bias + 256, 64);
                const std::uint16_t *wp = a.w + p * chunks * a.parts * 512;
                // each product issued right after the loads it needs (each accumulator's order is the same)
                for (std::int64_t c = 0; c < chunks; ++c, wp += a.parts * 512) {
                    _tile_loadd(4, xa + c * 1024, 64);
                    _tile_loadd(6, wp, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(7, wp + 512, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(5, xa + c * 1024 + 512, 64);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    if (a.parts == 4) {  // the weights' low parts against the same x tiles
                        _tile_loadd(6, wp + 1024, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_loadd(7, wp + 1536, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    pending.step(gelu_steps);
                }
                pending.step(64);
                const std::int64_t n0 = p * kLbBlock;
                float *o = a.out + m0 * a.n + n0;
                const std::int64_t ldo = a.n * sizeof(float);
                if (m0 + kLbBlock <= a.m && n0 + kLbBlock <= a.n) {
                    _tile_stored(0, o, ldo);
                    _tile_stored(1, o + 16, ldo);
                    _tile_stored(2, o + 16 * a.n, ldo);
                    _tile_stored(3, o + 16 * a.n + 16, ldo);
                    if (a.gelu) pending = LbPendingGelu{o, a.n, 0};
                } else {
                    _tile_stored(0, &edge[0][0], sizeof edge[0]);
                    _tile_stored(1, &edge[0][16], sizeof edge[0]);
                    _tile_stored(2, &edge[16][0], sizeof edge[0]);
                    _tile_stored(3, &edge[16][16], sizeof edge[0]);
                    if (a.gelu) LbPendingGelu{&edge[0][0], kLbBlock, 0}.step(64);
                    const std::int64_t rows = std::min<std::int64_t>(kLbBlock, a.m - m0);
                    const std::int64_t cols = std::min<std::int64_t>(kLbBlock, a.n - n0);
                    for (std::int64_t r = 0; r < rows; ++r) std::memcpy(o + r * a.n, edge[r], cols * sizeof(float));
                }
            }
        }
    }
    pending.step(64);
}

// Rows [m0, m0 + rows) of the band (xa: their bfloat16 copy, row stride kp) against panel p with VDPBF16PS: each
// weight vector (16 columns x a pair of K) against the 8 rows' pairs broadcast, Parts / 2 weight parts summed into
// the same accumulators; the first `cols` columns of the first `rows` rows stored to o (row stride n).
template <int Parts>
__attribute__((target(BF16_TARGET))) void lb_block_dp(const LinearBf16Args &a, const std::uint16_t *xa,
                                                      std::int64_t p, float *o, std::int64_t rows, std::int64_t cols) {
    const std::int64_t chunks = a.kp / kLbBlock, pairs = a.kp / 2;
    const auto *x = reinterpret_cast<const std::int32_t *>(xa);
    const float *bias = a.bias_tiles + p * 2 * 256;  // each bias tile's rows: the bias of its 16 columns
    __m512 acc[kLbDpRows][2];
    for (int r = 0; r < kLbDpRows; ++r) acc[r][0] = _mm512_load_ps(bias), acc[r][1] = _mm512_load_ps(bias + 256);
    const std::uint16_t *wp = a.w + p * chunks * Parts * 512;
    for (std::int64_t c = 0; c < chunks; ++c, wp += Parts * 512) {
        for (int i = 0; i < 16; ++i) {
            __m512bh w[Parts];
            for (int t = 0; t < Parts; ++t)
                w[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + t * 512 + i * 32));  // (numpy: 16-byte aligned)
#pragma GCC unroll 8
            for (int r = 0; r < kLbDpRows; ++r) {
                const auto xr = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[r * pairs + c * 16 + i]));
                for (int t = 0; t < Parts; ++t) acc[r][t & 1] = _mm512_dpbf16_ps(acc[r][t & 1], xr, w[t]);
            }
        }
    }
    if (a.gelu)
        for (int r = 0; r < kLbDpRows; ++r) acc[r][0] = lb_gelu(acc[r][0]), acc[r][1] = lb_gelu(acc[r][1]);
    const __mmask16 m0 = first_lanes(cols), m1 = first_lanes(cols - 16);
    for (std::int64_t r = 0; r < rows; ++r) {
        _mm512_mask_storeu_ps(o + r * a.n, m0, acc[r][0]);
        _mm512_mask_storeu_ps(o + r * a.n + 16, m1, acc[r][1]);
    }
}

// The band of rows [r0, r1) (xb: their bfloat16 copy, zero rows past r1 up to a multiple of 32) with VDPBF16PS.
__attribute__((target(BF16_TARGET))) void lb_band_dp(const LinearBf16Args &a, std::int64_t r0, std::int64_t r1,
                                                     const std::uint16_t *xb) {
    for (std::int64_t g0 = 0; g0 < a.panels; g0 += a.group) {
        const std::int64_t g1 = std::min(a.panels, g0 + a.group);
        for (std::int64_t m0 = r0; m0 < r1; m0 += kLbDpRows) {
            const std::int64_t rows = std::min<std::int64_t>(kLbDpRows, r1 - m0);
            for (std::int64_t p = g0; p < g1; ++p) {
                const std::int64_t n0 = p * kLbBlock, cols = std::min<std::int64_t>(kLbBlock, a.n - n0);
                float *o = a.out + m0 * a.n + n0;
                if (a.parts == 4)
                    lb_block_dp<4>(a, xb + (m0 - r0) * a.kp, p, o, rows, cols);
                else
                    lb_block_dp<2>(a, xb + (m0 - r0) * a.kp, p, o, rows, cols);
            }
        }
    }
}

// Bands [i0, i1) of `band` rows, on the tiles (amx) or with VDPBF16PS.
__attribute__((target(AMX_TARGET))) void lb_items(const LinearBf16Args &a, std::int64_t band, std::int64_t i0,
                                                  std::int64_t i1, bool amx) {
    std::vector<float> storage;
    auto *xb = reinterpret_cast<std::uint16_t *>(aligned_vecs(storage, band * a.kp / 32));
    if (amx) {
        AmxTileConfig config;
        for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
        _tile_loadconfig(&config);
    }
    for (std::int64_t i = i0; i < i1; ++i) {
        const std::int64_t r0 = i * band, r1 = std::min(a.m, r0 + band);
        lb_round_rows(a, r0, r1, xb, amx);
        if (amx)
            lb_band(a, r0, r1, xb);
        else
            lb_band_dp(a, r0, r1, xb);
    }
    if (amx) _tile_release();
}

// A weight product's threads and activation checked: whether it applies GELU.
bool product_activation(const std::string &name, std::int64_t threads, const std::string &activation) {
    check_threads(name.c_str(), threads);
    if (activation != "none" && activation != "gelu")
        throw py::value_error(name + ": activation must be 'none' or 'gelu', got '" + activation + "'");
    return activation == "gelu";
}

py::array_t<float> linear_bf16(py::handle x_obj, py::handle w_obj, py::handle bias_obj, py::handle out_obj,
                               const std::string &isa, std::int64_t threads, const std::string &activation) {
    const bool gelu = product_activation("linear_bf16", threads, activation);
    const py::array x = require<float>(x_obj, "x", "float32", 2);
    const py::array w = require<std::uint16_t>(w_obj, "w", "uint16", 6);
    const py::array bias = require<float>(bias_obj, "bias", "float32", 1);
    const std::int64_t rows = x.shape(0), depth = x.shape(1), cols = bias.shape(0);
    const std::int64_t kp = (depth + kLbBlock - 1) / kLbBlock * kLbBlock, panels = (cols + kLbBlock - 1) / kLbBlock;
    if (w.shape(0) != panels || w.shape(1) != kp / kLbBlock || (w.shape(2) != 2 && w.shape(2) != 4) ||
        w.shape(3) != 16 || w.shape(4) != 16 || w.shape(5) != 2)
        throw py::value_error("w: expected the packing of a (" + std::to_string(depth) + ", " + std::to_string(cols) +
                              ") weight (pack_bf16_weight), shape (" + std::to_string(panels) + ", " +
                              std::to_string(kp / kLbBlock) + ", 2 or 4, 16, 16, 2); got " + shape_str(w));
    py::array_t<float> out = product_out(out_obj, rows, cols, x, w, "w", bias);
    const bool amx = bf16_tiles("linear_bf16", isa);
    if (rows == 0 || cols == 0) return out;
    std::vector<float> tiles_buf;
    float *tiles = reinterpret_cast<float *>(aligned_vecs(tiles_buf, panels * 2 * 16));
    const auto *b = static_cast<const float *>(bias.data());
    for (std::int64_t p = 0; p < panels; ++p)
        for (int t = 0; t < 2; ++t)
            for (int r = 0; r < 16; ++r)
                for (int c = 0; c < 16; ++c) {
                    const std::int64_t col = p * kLbBlock + t * 16 + c;
                    tiles[((p * 2 + t) * 16 + r) * 16 + c] = col < cols ? b[col] : 0.f;
                }
    const LinearBf16Args args{static_cast<const float *>(x.data()), static_cast<const std::uint16_t *>(w.data()),
                              tiles, out.mutable_data(), rows, depth, cols, kp, panels,
                              static_cast<int>(w.shape(2)), gelu,
                              lb_group(kp / kLbBlock * w.shape(2) * 1024)};
    // bands of whole 32-row blocks, at least one per thread where there are enough rows
    const std::int64_t blocks = (rows + kLbBlock - 1) / kLbBlock;
    const std::int64_t limit = threads > 0 ? threads : usable_cpus();
    const std::int64_t band_blocks = std::max<std::int64_t>(1, std::min<std::int64_t>(8, blocks / limit));
    const std::int64_t band = band_blocks * kLbBlock, items = (rows + band - 1) / band;
    {
        py::gil_scoped_release release;
        // cost: the multiply-adds as the tiles (1/16 of them) or VDPBF16PS (1/32 of them) run them
        parallel_for(items, 2.0 * band * kp * panels * kLbBlock / (amx ? 16 : 32), threads,
                     [&](std::int64_t i0, std::int64_t i1) { lb_items(args, band, i0, i1, amx); });
    }
    return out;
}


// ------------------------------------------------------------------------------------------------
// A weight product in int8 with about 16-bit inputs (int8x3): out[M, N] = x[M, K] w[K, N] + bias from three integer
// products. Each row of x with its own symmetric scale s = max |x row| / 127 as two int8 parts, v = x / s,
// hi = round(v), lo = round(256 (v - hi)) clipped to [-128, 127]; each column of w likewise with its scale s_w
// (pack_int8x3_weight); x w = s s_w (hi w_hi + (hi w_lo + lo w_hi) / 256), the lo lo term left out (at most 1/256
// of the parts' own rounding). AVX512-VNNI's VPDPBUSD multiplies unsigned bytes by signed ones: w's parts come
// packed as w + 128 (unsigned) against x's signed parts, and the offsets' terms, 128 times each row's sums of hi
// and lo, come off the int32 sums (exact for K up to kI8MaxDepth); the two sums are combined and scaled in float32.
// w packed: uint8 [N32 / 32][K4 / 4][2 parts][32 columns][4 of K] (a vector: 16 columns x 4 of K, as VPDPBUSD
// reads it). Work items: bands of rows, each quantized into a byte copy, then each block of kI8Rows rows against
// each panel of a group (lb_group's weight budget: the group's panels stay in the core's L2).

// rows of a block: 4 x 2 x 2 accumulators, 4 weight vectors, 2 of x (6 rows need more than the 32 vector registers,
// and GCC 12 spilled them)
constexpr int kI8Rows = 4;
constexpr std::int64_t kI8MaxDepth = 32768;   // K up to this: |hi (w_lo + 128) + lo (w_hi + 128)| sums < 2^31
constexpr std::int64_t kI8BandRows = 192;     // rows of a band at most

// AVX-512 (F, DQ, VL, BW) with AVX512-VNNI (VPDPBUSD): Cascade Lake, Ice Lake and later Xeons, AMD Zen 4 and later.
bool has_avx512_vnni() {
    static const bool has = [] {
        unsigned a, b, c, d;
        return best_isa() == Isa::avx512 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c >> 11 & 1);
    }();
    return has;
}

struct LinearInt8x3Args {
    const float *x;          // [M, K]
    const std::uint8_t *w;   // [N32 / 32][K4 / 4][2][32][4]: w's parts + 128
    const float *w_scale;    // [N32] (zeros past N)
    const float *bias;       // [N32] (zeros past N)
    float *out;              // [M, N]
    std::int64_t m, k, n, kq, ld, panels;  // kq = K4; ld: row stride of a band's byte copies (K rounded up to 64)
    bool gelu;
    std::int64_t group;      // panels per group
};

// A band's quantized rows: hi and lo parts [rows][ld] (zeros past K), per row its scale s (NaN where the row has a
// value that is not finite: its results are NaN) and 128 times its sums of hi and of hi + lo.
struct I8Rows {
    std::int8_t *hi, *lo;
    float *scale;
    std::int32_t *offset_hi, *offset_cross;
};

// Rows [r0, r1) of x into rows (zero rows, scale 0, past r1 up to a multiple of kI8Rows).
__attribute__((target(VNNI_TARGET))) void li_quantize(const LinearInt8x3Args &a, std::int64_t r0, std::int64_t r1,
                                                     const I8Rows &rows) {
    const std::int64_t padded = (r1 - r0 + kI8Rows - 1) / kI8Rows * kI8Rows;
    for (std::int64_t r = 0; r < padded; ++r) {
        std::int8_t *hi = rows.hi + r * a.ld, *lo = rows.lo + r * a.ld;
        if (r0 + r >= r1) {
            std::memset(hi, 0, a.ld), std::memset(lo, 0, a.ld);
            rows.scale[r] = 0.f, rows.offset_hi[r] = rows.offset_cross[r] = 0;
            continue;
        }
        const float *src = a.x + (r0 + r) * a.k;
        __m512 top = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (std::int64_t c = 0; c < a.k; c += 16) {
            const __m512 v = load_first(src + c, a.k - c);
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
            bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);  // inf - inf, NaN
        }
        const float amax = _mm512_reduce_max_ps(top);
        const float s = bad ? std::numeric_limits<float>::quiet_NaN() : amax > 0.f ? amax / 127.f : 1.f;
        const __m512 sv = _mm512_set1_ps(bad ? 1.f : s);
        __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
        for (std::int64_t c = 0; c < a.ld; c += 16) {
            const __m512 v = _mm512_div_ps(load_first(src + c, a.k - c), sv);
            const __m512 h = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), _mm512_set1_ps(256.f)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i hq = _mm512_cvtps_epi32(h);
            const __m512i lq = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(l), _mm512_set1_epi32(127)),
                                                _mm512_set1_epi32(-128));
            sum_hi = _mm512_add_epi32(sum_hi, hq), sum_lo = _mm512_add_epi32(sum_lo, lq);
            _mm_storeu_si128(reinterpret_cast<__m128i *>(hi + c), _mm512_cvtepi32_epi8(hq));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(lo + c), _mm512_cvtepi32_epi8(lq));
        }
        const std::int32_t h = _mm512_reduce_add_epi32(sum_hi), l = _mm512_reduce_add_epi32(sum_lo);
        rows.scale[r] = s, rows.offset_hi[r] = 128 * h, rows.offset_cross[r] = 128 * (h + l);
    }
}

// kI8Rows rows of the band (from row i of rows) against panel p; the first `cols` columns of the first `count`
// rows stored to o (row stride n). Not inlined: inlined into li_items, GCC 12 kept the accumulators on the stack.
__attribute__((noinline, target(VNNI_TARGET))) void li_block(const LinearInt8x3Args &a, const I8Rows &rows, std::int64_t i,
                                                  std::int64_t p, float *o, std::int64_t count, std::int64_t cols) {
    __m512i hh[kI8Rows][2], cross[kI8Rows][2];
    for (int r = 0; r < kI8Rows; ++r)
        for (int t = 0; t < 2; ++t) hh[r][t] = cross[r][t] = _mm512_setzero_si512();
    const std::uint8_t *wp = a.w + p * a.kq * 64;  // a quad of K: 2 parts x 32 columns x 4 bytes
    for (std::int64_t q = 0; q < a.kq / 4; ++q, wp += 256) {
        const __m512i wh0 = _mm512_load_si512(wp), wh1 = _mm512_load_si512(wp + 64);
        const __m512i wl0 = _mm512_load_si512(wp + 128), wl1 = _mm512_load_si512(wp + 192);
#pragma GCC unroll 4
        for (int r = 0; r < kI8Rows; ++r) {
            std::int32_t hq, lq;
            std::memcpy(&hq, rows.hi + (i + r) * a.ld + 4 * q, 4);
            std::memcpy(&lq, rows.lo + (i + r) * a.ld + 4 * q, 4);
            const __m512i h = _mm512_set1_epi32(hq), l = _mm512_set1_epi32(lq);
            hh[r][0] = _mm512_dpbusd_epi32(hh[r][0], wh0, h);
            hh[r][1] = _mm512_dpbusd_epi32(hh[r][1], wh1, h);
            cross[r][0] = _mm512_dpbusd_epi32(cross[r][0], wl0, h);
            cross[r][1] = _mm512_dpbusd_epi32(cross[r][1], wl1, h);
            cross[r][0] = _mm512_dpbusd_epi32(cross[r][0], wh0, l);
            cross[r][1] = _mm512_dpbusd_epi32(cross[r][1], wh1, l);
        }
    }
    for (int t = 0; t < 2; ++t) {
        const __m512 w_scale = _mm512_load_ps(a.w_scale + p * 32 + 16 * t), bias = _mm512_load_ps(a.bias + p * 32 + 16 * t);
        const __mmask16 keep = first_lanes(cols - 16 * t);
        for (std::int64_t r = 0; r < count; ++r) {
            const __m512 whole = _mm512_cvtepi32_ps(_mm512_sub_epi32(hh[r][t], _mm512_set1_epi32(rows.offset_hi[i + r])));
            const __m512 part = _mm512_cvtepi32_ps(_mm512_sub_epi32(cross[r][t], _mm512_set1_epi32(rows.offset_cross[i + r])));
            const __m512 sum = _mm512_fmadd_ps(part, _mm512_set1_ps(1.f / 256.f), whole);
            __m512 y = _mm512_fmadd_ps(sum, _mm512_mul_ps(w_scale, _mm512_set1_ps(rows.scale[i + r])), bias);
            if (a.gelu) y = lb_gelu(y);
            _mm512_mask_storeu_ps(o + r * a.n + 16 * t, keep, y);
        }
    }
}

// Bands [i0, i1) of `band` rows.
__attribute__((target(VNNI_TARGET))) void li_items(const LinearInt8x3Args &a, std::int64_t band, std::int64_t i0,
                                                  std::int64_t i1) {
    const std::int64_t padded = (band + kI8Rows - 1) / kI8Rows * kI8Rows;
    std::vector<std::int8_t> bytes(static_cast<std::size_t>(2 * padded * a.ld));
    std::vector<float> scale(padded);
    std::vector<std::int32_t> offsets(static_cast<std::size_t>(2 * padded));
    const I8Rows rows{bytes.data(), bytes.data() + padded * a.ld, scale.data(), offsets.data(), offsets.data() + padded};
    for (std::int64_t item = i0; item < i1; ++item) {
        const std::int64_t r0 = item * band, r1 = std::min(a.m, r0 + band);
        li_quantize(a, r0, r1, rows);
        for (std::int64_t g0 = 0; g0 < a.panels; g0 += a.group) {
            const std::int64_t g1 = std::min(a.panels, g0 + a.group);
            for (std::int64_t m0 = r0; m0 < r1; m0 += kI8Rows) {
                const std::int64_t count = std::min<std::int64_t>(kI8Rows, r1 - m0);
                for (std::int64_t p = g0; p < g1; ++p) {
                    const std::int64_t n0 = p * 32;
                    li_block(a, rows, m0 - r0, p, a.out + m0 * a.n + n0, count, std::min<std::int64_t>(32, a.n - n0));
                }
            }
        }
    }
}

py::array_t<float> linear_int8x3(py::handle x_obj, py::handle w_obj, py::handle w_scale_obj, py::handle bias_obj,
                                 py::handle out_obj, std::int64_t threads, const std::string &activation) {
    const bool gelu = product_activation("linear_int8x3", threads, activation);
    const py::array x = require<float>(x_obj, "x", "float32", 2);
    const py::array w = require<std::uint8_t>(w_obj, "w", "uint8", 5);
    const py::array w_scale = require<float>(w_scale_obj, "w_scale", "float32", 1);
    const py::array bias = require<float>(bias_obj, "bias", "float32", 1);
    const std::int64_t rows = x.shape(0), depth = x.shape(1), cols = bias.shape(0);
    if (depth > kI8MaxDepth)
        throw py::value_error("x: linear_int8x3 takes K up to " + std::to_string(kI8MaxDepth) +
                              " (its int32 sums), got " + std::to_string(depth));
    const std::int64_t kq = (depth + 3) / 4 * 4, panels = (cols + 31) / 32;
    if (w.shape(0) != panels || w.shape(1) != kq / 4 || w.shape(2) != 2 || w.shape(3) != 32 || w.shape(4) != 4)
        throw py::value_error("w: expected the packing of a (" + std::to_string(depth) + ", " + std::to_string(cols) +
                              ") weight (pack_int8x3_weight), shape (" + std::to_string(panels) + ", " +
                              std::to_string(kq / 4) + ", 2, 32, 4); got " + shape_str(w));
    if (reinterpret_cast<std::uintptr_t>(w.data()) % 64 != 0)
        throw py::value_error("w: the packing must start on a 64-byte boundary (pack_int8x3_weight's does)");
    require_shape(w_scale, "w_scale", {cols});
    py::array_t<float> out = product_out(out_obj, rows, cols, x, w, "w", bias);
    if (!has_avx512_vnni())
        throw std::runtime_error("linear_int8x3: this CPU has no AVX512-VNNI (has_avx512_vnni() is False)");
    if (rows == 0 || cols == 0) return out;
    std::vector<float> columns;  // w_scale and bias, zeros past N
    float *padded = reinterpret_cast<float *>(aligned_vecs(columns, 2 * panels * 2));
    std::memcpy(padded, w_scale.data(), cols * sizeof(float));
    std::memcpy(padded + panels * 32, bias.data(), cols * sizeof(float));
    const std::int64_t ld = (depth + 63) / 64 * 64;
    const LinearInt8x3Args args{static_cast<const float *>(x.data()), static_cast<const std::uint8_t *>(w.data()),
                                padded, padded + panels * 32, out.mutable_data(), rows, depth, cols, kq, ld, panels,
                                gelu, lb_group(kq * 64)};
    const std::int64_t limit = threads > 0 ? threads : usable_cpus();
    const std::int64_t band = std::clamp<std::int64_t>((rows + limit - 1) / limit, kI8Rows, kI8BandRows) /
                              kI8Rows * kI8Rows;
    const std::int64_t items = (rows + band - 1) / band;
    {
        py::gil_scoped_release release;
        // cost: the multiply-adds as VPDPBUSD runs them (3 of 64 per product)
        parallel_for(items, 3.0 * band * kq * panels * 32 / 64, threads,
                     [&](std::int64_t i0, std::int64_t i1) { li_items(args, band, i0, i1); });
    }
    return out;
}

}  // namespace

// The threads argument of the multi-threaded kernels, in their docstrings.
#define THREADS_DOC                                                                                   \
    "\nthreads: at most this many threads (0: as many as the CPUs this process may run on, its affinity\n" \
    "mask); the result does not depend on it."

PYBIND11_MODULE(_ext, m) {
    m.doc() = "samreg-rt native kernels: bit-packed masks, overlap matrices, NMS, stability "
              "scores, greedy matching, resizing logits, SAM's fused mask upscaling, two-way "
              "attention pass and shared-key attention. Numpy twins of each live in tests/twins.py.";
    best_isa();  // an invalid SAMREG_RT_CPU_BUILD fails the import, naming the variable

    m.def("pack_masks", &pack_masks, py::arg("masks"),
          "pack_masks(masks: bool[N, H, W]) -> uint64[N, ceil(H*W/64)]\n\n"
          "Bit i of word w is pixel w*64+i of the row-major flattened mask; padding bits are 0.");
    m.def("unpack_masks", &unpack_masks, py::arg("packed"), py::arg("height"), py::arg("width"),
          "unpack_masks(packed: uint64[N, ceil(H*W/64)], height, width) -> bool[N, H, W]");
    m.def("mask_areas", &mask_areas, py::arg("packed"),
          "mask_areas(packed: uint64[N, words]) -> int64[N] pixel counts.");
    m.def("intersection_matrix", &intersection_matrix, py::arg("a_packed"), py::arg("b_packed"),
          "intersection_matrix(a_packed: uint64[Na, words], b_packed: uint64[Nb, words]) "
          "-> int64[Na, Nb] of |A_i & B_j|.");
    m.def("iou_matrix", &iou_matrix, py::arg("a_packed"), py::arg("b_packed"),
          "iou_matrix(a_packed, b_packed) -> float32[Na, Nb]: float32(inter / union) computed in "
          "double from exact counts; 0 where the union is empty.");
    m.def("containment_matrix", &containment_matrix, py::arg("a_packed"), py::arg("b_packed"),
          "containment_matrix(a_packed, b_packed) -> float32[Na, Nb]: "
          "float32(inter / min(|A_i|, |B_j|)) computed in double; 0 where either mask is empty.");
    m.def("box_nms", &box_nms, py::arg("boxes"), py::arg("scores"), py::arg("iou_thresh"),
          "box_nms(boxes: float32[N, 4] xyxy, scores: float32[N], iou_thresh) -> int64[K]\n\n"
          "torchvision.ops.nms on CPU: stable sort by descending score, area (x2-x1)*(y2-y1), "
          "float32 IoU, suppress IoU > iou_thresh. Kept indices in descending score order.");
    m.def("stability_scores", &stability_scores, py::arg("logits"), py::arg("mask_threshold"),
          py::arg("offset"), py::arg("threads") = 0,
          "stability_scores(logits: float32[N, H, W], mask_threshold, offset, threads=0) -> float32[N]\n\n"
          "|logits > t + offset| / |logits > t - offset| in float32 (SAM's "
          "calculate_stability_score); NaN when both counts are 0." THREADS_DOC);
    m.def("greedy_match", &greedy_match, py::arg("sim"), py::arg("threshold"),
          py::arg("max_pairs") = 0,
          "greedy_match(sim: float32[N1, N2], threshold, max_pairs=0)\n"
          "    -> (int64[K, 2], float32[K])\n\n"
          "Greedy global-max one-to-one assignment over entries > float32(threshold), ties broken "
          "by row-major index; pairs in descending similarity; max_pairs <= 0 keeps all.");
    m.def("resize_logits", &resize_logits, py::arg("low"), py::arg("ry"), py::arg("rx"), py::arg("threads") = 0,
          "resize_logits(low: float32[N, h, w], ry: float32[H, h], rx: float32[W, w], threads=0) -> float32[N, H, W]\n\n"
          "ry @ low[n] @ rx.T for banded ry, rx (bilinear resizing maps): the left product first, each\n"
          "sum over the band between a row's first and last non-zero weight, in ascending order." THREADS_DOC);
    m.def("mask_upscaling", &mask_upscaling, py::arg("tokens"), py::arg("rows"), py::arg("w1"), py::arg("b1"),
          py::arg("ln_weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("w2"), py::arg("b2"),
          py::arg("hyper"), py::arg("mask_start"), py::arg("width"), py::arg("grid_rows") = -1,
          py::arg("out") = py::none(), py::arg("isa") = "auto", py::arg("threads") = 0,
          "mask_upscaling(tokens: float32[B, hw, 256], rows: int64[R], w1: float32[256, 256],\n"
          "    b1: float32[256], ln_weight: float32[64], ln_bias: float32[64], eps,\n"
          "    w2: float32[64, 128], b2: float32[128], hyper: float32[M, 32], mask_start: int64[R+1],\n"
          "    width, grid_rows=-1, out=None, isa='auto', threads=0) -> float32[M, 4g, 4w]\n\n"
          "SAM's mask upscaling of prompts tokens[rows]: first transposed convolution (w1 as\n"
          "[c, (di, dj, c1)], b1), LayerNorm over c1 (eps), GELU, second transposed convolution\n"
          "(w2 as [c1, (di2, dj2, c2)], b2), GELU, then the logits of masks mask_start[r]..\n"
          "mask_start[r+1]-1 of rows[r] (at most 4) with their hyper rows, on the 4h x 4w grid\n"
          "(h = hw / width; width a multiple of 16), or on its first 4g rows, g = grid_rows (the transposed\n"
          "convolutions map grid row i to rows 4i..4i+3 only; -1: g = h), written into out when given. isa 'auto' runs\n"
          "the AVX-512 build on CPUs that have it, else the AVX2 build on CPUs with AVX2 and FMA; 'avx2'\n"
          "that build (equal to the AVX-512 one: the same operations per pixel), 'generic' the portable build."
          THREADS_DOC);
    m.def("mask_upscaling_factored", &mask_upscaling_factored, py::arg("e_t"), py::arg("probs1"), py::arg("rstd1"),
          py::arg("probs2"), py::arg("rstd2"), py::arg("first"), py::arg("rows"), py::arg("ln_weight"),
          py::arg("ln_bias"), py::arg("eps"), py::arg("w2"), py::arg("b2"), py::arg("hyper"), py::arg("mask_start"),
          py::arg("width"), py::arg("grid_rows") = -1, py::arg("out") = py::none(), py::arg("isa") = "auto",
          py::arg("threads") = 0,
          "mask_upscaling_factored(e_t: float32[hw/16, 256, 16], probs1: float32[B, hw/16, J, 16],\n"
          "    rstd1: float32[B, hw], probs2: float32[B, hw/16, J, 16], rstd2: float32[B, hw],\n"
          "    first: float32[B, 2J+2, 256], rows: int64[R], ln_weight, ln_bias, eps, w2, b2, hyper, mask_start,\n"
          "    width, grid_rows=-1, out=None, isa='auto', threads=0) -> float32[M, 4g, 4w]\n\n"
          "mask_upscaling with the first transposed convolution's output z (256 = (di, dj, c1) columns) of\n"
          "pixel p of prompt b = rows[r] given by factors: with x = [rstd1 rstd2 probs1[b, p // 16, :, p % 16],\n"
          "rstd2 probs2[b, p // 16, :, p % 16], rstd2, 1] (rstd1, rstd2 of [b, p]), z = x @ first[b] +\n"
          "rstd1 rstd2 e_t[p // 16, :, p % 16]; the rest as mask_upscaling (J <= 127)." THREADS_DOC);
    m.def("two_way_factored", &two_way_factored, py::arg("image"), py::arg("probs1"), py::arg("rstd1"), py::arg("k"),
          py::arg("vh1"), py::arg("vh2"), py::arg("qf"), py::arg("n"), py::arg("m1"), py::arg("gram"), py::arg("mf"),
          py::arg("eps"), py::arg("heads"), py::arg("probs2"), py::arg("rstd2"), py::arg("isa") = "auto",
          py::arg("threads") = 0,
          "two_way_factored(image: float32[blocks, 7D + 4, 48], probs1: float32[B, P/16, J, 16] | None,\n"
          "    rstd1: float32[B, P] | None, k: float32[B, J, d], vh1: float32[B, J, d] | None, vh2: float32[B, J, d],\n"
          "    qf: float32[B, J2, d], n: float32[B, J, J] | None, m1: float32[B, J] | None, gram: float32[B, K, K],\n"
          "    mf: float32[B, K, J2], eps, heads, probs2: float32[B, P/16, J, 16] (out), rstd2: float32[B, P] (out),\n"
          "    isa='auto', threads=0) -> pooled: float32[B, J2, d + K]\n\n"
          "A layer of a two-way transformer on the image side, and the next token->image pooling, from factors\n"
          "(samreg_rt.two_way._factored_pass): the second layer after the first (K = 2J + 1), or the first one\n"
          "(probs1, rstd1, vh1, n and m1 None: r1 = 1, a1 and the constant 1 absent from c, K = J, l = hd(Q, k):\n"
          "the rows QP, R1 and sigma, s1 are not read).\n"
          "D = heads * d, d a multiple of 16, P a multiple of\n"
          "16, blocks = ceil(P / 48). image holds per-pixel features in blocks of 48 pixels (image[i, f, l]:\n"
          "feature f of pixel 48 i + l; zero past P): rows 0..D-1 Q, D.. QP, 2D.. R1, 3D.. R2, 4D.. Kf,\n"
          "5D.. KPf, 6D.. V, then E2, sigma, s1, s0. With hd(X, u)_j = X[h(j) d:(h(j) + 1) d] . u[b, j]\n"
          "(h(j) = j / (tokens / heads)), per prompt b and pixel p, a1 = probs1[b, p], r1 = rstd1[b, p]:\n"
          "l_j = r1 hd(Q, k)_j + hd(QP, k)_j + (r1 a1 @ n[b])_j; a2 = softmax of l within each head -> probs2;\n"
          "c = [r1 a1, a2, 1]; cx = sum_j r1 a1_j (hd(R1, vh1)_j - sigma m1[b, j]) + sum_j a2_j hd(R2, vh2)_j\n"
          "+ r1 s1 + s0; r2 = 1 / sqrt((r1^2 E2 + 2 r1 cx + c gram[b] c) / 256 + eps) -> rstd2;\n"
          "s_j = r1 r2 hd(Kf, qf)_j + hd(KPf, qf)_j + r2 (c @ mf[b])_j; w = softmax over the pixels of s_j;\n"
          "pooled[b, j] = [sum_p w r1 r2 V[h(j) d:(h(j) + 1) d], sum_p w r2 c] (heads of J2 by J2 / heads).\n"
          "image must be 64-byte aligned; probs2, where 64-byte aligned (AVX2: 32-byte), is written with\n"
          "non-temporal stores (past the caches) by the AVX-512 and AVX2 kernels. isa: 'auto' (the CPU's best\n"
          "build: AVX-512, else AVX2 with FMA, else portable), 'avx2' (error without AVX2 and FMA) or 'generic'.");
    m.def("two_way_pass", &two_way_pass, py::arg("keys"), py::arg("pe"), py::arg("kq"), py::arg("koff"),
          py::arg("vwo"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("qk"), py::arg("heads"),
          py::arg("out") = py::none(), py::arg("isa") = "auto", py::arg("qproj") = py::none(),
          py::arg("threads") = 0,
          "two_way_pass(keys: float32[Bk, P, 256], pe: float32[P, 256], kq: float32[B, J, 256],\n"
          "    koff: float32[B, J], vwo: float32[B, J, 256], ln_weight: float32[256], ln_bias: float32[256],\n"
          "    eps, qk: float32[B, J2, 256], heads, out=None, isa='auto', qproj=None, threads=0)\n"
          "    -> (keys_out: float32[B, P, 256], pooled: float32[B, J2, 256])\n\n"
          "Image side of one layer of SAM's two-way transformer for B prompts (Bk = 1: keys shared by\n"
          "all; Bk = B: one row each), J <= 64, J2 <= 64, heads dividing J. Per prompt b and pixel p,\n"
          "x = keys[b, p] + pe[p]; l = kq[b] @ x + koff[b]; a = softmax of l within each head (head h:\n"
          "tokens h*J/heads..(h+1)*J/heads-1); y = keys[b, p] + a @ vwo[b]; keys_out[b, p] = z =\n"
          "LayerNorm(y) over the channels (biased variance, eps, ln_weight, ln_bias); then\n"
          "s[p, j] = qk[b, j] . (z_p + pe[p]) and pooled[b, j] = sum_p softmax_p(s[:, j]) z_p.\n"
          "keys_out is written into out when given (it must not overlap the inputs, except that it may be\n"
          "keys itself when Bk == B: the update is then in place; otherwise keys_out is written with non-temporal\n"
          "stores by the AVX-512 and AVX2 kernels). isa: 'auto' (the CPU's best build: AVX-512, else AVX2 with\n"
          "FMA, else portable), 'avx2' (error without AVX2 and FMA) or 'generic'.\n\n"
          "Projected logits mode, qproj: float32[P, D] given (D a multiple of heads, at most 256; d = D / heads):\n"
          "kq is float32[B, J, d] and l[j] = qproj[p, h*d:(h+1)*d] . kq[b, j] + koff[b, j] for the head h of\n"
          "token j (qproj = (keys + pe) @ Wq.T + bq, computed once for keys shared by all prompts); the rest\n"
          "is unchanged." THREADS_DOC);
    m.def("linear", &linear, py::arg("x"), py::arg("weight_t"), py::arg("bias"), py::arg("relu") = false,
          py::arg("out") = py::none(), py::arg("isa") = "auto", py::arg("threads") = 0,
          "linear(x: float32[M, K], weight_t: float32[K, N], bias: float32[N], relu=False, out=None,\n"
          "    isa='auto', threads=0) -> float32[M, N]\n\n"
          "out = x @ weight_t + bias, then max(out, 0) when relu: a Linear layer whose [N, K] weight the\n"
          "caller transposed once; each sum in float32, from the bias over k in ascending order. out, when\n"
          "given, must not overlap the inputs. isa 'auto' runs the best build of this CPU (AVX-512, else\n"
          "AVX2 with FMA, else portable), 'avx2' the AVX2 build, 'generic' the portable one." THREADS_DOC);
    m.def("shared_attention", &shared_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("rel_h") = py::none(),
          py::arg("rel_w") = py::none(), py::arg("isa") = "auto", py::arg("threads") = 0,
          "shared_attention(q: float32[R, H, d], k: float32[P, H, d], v: float32[P, H, d], rel_h=None, rel_w=None,\n"
          "    isa='auto', threads=0) -> float32[R, H, d]\n\n"
          "Softmax attention of R query rows to P keys shared by all rows, per head h (d <= 64): out[r, h] =\n"
          "sum_p softmax_p(l[r, h, p]) v[p, h], l = q[r, h] . k[p, h] (scale q or k beforehand), plus, with\n"
          "rel_h: float32[R, H, kh] and rel_w: float32[R, H, kw] (keys on a kh x kw grid, row-major, kw a\n"
          "multiple of 16), rel_h[r, h, p // kw] + rel_w[r, h, p % kw] (the decomposed relative positions of\n"
          "SAM ViT's global attention). The logits' maximum is\n"
          "subtracted before exp (a polynomial exp, about 1 ulp); each sum runs in float32. isa 'auto' runs\n"
          "the best build of this CPU (AVX-512, else AVX2 with FMA, else portable), 'avx2' the AVX2 build,\n"
          "'generic' the portable one." THREADS_DOC);
    m.def("shared_attention_bf16", &shared_attention_bf16, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("rel_h") = py::none(), py::arg("rel_w") = py::none(), py::arg("threads") = 0,
          py::arg("scale") = 1.0, py::arg("heads_first") = false, py::arg("out") = py::none(), py::arg("isa") = "auto",
          "shared_attention_bf16(q: float32[R, H, d], k: float32[P, H, d], v: float32[P, H, d], rel_h=None,\n"
          "    rel_w=None, threads=0, scale=1.0, heads_first=False, out=None, isa='auto') -> float32[R, H, d]\n\n"
          "shared_attention in bfloat16, its products on AMX tiles (isa 'amx') or with AVX512-BF16's VDPBF16PS\n"
          "('avx512'; 'auto': amx where has_amx_bf16(), else avx512; RuntimeError where the CPU lacks it): q scale\n"
          "(in float32), k, v rounded to bfloat16 (nearest even); the logits summed in float32, the terms added in\n"
          "float32 (any key grid kh x kw = P),\n"
          "e = exp(l - max) in float32 (a polynomial, relative error below 3e-6),\n"
          "out[r, h] = (sum_p bf16(e_p) v[p, h]) / sum_p e_p with the products'\n"
          "sums in float32 (in the order of the instructions that run them). heads_first: q, rel_h, rel_w and the\n"
          "result [H, R, ...],\n"
          "k and v [H, P, d] (the layout of batched attention, as in a ViT's windowed blocks: H = windows x heads).\n"
          "out: a C-contiguous float32 array of the result's shape to write into (returned), overlapping no input."
          THREADS_DOC);
    m.def("window_attention_bf16", &window_attention_bf16, py::arg("qkv"), py::arg("table_h"), py::arg("table_w"),
          py::arg("scale") = 1.0, py::arg("out") = py::none(), py::arg("threads") = 0, py::arg("isa") = "auto",
          "window_attention_bf16(qkv: float32[B, L, 3, G, d], table_h: float32[qh, kh, d],\n"
          "    table_w: float32[qw, kw, d], scale=1.0, out=None, threads=0, isa='auto') -> float32[B, L, G, d]\n\n"
          "SAM ViT's windowed attention in bfloat16 (isa as shared_attention_bf16's) from its qkv product\n"
          "(B windows of L = qh qw tokens, G heads):\n"
          "shared_attention_bf16 of q scale, k, v (heads first) with the relative position terms computed from the\n"
          "unscaled q in float32, rel_h[a] = q . table_h[r / qw, a], rel_w[b] = q . table_w[r % qw, b] (the tables of\n"
          "SAM's get_rel_pos; kh kw = L), the result token-major per window." THREADS_DOC);
    m.def("biased_attention_bf16", &biased_attention_bf16, py::arg("qkv"), py::arg("bias"), py::arg("scale") = 1.0,
          py::arg("out") = py::none(), py::arg("threads") = 0, py::arg("isa") = "auto",
          "biased_attention_bf16(qkv: float32[B, L, G, 3, d], bias: float32[G, L, L], scale=1.0, out=None,\n"
          "    threads=0, isa='auto') -> float32[B, L, G, d]\n\n"
          "TinyViT's windowed attention in bfloat16 (isa as shared_attention_bf16's) from its qkv product\n"
          "(B windows of L tokens, G heads, each head's\n"
          "q, k, v side by side): softmax(scale q k^T + bias[g]) v per window and head g, with shared_attention_bf16's\n"
          "rounding (q scale, k, v and the weights to bfloat16, the bias added in float32), the result token-major\n"
          "per window." THREADS_DOC);
    m.def("linear_bf16", &linear_bf16, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out") = py::none(),
          py::arg("isa") = "auto", py::arg("threads") = 0, py::arg("activation") = "none",
          "linear_bf16(x: float32[M, K], w: uint16[N32 / 32, K32 / 32, 2 or 4, 16, 16, 2], bias: float32[N], out=None,\n"
          "    isa='auto', threads=0, activation='none') -> float32[M, N]\n\n"
          "x @ W + bias in bfloat16: w is W [K, N]\n"
          "packed by samreg_rt.bf16_graph.pack_bf16_weight (rounded to bfloat16, nearest even; K and N padded to\n"
          "multiples of 32 with zeros: the packing's shape gives K only up to that padding, so the caller keeps\n"
          "x's K and W's equal, as bf16_graph.WeightProduct checks); x rounded to bfloat16 (nearest even); out[m, n] = bias[n] +\n"
          "sum_k bf16(x[m, k]) bf16(W[k, n]), each product exact and the sums in float32 (pairs of k at a time, in\n"
          "the order of the instructions that run it: the last bits differ between isas). A packing of W split\n"
          "(pack_bf16_weight(W, split=True): shape [.., 4, ..])\n"
          "holds W as hi + lo, both bfloat16: out = bias + bf16(x) @ (hi + lo), W to about 16 significant bits.\n"
          "out: an optional float32[M, N] array (not overlapping the inputs) to\n"
          "write and return instead of a new one. isa: 'amx' (AMX tiles, where has_amx_bf16()), 'avx512'\n"
          "(VDPBF16PS, where has_avx512_bf16()) or 'auto' (amx where the tiles are, else avx512); RuntimeError\n"
          "where the CPU lacks them. activation 'gelu': GELU(out) = out (1 + erf(out / sqrt 2)) / 2 applied to each\n"
          "result in float32 before it is stored (erf within 2e-7 absolute: Abramowitz & Stegun 7.1.26)." THREADS_DOC);
    m.def("linear_int8x3", &linear_int8x3, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("bias"),
          py::arg("out") = py::none(), py::arg("threads") = 0, py::arg("activation") = "none",
          "linear_int8x3(x: float32[M, K], w: uint8[N32 / 32, K4 / 4, 2, 32, 4], w_scale: float32[N], bias: float32[N],\n"
          "    out=None, threads=0, activation='none') -> float32[M, N]\n\n"
          "x @ W + bias from three int8 products (AVX512-VNNI's VPDPBUSD): w and w_scale are W [K, N] packed by\n"
          "samreg_rt.bf16_graph.pack_int8x3_weight (each column as two int8 parts, W / w_scale = w_hi + w_lo / 256;\n"
          "K up to 32768); each row of x with its scale s = max |x row| / 127 (float32) as two int8 parts, v = x / s,\n"
          "hi = round(v), lo = round(256 (v - hi)) clipped to [-128, 127] (nearest even); out[m, n] = bias[n] +\n"
          "s w_scale[n] (hi w_hi + (hi w_lo + lo w_hi) / 256)[m, n], the integer sums exact, combined and scaled in\n"
          "float32. A row with a value that is not finite gives NaN. out: an optional float32[M, N] array (not\n"
          "overlapping the inputs) to write and return. activation 'gelu': linear_bf16's GELU applied to each result.\n"
          "RuntimeError where the CPU has no AVX512-VNNI (has_avx512_vnni())." THREADS_DOC);
    m.def("has_avx512_vnni", &has_avx512_vnni,
          "has_avx512_vnni() -> whether linear_int8x3 runs here: the CPU has AVX-512 (F, DQ, VL, BW) and\n"
          "AVX512-VNNI (and SAMREG_RT_CPU_BUILD allows AVX-512).");
    m.def("has_amx_bf16", &has_amx_bf16,
          "has_amx_bf16() -> whether shared_attention_bf16 and linear_bf16(isa='amx') run here: the CPU has AMX-TILE,\n"
          "AMX-BF16 and AVX512-BF16, and the operating system let this process use the tiles.");
    m.def("has_avx512_bf16", &has_avx512_bf16,
          "has_avx512_bf16() -> whether linear_bf16 runs here: the CPU has AVX-512 (F, DQ, VL, BW) and AVX512-BF16\n"
          "(isa 'avx512'; with has_amx_bf16() too, 'auto' takes the tiles).");
    m.def("mask_upscaling_isa", [] {
              return std::string(for_build<const char *>(best_isa(), "avx512", "avx2", "generic"));
          },
          "mask_upscaling_isa() -> 'avx512', 'avx2' or 'generic': the build that mask_upscaling, linear,\n"
          "shared_attention and two_way_factored run with isa 'auto' on this CPU (capped by the environment\n"
          "variable SAMREG_RT_CPU_BUILD: 'avx2' or 'generic'); the kernels without an AVX2 build run their\n"
          "AVX-512 one only where this is 'avx512'.");
}
