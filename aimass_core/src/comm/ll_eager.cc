// Eager broadcast through the low-latency segment (see "Eager broadcast" in ll_shm.h).
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "comm/cma.h"
#include "comm/ll_shm.h"

namespace aimass {
namespace comm {

namespace {
constexpr uint64_t kPosted = 1, kNormal = 2;
constexpr double kEagerBusyGraceS = 1e-3;  // as the attempts' grace for a peer busy in its engine

inline uint64_t seq_of(uint64_t state) { return state >> 8; }
inline int writer_of(uint64_t state) { return static_cast<int>((state >> 2) & 63); }
inline uint64_t kind_of(uint64_t state) { return state & 3; }
inline uint64_t make_state(uint64_t s, int writer, uint64_t kind) {
  return s << 8 | static_cast<uint64_t>(writer) << 2 | kind;
}

std::string mismatch(int me, const std::string& mine, int other, const std::string& theirs, bool both_root) {
  return std::string("aimass.dist: a blocking broadcast was called with different arguments: rank ") +
         std::to_string(me) + ": " + mine +
         (both_root ? " (as root)" : "") + "; rank " + std::to_string(other) + ": " + theirs +
         " (as root). Every rank must call the same blocking broadcasts in the same order, with the same root, "
         "shape and dtype";
}

void copy_desc(char* dst, const std::string& s) {
  const size_t n = std::min(s.size(), LLChannel::kEagerDesc - 1);
  std::memcpy(dst, s.data(), n);
  dst[n] = '\0';
}
// A peer process that has exited, is a zombie or is stopped (SIGSTOP, a debugger) will not
// acknowledge anything: the engine is broken. A live one that only did not take part is a
// program error, raised without breaking the engine.
bool process_gone(int pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  const char* close = std::strrchr(buf, ')');  // "pid (comm) state ..."
  if (!close || close[1] != ' ') return false;
  const char st = close[2];
  return st == 'T' || st == 't' || st == 'Z' || st == 'X';
}
}  // namespace

void LLChannel::EagerSig::set(DType dt, int r, std::string_view nm, const int64_t* sh, int nd) {
  *this = EagerSig();
  dtype = static_cast<int32_t>(dt);
  root = r;
  ndim = nd;
  for (int i = 0; i < nd && i < 8; ++i) shape[i] = sh[i];
  name_len = static_cast<uint32_t>(std::min(nm.size(), sizeof(name)));
  std::memcpy(name, nm.data(), name_len);
}

std::string LLChannel::EagerSig::str() const {
  std::string s = "broadcast '" + std::string(name, std::min<size_t>(name_len, sizeof(name))) + "' (" +
                  dtype_name(static_cast<DType>(dtype)) + "[";
  for (int i = 0; i < ndim && i < 8; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  if (ndim > 8) s += ", ...";
  return s + "], root " + std::to_string(root) + ")";
}

// Entry s (written by rank `other`) does not match this rank's request: posted for every peer to
// raise at its next collective, acknowledged, raised here.
void LLChannel::mismatch_at(uint64_t s, int other, const EagerEntry* e, SigFill fill, const void* ctx, bool as_root) {
  EagerSig mine;
  fill(mine, ctx);
  const std::string msg = mismatch(rank_, mine.str(), other, e->sig.str(), as_root);
  EagerCtl* me = ectl(rank_);
  copy_desc(me->desc, msg);
  me->bad.store(s, std::memory_order_seq_cst);
  eager_ack(s);
  last_posted_ = s;
  reported_ = s;  // raised here: not again when a peer reports the same entry
  throw DistributedError(msg);
}

void LLChannel::eager_ack(uint64_t s) {
  eager_acked_ = s;
  ectl(rank_)->acked.store(s, std::memory_order_seq_cst);
}

LLChannel::Eager LLChannel::eager_root(uint64_t hash, const void* data, size_t bytes, bool post, SigFill fill,
                                       const void* ctx, bool by_address) {
  note_cpu();  // (the stream's waits yield at once when a peer shares this CPU, as the exchanges' do)
  by_address = by_address && cma_ok_ && bytes > 0 && data != nullptr;
  post = post && (by_address || bytes <= eager_bytes_);
  while (true) {
    const uint64_t s = eager_acked_ + 1;
    EagerEntry* e = entry(s);
    uint64_t st = e->state.load(std::memory_order_seq_cst);
    if (seq_of(st) > s) {  // entry s was a claim, and the slot was reused since (claims are not waited for)
      eager_ack(s);
      continue;
    }
    if (seq_of(st) < s) {  // nobody has written entry s yet (the ring slot holds an older entry or nothing)
      if (post) {
        e->hash = hash;
        e->bytes = bytes;
        e->root = rank_;
        e->addr.store(by_address ? reinterpret_cast<uint64_t>(data) : 0, std::memory_order_relaxed);
        // the record is read only on a mismatch: rewritten only when another request last used it
        if (e->sig_of != hash) {
          fill(e->sig, ctx);
          e->sig_of = hash;
        }
        if (bytes && !by_address) comm::copy_bytes(e->data(), data, bytes);
      } else {
        ectl(rank_)->claim_hash.store(hash, std::memory_order_seq_cst);
      }
      if (e->state.compare_exchange_strong(st, make_state(s, rank_, post ? kPosted : kNormal),
                                           std::memory_order_seq_cst)) {
        eager_ack(s);
        if (post) {
          ++eager_posted_;
          last_posted_ = s;
          if (by_address) posted_by_address_ = s;
        }
        return post ? Eager::Done : Eager::Normal;
      }
      // a receiver claimed it meanwhile: st now holds its claim
      if (seq_of(st) != s) continue;
    }
    const int w = writer_of(st);
    if (kind_of(st) == kPosted) {  // another rank posted this broadcast as its root
      mismatch_at(s, w, e, fill, ctx, true);
    }
    // claimed by receivers that went the normal way: join them when they went for this broadcast,
    // else (a broadcast this rank ran through its engine, which they joined there) skip the entry
    eager_ack(s);
    if (ectl(w)->claim_hash.load(std::memory_order_seq_cst) == hash) return Eager::Normal;
  }
}

LLChannel::Eager LLChannel::eager_receive(uint64_t hash, int root, void* out, size_t bytes, SigFill fill,
                                          const void* ctx, double fallback_s) {
  note_cpu();
  const uint64_t s = eager_acked_ + 1;
  EagerEntry* e = entry(s);
  ll_wait::Backoff backoff;
  backoff.spin = spin_;
  double busy_since = -1;
  while (true) {
    uint64_t st = e->state.load(std::memory_order_seq_cst);
    if (seq_of(st) >= s) {
      if (seq_of(st) > s || kind_of(st) == kNormal) {  // (> s: a claim whose slot was reused since)
        eager_ack(s);
        return Eager::Normal;
      }
      if (e->hash == hash && e->bytes == bytes && e->root == root) {
        const uint64_t addr = e->addr.load(std::memory_order_relaxed);  // (ordered by the state's load)
        if (addr == 0) {
          if (bytes) comm::copy_bytes(out, e->data(), bytes);
        } else {
          // single copy from the root's buffer, which stays as it is until this rank acknowledges,
          // unless the root gave up waiting (it found a receiver dead or stopped): then what was
          // read may be stale, and this rank raises (seen after the read: a root that had not given
          // up by then had not returned either)
          try {
            if (addr != kAbandoned) receive_by_address(s, root, addr, out, bytes);
            AIMASS_CHECK(e->addr.load(std::memory_order_seq_cst) != kAbandoned, DistributedError,
                         "aimass.dist: blocking broadcast: root rank ", root,
                         " stopped waiting for this rank to read its data (it found a rank dead or stopped)");
          } catch (const DistributedError&) {
            peer_lost_ = true;  // the root is gone, or the job is broken: the engine cannot go on
            eager_ack(s);
            throw;
          }
        }
        eager_ack(s);
        ++eager_posted_;
        last_posted_ = s;
        return Eager::Done;
      }
      mismatch_at(s, writer_of(st), e, fill, ctx, false);
    }
    // not posted yet: the root is late, or runs this broadcast through its engine (busy there)
    const double waited = backoff.elapsed();
    const bool busy = root >= 0 && root < size_ && ctl(root)->busy.load(std::memory_order_seq_cst) != 0;
    if (!busy) busy_since = -1;
    else if (busy_since < 0) busy_since = waited;
    if ((busy && waited - busy_since > kEagerBusyGraceS) || waited > fallback_s) {
      ectl(rank_)->claim_hash.store(hash, std::memory_order_seq_cst);
      if (e->state.compare_exchange_strong(st, make_state(s, rank_, kNormal), std::memory_order_seq_cst)) {
        eager_ack(s);
        return Eager::Normal;
      }
      continue;  // the root posted (or a peer claimed) meanwhile: look again
    }
    backoff.pause(waited);
  }
}

// A by-address entry's payload into `out`: one read, or (kHelpMin bytes or more) pieces claimed one
// at a time, the root writing the ones it claims (eager_serve); returns once every piece is in.
void LLChannel::receive_by_address(uint64_t s, int root, uint64_t addr, void* out, size_t bytes) {
  const pid_t pid = static_cast<pid_t>(ctl(root)->pid.load(std::memory_order_relaxed));
  eager_out_posted_ = false;
  if (bytes < kHelpMin || !push_ok_) {  // (push_ok_ is agreed: the root does not help either)
    iovec l{out, bytes};
    iovec r{reinterpret_cast<void*>(addr), bytes};
    cma_read(pid, &l, &r, 1, "blocking broadcast", "root rank", root);
    return;
  }
  const size_t piece = help_piece_bytes(bytes);
  const uint64_t pieces = (bytes + piece - 1) / piece;
  EagerCtl* me = ectl(rank_);
  me->help_out.store(reinterpret_cast<uint64_t>(out), std::memory_order_relaxed);
  me->claims.store(s << 24, std::memory_order_relaxed);
  me->pushed.store(s << 24, std::memory_order_relaxed);
  me->help.store(s, std::memory_order_seq_cst);  // (publishes the three above)
  eager_out_posted_ = true;
  uint64_t mine = 0;
  uint64_t w = me->claims.load(std::memory_order_seq_cst);
  while ((w & 0xffffff) < pieces) {  // (only this entry's claims: the tag is ours until we acknowledge)
    if (!me->claims.compare_exchange_weak(w, w + 1, std::memory_order_seq_cst)) continue;
    const size_t off = static_cast<size_t>(w & 0xffffff) * piece, n = std::min(piece, bytes - off);
    iovec l{static_cast<char*>(out) + off, n};
    iovec r{reinterpret_cast<void*>(addr + off), n};
    cma_read(pid, &l, &r, 1, "blocking broadcast", "root rank", root);
    ++mine;
    w = me->claims.load(std::memory_order_seq_cst);
  }
  // the root's pieces: it claimed them before we ran out, so it is writing them now
  ll_wait::Backoff backoff;
  backoff.spin = spin_;
  while ((me->pushed.load(std::memory_order_seq_cst) & 0xffffff) < pieces - mine) {
    const double waited = backoff.elapsed();
    if (waited > timeout_s_ || (backoff.iter % 4096 == 4095 && process_gone(static_cast<int>(pid))))
      throw DistributedError(detail::concat("aimass.dist: blocking broadcast: root rank ", root,
                                            " did not finish writing its part of the data within ", timeout_s_,
                                            " s: it has died or stopped (raise AIMASS_COMM_TIMEOUT if it is only slow)"));
    backoff.pause(waited);
  }
  eager_out_posted_ = false;  // nobody writes it any more
}

void LLChannel::eager_serve(double deadline_s) {
  const uint64_t s = posted_by_address_;
  // (not when a peer last ran on this CPU: the two would take turns on one core, and the writes only
  // add syscalls; the receiver then claims every piece itself)
  if (s == 0 || !push_ok_ || !spin_) return;
  EagerEntry* e = entry(s);
  const size_t bytes = e->bytes;
  if (bytes < kHelpMin) return;
  const char* data = reinterpret_cast<const char*>(e->addr.load(std::memory_order_relaxed));
  const size_t piece = help_piece_bytes(bytes);
  const uint64_t pieces = (bytes + piece - 1) / piece;
  ll_wait::Backoff backoff;
  backoff.spin = spin_;
  while (true) {
    bool waiting = false;  // a receiver neither acknowledged nor posted its output yet
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      EagerCtl* p = ectl(j);
      if (p->acked.load(std::memory_order_seq_cst) >= s) continue;
      if (p->help.load(std::memory_order_seq_cst) != s) {
        waiting = true;
        continue;
      }
      const uint64_t out = p->help_out.load(std::memory_order_relaxed);
      const pid_t pid = static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed));
      uint64_t w = p->claims.load(std::memory_order_seq_cst);
      // the tag: a receiver that finished this entry may already have posted the next one
      while ((w >> 24) == s && (w & 0xffffff) < pieces) {
        if (!p->claims.compare_exchange_weak(w, w + 1, std::memory_order_seq_cst)) continue;
        // claimed (from the back would keep the receiver's reads sequential; the front is simpler
        // and the pieces are whole pages either way)
        const size_t off = static_cast<size_t>(w & 0xffffff) * piece, n = std::min(piece, bytes - off);
        iovec l{const_cast<char*>(data) + off, n};
        iovec r{reinterpret_cast<void*>(out + off), n};
        try {
          cma_write(pid, &l, &r, 1, "blocking broadcast", "rank", j);
        } catch (const DistributedError&) {
          peer_lost_ = true;
          throw;
        }
        p->pushed.fetch_add(1, std::memory_order_seq_cst);
        w = p->claims.load(std::memory_order_seq_cst);
      }
    }
    if (!waiting) return;  // settle() waits for the acknowledgements
    const double waited = backoff.elapsed();
    if (waited > deadline_s) return;  // (settle() reports it)
    backoff.pause(waited);
  }
}

