// Negotiation (the controller; see aimass/collectives.h for the protocol summary).
//
// Every cycle each rank's background thread takes part in one MPI_Iallreduce
// (BAND) of a bit vector: word 0 carries control flags (negated flags make BAND
// act as OR), the other words one bit per response-cache entry whose name is
// pending locally with the cached arguments. Bits set on every rank are ready.
// When some rank has a request the cache cannot describe (new name, changed
// arguments, stalled), or the coordinator still tracks unfinished names, the
// round also gathers every rank's unreported requests at rank 0, which answers
// with ready names and errors (mismatch / timeout) by broadcast. Every rank
// executes the same ready list in the same order, so the data collectives
// always match.
#include "comm/engine_impl.h"
#include "comm/host_regions.h"

namespace aimass {

// One negotiation round plus the collectives it makes ready. Returns true to stop.
bool CollectiveEngine::Impl::cycle_once() {
  if (hier && hier->pair) hier_engine_answer();  // (hier_fast.cc)
  bool want_stop;
  uint64_t threshold_local, shm_min_local;
  {
    std::lock_guard<std::mutex> lk(mu);
    shm_min_local = opts.shm_min_bytes;
    threshold_local = opts.fusion_threshold;
    cycle_s = opts.cycle_time_s;
    for (auto& p : incoming) {
      std::string name = p.req.name;
      auto pz = poisoned.find(name);
      if (pz != poisoned.end()) {  // failed on the other ranks while this one was queued
        inflight.erase(name);
        ll_publish_busy();
        ++st.errors;
        p.handle->finish(CollectiveHandle::ErrorKind::Distributed, pz->second.first);
        poisoned.erase(pz);
        continue;
      }
      pending.emplace(name, std::move(p));
    }
    incoming.clear();
    want_stop = stop_requested;
    ++st.cycles;
  }
  const auto now = Clock::now();
  if (want_stop && seconds_between(stop_since, now) > opts.timeout_s) {
    throw DistributedError(detail::concat("aimass.dist.shutdown(): not every rank called shutdown within ",
                                          opts.timeout_s, " s"));
  }

  // ---- bit vector: word 0 = control, then one bit per cache entry
  // word 1 carries the fusion threshold: BAND gives every rank the same value,
  // so all ranks cut fused buffers identically even while a new one propagates.
  // word 2 does the same for the shared-memory size threshold, word 3 for the staged / single-copy vote,
  // words 4 and 5 agree the staged layout's line offset (line_offset_code).
  constexpr size_t kCtl = 6;
  const size_t words = kCtl + (cache.size() + 63) / 64;
  std::vector<uint64_t>& bits = neg_bits;  // a member: a timed-out request may still write it
  bits.assign(words, 0);
  bool need_full = table_nonempty;
  for (auto& kv : pending) {
    Pending& p = kv.second;
    if (p.reported) continue;
    if (seconds_between(p.submitted, now) > timeout_of(p.req)) need_full = true;
    auto it = cache_index.find(p.req.name);
    if (it != cache_index.end() && cache[it->second].sig == p.sig) {
      bits[kCtl + it->second / 64] |= uint64_t(1) << (it->second % 64);
    } else {
      need_full = true;
    }
  }
  // An idle rank (the steady state of a job whose small collectives take the caller-thread
  // fast path) naps between polls instead of spinning: its round only paces the others.
  const bool idle = pending.empty() && !table_nonempty && !want_stop;
  // BAND: bit0 -> nobody needs a full round, bit1 -> every rank stops, bit2 -> every rank is idle,
  // bit3 -> every rank's pending allreduces live in shared host buffers (pending_all_mapped)
  bits[0] = (need_full ? 0 : 1) | (want_stop ? 2 : 0) | (idle ? 4 : 0) | (pending_all_mapped() ? 8 : 0);
  bits[1] = threshold_local;
  bits[2] = shm_min_local;
  bits[3] = ar_vote ? vote_bits() : 0;  // BAND: staged where every rank prefers it (vote_bits)
  // BAND of a code and of its complement: every rank posted the same code iff the results are each
  // other's complement (a bit where two ranks differ is 0 in both)
  const uint64_t line_code = line_offset_code();
  bits[4] = line_code;
  bits[5] = ~line_code;
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, bits.data(), static_cast<int>(words), MPI_UINT64_T, MPI_BAND, mpi, &req),
            "MPI_Iallreduce(negotiation)");
  wait_req(&req, idle ? 20e-6 : 2 * cycle_s + 1e-3, "negotiation");
  ++rounds_done;
  parked = (ll != nullptr || wake_comm != MPI_COMM_NULL) && (bits[0] & 4) != 0;  // the same on every rank

  std::vector<std::string> ready;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (bits[kCtl + i / 64] & (uint64_t(1) << (i % 64))) ready.push_back(cache[i].name);
  }
  {
    std::lock_guard<std::mutex> lk(mu);
    st.cache_hits += ready.size();
  }
  if (!(bits[0] & 1)) full_round(ready);
  shm_min_agreed = static_cast<size_t>(bits[2]);
  ar_votes_agreed = bits[3];
  ar_cycle_mapped = (bits[0] & 8) != 0;
  ar_line_offset = bits[4] == ~bits[5] && bits[4] != 0 ? static_cast<int>(bits[4] - 1) : -1;
  execute(ready, static_cast<size_t>(bits[1]));
  return (bits[0] & 2) != 0;  // every rank asked to stop
}

