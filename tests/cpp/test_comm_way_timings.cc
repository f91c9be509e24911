// comm::WayTimings: the one "time staged against single-copy per size class" record of the two timed
// votes (the low-latency channel's, warm_runs 1; the engine's, warm_runs 2; comm/way_timings.h).
#include <gtest/gtest.h>

#include "comm/way_timings.h"

namespace {

using Timings = aimass::comm::WayTimings<4>;

TEST(CommWayTimings, UntimedWaysAreTriedStagedFirst) {
  for (int warm : {1, 2}) {
    Timings t(warm);
    EXPECT_TRUE(t.prefers_staged(0, 1.25));  // nothing timed: try staged
    for (int i = 0; i < warm; ++i) {
      EXPECT_TRUE(t.untimed(Timings::kStaged, 0));
      t.note(Timings::kStaged, 0, 1.0);
    }
    EXPECT_FALSE(t.untimed(Timings::kStaged, 0));
    EXPECT_FALSE(t.prefers_staged(0, 1.25));  // staged timed, single-copy not yet: try it
    for (int i = 0; i < warm; ++i) t.note(Timings::kSingleCopy, 0, 1.0);
    EXPECT_FALSE(t.prefers_staged(0, 1.25));  // equal: single-copy
    EXPECT_TRUE(t.prefers_staged(1, 1.25));   // classes are apart
  }
}

TEST(CommWayTimings, WarmRunsReplaceThenAMovingAverage) {
  Timings t(2);
  t.note(Timings::kStaged, 2, 8.0);  // cold pages
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 2), 8.0);
  t.note(Timings::kStaged, 2, 2.0);  // the second warm run replaces it
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 2), 2.0);
  t.note(Timings::kStaged, 2, 6.0);  // then new runs weigh 1/4
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 2), 3.0);
  EXPECT_EQ(t.runs(Timings::kStaged, 2), 3);
  t.note(Timings::kStaged, 9, 1.0);  // a class out of range is ignored
  t.note(Timings::kStaged, -1, 1.0);
  EXPECT_FALSE(t.prefers_staged(9, 1.0));
}

TEST(CommWayTimings, StagedOnlyWhenFasterByTheMargin) {
  Timings t(1);
  t.note(Timings::kSingleCopy, 0, 1.2);
  t.note(Timings::kStaged, 0, 1.0);  // 1.2x faster
  EXPECT_FALSE(t.prefers_staged(0, 1.25));
  EXPECT_TRUE(t.prefers_staged(0, 1.1));
  t.note(Timings::kStaged, 0, 0.6);  // average 0.9: 1.33x faster
  EXPECT_TRUE(t.prefers_staged(0, 1.25));
}

// median_of: the median of the last runs, so one run that lost its CPU does not sway the choice.
TEST(CommWayTimings, MedianOfTheLastRunsForgetsAnOutlier) {
  Timings t(2, 5);
  t.note(Timings::kStaged, 1, 8.0);  // cold
  t.note(Timings::kStaged, 1, 2.0);  // the last warm run replaces it
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 1), 2.0);
  t.note(Timings::kStaged, 1, 100.0);  // [2, 100]
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 1), 51.0);
  t.note(Timings::kStaged, 1, 2.0);  // [2, 100, 2]
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 1), 2.0);
  t.note(Timings::kSingleCopy, 1, 5.0);
  t.note(Timings::kSingleCopy, 1, 5.0);
  EXPECT_TRUE(t.prefers_staged(1, 1.25));  // 2 against 5 (the moving average would hold 26.5)
  for (double v : {3.0, 3.0, 3.0}) t.note(Timings::kStaged, 1, v);  // the last 5: 100, 2, 3, 3, 3
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 1), 3.0);
  for (double v : {9.0, 9.0, 9.0}) t.note(Timings::kStaged, 1, v);  // 3, 3, 9, 9, 9: staged slowed down
  EXPECT_EQ(t.secs_per_byte(Timings::kStaged, 1), 9.0);
  EXPECT_FALSE(t.prefers_staged(1, 1.25));
  EXPECT_EQ(t.runs(Timings::kStaged, 1), 10);
  Timings e(1, 0);  // median_of 0: the moving average, as before
  e.note(Timings::kStaged, 0, 4.0);
  e.note(Timings::kStaged, 0, 8.0);
  EXPECT_EQ(e.secs_per_byte(Timings::kStaged, 0), 5.0);
}

}  // namespace
