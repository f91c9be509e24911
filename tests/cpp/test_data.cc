#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/data.h"

namespace ad = aimass::data;

namespace {
std::string tmpdir() {
  char tmpl[] = "/tmp/aimass_data_test_XXXXXX";
  return std::string(mkdtemp(tmpl));
}
ad::Schema schema_xy() {
  ad::Schema s;
  s.fields.push_back({"x", aimass::DType::U8, {4, 4, 3}});
  s.fields.push_back({"y", aimass::DType::I64, {}});
  return s;
}
}  // namespace

TEST(DataCrc, KnownVectorAndMask) {
  const char* s = "123456789";
  EXPECT_EQ(ad::crc32c_scalar(s, 9), 0xE3069283u);
  EXPECT_EQ(ad::crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(ad::unmask_crc(ad::mask_crc(0x12345678u)), 0x12345678u);
}

TEST(DataCrc, Sse42MatchesScalar) {
  if (!aimass::cpu_features().sse42) GTEST_SKIP() << "no SSE4.2";
  std::mt19937 rng(1);
  std::vector<uint8_t> buf(5000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t off : {0, 1, 3, 7}) {
    for (size_t n : {0, 1, 7, 8, 9, 63, 64, 767, 768, 769, 1000, 2304, 3080, 4093}) {
      EXPECT_EQ(ad::crc32c_scalar(buf.data() + off, n, 0), ad::crc32c_sse42(buf.data() + off, n, 0)) << n;
      EXPECT_EQ(ad::crc32c_scalar(buf.data() + off, n, 77), ad::crc32c_sse42(buf.data() + off, n, 77)) << n;
      std::vector<uint8_t> out(n + 2, 0);
      EXPECT_EQ(ad::crc32c_scalar(buf.data() + off, n, 5), ad::crc32c_copy_sse42(out.data() + 1, buf.data() + off, n, 5));
      EXPECT_EQ(0, std::memcmp(out.data() + 1, buf.data() + off, n));
      EXPECT_EQ(0, out[n + 1]);
    }
  }
}

TEST(DataCrc, Avx512FoldAndFusedCopyMatchScalar) {
  if (!ad::crc32c_avx512_supported()) GTEST_SKIP() << "no AVX-512 with VPCLMULQDQ";
  std::mt19937 rng(2);
  std::vector<uint8_t> buf(5000), out(5000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t off : {0, 1, 3, 7, 13}) {
    for (size_t n = 0; n <= 4200; n += (n < 600 ? 1 : 37)) {
      const uint32_t init = static_cast<uint32_t>(n * 2654435761u);
      const uint32_t ref = ad::crc32c_scalar(buf.data() + off, n, init);
      ASSERT_EQ(ref, ad::crc32c_avx512(buf.data() + off, n, init)) << off << " " << n;
      std::fill(out.begin(), out.end(), 0);
      ASSERT_EQ(ref, ad::crc32c_copy_avx512(out.data() + 5, buf.data() + off, n, init)) << off << " " << n;
      ASSERT_EQ(0, std::memcmp(out.data() + 5, buf.data() + off, n));
      ASSERT_EQ(0, out[4]);
      ASSERT_EQ(0, out[5 + n]);  // nothing written past the end
    }
  }
}

TEST(DataFormat, RoundTripAndCorruption) {
  std::string dir = tmpdir();
  const int64_t n = 100;
  std::vector<uint8_t> x(n * 48);
  std::vector<int64_t> y(n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i * 7);
  for (int64_t i = 0; i < n; ++i) y[i] = i;
  auto shards = ad::write_shards(dir, schema_xy(), {{x.data(), nullptr}, {y.data(), nullptr}}, n, 2000);
  ASSERT_GT(shards.size(), 1u);
  std::vector<std::string> paths, names;
  uint64_t total = 0;
  for (auto& s : shards) {
    paths.push_back(dir + "/" + s.file);
    names.push_back(s.file);
    total += s.records;
  }
  EXPECT_EQ(total, static_cast<uint64_t>(n));
  {
    ad::Reader r(schema_xy(), paths, names);
    EXPECT_EQ(r.size(), n);
    EXPECT_EQ(r.verify_all(), n);
    const uint8_t* fp[2];
    int64_t d0[2];
    for (int64_t i : {0, 37, 99}) {
      uint64_t len;
      const uint8_t* p = r.record(i, &len, true);
      r.decode(p, len, i, fp, d0);
      EXPECT_EQ(0, std::memcmp(fp[0], x.data() + i * 48, 48));
      int64_t v;
      std::memcpy(&v, fp[1], 8);
      EXPECT_EQ(v, i);
    }
    // exactly-once over 3 ranks with a count that 3 divides
    std::multiset<int64_t> seen;
    for (int rank = 0; rank < 4; ++rank) {
      ad::LoaderOptions o;
      o.batch_size = 8;
      o.world_size = 4;
      o.rank = rank;
      o.seed = 3;
      auto rp = std::make_shared<ad::Reader>(schema_xy(), paths, names);
      ad::Loader l(rp, {}, o, {});
      l.start(0, 0);
      while (auto b = l.next()) {
        const int64_t* ys = reinterpret_cast<const int64_t*>(b->fields[1].data());
        for (int64_t k = 0; k < b->rows; ++k) seen.insert(ys[k]);
      }
    }
    EXPECT_EQ(seen.size(), static_cast<size_t>(n));
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), static_cast<size_t>(n));
  }
  // flip one payload byte of record 2 in shard 0
  {
    std::fstream f(paths[0], std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(32 + 2 * (16 + 56) + 12 + 5);  // 32-byte version-2 header
    char c = 0x5a;
    f.write(&c, 1);
  }
  {
    ad::Reader r(schema_xy(), paths, names);
    uint64_t len;
    try {
      r.record(2, &len, true);
      FAIL() << "no error";
    } catch (const aimass::CorruptDataError& e) {
      EXPECT_NE(std::string(e.what()).find(names[0] + " record 2"), std::string::npos) << e.what();
    }
  }
  // truncate shard 1
  ASSERT_EQ(0, truncate(paths[1].c_str(), 32 + 3 * 72 + 20));
  try {
    ad::Reader r(schema_xy(), paths, names);
    FAIL() << "no error";
  } catch (const aimass::CorruptDataError& e) {
    EXPECT_NE(std::string(e.what()).find(names[1]), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("record 3 is incomplete"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(DataLoader, PermutationIsPureAndChangesPerEpoch) {
  auto a = ad::epoch_permutation(5, 0, 1000, true);
  EXPECT_EQ(a, ad::epoch_permutation(5, 0, 1000, true));
  EXPECT_NE(a, ad::epoch_permutation(5, 1, 1000, true));
  std::vector<int64_t> s = a;
  std::sort(s.begin(), s.end());
  for (int64_t i = 0; i < 1000; ++i) EXPECT_EQ(s[i], i);
}

TEST(DataLoader, TransformsRestartAndDropMidEpoch) {
  std::string dir = tmpdir();
  const int64_t n = 64;
  std::vector<uint8_t> x(n * 48);
  std::vector<int64_t> y(n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i);
  for (int64_t i = 0; i < n; ++i) y[i] = i % 5;
  auto shards = ad::write_shards(dir, schema_xy(), {{x.data(), nullptr}, {y.data(), nullptr}}, n, 1000);
  std::vector<std::string> paths, names;
  for (auto& s : shards) {
    paths.push_back(dir + "/" + s.file);
    names.push_back(s.file);
  }
  auto reader = std::make_shared<ad::Reader>(schema_xy(), paths, names);
  std::vector<ad::Transform> tf(5);
  tf[0].kind = ad::TransformKind::RandomCrop;
  tf[0].field = "x";
  tf[0].crop_h = tf[0].crop_w = 3;
  tf[0].padding = 1;
  tf[1].kind = ad::TransformKind::RandomFlip;
  tf[1].field = "x";
  tf[2].kind = ad::TransformKind::Cast;
  tf[2].field = "x";
  tf[2].scale = 1.0 / 255;
  tf[3].kind = ad::TransformKind::Normalize;
  tf[3].field = "x";
  tf[3].mean = {0.5f};
  tf[3].std = {0.25f};
  tf[4].kind = ad::TransformKind::OneHot;
  tf[4].field = "y";
  tf[4].num_classes = 5;
  ad::LoaderOptions o;
  o.batch_size = 7;
  o.num_threads = 3;
  std::vector<float> first;
  for (int round = 0; round < 3; ++round) {
    ad::Loader l(reader, {}, o, tf);
    ASSERT_EQ(l.outputs()[0].shape, (std::vector<int64_t>{3, 3, 3}));
    l.start(0, 0);
    auto b = l.next();
    ASSERT_TRUE(b);
    const float* xs = reinterpret_cast<const float*>(b->fields[0].data());
    std::vector<float> got(xs, xs + 7 * 27);
    if (round == 0) first = got; else EXPECT_EQ(got, first);
    const float* ys = reinterpret_cast<const float*>(b->fields[1].data());
    for (int r = 0; r < 7; ++r) {
      float sum = 0;
      for (int c = 0; c < 5; ++c) sum += ys[r * 5 + c];
      EXPECT_EQ(sum, 1.f);
    }
    l.start(1, 3);  // restart elsewhere while workers are busy
    EXPECT_TRUE(l.next());
    // dropped here with batches in flight
  }
  std::filesystem::remove_all(dir);
}