// Where this rank's largest pending allreduce (no compression) starts within its 64-byte line, plus 1;
// 0 when it has none. When every rank posts the same code, the staged data phase of this cycle lays its
// segments (a fused batch's, or one tensor's) out at that line offset (shm_line_pads): numpy's large
// arrays start 16 bytes into a page on every rank, and with the segments packed from element 0 one of the
// reduce kernel's two loads straddled two lines throughout. Measured (2 ranks, ResNet-50's 161 gradients,
// staged forced, loaded VM, alternate steps in one process): data phase 25.5 / 21.8 ms (min, per rank) and
// 38.7 / 38.2 ms (median) with numpy's arrays, against 22.0 / 17.3 and 34.1 / 30.7 ms with every array on
// a line. One tensor (session 23, async, staged forced, best of 7 x 100 calls, alternating jobs): 4 MiB
// 0.245 / 0.232 / 0.360 ms laid out against 0.263 / 0.292 / 0.401 ms packed; 16 MiB 1.42 / 1.33 / 1.29
// against 1.33 / 1.67 / 1.30 ms; 97.5 MiB 11.0 / 10.3 / 10.5 against 12.0 / 11.5 / 10.5 ms.
uint64_t CollectiveEngine::Impl::line_offset_code() const {
  const Pending* big = nullptr;
  size_t big_bytes = 0;
  for (auto& kv : pending) {
    const CollectiveRequest& r = kv.second.req;
    if (r.kind != CollectiveKind::Allreduce || r.wire != r.dtype || r.output == nullptr) continue;
    const size_t b = static_cast<size_t>(numel_of(r.shape)) * dtype_size(r.dtype);
    if (big == nullptr || b > big_bytes) {
      big = &kv.second;
      big_bytes = b;
    }
  }
  return big ? static_cast<uint64_t>(reinterpret_cast<uintptr_t>(big->req.output) % 64) + 1 : 0;
}

// Whether this rank has pending allreduces and every one of them (input and output, uncompressed) lives in
// a shared host buffer (aimass/shared_host.h: gradient buckets) while the segment maps the peers' ones. When
// every rank says so, the cycle's allreduces skip the staged / single-copy vote: reduced in every rank's
// mapping they move the fewest bytes with no kernel copy, and a staged run (the vote's, or its every-32nd
// exploration) would stage them through the segment and wait at each chunk for a descheduled peer. Their
// timings stay out of the vote, whose classes then keep describing the kernel-copy runs they decide.
bool CollectiveEngine::Impl::pending_all_mapped() const {
  if (!ar_vote || !shm_ok || !shm->maps_peers() || comm->cross_size() != 1) return false;
  bool any = false;
  comm::RegionRef ref;
  for (auto& kv : pending) {
    const CollectiveRequest& r = kv.second.req;
    if (r.kind != CollectiveKind::Allreduce) continue;
    const size_t b = static_cast<size_t>(numel_of(r.shape)) * dtype_size(r.dtype);
    if (r.wire != r.dtype || r.output == nullptr || r.input == nullptr || !comm::find_shared_region(r.input, b, &ref) ||
        !comm::find_shared_region(r.output, b, &ref))
      return false;
    any = true;
  }
  return any;
}

