// comm::cpu_share: the one "more ranks than CPUs" decision of the shared-memory waits and the eager
// broadcast bound (comm/cpu_share.h).
#include <gtest/gtest.h>
#include <sched.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/cpu_share.h"

namespace {

using aimass::comm::cpu_share;

// Sets (or, with nullptr, unsets) environment variables for the life of the object, then restores them.
struct Env {
  std::vector<std::pair<std::string, std::string>> saved;
  std::vector<std::string> unset_after;
  Env(std::initializer_list<std::pair<const char*, const char*>> kv) {
    for (auto& p : kv) {
      if (const char* old = std::getenv(p.first)) saved.emplace_back(p.first, old);
      else unset_after.emplace_back(p.first);
      if (p.second) ::setenv(p.first, p.second, 1);
      else ::unsetenv(p.first);
    }
  }
  ~Env() {
    for (auto& n : unset_after) ::unsetenv(n.c_str());
    for (auto& p : saved) ::setenv(p.first.c_str(), p.second.c_str(), 1);
  }
};

long machine_cpus() { return static_cast<long>(std::thread::hardware_concurrency()); }

TEST(CommCpuShare, NodeCountWithoutALauncher) {
  Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", nullptr}, {"MPI_LOCALNRANKS", nullptr}});
  const auto s = cpu_share(1);
  EXPECT_EQ(s.cpus, machine_cpus());
  EXPECT_EQ(s.ranks, 1);
  EXPECT_FALSE(s.oversubscribed());
  if (machine_cpus() > 0) EXPECT_TRUE(cpu_share(machine_cpus() + 1).oversubscribed());
  EXPECT_FALSE(cpu_share(machine_cpus()).oversubscribed());
}

TEST(CommCpuShare, TheLaunchersCountCoversSimulatedNodes) {
  if (machine_cpus() <= 0) GTEST_SKIP() << "CPU count unknown";
  const std::string more = std::to_string(machine_cpus() + 2);
  {  // 2 ranks per simulated node, but the machine runs cpus + 2 ranks (Open MPI)
    Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", more.c_str()}, {"MPI_LOCALNRANKS", nullptr}});
    EXPECT_EQ(cpu_share(2).ranks, machine_cpus() + 2);
    EXPECT_TRUE(cpu_share(2).oversubscribed());
  }
  {  // MPICH / Hydra
    Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", nullptr}, {"MPI_LOCALNRANKS", more.c_str()}});
    EXPECT_TRUE(cpu_share(2).oversubscribed());
  }
  {  // a smaller launcher count (a process set spanning fewer ranks) never lowers the node's count
    Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", "1"}, {"MPI_LOCALNRANKS", nullptr}});
    EXPECT_EQ(cpu_share(3).ranks, 3);
  }
  {  // a garbled value: the node's count
    Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", "4x"}, {"MPI_LOCALNRANKS", nullptr}});
    EXPECT_EQ(cpu_share(2).ranks, 2);
  }
}

// mpirun --bind-to core: each rank's affinity mask holds one CPU, yet with as many ranks as CPUs
// every rank has a core of its own: not oversubscribed (the old wait policy counted the mask).
TEST(CommCpuShare, OneCpuAffinityMaskIsNotOversubscription) {
  if (machine_cpus() < 2) GTEST_SKIP() << "needs 2 CPUs";
  cpu_set_t old;
  ASSERT_EQ(sched_getaffinity(0, sizeof(old), &old), 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &old)) {
      CPU_SET(c, &one);
      break;
    }
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  const std::string n = std::to_string(machine_cpus());
  Env env({{"OMPI_COMM_WORLD_LOCAL_SIZE", n.c_str()}, {"MPI_LOCALNRANKS", nullptr}});
  const auto s = cpu_share(1);
  sched_setaffinity(0, sizeof(old), &old);
  EXPECT_EQ(s.cpus, machine_cpus());
  EXPECT_EQ(s.ranks, machine_cpus());
  EXPECT_FALSE(s.oversubscribed());
}

}  // namespace