void LLChannel::eager_abandon() {
  if (posted_by_address_ == 0) return;
  EagerEntry* e = entry(posted_by_address_);
  if (seq_of(e->state.load(std::memory_order_seq_cst)) == posted_by_address_)
    e->addr.store(kAbandoned, std::memory_order_seq_cst);
  posted_by_address_ = 0;
}

void LLChannel::settle(double deadline_s, uint64_t lag) {
  // posted entries only: a claim has no payload to read, and its claimers never wait for the
  // root (which may not broadcast again for a long while) to acknowledge it
  const uint64_t s = last_posted_;
  const uint64_t target = std::min(s, eager_acked_ > lag ? eager_acked_ - lag : 0);
  if (target > settled_) {
    ll_wait::Backoff backoff;
    backoff.spin = spin_;
    uint64_t low = s;
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      uint64_t a;
      while ((a = ectl(j)->acked.load(std::memory_order_seq_cst)) < target) {
        const double waited = backoff.elapsed();
        if (waited > deadline_s) {
          settled_ = s;  // reported once; the stream may be out of step from here on
          peer_lost_ = process_gone(static_cast<int>(ctl(j)->pid.load(std::memory_order_relaxed)));
          throw DistributedError(
              std::string("aimass.dist: rank ") + std::to_string(j) + " did not take part in this rank's blocking " +
              "broadcast #" + std::to_string(target) + " within " + std::to_string(deadline_s) +
              " s: it has died, stopped, or calls its blocking broadcasts in another order (raise "
              "AIMASS_COMM_TIMEOUT if it is only slow)");
        }
        backoff.pause(waited);
      }
      low = std::min(low, a);
    }
    settled_ = std::max(settled_, low);
  }
  // the peers' mismatches in entries this rank processed (their bad words change only then)
  if (reported_upto_ < s) {
    const uint64_t from = reported_upto_;
    reported_upto_ = std::min(s, settled_);  // entries every rank processed: their reports are in
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      const uint64_t b = ectl(j)->bad.load(std::memory_order_seq_cst);
      if (b > from && b > reported_ && b <= s) {
        reported_ = b;
        throw DistributedError(std::string(ectl(j)->desc));
      }
    }
  }
}

}  // namespace comm
}  // namespace aimass
