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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <thread>
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

// Runs f(begin, end) over [0, n) on up to hardware_concurrency threads when the total work
// (n * cost_per_item, in rough element operations) makes threads worth starting.
template <typename F>
void parallel_for(std::int64_t n, double cost_per_item, F f) {
    constexpr double kMinWorkPerThread = 2.0e5;
    const std::int64_t hw = std::max(1u, std::thread::hardware_concurrency());
    const auto by_work = static_cast<std::int64_t>(n * cost_per_item / kMinWorkPerThread);
    const std::int64_t threads = std::max<std::int64_t>(1, std::min({hw, n, by_work}));
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
    parallel_for(na, static_cast<double>(nb) * words, [&](std::int64_t i0, std::int64_t i1) {
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
        parallel_for(n, static_cast<double>(pixels) / 4, [&](std::int64_t i0, std::int64_t i1) {
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
        parallel_for(n, static_cast<double>(pixels) / 4, [&](std::int64_t i0, std::int64_t i1) {
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

py::array_t<float> stability_scores(py::handle logits_obj, double mask_threshold, double offset) {
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
        parallel_for(n, static_cast<double>(pixels), [&](std::int64_t i0, std::int64_t i1) {
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

py::array_t<float> resize_logits(py::handle low_obj, py::handle ry_obj, py::handle rx_obj) {
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
        parallel_for(n, static_cast<double>(h * w + out_h * out_w) * 4, [&](std::int64_t i0, std::int64_t i1) {
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
// products with each kept mask's hypernetwork row, written into the mask logits. 16 consecutive
// input pixels share the vector lanes; no intermediate tensor leaves the core's caches.

typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

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

// GELU 0.5 x (1 + erf(x / sqrt 2)) with erf as Eigen's rational approximation on [-4, 4]
// (float32 absolute error below 5e-7 against the exact erf).
__attribute__((always_inline)) inline v16f gelu16(v16f x) {
    const v16f four = v16f{} + 4.f, minus_four = v16f{} - 4.f;
    v16f t = x * 0.70710678118654752f;
    t = t > four ? four : t;
    t = t < minus_four ? minus_four : t;
    const v16f t2 = t * t;
    v16f p = t2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = p * t2 + -2.10102402082508e-06f;
    p = p * t2 + -5.69250639462346e-05f;
    p = p * t2 + -7.34990630326855e-04f;
    p = p * t2 + -2.95459980854025e-03f;
    p = p * t2 + -1.60960333262415e-02f;
    p = p * t;
    v16f q = t2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = q * t2 + -1.68282697438203e-03f;
    q = q * t2 + -7.37332916720468e-03f;
    q = q * t2 + -1.42647390514189e-02f;
    return 0.5f * x * (1.f + p / q);
}

// In-place transpose of 16 vectors (rows) of 16 lanes: swaps each bit of the row index with the
// same bit of the lane index, one bit per round.
__attribute__((always_inline)) inline void transpose16(v16f *r) {
    for (int s = 8; s >= 1; s /= 2) {
        v16i lo, hi;
        for (int l = 0; l < 16; ++l) {
            lo[l] = (l & s) ? 16 + l - s : l;
            hi[l] = (l & s) ? 16 + l : l + s;
        }
        for (int i = 0; i < 16; ++i) {
            if (i & s) continue;
            const v16f a = r[i], b = r[i + s];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + s] = __builtin_shuffle(a, b, hi);
        }
    }
}

// out[t] = bias[col0 + t] + sum_k x[k] * w[k, col0 + t] for 16 output channels t of a product with
// the pixels in the lanes (w row-major with kStride columns).
template <int kStride>
__attribute__((always_inline)) inline void product16(v16f *out, const v16f *x, int count, const float *w,
                                                             const float *bias, int col0) {
    v16f acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = v16f{} + bias[col0 + t];
    for (int k = 0; k < count; ++k) {
        const float *wr = w + k * kStride + col0;
        const v16f xk = x[k];
        for (int t = 0; t < 16; ++t) acc[t] += xk * wr[t];
    }
    for (int t = 0; t < 16; ++t) out[t] = acc[t];
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
    float *out;                      // [M, 4h, 4w]
};

// Groups [g0, g1) of kLanes consecutive input pixels of the r-th prompt.
__attribute__((always_inline)) inline void upscale_body(const UpscaleArgs &a, std::int64_t r,
                                                        std::int64_t g0, std::int64_t g1) {
    const std::int64_t hw = a.height * a.width, out_w = 4 * a.width, out_plane = 16 * hw;
    const std::int64_t m0 = a.mask_start[r], masks = a.mask_start[r + 1] - m0;
    v16f x[kChannels];  // the group's image tokens, channel k in x[k] (pixels in lanes)
    v16f act[kC1];
    v16f logits[kMaxMasks];
    for (std::int64_t g = g0; g < g1; ++g) {
        const std::int64_t p0 = g * kLanes, i = p0 / a.width, j0 = p0 % a.width;
        const float *tok = a.tokens + (a.rows[r] * hw + p0) * kChannels;
        for (int k0 = 0; k0 < kChannels; k0 += kLanes) {
            for (int l = 0; l < kLanes; ++l) x[k0 + l] = load16(tok + l * kChannels + k0);
            transpose16(x + k0);
        }
        for (int s1 = 0; s1 < 4; ++s1) {  // output pixel (di, dj) of the first convolution
            for (int c0 = 0; c0 < kC1; c0 += 16) product16<4 * kC1>(act + c0, x, kChannels, a.w1, a.b1, s1 * kC1 + c0);
            v16f mean = v16f{};
            for (int c = 0; c < kC1; ++c) mean += act[c];
            mean *= 1.f / kC1;
            v16f var = v16f{};
            for (int c = 0; c < kC1; ++c) {
                act[c] -= mean;
                var += act[c] * act[c];
            }
            v16f inv;
            for (int l = 0; l < kLanes; ++l) inv[l] = 1.f / std::sqrt(var[l] * (1.f / kC1) + a.eps);
            for (int c = 0; c < kC1; ++c) act[c] = gelu16(act[c] * inv * a.ln_weight[c] + a.ln_bias[c]);
            const int di = s1 / 2, dj = s1 % 2;
            for (int s2 = 0; s2 < 4; ++s2) {  // output pixel (di2, dj2) of the second convolution
                for (std::int64_t m = 0; m < masks; ++m) logits[m] = v16f{};
                for (int half = 0; half < 2; ++half) {  // 16 of its C2 channels at a time
                    v16f acc[16];
                    product16<4 * kC2>(acc, act, kC1, a.w2, a.b2, s2 * kC2 + half * 16);
                    for (int t = 0; t < 16; ++t) acc[t] = gelu16(acc[t]);
                    for (std::int64_t m = 0; m < masks; ++m) {
                        const float *hm = a.hyper + (m0 + m) * kC2 + half * 16;
                        v16f s = logits[m];
                        for (int t = 0; t < 16; ++t) s += hm[t] * acc[t];
                        logits[m] = s;
                    }
                }
                const std::int64_t row = 4 * i + 2 * di + s2 / 2, col = 4 * j0 + 2 * dj + s2 % 2;
                for (std::int64_t m = 0; m < masks; ++m) {
                    float *o = a.out + (m0 + m) * out_plane + row * out_w + col;
                    for (int l = 0; l < kLanes; ++l) o[4 * l] = logits[m][l];
                }
            }
        }
    }
}

using UpscaleFn = void (*)(const UpscaleArgs &, std::int64_t, std::int64_t, std::int64_t);

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void upscale_avx512(
    const UpscaleArgs &a, std::int64_t r, std::int64_t g0, std::int64_t g1) {
    upscale_body(a, r, g0, g1);
}
void upscale_generic(const UpscaleArgs &a, std::int64_t r, std::int64_t g0, std::int64_t g1) {
    upscale_body(a, r, g0, g1);
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

void require_shape(const py::array &a, const char *name, std::initializer_list<py::ssize_t> shape) {
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

py::array_t<float> mask_upscaling(py::handle tokens_obj, py::handle rows_obj, py::handle w1_obj,
                                  py::handle b1_obj, py::handle ln_weight_obj, py::handle ln_bias_obj,
                                  double eps, py::handle w2_obj, py::handle b2_obj, py::handle hyper_obj,
                                  py::handle mask_start_obj, std::int64_t width, py::handle out_obj) {
    const py::array tokens = require<float>(tokens_obj, "tokens", "float32", 3);
    const py::array rows_arr = require<std::int64_t>(rows_obj, "rows", "int64", 1);
    const py::array w1 = require<float>(w1_obj, "w1", "float32", 2);
    const py::array b1 = require<float>(b1_obj, "b1", "float32", 1);
    const py::array ln_weight = require<float>(ln_weight_obj, "ln_weight", "float32", 1);
    const py::array ln_bias = require<float>(ln_bias_obj, "ln_bias", "float32", 1);
    const py::array w2 = require<float>(w2_obj, "w2", "float32", 2);
    const py::array b2 = require<float>(b2_obj, "b2", "float32", 1);
    const py::array hyper = require<float>(hyper_obj, "hyper", "float32", 2);
    const py::array mask_start = require<std::int64_t>(mask_start_obj, "mask_start", "int64", 1);
    const std::int64_t batch = tokens.shape(0), hw = tokens.shape(1), prompts = rows_arr.shape(0);
    const std::int64_t m_total = hyper.shape(0);
    require_shape(tokens, "tokens", {batch, hw, kChannels});
    require_shape(w1, "w1", {kChannels, 4 * kC1});
    require_shape(b1, "b1", {4 * kC1});
    require_shape(ln_weight, "ln_weight", {kC1});
    require_shape(ln_bias, "ln_bias", {kC1});
    require_shape(w2, "w2", {kC1, 4 * kC2});
    require_shape(b2, "b2", {4 * kC2});
    require_shape(hyper, "hyper", {m_total, kC2});
    require_shape(mask_start, "mask_start", {prompts + 1});
    if (width <= 0 || width % kLanes != 0 || hw % width != 0) {
        throw py::value_error("mask_upscaling: width " + std::to_string(width) + " must be a positive multiple of " +
                              std::to_string(kLanes) + " dividing the tokens' " + std::to_string(hw) + " pixels");
    }
    if (!(eps > 0) || !std::isfinite(eps)) throw py::value_error("mask_upscaling: eps must be positive and finite");
    const auto *rows = static_cast<const std::int64_t *>(rows_arr.data());
    for (std::int64_t r = 0; r < prompts; ++r) {
        if (rows[r] < 0 || rows[r] >= batch) {
            throw py::value_error("rows: " + std::to_string(rows[r]) + " is not a row of tokens (" +
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
    const std::int64_t height = hw / width;
    py::array_t<float> out;
    if (out_obj.is_none()) {
        out = py::array_t<float>({static_cast<py::ssize_t>(m_total), static_cast<py::ssize_t>(4 * height),
                                  static_cast<py::ssize_t>(4 * width)});
    } else {
        out = py::reinterpret_borrow<py::array_t<float>>(require<float>(out_obj, "out", "float32", 3));
        require_shape(out, "out", {m_total, 4 * height, 4 * width});
        if (!out.writeable()) throw py::value_error("out: array is read-only");
    }
    const UpscaleArgs args{static_cast<const float *>(tokens.data()), rows,
                           static_cast<const float *>(w1.data()), static_cast<const float *>(b1.data()),
                           static_cast<const float *>(ln_weight.data()), static_cast<const float *>(ln_bias.data()),
                           static_cast<float>(eps), static_cast<const float *>(w2.data()),
                           static_cast<const float *>(b2.data()), static_cast<const float *>(hyper.data()),
                           start, height, width, out.mutable_data()};
    const UpscaleFn fn = have_avx512() ? upscale_avx512 : upscale_generic;
    constexpr std::int64_t kChunks = 4;  // work items per prompt, so that one prompt fills the threads
    const std::int64_t groups = hw / kLanes;
    {
        py::gil_scoped_release release;
        parallel_for(prompts * kChunks, static_cast<double>(groups) * 1e5 / kChunks,
                     [&](std::int64_t t0, std::int64_t t1) {
                         for (std::int64_t t = t0; t < t1; ++t) {
                             const std::int64_t r = t / kChunks, c = t % kChunks;
                             if (start[r + 1] == start[r]) continue;
                             fn(args, r, groups * c / kChunks, groups * (c + 1) / kChunks);
                         }
                     });
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_ext, m) {
    m.doc() = "samreg-rt native kernels: bit-packed masks, overlap matrices, NMS, stability "
              "scores, greedy matching. Numpy twins of each live in tests/twins.py.";

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
          py::arg("offset"),
          "stability_scores(logits: float32[N, H, W], mask_threshold, offset) -> float32[N]\n\n"
          "|logits > t + offset| / |logits > t - offset| in float32 (SAM's "
          "calculate_stability_score); NaN when both counts are 0.");
    m.def("greedy_match", &greedy_match, py::arg("sim"), py::arg("threshold"),
          py::arg("max_pairs") = 0,
          "greedy_match(sim: float32[N1, N2], threshold, max_pairs=0)\n"
          "    -> (int64[K, 2], float32[K])\n\n"
          "Greedy global-max one-to-one assignment over entries > float32(threshold), ties broken "
          "by row-major index; pairs in descending similarity; max_pairs <= 0 keeps all.");
    m.def("resize_logits", &resize_logits, py::arg("low"), py::arg("ry"), py::arg("rx"),
          "resize_logits(low: float32[N, h, w], ry: float32[H, h], rx: float32[W, w]) -> float32[N, H, W]\n\n"
          "ry @ low[n] @ rx.T for banded ry, rx (bilinear resizing maps): the left product first, each\n"
          "sum over the band between a row's first and last non-zero weight, in ascending order.");
    m.def("mask_upscaling", &mask_upscaling, py::arg("tokens"), py::arg("rows"), py::arg("w1"), py::arg("b1"),
          py::arg("ln_weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("w2"), py::arg("b2"),
          py::arg("hyper"), py::arg("mask_start"), py::arg("width"), py::arg("out") = py::none(),
          "mask_upscaling(tokens: float32[B, hw, 256], rows: int64[R], w1: float32[256, 256],\n"
          "    b1: float32[256], ln_weight: float32[64], ln_bias: float32[64], eps,\n"
          "    w2: float32[64, 128], b2: float32[128], hyper: float32[M, 32], mask_start: int64[R+1],\n"
          "    width, out=None) -> float32[M, 4h, 4w]\n\n"
          "SAM's mask upscaling of prompts tokens[rows]: first transposed convolution (w1 as\n"
          "[c, (di, dj, c1)], b1), LayerNorm over c1 (eps), GELU, second transposed convolution\n"
          "(w2 as [c1, (di2, dj2, c2)], b2), GELU, then the logits of masks mask_start[r]..\n"
          "mask_start[r+1]-1 of rows[r] (at most 4) with their hyper rows, on the 4h x 4w grid\n"
          "(h = hw / width; width a multiple of 16), written into out when given.");
    m.def("mask_upscaling_isa", [] { return std::string(have_avx512() ? "avx512" : "generic"); },
          "mask_upscaling_isa() -> 'avx512' or 'generic': the code path mask_upscaling runs on this CPU.");
}
