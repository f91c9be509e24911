// The thread-as-rank tests of the shared-memory collectives: fn(r) runs on one thread per simulated
// rank; an exception ends that rank's run and its text goes to errors[r], so one failing rank shows
// up as a test failure instead of terminating the process (its peers then time out and report too).
#pragma once
#include <exception>
#include <string>
#include <thread>
#include <vector>

template <class Fn>
void run_rank_threads(int L, std::vector<std::string>& errors, Fn fn) {
  if (static_cast<int>(errors.size()) < L) errors.resize(static_cast<size_t>(L));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(L));
  for (int r = 0; r < L; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
}
