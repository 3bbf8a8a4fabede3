// The nanobind module pagedkv._C: tensors cross as DLPack arrays, never copied. The Python class
// PagedKV (python/pagedkv/cache.py) checks arguments first with messages in Python's terms; the
// checks here guard the raw pointers whatever the caller.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <utility>

#include "pagedkv/crc32c.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace pagedkv;

namespace {

using Array = nb::ndarray<nb::c_contig>;

nb::dlpack::dtype to_dlpack(DType d) {
  switch (d) {
    case DType::f32: return nb::dtype<float>();
    case DType::f16: return {uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    default: return {uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};
  }
}

// The data pointer of `a` after checking it matches the cache: dtype, device, element count.
void* checked(const Engine& e, const Array& a, const char* name, int64_t elems, DType dtype, bool vectors = true) {
  const CacheConfig& c = e.config();
  PKV_CHECK(a.dtype() == to_dlpack(dtype), TypeMismatch, name, " must be ", dtype_name(dtype));
  const int want_dev = c.on_cuda ? nb::device::cuda::value : nb::device::cpu::value;
  PKV_CHECK(a.device_type() == want_dev && (!c.on_cuda || a.device_id() == c.cuda_device),
            ArgumentError, name, " must be on the cache's device");
  PKV_CHECK(int64_t(a.size()) == elems, ArgumentError, name, " has ", a.size(), " elements, expected ",
            elems);
  // The kernels read and write whole 16-byte vectors.
  PKV_CHECK(!vectors || !c.on_cuda || reinterpret_cast<uintptr_t>(a.data()) % 16 == 0, ArgumentError, name,
            " must start on a 16-byte boundary (a view at an odd offset? pass a fresh tensor)");
  return a.data();
}

// The sink rotation table of attention_params.h, built once by the Python side (cache.py):
// [2 + rotary_dim / 2] float64 on the CPU whatever the cache's device (the engine sends it).
using RopeTable = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

const double* checked_rope(const RopeTable& t) {
  const double* d = t.data();
  PKV_CHECK(t.shape(0) >= 2 && d[1] >= 2 && d[1] <= 1 << 20 && t.shape(0) == size_t(2 + int64_t(d[1]) / 2),
            ArgumentError, "sink_rope must hold [style, rotary_dim, rotary_dim / 2 frequencies], got ",
            t.shape(0), " values");
  return d;
}

void register_exceptions(nb::module_& m) {
  static nb::object out_of_blocks = nb::steal(PyErr_NewExceptionWithDoc(
      "pagedkv._C.OutOfBlocksError", "Every tier of the cache is full.", PyExc_MemoryError, nullptr));
  m.attr("OutOfBlocksError") = out_of_blocks;
  static nb::object corrupt_block = nb::steal(PyErr_NewExceptionWithDoc(
      "pagedkv._C.CorruptBlockError",
      "A block read back from the disk tier is not the block written there (checksum mismatch or a "
      "file cut short); the message names its sequence(s) and logical block. Other blocks stay readable.",
      PyExc_OSError, nullptr));
  m.attr("CorruptBlockError") = corrupt_block;
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    // OSError(errno, message): Python picks the subclass (PermissionError for EACCES, ...).
    auto os_error = [](PyObject* type, const IoError& e) {
      PyObject* args = Py_BuildValue("(is)", e.err, e.what());
      if (args) PyErr_SetObject(type, args);
      Py_XDECREF(args);
    };
    try {
      std::rethrow_exception(p);
    } catch (const CorruptBlock& e) {
      os_error(corrupt_block.ptr(), e);
    } catch (const IoError& e) {
      os_error(PyExc_OSError, e);
    } catch (const ArgumentError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const TypeMismatch& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const UnknownSequence& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    } catch (const LayerOutOfRange& e) {
      PyErr_SetString(PyExc_IndexError, e.what());
    } catch (const OutOfBlocks& e) {
      PyErr_SetString(out_of_blocks.ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
}

nb::dict stats_dict(const Stats& s) {
  nb::dict d;
  d["device_blocks_used"] = s.device_blocks_used;
  d["device_blocks_free"] = s.device_blocks_free;
  d["host_blocks_used"] = s.host_blocks_used;
  d["host_blocks_free"] = s.host_blocks_free;
  d["disk_blocks_used"] = s.disk_blocks_used;
  d["disk_blocks_free"] = s.disk_blocks_free;
  const TransferCounters& c = s.counters;
  d["blocks_to_host"] = c.blocks_to_host;
  d["blocks_from_host"] = c.blocks_from_host;
  d["blocks_to_disk"] = c.blocks_to_disk;
  d["blocks_from_disk"] = c.blocks_from_disk;
  d["bytes_to_host"] = c.bytes_to_host;
  d["bytes_from_host"] = c.bytes_from_host;
  d["bytes_to_disk"] = c.bytes_to_disk;
  d["bytes_from_disk"] = c.bytes_from_disk;
  d["evictions"] = c.evictions;
  d["drops"] = c.drops;
  d["device_hits"] = c.device_hits;
  d["device_misses"] = c.device_misses;
  d["cow_copies"] = c.cow_copies;
  d["disk_crcs_carried"] = c.disk_crcs_carried;
  d["slices_staged"] = c.slices_staged;
  d["bytes_staged"] = c.bytes_staged;
  d["transfer_wait_s"] = c.transfer_wait_s;
  d["num_sequences"] = s.num_sequences;
  d["device_scratch_bytes"] = s.device_scratch_bytes;
  return d;
}

void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }

// The CRC paths by the names Python uses (PagedKV(disk_crc=), _C.crc32c(path=)), fastest first.
constexpr std::pair<const char*, Crc32cPath> kCrcPaths[] = {
    {"fold", Crc32cPath::fold}, {"crc32", Crc32cPath::crc32}, {"portable", Crc32cPath::portable}};

// The path named `name`; ArgumentError naming `what` (and "best" where `best` is allowed) otherwise.
Crc32cPath crc_path_named(const std::string& name, const char* what, bool best) {
  if (best && name == "best") return crc32c_best();
  for (const auto& [key, path] : kCrcPaths)
    if (name == key) return path;
  PKV_FAIL(ArgumentError, what, " must be ", best ? "'best', " : "", "'fold', 'crc32' or 'portable', got '", name, "'");
}

}  // namespace

NB_MODULE(_C, m) {
  register_exceptions(m);

  m.def("cuda_available", [] { return cuda_usable(); },
        "Whether this build has CUDA kernels and a GPU with a driver that can run them.");
  m.def("built_with_cuda", [] { return built_with_cuda(); });
  // The disk tier's checksum, for its benchmark (bench/checksum.py) and tests.
  // path: "best" (what the disk tier runs), or "fold" / "crc32" / "portable" (each falls back to
  // the next when the CPU lacks it; crc32c_paths() lists those it has).
  m.def("crc32c",
        [](const nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>& data, bool portable, const std::string& path) {
          const Crc32cPath p = portable ? Crc32cPath::portable : crc_path_named(path, "crc32c(): path", true);
          nb::gil_scoped_release release;
          return crc32c_on(p, data.data(), data.size());
        },
        "data"_a, "portable"_a = false, "path"_a = "best",
        "CRC-32C of a contiguous uint8 CPU array (the disk tier's block checksum).");
  m.def("crc32c_hardware", [] { return crc32c_hardware(); });
  m.def("crc32c_paths", [] {  // the paths this CPU has, fastest first (the first is "best")
    std::vector<std::string> out;
    for (const auto& [key, path] : kCrcPaths)
      if (path <= crc32c_best()) out.push_back(key);
    return out;
  });

  nb::class_<Engine>(m, "Engine")
      .def("__init__",
           [](Engine* self, int32_t num_layers, int32_t num_kv_heads, int32_t head_dim,
              int32_t block_size, int32_t dtype, int64_t device_blocks, int64_t host_blocks,
              int64_t disk_blocks, std::string disk_path, int32_t window, int32_t sink_tokens,
              bool retain, bool on_cuda, int32_t cuda_device, std::string policy,
              std::map<std::string, double> policy_params, double low_watermark,
              double high_watermark, int32_t staging, std::tuple<int, int, int> gather_shape,
              int32_t copy_batch, std::string cold_tier, int32_t stripe_world, int32_t stripe_rank,
              bool disk_checksum, int64_t disk_read_piece, std::string disk_crc) {
             CacheConfig c;
             c.num_layers = num_layers;
             c.num_kv_heads = num_kv_heads;
             c.head_dim = head_dim;
             c.block_size = block_size;
             PKV_CHECK(dtype >= 0 && dtype <= 2, TypeMismatch, "dtype code ", dtype, " is unknown");
             c.dtype = DType(dtype);
             c.device_blocks = device_blocks;
             c.host_blocks = host_blocks;
             c.disk_blocks = disk_blocks;
             c.disk_path = std::move(disk_path);
             c.window = window;
             c.sink_tokens = sink_tokens;
             c.retain = retain;
             c.on_cuda = on_cuda;
             c.cuda_device = cuda_device;
             c.policy = std::move(policy);
             c.policy_params = std::move(policy_params);
             c.low_watermark = low_watermark;
             c.high_watermark = high_watermark;
             PKV_CHECK(staging == 0 || staging == 1, ArgumentError, "staging code ", staging, " is unknown");
             c.staging = Staging(staging);
             c.gather_shape = {std::get<0>(gather_shape), std::get<1>(gather_shape), std::get<2>(gather_shape)};
             PKV_CHECK(copy_batch >= 0 && copy_batch <= 2, ArgumentError, "copy_batch code ", copy_batch,
                       " is unknown");
             c.copy_batch = CopyBatch(copy_batch);
             c.cold_tier = std::move(cold_tier);
             c.stripe_world = stripe_world;
             c.stripe_rank = stripe_rank;
             c.disk_checksum = disk_checksum;
             c.disk_read_piece = disk_read_piece;
             c.disk_crc = crc_path_named(disk_crc, "disk_crc", false);
             new (self) Engine(c);
           },
           "num_layers"_a, "num_kv_heads"_a, "head_dim"_a, "block_size"_a, "dtype"_a,
           "device_blocks"_a, "host_blocks"_a, "disk_blocks"_a, "disk_path"_a, "window"_a,
           "sink_tokens"_a, "retain"_a, "on_cuda"_a, "cuda_device"_a, "policy"_a,
           "policy_params"_a, "low_watermark"_a, "high_watermark"_a, "staging"_a = 0,
           "gather_shape"_a = std::make_tuple(GatherShape{}.unroll, GatherShape{}.threads,
                                              GatherShape{}.ctas_per_sm),
           "copy_batch"_a = 0, "cold_tier"_a = "disk", "stripe_world"_a = 1, "stripe_rank"_a = 0,
           "disk_checksum"_a = true, "disk_read_piece"_a = CacheConfig{}.disk_read_piece, "disk_crc"_a = "crc32")
      // Every call below releases the GIL before it enters the engine, so a thread waiting for the
      // engine's lock (another thread is inside) never holds up the rest of Python.
      .def("add_sequence", &Engine::add_sequence, nb::call_guard<nb::gil_scoped_release>())
      .def("fork", &Engine::fork, "seq"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("free", &Engine::free, "seq"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("truncate", &Engine::truncate, "seq"_a, "tokens"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("append",
           [](Engine& e, const std::vector<SeqId>& seqs, int32_t layer,
              const std::vector<int32_t>& lengths, const Array& k, const Array& v, uintptr_t stream) {
             const CacheConfig& c = e.config();
             int64_t rows = 0;
             for (int32_t n : lengths) rows += n;
             const int64_t elems = rows * c.num_kv_heads * c.head_dim;
             const void* kp = checked(e, k, "k", elems, c.dtype);
             const void* vp = checked(e, v, "v", elems, c.dtype);
             nb::gil_scoped_release release;
             e.append(seqs, layer, lengths, kp, vp, as_stream(stream));
           },
           "seqs"_a, "layer"_a, "lengths"_a, "k"_a.noconvert(), "v"_a.noconvert(), "stream"_a)
      .def("check_append", &Engine::check_append, "seqs"_a, "layer"_a, "lengths"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("attend",
           [](Engine& e, const std::vector<SeqId>& seqs, int32_t layer,
              const std::vector<int32_t>& lengths, const Array& q, const Array& out,
              std::optional<Array> lse, int32_t num_q_heads, float scale, int32_t window,
              int32_t sinks, uintptr_t stream, std::optional<RopeTable> sink_rope) {
             const CacheConfig& c = e.config();
             int64_t rows = 0;
             for (int32_t n : lengths) rows += n;
             AttendArgs a;
             a.num_q_heads = num_q_heads;
             a.q = checked(e, q, "q", rows * num_q_heads * c.head_dim, c.dtype);
             a.out = checked(e, out, "out", rows * num_q_heads * c.head_dim, c.dtype);
             if (lse) a.lse = static_cast<float*>(checked(e, *lse, "lse", rows * num_q_heads, DType::f32));
             a.scale = scale;
             a.window = window;
             a.sink_tokens = sinks;
             a.stream = as_stream(stream);
             if (sink_rope) a.sink_rope = checked_rope(*sink_rope);
             nb::gil_scoped_release release;
             e.attend(seqs, layer, lengths, a);
           },
           "seqs"_a, "layer"_a, "lengths"_a, "q"_a.noconvert(), "out"_a.noconvert(),
           "lse"_a.noconvert().none(), "num_q_heads"_a, "scale"_a, "window"_a, "sinks"_a = -1,
           "stream"_a = 0, "sink_rope"_a.noconvert().none() = nb::none())
      .def("merge_partials",
           [](Engine& e, const Array& outs, const Array& lses, const Array& out, std::optional<Array> lse,
              uintptr_t stream) {
             // outs [parts, rows, heads, head_dim] (cache dtype), lses [parts, rows, heads] float32.
             const CacheConfig& c = e.config();
             PKV_CHECK(lses.ndim() >= 1 && lses.shape(0) >= 1, ArgumentError,
                       "lses must be [parts, ...] with at least one part");
             const int32_t parts = int32_t(lses.shape(0));
             const int64_t rows_heads = int64_t(lses.size()) / parts;
             const void* op = checked(e, outs, "outs", int64_t(parts) * rows_heads * c.head_dim, c.dtype, false);
             const float* lp =
                 static_cast<const float*>(checked(e, lses, "lses", int64_t(parts) * rows_heads, DType::f32, false));
             // (the merge reads and writes single elements: views at any offset will do)
             void* o = checked(e, out, "out", rows_heads * c.head_dim, c.dtype, false);
             float* l = lse ? static_cast<float*>(checked(e, *lse, "lse", rows_heads, DType::f32, false)) : nullptr;
             nb::gil_scoped_release release;
             e.merge_partials(op, lp, parts, rows_heads, o, l, as_stream(stream));
           },
           "outs"_a.noconvert(), "lses"_a.noconvert(), "out"_a.noconvert(), "lse"_a.noconvert().none(),
           "stream"_a)
      .def("blocks_needed", &Engine::blocks_needed, "seqs"_a, "layer"_a, "lengths"_a, "window"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("attend_range",
           [](Engine& e, SeqId seq, int32_t layer, int32_t position, int32_t key_begin,
              int32_t key_end, const Array& q, const Array& out, const Array& lse, int32_t num_q_heads,
              float scale, uintptr_t stream) {
             const CacheConfig& c = e.config();
             AttendArgs a;
             a.num_q_heads = num_q_heads;
             a.q = checked(e, q, "q", int64_t(num_q_heads) * c.head_dim, c.dtype);
             a.out = checked(e, out, "out", int64_t(num_q_heads) * c.head_dim, c.dtype);
             a.lse = static_cast<float*>(checked(e, lse, "lse", num_q_heads, DType::f32));
             a.scale = scale;
             a.stream = as_stream(stream);
             nb::gil_scoped_release release;
             e.attend_range(seq, layer, position, key_begin, key_end, a);
           },
           "seq"_a, "layer"_a, "position"_a, "key_begin"_a, "key_end"_a, "q"_a.noconvert(),
           "out"_a.noconvert(), "lse"_a.noconvert(), "num_q_heads"_a, "scale"_a, "stream"_a)
      .def("gather",
           [](Engine& e, SeqId seq, int32_t layer, const Array& k_out, const Array& v_out,
              uintptr_t stream) {
             const CacheConfig& c = e.config();
             // k_out, v_out: [rows, num_kv_heads, head_dim]; the engine checks rows == seq_len
             // under its lock (another thread may append between two calls).
             PKV_CHECK(k_out.ndim() >= 1 && k_out.shape(0) < (size_t(1) << 31), ArgumentError,
                       "gather(): k_out must be [seq_len, num_kv_heads, head_dim]");
             const int32_t rows = int32_t(k_out.shape(0));
             const int64_t elems = int64_t(rows) * c.num_kv_heads * c.head_dim;
             void* kp = checked(e, k_out, "k_out", elems, c.dtype);
             void* vp = checked(e, v_out, "v_out", elems, c.dtype);
             nb::gil_scoped_release release;
             e.gather(seq, layer, kp, vp, as_stream(stream), rows);
           },
           "seq"_a, "layer"_a, "k_out"_a.noconvert(), "v_out"_a.noconvert(), "stream"_a)
      .def("prepare",
           [](Engine& e, const std::vector<SeqId>& seqs, uintptr_t stream) {
             nb::gil_scoped_release release;
             return e.prepare(seqs, as_stream(stream));
           },
           "seqs"_a, "stream"_a)
      .def("begin_step",
           [](Engine& e, const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads, uintptr_t stream) {
             nb::gil_scoped_release release;
             return e.begin_step(seqs, tokens, num_q_heads, as_stream(stream));
           },
           "seqs"_a, "tokens"_a, "num_q_heads"_a, "stream"_a)
      .def("end_step", &Engine::end_step, nb::call_guard<nb::gil_scoped_release>())
      .def("step_open", &Engine::step_open, nb::call_guard<nb::gil_scoped_release>())
      .def("prefetch",
           [](Engine& e, const std::vector<SeqId>& seqs, uintptr_t stream) {
             nb::gil_scoped_release release;
             e.prefetch(seqs, as_stream(stream));
           },
           "seqs"_a, "stream"_a)
      .def("offload",
           [](Engine& e, const std::vector<SeqId>& seqs, uintptr_t stream) {
             nb::gil_scoped_release release;
             e.offload(seqs, as_stream(stream));
           },
           "seqs"_a, "stream"_a)
      .def("seq_len",
           [](const Engine& e, SeqId seq, int32_t layer, const std::string& what) {
             nb::gil_scoped_release release;
             return e.seq_len(seq, layer, what.c_str());
           },
           "seq"_a, "layer"_a, "what"_a = "seq_len()")
      .def("written_len", &Engine::written_len, "seq"_a, "layer"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("block_table",
           [](const Engine& e, SeqId seq) {
             std::vector<std::tuple<std::string, int32_t>> out;
             nb::gil_scoped_release release;
             for (const BlockLoc& l : e.block_table(seq)) out.emplace_back(tier_name(l.tier), l.slot);
             return out;
           },
           "seq"_a)
      .def("stats",
           [](const Engine& e) {
             Stats s;
             {
               nb::gil_scoped_release release;
               s = e.stats();
             }
             return stats_dict(s);
           })
      .def("sequences", &Engine::sequences, nb::call_guard<nb::gil_scoped_release>())
      .def("check_invariants", &Engine::check_invariants, nb::call_guard<nb::gil_scoped_release>())
      .def("num_sms", &Engine::num_sms)
      .def("pool",
           [](const Engine& e) {
             const CacheConfig& c = e.config();
             size_t shape[6] = {size_t(e.pool_blocks(Tier::device)), size_t(c.num_layers), 2,
                                size_t(c.num_kv_heads), size_t(c.block_size), size_t(c.head_dim)};
             const int dev = c.on_cuda ? nb::device::cuda::value : nb::device::cpu::value;
             return nb::ndarray<>(e.pool_data(Tier::device), 6, shape, nb::handle(), nullptr,
                                  to_dlpack(c.dtype), dev, c.on_cuda ? c.cuda_device : 0);
           },
           nb::rv_policy::reference_internal);
}