// -------------------------------------------------------------- coordinator round
void CollectiveEngine::Impl::full_round(std::vector<std::string>& ready) {
  {
    std::lock_guard<std::mutex> lk(mu);
    ++st.full_rounds;
  }
  const auto now = Clock::now();
  std::unordered_set<std::string> in_ready(ready.begin(), ready.end());
  // buffers posted to MPI are members: a timed-out request may still read/write them
  Writer& w = neg_w;
  w.buf.clear();
  uint32_t count = 0;
  for (auto& kv : pending) {
    if (kv.second.reported || in_ready.count(kv.first)) continue;
    ++count;
  }
  w.u32(count);
  for (auto& kv : pending) {
    Pending& p = kv.second;
    if (p.reported || in_ready.count(kv.first)) continue;
    p.reported = true;
    w.str(p.req.name);
    w.str(p.sig);
    w.f64(timeout_of(p.req));
    w.f64(seconds_between(p.submitted, now));
  }
  int& len = neg_len;
  len = static_cast<int>(w.buf.size());
  std::vector<int>& lens = neg_lens;
  lens.assign(rank == 0 ? size : 0, 0);
  MPI_Request req;
  check_mpi(MPI_Igather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, mpi, &req), "MPI_Igather(negotiation)");
  wait_req(&req, 2 * cycle_s + 1e-3, "negotiation");
  std::vector<int>& displs = neg_displs;
  displs.assign(rank == 0 ? size : 0, 0);
  std::vector<char>& all = neg_all;
  all.clear();
  if (rank == 0) {
    int64_t total = 0;
    for (int r = 0; r < size; ++r) {
      displs[r] = static_cast<int>(total);
      total += lens[r];
    }
    AIMASS_CHECK(total < INT_MAX, DistributedError, "aimass.dist: too many pending requests to negotiate");
    all.resize(static_cast<size_t>(total) + 1);
  }
  check_mpi(MPI_Igatherv(w.buf.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, 0, mpi,
                         &req),
            "MPI_Igatherv(negotiation)");
  wait_req(&req, 2 * cycle_s + 1e-3, "negotiation");

  Writer& out = neg_out;
  out.buf.clear();
  if (rank == 0) {
    for (int r = 0; r < size; ++r) {
      Reader rd{all.data() + displs[r], all.data() + displs[r] + lens[r]};
      uint32_t n = rd.u32();
      for (uint32_t i = 0; i < n; ++i) {
        std::string name = rd.str(), sig = rd.str();
        double timeout = rd.f64(), age = rd.f64();
        auto ins = table.try_emplace(name);
        TableEntry& e = ins.first->second;
        const auto seen = now - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(age));
        if (ins.second) {
          e.sigs.assign(size, std::string());
          e.timeout_s = timeout;
          e.first_seen = seen;
          e.seq = table_seq++;
        }
        if (e.sigs[r].empty()) ++e.count;
        e.sigs[r] = sig;
        e.timeout_s = std::min(e.timeout_s, timeout);
        e.first_seen = std::min(e.first_seen, seen);
      }
    }
    std::vector<std::pair<uint64_t, std::string>> order;
    for (auto& kv : table) order.emplace_back(kv.second.seq, kv.first);
    std::sort(order.begin(), order.end());
    std::vector<Response> resp;
    for (auto& o : order) {
      TableEntry& e = table[o.second];
      std::string first;
      bool mismatch = false;
      for (auto& s : e.sigs) {
        if (s.empty()) continue;
        if (first.empty()) first = s;
        else if (s != first) mismatch = true;
      }
      // A mismatch is reported once every rank has submitted (or at the
      // timeout), so the message shows what each rank asked for.
      if (e.count == size && mismatch) {
        resp.push_back({false, o.second, describe(o.second, e, "ranks submitted collective '" + o.second +
                                                                   "' with different arguments")});
      } else if (e.count == size) {
        resp.push_back({true, o.second, ""});
      } else if (seconds_between(e.first_seen, now) > e.timeout_s) {
        resp.push_back({false, o.second,
                        describe(o.second, e, detail::concat("collective '", o.second, "' timed out after ",
                                                             e.timeout_s, " s waiting for every rank to submit it",
                                                             mismatch ? " (and the ranks that did disagree)" : ""))});
      } else {
        continue;
      }
      table.erase(o.second);
    }
    out.u32(table.empty() ? 0 : 1);
    out.u32(static_cast<uint32_t>(resp.size()));
    for (auto& r : resp) {
      out.u32(r.ok ? 1 : 0);
      out.str(r.name);
      out.str(r.error);
    }
  }
  int& out_len = neg_out_len;
  out_len = static_cast<int>(out.buf.size());
  check_mpi(MPI_Ibcast(&out_len, 1, MPI_INT, 0, mpi, &req), "MPI_Ibcast(negotiation)");
  wait_req(&req, 2 * cycle_s + 1e-3, "negotiation");
  out.buf.resize(static_cast<size_t>(out_len));
  check_mpi(MPI_Ibcast(out.buf.data(), out_len, MPI_CHAR, 0, mpi, &req), "MPI_Ibcast(negotiation)");
  wait_req(&req, 2 * cycle_s + 1e-3, "negotiation");

  Reader rd{out.buf.data(), out.buf.data() + out.buf.size()};
  table_nonempty = rd.u32() != 0;
  const uint32_t n = rd.u32();
  for (uint32_t i = 0; i < n; ++i) {
    const bool ok = rd.u32() != 0;
    std::string name = rd.str(), error = rd.str();
    auto it = pending.find(name);
    if (ok) {
      AIMASS_CHECK(it != pending.end(), DistributedError, "aimass.dist: coordinator scheduled '", name,
                   "' which this rank did not submit (internal error)");
      ready.push_back(name);
      auto ci = cache_index.find(name);
      if (ci != cache_index.end()) {
        cache[ci->second].sig = it->second.sig;
      } else if (cache.size() < opts.cache_capacity) {
        cache_index[name] = cache.size();
        cache.push_back({name, it->second.sig});
      }
      it->second.reported = false;  // runs now
    } else if (it != pending.end()) {
      Pending p = std::move(it->second);
      pending.erase(it);
      finish(p, CollectiveHandle::ErrorKind::Distributed, error);
    } else {
      // This rank never submitted it (yet): a later submission fails at once.
      std::lock_guard<std::mutex> lk(mu);
      const auto t = Clock::now();
      for (auto pz = poisoned.begin(); pz != poisoned.end();) {  // forget errors nobody asked about
        if (seconds_between(pz->second.second, t) > opts.timeout_s) pz = poisoned.erase(pz);
        else ++pz;
      }
      poisoned[name] = {error, t};
    }
  }
}

std::string CollectiveEngine::Impl::describe(const std::string& name, const TableEntry& e, const std::string& headline) {
  std::ostringstream os;
  os << "aimass.dist: " << headline << ":";
  for (int r = 0; r < size; ++r) {
    os << (r ? ";" : "") << " rank " << r << ": ";
    if (e.sigs[r].empty()) os << "did not submit it";
    else os << e.sigs[r];
  }
  os << ". Every rank must call the same collectives with the same names, shapes, dtypes and ops"
        " (timeout: the timeout= argument or AIMASS_COMM_TIMEOUT).";
  return os.str();
}

}  // namespace aimass
