// "Time way A against way B per size class": the one record behind the two timed staged /
// single-copy votes of a large allreduce on one node - the low-latency channel's (ll_push.cc:
// LLChannel::vote, note_large_allreduce) and the engine's (engine.cc: vote_bits, the timing in
// shm_allreduce_segments). Each caller keeps its own size classes, margin and way of carrying the
// vote between ranks; this keeps the seconds-per-byte averages and the rule that reads them.
// Internal to the comm area.
#pragma once

namespace aimass {
namespace comm {

template <int Classes>
class WayTimings {
 public:
  enum Way { kSingleCopy = 0, kStaged = 1 };

  // warm_runs: runs of a way that replace its average instead of joining it (the first run of a way
  // pays for cold pages and caches), and that it needs before its average is compared.
  explicit WayTimings(int warm_runs = 1) : warm_(warm_runs < 1 ? 1 : warm_runs) {}

  // One run of `way` in size class `cls` took `secs_per_byte`: a moving average (new runs weigh 1/4).
  void note(int way, int cls, double secs_per_byte) {
    if (cls < 0 || cls >= Classes) return;
    double& avg = spb_[way][cls];
    int& runs = runs_[way][cls];
    avg = runs < warm_ ? secs_per_byte : 0.75 * avg + 0.25 * secs_per_byte;
    ++runs;
  }

  // Whether this rank prefers the staged way for class `cls`: a way not yet timed warm_runs times is
  // tried first (staged, then single-copy); then staged only when it is `margin` times faster.
  bool prefers_staged(int cls, double margin) const {
    if (cls < 0 || cls >= Classes) return false;
    if (runs_[kStaged][cls] < warm_) return true;
    if (runs_[kSingleCopy][cls] < warm_) return false;
    return spb_[kStaged][cls] * margin < spb_[kSingleCopy][cls];
  }
  // Whether `way` still has to be timed in class `cls` before the averages are compared.
  bool untimed(int way, int cls) const { return cls >= 0 && cls < Classes && runs_[way][cls] < warm_; }

  double secs_per_byte(int way, int cls) const { return spb_[way][cls]; }
  int runs(int way, int cls) const { return runs_[way][cls]; }

 private:
  int warm_;
  double spb_[2][Classes] = {};
  int runs_[2][Classes] = {};
};

}  // namespace comm
}  // namespace aimass
