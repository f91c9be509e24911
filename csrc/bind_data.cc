// Bindings for the record format and the native loader (aimass.data). Thin:
// converts arrays and options; every call that touches files or waits releases the GIL.
#include "aimass/cpu_features.h"
#include "aimass/data.h"
#include "aimass/dtype.h"
#include <cstdio>
#include <cstring>

#include "common.h"

namespace aimass_bind {

namespace ad = aimass::data;

namespace {
ad::Schema schema_from(const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& spec) {
  ad::Schema s;
  for (const auto& [name, dt, shape] : spec) s.fields.push_back({name, aimass::parse_dtype(dt), shape});
  s.validate();
  return s;
}

py::dtype np_dtype(aimass::DType t) {
  if (t == aimass::DType::BF16) return py::dtype("uint16");  // numpy has no bfloat16; Python re-views it
  return py::dtype(aimass::dtype_name(t));
}

py::array array_view(std::shared_ptr<void> owner, const void* data, aimass::DType t, std::vector<int64_t> shape) {
  auto* keep = new std::shared_ptr<void>(std::move(owner));
  py::capsule cap(keep, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
  std::vector<py::ssize_t> sh(shape.begin(), shape.end());
  return py::array(np_dtype(t), sh, data, cap);
}
}  // namespace

void bind_data(py::module_& m) {
  m.def("data_crc32c", [](py::buffer b, const std::string& impl, uint32_t crc) {
    py::buffer_info info = b.request();
    AIMASS_CHECK(PyBuffer_IsContiguous(info.view(), 'C'), ValueError, "crc32c: data must be contiguous");
    const void* p = info.ptr;
    size_t n = static_cast<size_t>(info.size * info.itemsize);
    py::gil_scoped_release nogil_;
    if (impl == "scalar") return ad::crc32c_scalar(p, n, crc);
    if (impl == "sse42") {
      AIMASS_CHECK(aimass::cpu_features().sse42, ValueError, "crc32c: this CPU has no SSE4.2");
      return ad::crc32c_sse42(p, n, crc);
    }
    if (impl == "avx512") {
      AIMASS_CHECK(ad::crc32c_avx512_supported(), ValueError, "crc32c: this CPU has no AVX-512 with VPCLMULQDQ");
      return ad::crc32c_avx512(p, n, crc, p);  // prefetching bytes it reads anyway: harmless
    }
    AIMASS_CHECK(impl == "auto", ValueError, "crc32c: impl must be 'auto', 'scalar', 'sse42' or 'avx512', got '",
                 impl, "'");
    return ad::crc32c(p, n, crc);
  }, py::arg("data"), py::arg("impl") = "auto", py::arg("crc") = 0);
  // The fused check-and-copy the loader uses: (crc, copy of the bytes). For tests.
  m.def("data_crc32c_copy", [](py::buffer b, const std::string& impl, uint32_t crc) {
    py::buffer_info info = b.request();
    AIMASS_CHECK(PyBuffer_IsContiguous(info.view(), 'C'), ValueError, "crc32c_copy: data must be contiguous");
    size_t n = static_cast<size_t>(info.size * info.itemsize);
    py::array_t<uint8_t> out(static_cast<py::ssize_t>(n));
    uint8_t* dst = out.mutable_data();
    const void* src = info.ptr;
    uint32_t r;
    {
      py::gil_scoped_release nogil_;
      if (impl == "avx512") {
        AIMASS_CHECK(ad::crc32c_avx512_supported(), ValueError, "crc32c_copy: this CPU has no AVX-512 with VPCLMULQDQ");
        r = ad::crc32c_copy_avx512(dst, src, n, crc, src);  // prefetching bytes it reads anyway: harmless
      } else if (impl == "sse42") {
        AIMASS_CHECK(aimass::cpu_features().sse42, ValueError, "crc32c_copy: this CPU has no SSE4.2");
        r = ad::crc32c_copy_sse42(dst, src, n, crc);
      } else {
        AIMASS_CHECK(impl == "auto", ValueError, "crc32c_copy: impl must be 'auto', 'sse42' or 'avx512', got '",
                     impl, "'");
        r = ad::crc32c_copy(dst, src, n, crc);
      }
    }
    return py::make_tuple(r, out);
  }, py::arg("data"), py::arg("impl") = "auto", py::arg("crc") = 0);
  m.def("data_crc32c_impl", [] { return std::string(ad::crc32c_impl_name()); });
  m.def("data_mask_crc", &ad::mask_crc);

  m.def("data_write_shards",
        [](const std::string& dir, const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& spec,
           std::vector<py::array> columns, std::vector<py::object> dim0s, int64_t n, int64_t shard_bytes,
           int first_shard) {
          ad::Schema schema = schema_from(spec);
          AIMASS_CHECK(columns.size() == schema.fields.size() && dim0s.size() == columns.size(), ValueError,
                       "write: one column (and one dim0 entry) per field is needed");
          std::vector<ad::Column> cols(columns.size());
          std::vector<py::array_t<int64_t>> keep;
          for (size_t i = 0; i < columns.size(); ++i) {
            require_contiguous(columns[i], schema.fields[i].name.c_str());
            cols[i].data = columns[i].data();
            int64_t expect = schema.fields[i].fixed_bytes();
            if (!dim0s[i].is_none()) {
              auto d = py::array_t<int64_t, py::array::c_style>::ensure(dim0s[i]);
              AIMASS_CHECK(d && d.size() == n, ValueError, "write: field '", schema.fields[i].name,
                           "' needs one first dimension per record");
              keep.push_back(d);
              cols[i].dim0 = d.data();
              int64_t total = 0;
              for (int64_t k = 0; k < n; ++k) total += d.data()[k];
              expect *= total;
            } else {
              expect *= n;
            }
            AIMASS_CHECK(columns[i].nbytes() == expect, ValueError, "write: field '", schema.fields[i].name,
                         "' column has ", columns[i].nbytes(), " bytes, the schema needs ", expect);
          }
          std::vector<ad::ShardInfo> out;
          {
            py::gil_scoped_release nogil_;
            out = ad::write_shards(dir, schema, cols, n, shard_bytes, first_shard);
          }
          py::list res;
          for (auto& s : out) res.append(py::make_tuple(s.file, s.records, s.bytes));
          return res;
        },
        py::arg("dir"), py::arg("schema"), py::arg("columns"), py::arg("dim0s"), py::arg("n"), py::arg("shard_bytes"),
        py::arg("first_shard") = 0);

  // Checks index.json's text (typed errors naming `what`); Python keeps the document.
  m.def("data_parse_index", [](const py::bytes& index_text, const std::string& what) {
    std::string text = index_text;
    ad::Index idx = ad::parse_index(text.data(), text.size(), what);
    return py::make_tuple(idx.version, idx.num_records);
  }, py::arg("index_text"), py::arg("what"));

  py::class_<ad::Reader, std::shared_ptr<ad::Reader>>(m, "DataReader")
      .def(py::init([](const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& spec,
                       const std::vector<std::string>& paths, const std::vector<std::string>& names) {
             ad::Schema s = schema_from(spec);
             py::gil_scoped_release nogil_;
             return std::make_shared<ad::Reader>(s, paths, names);
           }),
           py::arg("schema"), py::arg("paths"), py::arg("names"))
      // The dataset at `dir` as its index.json text describes it (parse_index + open_dataset).
      .def_static("open", [](const std::string& dir, const py::bytes& index_text, const std::string& what) {
             std::string text = index_text;
             py::gil_scoped_release nogil_;
             ad::Index idx = ad::parse_index(text.data(), text.size(), what);
             return std::shared_ptr<ad::Reader>(ad::open_dataset(dir, idx, what));
           }, py::arg("dir"), py::arg("index_text"), py::arg("what"))
      .def_property_readonly("schema_fingerprint", [](const ad::Reader& r) {
        char buf[24];
        std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(ad::schema_fingerprint(r.schema())));
        return std::string(buf);
      })
      .def("shard_versions", [](const ad::Reader& r) {
        std::vector<uint32_t> v;
        for (int64_t s = 0; s < r.num_shards(); ++s) v.push_back(r.shard(s).version());
        return v;
      })
      .def("__len__", &ad::Reader::size)
      .def_property_readonly("num_shards", &ad::Reader::num_shards)
      .def("shard_records", [](const ad::Reader& r) {
        std::vector<int64_t> v;
        for (int64_t s = 0; s < r.num_shards(); ++s) v.push_back(static_cast<int64_t>(r.shard(s).size()));
        return v;
      })
      .def("verify_all", &ad::Reader::verify_all, nogil())
      // One record as a tuple of fresh numpy arrays (copies; records are small).
      .def("record", [](const ad::Reader& r, int64_t i, bool verify) {
        const auto& sc = r.schema();
        std::vector<const uint8_t*> fp(sc.fields.size());
        std::vector<int64_t> d0(sc.fields.size());
        int64_t shard = 0;
        {
          py::gil_scoped_release nogil_;
          uint64_t len;
          const uint8_t* p = r.record(i, &len, verify, &shard);
          try {
            r.decode(p, len, i, fp.data(), d0.data());
          } catch (const aimass::CorruptDataError& e) {
            throw aimass::CorruptDataError(aimass::detail::concat("shard ", r.shard(shard).name(), ": ", e.what()));
          }
        }
        py::tuple out(sc.fields.size());
        for (size_t f = 0; f < sc.fields.size(); ++f) {
          std::vector<py::ssize_t> shape(sc.fields[f].shape.begin(), sc.fields[f].shape.end());
          if (sc.fields[f].variable()) shape[0] = d0[f];
          py::array a(np_dtype(sc.fields[f].dtype), shape);
          std::memcpy(a.mutable_data(), fp[f], static_cast<size_t>(a.nbytes()));
          out[f] = a;
        }
        return out;
      }, py::arg("index"), py::arg("verify") = true);

