// "Time way A against way B per size class": the one record behind the two timed staged /
// single-copy votes of a large allreduce on one node - the low-latency channel's (ll_push.cc:
// LLChannel::vote, note_large_allreduce) and the engine's (engine.cc: vote_bits, the timing in
// shm_allreduce_segments). Each caller keeps its own size classes, margin and way of carrying the
// vote between ranks; this keeps the seconds-per-byte averages and the rule that reads them.
// Internal to the comm area.
#pragma once
#include <algorithm>

namespace aimass {
namespace comm {

template <int Classes>
class WayTimings {
 public:
  enum Way { kSingleCopy = 0, kStaged = 1 };

  // warm_runs: runs of a way that replace its average instead of joining it (the first run of a way
  // pays for cold pages and caches), and that it needs before its average is compared.
  // median_of (0, or up to kMaxWindow): a way's figure is the median of its last median_of runs (the
  // last warm run and those after it) instead of the moving average. The caller-thread vote uses 5: on
  // a loaded machine single staged runs that lost their CPU took 1.8 ms and 99 ms against ~0.3 ms
  // (2 MiB), which lifted the average past the push's for hundreds of calls (the way not preferred is
  // timed again only every 32nd call); a median forgets them.
  static constexpr int kMaxWindow = 8;
  explicit WayTimings(int warm_runs = 1, int median_of = 0)
      : warm_(warm_runs < 1 ? 1 : warm_runs), window_(std::min(std::max(median_of, 0), kMaxWindow)) {}

  // One run of `way` in size class `cls` took `secs_per_byte`: a moving average (new runs weigh 1/4),
  // or the median of the last runs (median_of).
  void note(int way, int cls, double secs_per_byte) {
    if (cls < 0 || cls >= Classes) return;
    double& avg = spb_[way][cls];
    int& runs = runs_[way][cls];
    if (window_ > 0) {
      Ring& r = last_[way][cls];
      if (runs < warm_) r.n = 0;  // a warm run replaces the record
      r.v[r.next] = secs_per_byte;
      r.next = (r.next + 1) % window_;
      r.n = std::min(r.n + 1, window_);
      double tmp[kMaxWindow];
      std::copy(r.v, r.v + window_, tmp);
      // (the ring's n newest values: with n < window_ they are the n before `next`)
      double* live = tmp;
      if (r.n < window_) {
        for (int i = 0; i < r.n; ++i) tmp[i] = r.v[(r.next - 1 - i + window_) % window_];
      }
      // insertion sort of at most kMaxWindow values (std::sort's unrolled tail made GCC 12 warn of bounds)
      const int m = std::min(r.n, kMaxWindow);
      for (int i = 1; i < m; ++i) {
        const double v = live[i];
        int k = i;
        for (; k > 0 && live[k - 1] > v; --k) live[k] = live[k - 1];
        live[k] = v;
      }
      avg = r.n % 2 ? live[r.n / 2] : 0.5 * (live[r.n / 2 - 1] + live[r.n / 2]);
    } else {
      avg = runs < warm_ ? secs_per_byte : 0.75 * avg + 0.25 * secs_per_byte;
    }
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
  struct Ring {
    double v[kMaxWindow] = {};
    int next = 0, n = 0;
  };
  int warm_;
  int window_;
  double spb_[2][Classes] = {};
  Ring last_[2][Classes] = {};  // median_of: each way's last runs
  int runs_[2][Classes] = {};
};

}  // namespace comm
}  // namespace aimass