  py::class_<ad::Loader, std::shared_ptr<ad::Loader>>(m, "DataLoader")
      .def(py::init([](std::shared_ptr<ad::Reader> reader, py::array_t<int64_t, py::array::c_style> indices,
                       int64_t batch_size, bool shuffle, uint64_t seed, int rank, int world_size, bool drop_last,
                       int num_threads, int prefetch, int verify, py::list transforms, uint64_t host_alloc,
                       uint64_t host_free) {
             ad::LoaderOptions o;
             o.batch_size = batch_size;
             o.shuffle = shuffle;
             o.seed = seed;
             o.rank = rank;
             o.world_size = world_size;
             o.drop_last = drop_last;
             o.num_threads = num_threads;
             o.prefetch = prefetch;
             o.verify = verify;
             // e.g. aimass._cuda's cudaHostAlloc/cudaFreeHost wrappers (pin_memory=True)
             o.allocator.alloc = reinterpret_cast<void* (*)(size_t)>(static_cast<uintptr_t>(host_alloc));
             o.allocator.free = reinterpret_cast<void (*)(void*)>(static_cast<uintptr_t>(host_free));
             std::vector<ad::Transform> ts;
             for (auto item : transforms) {
               py::dict d = item.cast<py::dict>();
               ad::Transform t;
               t.kind = static_cast<ad::TransformKind>(d["kind"].cast<int>());
               t.field = d["field"].cast<std::string>();
               if (d.contains("dtype")) t.out_dtype = aimass::parse_dtype(d["dtype"].cast<std::string>());
               if (d.contains("scale")) t.scale = d["scale"].cast<double>();
               if (d.contains("mean")) t.mean = d["mean"].cast<std::vector<float>>();
               if (d.contains("std")) t.std = d["std"].cast<std::vector<float>>();
               if (d.contains("crop_h")) t.crop_h = d["crop_h"].cast<int64_t>();
               if (d.contains("crop_w")) t.crop_w = d["crop_w"].cast<int64_t>();
               if (d.contains("padding")) t.padding = d["padding"].cast<int64_t>();
               if (d.contains("p")) t.p = d["p"].cast<double>();
               if (d.contains("num_classes")) t.num_classes = d["num_classes"].cast<int64_t>();
               if (d.contains("address"))
                 t.fn = reinterpret_cast<ad::UserTransformFn>(static_cast<uintptr_t>(d["address"].cast<uint64_t>()));
               if (d.contains("shape")) t.out_shape = d["shape"].cast<std::vector<int64_t>>();
               ts.push_back(std::move(t));
             }
             std::vector<int64_t> idx(indices.data(), indices.data() + indices.size());
             // The destructor joins the worker threads, which may be waiting for the GIL
             // (a Python-backed CFunc transform): never join while holding it.
             return std::shared_ptr<ad::Loader>(new ad::Loader(reader, std::move(idx), o, std::move(ts)),
                                                [](ad::Loader* l) {
                                                  if (PyGILState_Check()) {
                                                    py::gil_scoped_release nogil_;
                                                    delete l;
                                                  } else {
                                                    delete l;
                                                  }
                                                });
           }),
           py::arg("reader"), py::arg("indices"), py::arg("batch_size"), py::arg("shuffle"), py::arg("seed"),
           py::arg("rank"), py::arg("world_size"), py::arg("drop_last"), py::arg("num_threads"),
           py::arg("prefetch"), py::arg("verify"), py::arg("transforms"), py::arg("host_alloc") = 0,
           py::arg("host_free") = 0)
      .def_property_readonly("batches_per_epoch", &ad::Loader::batches_per_epoch)
      .def_property_readonly("samples_per_rank", &ad::Loader::samples_per_rank)
      .def_property_readonly("num_samples", &ad::Loader::num_samples)
      .def_property_readonly("next_batch_index", &ad::Loader::next_batch_index)
      .def_property_readonly("buffers_allocated", &ad::Loader::buffers_allocated)
      .def("outputs", [](const ad::Loader& l) {
        py::list out;
        for (const auto& f : l.outputs()) out.append(py::make_tuple(f.name, std::string(aimass::dtype_name(f.dtype)), f.shape));
        return out;
      })
      .def("start", &ad::Loader::start, py::arg("epoch"), py::arg("start_batch"), nogil())
      .def("stop", &ad::Loader::stop, nogil())
      // The next batch as a tuple of numpy views of pool memory (or None at the epoch's end).
      .def("next", [](ad::Loader& l) -> py::object {
        std::shared_ptr<ad::BatchBuffer> b;
        {
          py::gil_scoped_release nogil_;
          b = l.next();
        }
        if (!b) return py::none();
        const auto& outs = l.outputs();
        py::tuple t(outs.size());
        for (size_t f = 0; f < outs.size(); ++f) {
          std::vector<int64_t> shape{b->rows};
          shape.insert(shape.end(), outs[f].shape.begin(), outs[f].shape.end());
          t[f] = array_view(b, b->fields[f].data(), outs[f].dtype, shape);
        }
        return t;
      });
}

}  // namespace aimass_bind
