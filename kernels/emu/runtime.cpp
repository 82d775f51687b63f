// The runtime of the host emulation of CUDA (see emu.h): fibers and their scheduler,
// the pool of host threads that runs blocks, device memory with guard pages and poison,
// and the C API that src/gpu/emu.rs calls.
//
// Built with PK_EMU_SANITIZE=address (PK_EMU_ASAN), device buffers are heap blocks with
// 4 KiB red zones on both sides, poisoned through ASan's interface, and fiber switches
// are announced to ASan. Built with PK_EMU_SANITIZE=thread (PK_EMU_TSAN), only the
// kernels are instrumented, not this file: each CUDA thread is a TSan fiber, switched to
// without synchronization, and the runtime tells TSan which events order the CUDA
// threads (barriers, warp collectives, block and launch boundaries).
#include "emu.h"

#if defined(PK_EMU_ASAN) || defined(PK_EMU_TSAN)
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef PK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif
#ifdef PK_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace pk_emu {

thread_local FiberHead* tls_fiber = nullptr;
thread_local uint3 tls_block_idx = {0, 0, 0};
thread_local dim3 tls_block_dim;
thread_local dim3 tls_grid_dim;
thread_local unsigned char* tls_dyn_smem = nullptr;
thread_local size_t tls_dyn_smem_bytes = 0;

// Static shared memory: every `__shared__` variable is in the TLS section pk_shared
// (emu.h). The linker's __start_pk_shared and __stop_pk_shared bound the section's
// initialization image (not a thread's instance of it: linkers do not define them as TLS
// symbols). The anchor, the only variable of the section with a nonzero initial value,
// is found in the image once; a thread's instance starts as far before the thread's
// anchor as the image starts before the image's anchor.
constexpr unsigned long long kSharedAnchor = 0x21656d736d5f6b70ull;  // "pk_smem!"
static __thread unsigned long long pk_shared_anchor __attribute__((section("pk_shared"), used)) = kSharedAnchor;
extern "C" {
extern unsigned char __start_pk_shared[];
extern unsigned char __stop_pk_shared[];
}
static ptrdiff_t static_shared_anchor_offset() {
  static const ptrdiff_t anchor_offset = [] {
    for (unsigned char* q = __start_pk_shared; q + 8 <= __stop_pk_shared; q += 8) {
      unsigned long long v;
      std::memcpy(&v, q, 8);
      if (v == kSharedAnchor) return q - __start_pk_shared;
    }
    std::fprintf(stderr, "pk-emu: the anchor of static shared memory is not in the section pk_shared\n");
    std::abort();
  }();
  return anchor_offset;
}
// This host thread's instance of static shared memory: its start.
static unsigned char* static_shared_start() {
  return reinterpret_cast<unsigned char*>(&pk_shared_anchor) - static_shared_anchor_offset();
}
static size_t static_shared_len() { return (size_t)(__stop_pk_shared - __start_pk_shared); }
static void poison_static_shared() {
  const ptrdiff_t anchor_offset = static_shared_anchor_offset();
  unsigned char* start = static_shared_start();
  const size_t len = static_shared_len();
  // Poison everything but the anchor.
  std::memset(start, 0xFF, (size_t)anchor_offset);
  std::memset(start + anchor_offset + 8, 0xFF, len - (size_t)anchor_offset - 8);
}

Registrar::Registrar(Module* m, const char* name, void (*entry)(const void*), size_t param_size) {
  if (m->count >= kMaxKernelsPerModule) {
    std::fprintf(stderr, "pk-emu: too many kernels in one module (at %s)\n", name);
    std::abort();
  }
  m->kernels[m->count++] = Kernel{name, entry, param_size};
}

// ---------------------------------------------------------------- contexts
#if defined(__x86_64__)
extern "C" void pk_emu_switch(void** save_sp, void* new_sp);
extern "C" void pk_emu_fiber_start();
// Saves the callee-saved registers, MXCSR and the x87 control word of the running
// context on its stack, stores its stack pointer, and resumes the other context.
asm(R"(
    .text
    .globl pk_emu_switch
    .hidden pk_emu_switch
    .type pk_emu_switch,@function
pk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pk_emu_switch,.-pk_emu_switch

    .globl pk_emu_fiber_start
    .hidden pk_emu_fiber_start
    .type pk_emu_fiber_start,@function
pk_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size pk_emu_fiber_start,.-pk_emu_fiber_start
)");

struct Context {
  void* sp = nullptr;
};
static void ctx_init(Context* c, unsigned char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
#ifdef PK_EMU_ASAN
  // A fiber that was abandoned (its block failed) leaves the red zones of its frames
  // poisoned on its stack: a fresh start begins with a clean stack.
  ASAN_UNPOISON_MEMORY_REGION(stack_lo, size);
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 80);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpucw, 2);
  sp[3] = reinterpret_cast<uint64_t>(fn);   // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);  // r12
  sp[7] = reinterpret_cast<uint64_t>(&pk_emu_fiber_start);
  c->sp = sp;
}
static inline void ctx_switch(Context* from, Context* to) { pk_emu_switch(&from->sp, to->sp); }
#else
#include <ucontext.h>
struct Context {
  ucontext_t uc;
};
static void ucontext_entry(unsigned hi, unsigned lo, unsigned fhi, unsigned flo) {
  void* arg = reinterpret_cast<void*>((uintptr_t(hi) << 32) | lo);
  auto fn = reinterpret_cast<void (*)(void*)>((uintptr_t(fhi) << 32) | flo);
  fn(arg);
  std::abort();
}
static void ctx_init(Context* c, unsigned char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack_lo;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  uintptr_t a = reinterpret_cast<uintptr_t>(arg), f = reinterpret_cast<uintptr_t>(fn);
  makecontext(&c->uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, unsigned(a >> 32), unsigned(a),
              unsigned(f >> 32), unsigned(f));
}
static inline void ctx_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

// ---------------------------------------------------------------- memory
static size_t page_size() {
  static size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

constexpr size_t kCanaryBefore = 64;
constexpr unsigned char kCanary = 0xA5;
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kRedZone = 4096;  // ASan builds: the red zone on each side of a buffer

struct Alloc {
  unsigned char* map;
  size_t map_len;
  unsigned char* data;
  size_t bytes;
  size_t padded;  // bytes rounded up to 16: data + padded is the guard page
};
static std::mutex g_alloc_mtx;
static std::map<uintptr_t, Alloc>* g_allocs = new std::map<uintptr_t, Alloc>();  // keyed by data

static bool canaries_intact(const Alloc& a) {
  for (size_t i = 0; i < kCanaryBefore; ++i)
    if (a.data[-(ptrdiff_t)kCanaryBefore + (ptrdiff_t)i] != kCanary) return false;
  for (size_t i = a.bytes; i < a.padded; ++i)
    if (a.data[i] != kCanary) return false;
  return true;
}

// ---------------------------------------------------------------- fibers and blocks
enum class St : uint8_t { Runnable, BlockBarrier, NamedBarrier, WarpBarrier, MbarWait, Done };
enum class WaitKind : uint8_t { SyncWarp, Exchange };

struct PendingCopy {
  void* dst;
  const void* src;
  unsigned bytes;
  unsigned src_bytes;
  unsigned group;
};

struct Fiber : FiberHead {
  Context ctx;
  unsigned char* stack_lo = nullptr;
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
  void* tsan = nullptr;  // this slot's TSan fiber, reused from block to block
  St state = St::Done;
  WaitKind kind = WaitKind::SyncWarp;
  unsigned wait_mask = 0;
  const char* file = "";
  int line = 0;
  std::vector<PendingCopy> copies;
  unsigned committed = 0;
  std::vector<WgmmaOp> mmas;
  unsigned mma_committed = 0;
  // At an mbarrier wait (St::MbarWait): the barrier and the parity of the awaited phase.
  const void* mbar = nullptr;
  unsigned mbar_parity = 0;
  // At a named barrier (St::NamedBarrier): its id and the threads it waits for.
  unsigned bar_id = 0, bar_count = 0;
};

// An mbarrier's state (emu.h).
struct Mbar {
  unsigned expected;  // arrivals per phase
  unsigned pending;   // arrivals the current phase still waits for
  int64_t tx;         // transaction bytes it still waits for
  uint64_t phase;     // phases completed
};

struct Launch {
  void (*entry)(const void*) = nullptr;
  alignas(16) unsigned char params[4096];
  const char* name = "";
  dim3 grid, block;
  size_t dyn_smem = 0;
  int order = 0;  // 0 forward, 1 reverse, 2 shuffled
  uint64_t seed = 0;
  uint64_t total = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<uint64_t> completed{0};
  std::atomic<bool> failed{false};
  std::mutex mtx;
  std::condition_variable cv;
  std::string error;
};

struct Stack {
  unsigned char* map;  // guard page, then the usable stack
  size_t len;
};

static size_t fiber_stack_bytes() {
  static size_t s = [] {
    size_t kb = 256;
    if (const char* e = std::getenv("PK_EMU_STACK_KB")) kb = std::strtoul(e, nullptr, 10);
    if (kb < 16) kb = 16;
    return round_up(kb * 1024, page_size());
  }();
  return s;
}

struct Worker {
  Context sched;
  std::vector<Stack> stacks;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> slots;  // per warp: 32 lanes x 64 bytes of warp_exchange data
  unsigned char* smem_map = nullptr;  // dynamic shared memory, ending at a guard page
  size_t smem_len = 0;
  Launch* launch = nullptr;
  bool failed = false;
  std::string error;
  Fiber* current = nullptr;
  unsigned nthreads = 0;
  std::mt19937_64 rng;
  // The scheduler's own stack (for ASan's fiber switches) and TSan context.
  void* asan_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* tsan_sched = nullptr;
  // Addresses that name TSan sync objects: [0] __syncthreads, [1] the blocks of this
  // host thread one after another, [2 + w] warp w's collectives.
  char sync_ids[2 + 32] = {};
  char bar_ids[16] = {};  // named barrier i's TSan sync object
  // The shared memory that the block's MMAs in flight (issued, not yet waited for) read:
  // [lo, hi) -> how many of them. A cp.async into it is an error.
  std::map<std::pair<const unsigned char*, const unsigned char*>, unsigned> mma_reads;
  // The block's mbarriers, by address.
  std::map<const void*, Mbar> mbars;
};
static thread_local Worker* tls_worker = nullptr;

static std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

static std::string where(const Worker& w, const Fiber* f) {
  std::string s = fmt("kernel %s, block (%u,%u,%u)", w.launch ? w.launch->name : "?", tls_block_idx.x,
                      tls_block_idx.y, tls_block_idx.z);
  if (f) s += fmt(", thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
  return s;
}

static void fail(Worker& w, const std::string& msg) {
  if (!w.failed) {
    w.failed = true;
    w.error = msg;
  }
}

static Fiber* cur() {
  Worker* w = tls_worker;
  if (!w || !w->current) {
    std::fprintf(stderr, "pk-emu: a device function was called outside a kernel\n");
    std::abort();
  }
  return w->current;
}

// ---------------------------------------------------------------- switches
// The scheduler resumes a fiber.
static void switch_to_fiber(Worker& w, Fiber& f) {
#ifdef PK_EMU_ASAN
  __sanitizer_start_switch_fiber(&w.asan_fake_stack, f.stack_lo, f.stack_size);
#endif
#ifdef PK_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
  ctx_switch(&w.sched, &f.ctx);
#ifdef PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(w.asan_fake_stack, nullptr, nullptr);
#endif
}

// A fiber returns to the scheduler; `finished`: it is never resumed.
static void switch_to_scheduler(Fiber* f, bool finished) {
  Worker& w = *tls_worker;
#ifdef PK_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake_stack, w.sched_stack_bottom, w.sched_stack_size);
#else
  (void)finished;
#endif
#ifdef PK_EMU_TSAN
  __tsan_switch_to_fiber(w.tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
  ctx_switch(&f->ctx, &w.sched);
#ifdef PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
}

static void yield_to_scheduler(Fiber* f) { switch_to_scheduler(f, f->state == St::Done); }

#ifdef PK_EMU_TSAN
// TSan: the fibers of a block run one after another on one host thread, but switches
// between them carry no synchronization, so TSan sees them as concurrent threads. What
// orders them on a GPU is told to TSan here, by the scheduler acting in each fiber's
// name (switching TSan's context without switching stacks): every fiber releases the
// sync object, then every fiber acquires it.
static char g_launch_start_sync, g_launch_end_sync;
static void tsan_in(Worker& w, Fiber& f, void (*op)(void*), void* addr) {
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
  op(addr);
  __tsan_switch_to_fiber(w.tsan_sched, __tsan_switch_to_fiber_no_sync);
}
// Fibers first .. first + 32 whose bit is set in mask (or all n from first if mask == 0
// and n given) synchronize through addr.
static void tsan_sync_fibers(Worker& w, unsigned first, unsigned n, unsigned mask, void* addr) {
  for (unsigned i = 0; i < n; ++i)
    if (!mask || ((mask >> i) & 1u)) tsan_in(w, w.fibers[first + i], &__tsan_release, addr);
  for (unsigned i = 0; i < n; ++i)
    if (!mask || ((mask >> i) & 1u)) tsan_in(w, w.fibers[first + i], &__tsan_acquire, addr);
}
#endif

static void perform(const PendingCopy& c) {
  if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.src_bytes < c.bytes) std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}

[[noreturn]] static void fiber_fail(const std::string& msg);

static void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Worker* w = tls_worker;
#ifdef PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
  w->launch->entry(w->launch->params);
  for (const PendingCopy& c : f->copies) perform(c);  // the kernel's end waits for its copies
  f->copies.clear();
  if (!f->mmas.empty()) {
    const WgmmaOp& op = f->mmas.front();
    fiber_fail(fmt("a thread ends with %zu wgmma.mma_async it never waited for (the first at %s:%d) (%s)",
                   f->mmas.size(), op.file, op.line, where(*tls_worker, f).c_str()));
  }
  f->state = St::Done;
  yield_to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}

[[noreturn]] static void fiber_fail(const std::string& msg) {
  Fiber* f = cur();
  fail(*tls_worker, msg);
  f->state = St::Done;
  yield_to_scheduler(f);
  std::abort();
}

void trap(const char* what, const char* file, int line) {
  Fiber* f = cur();
  fiber_fail(fmt("%s at %s:%d (%s)", what, file, line, where(*tls_worker, f).c_str()));
}

void syncthreads(const char* file, int line) {
  Fiber* f = cur();
  f->file = file;
  f->line = line;
  f->state = St::BlockBarrier;
  yield_to_scheduler(f);
}

constexpr unsigned kNamedBarriers = 16;

void named_barrier_sync(unsigned id, unsigned count, const char* file, int line) {
  Fiber* f = cur();
  const unsigned n = tls_worker->nthreads;
  if (id == 0 || id >= kNamedBarriers)
    fiber_fail(fmt("bar.sync %u at %s:%d: named barriers are 1 to 15 (0 is __syncthreads') (%s)", id, file, line,
                   where(*tls_worker, f).c_str()));
  if (count == 0 || count % 32 != 0 || count > (n + 31) / 32 * 32)
    fiber_fail(fmt("bar.sync %u, %u at %s:%d: the count must be a multiple of 32 of at most the block's %u threads "
                   "(%s)",
                   id, count, file, line, n, where(*tls_worker, f).c_str()));
  f->bar_id = id;
  f->bar_count = count;
  f->file = file;
  f->line = line;
  f->state = St::NamedBarrier;
  yield_to_scheduler(f);
}

static void warp_wait(Fiber* f, unsigned mask, WaitKind kind, const char* file, int line) {
  if (!((mask >> f->lane) & 1u))
    fiber_fail(fmt("warp-synchronous operation with a mask (0x%08x) that excludes the calling lane %u at %s:%d (%s)",
                   mask, f->lane, file, line, where(*tls_worker, f).c_str()));
  f->wait_mask = mask;
  f->kind = kind;
  f->file = file;
  f->line = line;
  f->state = St::WarpBarrier;
  yield_to_scheduler(f);
}

void syncwarp(unsigned mask, const char* file, int line) { warp_wait(cur(), mask, WaitKind::SyncWarp, file, line); }

void warp_exchange(unsigned mask, const void* mine, unsigned bytes, void* all, const char* file, int line) {
  Fiber* f = cur();
  Worker& w = *tls_worker;
  if (bytes > 64) fiber_fail("pk-emu: warp_exchange of more than 64 bytes");
  unsigned char* base = w.slots.data() + (size_t)f->warp * 32 * 64;
  std::memcpy(base + f->lane * 64, mine, bytes);
  warp_wait(f, mask, WaitKind::Exchange, file, line);
  auto* out = static_cast<unsigned char*>(all);
  for (unsigned i = 0; i < 32; ++i) {
    if ((mask >> i) & 1u)
      std::memcpy(out + i * bytes, base + i * 64, bytes);
    else
      std::memset(out + i * bytes, 0, bytes);
  }
  // Second phase: nobody overwrites its slot before every lane has read it.
  warp_wait(f, mask, WaitKind::Exchange, file, line);
}

void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
  Fiber* f = cur();
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % bytes != 0)
    fiber_fail(fmt("misaligned cp.async of %u bytes (dst %p, src %p) (%s)", bytes, dst, src,
                   where(*tls_worker, f).c_str()));
  if (src_bytes > bytes) fiber_fail("cp.async with src_bytes > bytes");
  const auto* d = static_cast<const unsigned char*>(dst);
  for (const auto& r : tls_worker->mma_reads)
    if (d < r.first.second && d + bytes > r.first.first)
      fiber_fail(fmt("cp.async into shared memory that a wgmma.mma_async in flight reads (issued, not yet waited for) (%s)",
                     where(*tls_worker, f).c_str()));
  f->copies.push_back(PendingCopy{dst, src, bytes, src_bytes, f->committed});
}
void wgmma_issue(const WgmmaOp& op) {
  Fiber* f = cur();
  f->mmas.push_back(op);
  f->mmas.back().group = f->mma_committed;
  for (int i = 0; i < 2; ++i) tls_worker->mma_reads[{op.lo[i], op.hi[i]}]++;
}
static void wgmma_perform(const WgmmaOp& op) {
  op.run(op);
  for (int i = 0; i < 2; ++i) {
    auto it = tls_worker->mma_reads.find({op.lo[i], op.hi[i]});
    if (it != tls_worker->mma_reads.end() && --it->second == 0) tls_worker->mma_reads.erase(it);
  }
}
void wgmma_commit() { cur()->mma_committed++; }
void wgmma_wait(int keep) {
  Fiber* f = cur();
  const unsigned limit = f->mma_committed > (unsigned)keep ? f->mma_committed - (unsigned)keep : 0;
  size_t kept = 0;
  for (size_t i = 0; i < f->mmas.size(); ++i) {
    if (f->mmas[i].group < limit)
      wgmma_perform(f->mmas[i]);
    else
      f->mmas[kept++] = f->mmas[i];
  }
  f->mmas.resize(kept);
}
void cp_async_commit() { cur()->committed++; }
void cp_async_wait(int keep) {
  Fiber* f = cur();
  const unsigned limit = f->committed > (unsigned)keep ? f->committed - (unsigned)keep : 0;
  size_t kept = 0;
  for (size_t i = 0; i < f->copies.size(); ++i) {
    if (f->copies[i].group < limit)
      perform(f->copies[i]);
    else
      f->copies[kept++] = f->copies[i];
  }
  f->copies.resize(kept);
}

// ---------------------------------------------------------------- mbarrier
// Whether [p, p + bytes) is in this block's dynamic or static shared memory.
static bool in_shared(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (tls_dyn_smem && b >= tls_dyn_smem && b + bytes <= tls_dyn_smem + tls_dyn_smem_bytes) return true;
  const unsigned char* s = static_shared_start();
  return b >= s && b + bytes <= s + static_shared_len();
}

static void check_mbar_address(const void* bar, const char* op, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || !in_shared(bar, 8))
    fiber_fail(fmt("%s on an mbarrier at %p, which is not 8 aligned bytes of shared memory, at %s:%d (%s)", op, bar,
                   file, line, where(*tls_worker, cur()).c_str()));
}

static Mbar& mbar_at(const void* bar, const char* op, const char* file, int line) {
  check_mbar_address(bar, op, file, line);
  auto it = tls_worker->mbars.find(bar);
  if (it == tls_worker->mbars.end())
    fiber_fail(fmt("%s on an mbarrier that was never initialized (mbarrier.init) at %s:%d (%s)", op, file, line,
                   where(*tls_worker, cur()).c_str()));
  return it->second;
}

static void mbar_complete_if_done(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    m.phase++;
    m.pending = m.expected;
  }
}

// The PTX ISA's limits on the counts: arrivals in [1, 2^20 - 1], transaction bytes within
// +-(2^20 - 1).
constexpr int64_t kMbarMax = (1 << 20) - 1;

static void mbar_add_tx(Mbar& m, int64_t bytes, const char* file, int line) {
  m.tx += bytes;
  if (m.tx > kMbarMax || m.tx < -kMbarMax)
    fiber_fail(fmt("an mbarrier's transaction count leaves +-(2^20 - 1) (%lld) at %s:%d (%s)", (long long)m.tx, file,
                   line, where(*tls_worker, cur()).c_str()));
}

void mbarrier_init(void* bar, unsigned count, const char* file, int line) {
  check_mbar_address(bar, "mbarrier.init", file, line);
  if (count < 1 || count > (unsigned)kMbarMax)
    fiber_fail(fmt("mbarrier.init with %u arrivals (1 to 2^20 - 1) at %s:%d (%s)", count, file, line,
                   where(*tls_worker, cur()).c_str()));
  tls_worker->mbars[bar] = Mbar{count, count, 0, 0};
  std::memset(bar, 0, 8);
}

void mbarrier_arrive(void* bar, unsigned count, unsigned tx_bytes, const char* file, int line) {
  Mbar& m = mbar_at(bar, "mbarrier.arrive", file, line);
  mbar_add_tx(m, tx_bytes, file, line);
  if (count < 1 || count > m.pending)
    fiber_fail(fmt("mbarrier.arrive of %u with %u arrivals pending in the phase (a phase that waits for its "
                   "transaction bytes takes no more arrivals) at %s:%d (%s)",
                   count, m.pending, file, line, where(*tls_worker, cur()).c_str()));
#ifdef PK_EMU_TSAN
  __tsan_release(bar);  // the arrival has release semantics (.release.cta)
#endif
  m.pending -= count;
  mbar_complete_if_done(m);
}

bool mbarrier_try_wait(void* bar, unsigned parity, const char* file, int line) {
  const Mbar& m = mbar_at(bar, "mbarrier.try_wait", file, line);
  const bool done = (m.phase & 1u) != (parity & 1u);
#ifdef PK_EMU_TSAN
  if (done) __tsan_acquire(bar);  // a successful wait has acquire semantics (.acquire.cta)
#endif
  return done;
}

void mbarrier_wait(void* bar, unsigned parity, const char* file, int line) {
  while (!mbarrier_try_wait(bar, parity, file, line)) {
    Fiber* f = cur();
    f->mbar = bar;
    f->mbar_parity = parity & 1u;
    f->file = file;
    f->line = line;
    f->state = St::MbarWait;
    yield_to_scheduler(f);
  }
}

void cp_async_mbarrier_arrive(void* bar, const char* file, int line) {
  Fiber* f = cur();
  mbar_at(bar, "cp.async.mbarrier.arrive", file, line);
  for (const PendingCopy& c : f->copies) perform(c);
  f->copies.clear();
  mbarrier_arrive(bar, 1, 0, file, line);
}

void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes, void* bar, const char* file, int line) {
  Fiber* f = cur();
  Mbar& m = mbar_at(bar, "cp.async.bulk", file, line);
  if (bytes == 0 || bytes % 16 != 0 || (reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0)
    fiber_fail(fmt("cp.async.bulk of %u bytes from %p to %p (a multiple of 16 bytes, both addresses 16-byte "
                   "aligned) at %s:%d (%s)",
                   bytes, src, dst, file, line, where(*tls_worker, f).c_str()));
  if (!in_shared(dst, bytes))
    fiber_fail(fmt("cp.async.bulk into %u bytes at %p, not all of them shared memory, at %s:%d (%s)", bytes, dst, file,
                   line, where(*tls_worker, f).c_str()));
  const auto* d = static_cast<const unsigned char*>(dst);
  for (const auto& r : tls_worker->mma_reads)
    if (d < r.first.second && d + bytes > r.first.first)
      fiber_fail(fmt("cp.async.bulk into shared memory that a wgmma.mma_async in flight reads at %s:%d (%s)", file,
                     line, where(*tls_worker, f).c_str()));
  std::memcpy(dst, src, bytes);
#ifdef PK_EMU_TSAN
  __tsan_release(bar);
#endif
  mbar_add_tx(m, -(int64_t)bytes, file, line);
  mbar_complete_if_done(m);
}

static const char* state_name(St s) {
  switch (s) {
    case St::Runnable:
      return "running";
    case St::BlockBarrier:
      return "at __syncthreads";
    case St::NamedBarrier:
      return "at a named barrier (bar.sync)";
    case St::WarpBarrier:
      return "at a warp-synchronous operation";
    case St::MbarWait:
      return "at an mbarrier wait";
    case St::Done:
      return "exited";
  }
  return "?";
}

// Releases the lanes of every warp-synchronous operation of the warp starting at thread
// `base` that all its lanes have reached. Returns true if any lane was released.
static bool resolve_warp(Worker& w, unsigned base) {
  bool released = false;
  const unsigned n = w.nthreads;
  for (unsigned l = 0; l < 32 && base + l < n; ++l) {
    Fiber& f = w.fibers[base + l];
    if (f.state != St::WarpBarrier) continue;
    bool ready = true;
    for (unsigned j = 0; j < 32; ++j) {
      if (!((f.wait_mask >> j) & 1u)) continue;
      if (base + j >= n) {
        fail(w, fmt("warp-synchronous operation at %s:%d names lane %u (mask 0x%08x), which this block of %u "
                    "threads does not have (%s)",
                    f.file, f.line, j, f.wait_mask, n, where(w, &f).c_str()));
        return false;
      }
      const Fiber& g = w.fibers[base + j];
      if (g.state == St::Done) {
        fail(w, fmt("warp-synchronous operation at %s:%d waits for lane %u, which has exited (%s)", f.file, f.line,
                    j, where(w, &f).c_str()));
        return false;
      }
      if (g.state != St::WarpBarrier || g.wait_mask != f.wait_mask || g.kind != f.kind ||
          (f.kind == WaitKind::Exchange && (g.line != f.line || std::strcmp(g.file, f.file) != 0))) {
        ready = false;
        break;
      }
    }
    if (ready) {
#ifdef PK_EMU_TSAN
      // __syncwarp and the collectives order the memory accesses of their lanes.
      tsan_sync_fibers(w, base, 32, f.wait_mask, &w.sync_ids[2 + (base / 32) % 32]);
#endif
      for (unsigned j = 0; j < 32; ++j)
        if ((f.wait_mask >> j) & 1u) w.fibers[base + j].state = St::Runnable;
      released = true;
    }
  }
  return released;
}

// Makes the fibers first .. first + n - 1 that wait for an mbarrier phase that has
// completed runnable. Returns true if any was.
static bool resolve_mbar_waits(Worker& w, unsigned first, unsigned n) {
  bool released = false;
  for (unsigned t = first; t < first + n && t < w.nthreads; ++t) {
    Fiber& f = w.fibers[t];
    if (f.state != St::MbarWait) continue;
    const auto it = w.mbars.find(f.mbar);
    if (it != w.mbars.end() && (it->second.phase & 1u) != f.mbar_parity) {
      f.state = St::Runnable;
      released = true;
    }
  }
  return released;
}

// Releases the threads of every named barrier that as many threads wait at as its count
// says. Returns true if any were released. More threads at a barrier than its count, or
// two counts for one barrier, are errors (on a GPU the extra threads would wait for a
// next round that never comes, or the barrier's count is undefined).
static bool resolve_named_barriers(Worker& w) {
  bool released = false;
  for (unsigned id = 1; id < kNamedBarriers; ++id) {
    const Fiber* first = nullptr;
    unsigned waiting = 0;
    for (unsigned t = 0; t < w.nthreads; ++t) {
      const Fiber& f = w.fibers[t];
      if (f.state != St::NamedBarrier || f.bar_id != id) continue;
      if (first && f.bar_count != first->bar_count) {
        fail(w, fmt("bar.sync %u with the count %u at %s:%d and %u at %s:%d (%s)", id, first->bar_count, first->file,
                    first->line, f.bar_count, f.file, f.line, where(w, &f).c_str()));
        return false;
      }
      if (!first) first = &f;
      ++waiting;
    }
    if (!first || waiting < first->bar_count) continue;
    if (waiting > first->bar_count) {
      fail(w, fmt("%u threads wait at bar.sync %u, %u (%s:%d): more than its count (%s)", waiting, id,
                  first->bar_count, first->file, first->line, where(w, first).c_str()));
      return false;
    }
#ifdef PK_EMU_TSAN
    for (int op = 0; op < 2; ++op)
      for (unsigned t = 0; t < w.nthreads; ++t) {
        Fiber& f = w.fibers[t];
        if (f.state == St::NamedBarrier && f.bar_id == id)
          tsan_in(w, f, op == 0 ? &__tsan_release : &__tsan_acquire, &w.bar_ids[id]);
      }
#endif
    for (unsigned t = 0; t < w.nthreads; ++t) {
      Fiber& f = w.fibers[t];
      if (f.state == St::NamedBarrier && f.bar_id == id) f.state = St::Runnable;
    }
    released = true;
  }
  return released;
}

static void run_block_fibers(Worker& w, Launch& L, uint64_t b);

static void run_block(Worker& w, Launch& L, uint64_t b) {
  run_block_fibers(w, L, b);
#ifdef PK_EMU_TSAN
  // The block's end: everything its threads did happens before the next block on this
  // host thread (which reuses its shared memory and stacks) and before the launch
  // returns to the host. A fiber the block abandoned (it failed) gets a fresh context.
  for (unsigned t = 0; t < w.nthreads; ++t) {
    Fiber& f = w.fibers[t];
    if (!f.tsan) continue;
    tsan_in(w, f, &__tsan_release, &w.sync_ids[1]);
    tsan_in(w, f, &__tsan_release, &g_launch_end_sync);
    if (f.state != St::Done) {
      __tsan_destroy_fiber(f.tsan);
      f.tsan = nullptr;
    }
  }
#endif
}

static void run_block_fibers(Worker& w, Launch& L, uint64_t b) {
  const dim3 g = L.grid, bd = L.block;
  tls_block_idx = uint3{(unsigned)(b % g.x), (unsigned)((b / g.x) % g.y), (unsigned)(b / ((uint64_t)g.x * g.y))};
  tls_block_dim = bd;
  tls_grid_dim = g;
  const unsigned n = bd.x * bd.y * bd.z;
  w.nthreads = n;
  w.failed = false;
  w.error.clear();

  // Dynamic shared memory ends at a guard page and starts poisoned.
  if (L.dyn_smem > 0) {
    const size_t need = round_up(L.dyn_smem, 16);
    if (w.smem_len < need + page_size()) {
      if (w.smem_map) munmap(w.smem_map, w.smem_len);
      w.smem_len = round_up(need, page_size()) + page_size();
      void* m = mmap(nullptr, w.smem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) {
        fail(w, "pk-emu: cannot map dynamic shared memory");
        return;
      }
      w.smem_map = static_cast<unsigned char*>(m);
      mprotect(w.smem_map + w.smem_len - page_size(), page_size(), PROT_NONE);
    }
    tls_dyn_smem = w.smem_map + w.smem_len - page_size() - need;
    tls_dyn_smem_bytes = L.dyn_smem;
    std::memset(tls_dyn_smem, kPoison, need);
  } else {
    tls_dyn_smem = nullptr;
    tls_dyn_smem_bytes = 0;
  }
  poison_static_shared();

  const size_t stack_len = fiber_stack_bytes() + page_size();
  while (w.stacks.size() < n) {
    void* m = mmap(nullptr, stack_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      fail(w, "pk-emu: cannot map fiber stacks");
      return;
    }
    mprotect(m, page_size(), PROT_NONE);
    w.stacks.push_back(Stack{static_cast<unsigned char*>(m), stack_len});
  }
  if (w.fibers.size() < n) w.fibers.resize(n);
  w.slots.assign((size_t)((n + 31) / 32) * 32 * 64, 0);
  w.mma_reads.clear();
  w.mbars.clear();
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = w.fibers[t];
    f.tid = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f.linear = t;
    f.lane = t & 31u;
    f.warp = t >> 5;
    f.state = St::Runnable;
    f.copies.clear();
    f.committed = 0;
    f.mmas.clear();
    f.mma_committed = 0;
    f.stack_lo = w.stacks[t].map + page_size();
    f.stack_size = fiber_stack_bytes();
    f.asan_fake_stack = nullptr;
    ctx_init(&f.ctx, f.stack_lo, f.stack_size, &fiber_main, &f);
#ifdef PK_EMU_TSAN
    if (!f.tsan) f.tsan = __tsan_create_fiber(0);
    // The block's start: after the launch (the host's writes) and after the blocks
    // this host thread ran before.
    tsan_in(w, f, &__tsan_acquire, &g_launch_start_sync);
    tsan_in(w, f, &__tsan_acquire, &w.sync_ids[1]);
#endif
  }

  // Scheduling: one warp at a time runs until all its threads wait at a __syncthreads
  // (or have exited), its warp-synchronous operations resolved among its own lanes as
  // soon as they are reached; then the next warp. So no warp sees another warp's writes
  // unless a __syncthreads orders them, and a missing barrier shows. The order of the
  // warps, and of the lanes inside a warp, is forward, reversed or shuffled.
  const unsigned nwarps = (n + 31) / 32;
  std::vector<unsigned> warp_order(nwarps);
  for (unsigned i = 0; i < nwarps; ++i) warp_order[i] = L.order == 1 ? nwarps - 1 - i : i;
  std::vector<unsigned> lane_order(32);
  for (unsigned i = 0; i < 32; ++i) lane_order[i] = L.order == 1 ? 31 - i : i;
  if (L.order == 2) w.rng.seed(L.seed * 0x9E3779B97F4A7C15ull + b);

  for (;;) {
    if (L.order == 2) std::shuffle(warp_order.begin(), warp_order.end(), w.rng);
    for (unsigned wi : warp_order) {
      const unsigned base = wi * 32;
      for (;;) {
        if (L.order == 2) std::shuffle(lane_order.begin(), lane_order.end(), w.rng);
        bool ran = false;
        for (unsigned l : lane_order) {
          if (base + l >= n) continue;
          Fiber& f = w.fibers[base + l];
          if (f.state != St::Runnable) continue;
          ran = true;
          w.current = &f;
          tls_fiber = &f;
          switch_to_fiber(w, f);
          w.current = nullptr;
          tls_fiber = nullptr;
          if (w.failed) return;
        }
        bool released = resolve_warp(w, base);
        if (w.failed) return;
        released |= resolve_mbar_waits(w, base, 32);
        if (!ran && !released) break;
      }
    }

    // Arrivals by warps that ran later complete the phases earlier warps wait for.
    if (resolve_mbar_waits(w, 0, n)) continue;
    // A part of the block that met at a named barrier runs on.
    if (resolve_named_barriers(w)) continue;
    if (w.failed) return;
    bool all_done = true, any_done = false, any_runnable = false;
    const Fiber* at_barrier = nullptr;
    const Fiber* elsewhere = nullptr;
    const Fiber* at_mbar = nullptr;
    const Fiber* at_named = nullptr;
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = w.fibers[t];
      if (f.state != St::Done) all_done = false;
      if (f.state == St::Done) any_done = true;
      if (f.state == St::Runnable) any_runnable = true;
      if (f.state == St::BlockBarrier && !at_barrier) at_barrier = &f;
      if (f.state == St::WarpBarrier && !elsewhere) elsewhere = &f;
      if (f.state == St::MbarWait && !at_mbar) at_mbar = &f;
      if (f.state == St::NamedBarrier && !at_named) at_named = &f;
    }
    if (all_done) return;
    if (any_runnable) continue;  // cannot happen: every warp ran until it could not
    if (at_mbar) {
      // Nobody can arrive any more: everybody else waits too, or has exited.
      const Mbar& m = w.mbars.at(at_mbar->mbar);
      fail(w, fmt("deadlock: the mbarrier wait at %s:%d for the phase of parity %u never completes (%u of %u "
                  "arrivals and %lld transaction bytes missing; the other threads wait or have exited) (%s)",
                  at_mbar->file, at_mbar->line, at_mbar->mbar_parity, m.pending, m.expected, (long long)m.tx,
                  where(w, at_mbar).c_str()));
      return;
    }
    if (at_named) {
      // Too few threads reach it: the others wait elsewhere or have exited.
      unsigned waiting = 0;
      for (unsigned t = 0; t < n; ++t)
        waiting += w.fibers[t].state == St::NamedBarrier && w.fibers[t].bar_id == at_named->bar_id;
      fail(w, fmt("deadlock: bar.sync %u, %u at %s:%d is reached by %u threads; the others wait elsewhere or have "
                  "exited (%s)",
                  at_named->bar_id, at_named->bar_count, at_named->file, at_named->line, waiting,
                  where(w, at_named).c_str()));
      return;
    }
    if (at_barrier && !elsewhere) {
      // Everyone still alive is at a __syncthreads: all must be at the same one, and
      // nobody may have exited.
      for (unsigned t = 0; t < n; ++t) {
        const Fiber& f = w.fibers[t];
        if (f.state == St::Done) {
          fail(w, fmt("divergent barrier: __syncthreads at %s:%d is not reached by thread (%u,%u,%u), which has "
                      "exited (%s)",
                      at_barrier->file, at_barrier->line, f.tid.x, f.tid.y, f.tid.z, where(w, at_barrier).c_str()));
          return;
        }
        if (f.line != at_barrier->line || std::strcmp(f.file, at_barrier->file) != 0) {
          fail(w, fmt("divergent barrier: thread (%u,%u,%u) waits at __syncthreads %s:%d while thread (%u,%u,%u) "
                      "waits at %s:%d (%s)",
                      at_barrier->tid.x, at_barrier->tid.y, at_barrier->tid.z, at_barrier->file, at_barrier->line,
                      f.tid.x, f.tid.y, f.tid.z, f.file, f.line, where(w, nullptr).c_str()));
          return;
        }
      }
      (void)any_done;
#ifdef PK_EMU_TSAN
      tsan_sync_fibers(w, 0, n, 0, &w.sync_ids[0]);
#endif
      for (unsigned t = 0; t < n; ++t) w.fibers[t].state = St::Runnable;
      continue;
    }
    // Nothing can run: describe the first stuck warp-synchronous operation.
    const Fiber& f = *elsewhere;
    std::string lanes;
    for (unsigned j = 0; j < 32; ++j) {
      if (!((f.wait_mask >> j) & 1u)) continue;
      const Fiber& g = w.fibers[(f.warp * 32) + j];
      if (g.state == St::WarpBarrier && g.wait_mask == f.wait_mask && g.line == f.line) continue;
      lanes += fmt(" lane %u %s", j, state_name(g.state));
      if (g.state != St::Done) lanes += fmt(" (%s:%d)", g.file, g.line);
      lanes += ";";
    }
    fail(w, fmt("deadlock: warp-synchronous operation at %s:%d (mask 0x%08x) is never reached by all its lanes:%s "
                "(%s)",
                f.file, f.line, f.wait_mask, lanes.c_str(), where(w, &f).c_str()));
    return;
  }
}

// ---------------------------------------------------------------- faults
static struct sigaction g_old_segv, g_old_bus, g_old_ill;

static void describe_fault(uintptr_t a, char* out, size_t len) {
  Worker* w = tls_worker;
  std::string ctx = w ? where(*w, w->current) : std::string("outside a kernel");
  if (w) {
    for (const Stack& s : w->stacks) {
      uintptr_t lo = reinterpret_cast<uintptr_t>(s.map);
      if (a >= lo && a < lo + page_size()) {
        std::snprintf(out, len, "pk-emu: fiber stack overflow (%zu KiB per CUDA thread; set PK_EMU_STACK_KB) in %s\n",
                      fiber_stack_bytes() / 1024, ctx.c_str());
        return;
      }
    }
    if (w->smem_map) {
      uintptr_t g = reinterpret_cast<uintptr_t>(w->smem_map) + w->smem_len - page_size();
      if (a >= g && a < g + page_size()) {
        std::snprintf(out, len,
                      "pk-emu: out-of-bounds access to dynamic shared memory: address %#lx is %lu bytes past the "
                      "end of the %zu bytes of the launch, in %s\n",
                      (unsigned long)a, (unsigned long)(a - g), w->launch ? w->launch->dyn_smem : 0, ctx.c_str());
        return;
      }
    }
  }
  if (g_alloc_mtx.try_lock()) {
    for (const auto& kv : *g_allocs) {
      const Alloc& al = kv.second;
      uintptr_t lo = reinterpret_cast<uintptr_t>(al.map), hi = lo + al.map_len;
      if (a >= lo && a < hi) {
        uintptr_t end = reinterpret_cast<uintptr_t>(al.data) + al.bytes;
        std::snprintf(out, len,
                      "pk-emu: out-of-bounds access: address %#lx is %lu bytes past the end of a device buffer of "
                      "%zu bytes, in %s\n",
                      (unsigned long)a, (unsigned long)(a - end), al.bytes, ctx.c_str());
        g_alloc_mtx.unlock();
        return;
      }
    }
    g_alloc_mtx.unlock();
  }
  std::snprintf(out, len,
                "pk-emu: invalid memory access at %#lx: not inside any live device buffer (use after free, a wild or "
                "host pointer), in %s\n",
                (unsigned long)a, ctx.c_str());
}

static void on_fault(int sig, siginfo_t* si, void*) {
  if (tls_worker) {
    char msg[1024];
    if (sig == SIGILL) {
      // The kernels are compiled with -fsanitize=alignment in trap mode.
      const std::string ctx = where(*tls_worker, tls_worker->current);
      std::snprintf(msg, sizeof msg,
                    "pk-emu: misaligned memory access (a load or store at an address that is not a multiple of its "
                    "size, which faults on a GPU) in %s\n",
                    ctx.c_str());
    } else {
      describe_fault(reinterpret_cast<uintptr_t>(si->si_addr), msg, sizeof msg);
    }
    ssize_t r = write(2, msg, std::strlen(msg));
    (void)r;
  }
  // Hand the fault to whoever had the signal before (the Rust runtime, or the default
  // action): returning re-executes the faulting instruction under the old handler.
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus : &g_old_ill, nullptr);
}

static void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGILL, &sa, &g_old_ill);
  });
}

// ---------------------------------------------------------------- the pool
struct Pool {
  std::mutex mtx;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Launch>> queue;
  unsigned threads = 0;
};
static Pool* g_pool = new Pool();  // never destroyed: workers outlive main()

static void worker_loop() {
  // Signals for faults inside fibers run on an alternate stack.
  stack_t ss;
  ss.ss_size = 64 * 1024;
  ss.ss_sp = std::malloc(ss.ss_size);
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  Worker* w = new Worker();
  tls_worker = w;
#ifdef PK_EMU_TSAN
  w->tsan_sched = __tsan_get_current_fiber();
#endif
  for (;;) {
    std::shared_ptr<Launch> L;  // shared: the launching thread may return before we drop it
    {
      std::unique_lock<std::mutex> lk(g_pool->mtx);
      g_pool->cv.wait(lk, [] { return !g_pool->queue.empty(); });
      L = g_pool->queue.front();
      if (L->next.load() >= L->total) {
        g_pool->queue.pop_front();
        continue;
      }
    }
    w->launch = L.get();
    for (;;) {
      const uint64_t b = L->next.fetch_add(1);
      if (b >= L->total) break;
      if (!L->failed.load()) {
        run_block(*w, *L, b);
        if (w->failed) {
          std::lock_guard<std::mutex> lk(L->mtx);
          if (!L->failed.exchange(true)) L->error = w->error;
        }
      }
      if (L->completed.fetch_add(1) + 1 == L->total) {
        std::lock_guard<std::mutex> lk(L->mtx);
        L->cv.notify_all();
      }
    }
    w->launch = nullptr;
  }
}

static void install_report_hooks();

static void ensure_pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    install_fault_handler();
    install_report_hooks();
    unsigned n = std::thread::hardware_concurrency();
    if (const char* e = std::getenv("PK_EMU_THREADS")) n = (unsigned)std::strtoul(e, nullptr, 10);
    if (n == 0) n = 1;
    g_pool->threads = n;
    for (unsigned i = 0; i < n; ++i) std::thread(worker_loop).detach();
  });
}

// ---------------------------------------------------------------- sanitizer reports
#if defined(PK_EMU_ASAN) || defined(PK_EMU_TSAN)
// After a sanitizer's report: which kernel, block and CUDA thread this host thread was
// running (the report's stack names the kernel's function too).
static void print_launch_context() {
  static std::atomic<bool> printed{false};
  if (printed.exchange(true)) return;
  char msg[1024];
  Worker* w = tls_worker;
  if (w && w->launch) {
    std::snprintf(msg, sizeof msg, "prunekit emu: in kernel %s, block (%u,%u,%u)", w->launch->name, tls_block_idx.x,
                  tls_block_idx.y, tls_block_idx.z);
    if (w->current) {
      const size_t len = std::strlen(msg);
      std::snprintf(msg + len, sizeof msg - len, ", thread (%u,%u,%u)", w->current->tid.x, w->current->tid.y,
                    w->current->tid.z);
    }
  } else {
    std::snprintf(msg, sizeof msg, "prunekit emu: the report is from a host thread, outside any kernel");
  }
  std::strncat(msg, "\n", sizeof msg - std::strlen(msg) - 1);
  ssize_t r = write(2, msg, std::strlen(msg));
  (void)r;
}
#endif

#ifdef PK_EMU_ASAN
// Where the reported address lies relative to the live device buffers.
static void asan_report(const char*) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(__asan_get_report_address());
  char msg[512] = "";
  if (a && g_alloc_mtx.try_lock()) {
    for (const auto& kv : *g_allocs) {
      const Alloc& al = kv.second;
      const uintptr_t lo = reinterpret_cast<uintptr_t>(al.data), hi = lo + al.bytes;
      if (a >= lo - kRedZone && a < hi + kRedZone + (al.padded - al.bytes)) {
        if (a < lo)
          std::snprintf(msg, sizeof msg, "prunekit emu: address %#lx is %lu bytes before a device buffer of %zu bytes\n",
                        (unsigned long)a, (unsigned long)(lo - a), al.bytes);
        else
          std::snprintf(msg, sizeof msg,
                        "prunekit emu: address %#lx is %lu bytes past the end of a device buffer of %zu bytes\n",
                        (unsigned long)a, (unsigned long)(a - hi), al.bytes);
        break;
      }
    }
    g_alloc_mtx.unlock();
  }
  if (msg[0]) {
    ssize_t r = write(2, msg, std::strlen(msg));
    (void)r;
  }
  print_launch_context();
}
#endif

#if defined(PK_EMU_ASAN) || defined(PK_EMU_TSAN)
static void install_report_hooks() {
  static std::once_flag once;
  std::call_once(once, [] {
#ifdef PK_EMU_ASAN
    __asan_set_error_report_callback(&asan_report);
#endif
    __sanitizer_set_death_callback(&print_launch_context);
  });
}
#else
static void install_report_hooks() {}
#endif

}  // namespace pk_emu

#ifdef PK_EMU_TSAN
// Called by TSan after it printed a report.
extern "C" void __tsan_on_report(void*) { pk_emu::print_launch_context(); }
// Stop at the first report (the kernel tests must be clean); accesses inside libc's
// interceptors (memcpy, free, ...) are not checked: the Rust code around the kernels
// synchronizes in ways TSan cannot see, and its only accesses TSan sees are those.
extern "C" const char* __tsan_default_options() {
  return "halt_on_error=1:ignore_interceptors_accesses=1:report_signal_unsafe=0";
}
#endif
#ifdef PK_EMU_ASAN
// The runtime keeps its pool and workers for the whole program on purpose.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }
#endif

// ---------------------------------------------------------------- C API
using namespace pk_emu;

static void set_err(char* err, size_t len, const std::string& s) {
  if (err && len) {
    std::snprintf(err, len, "%s", s.c_str());
  }
}

extern "C" {

#ifdef PK_EMU_ASAN
// A device buffer is a heap block: a red zone of kRedZone bytes, the data (16-byte
// aligned), its slack up to a multiple of 16, and another red zone. ASan reports any
// access to a red zone or the slack (byte-exact), and a freed buffer goes to ASan's
// quarantine, so that a later access is a use-after-free.
void* pk_emu_alloc(size_t bytes, int poison) {
  const size_t padded = round_up(bytes, 16);
  const size_t total = kRedZone + padded + kRedZone;
  void* m = nullptr;
  if (posix_memalign(&m, 64, total) != 0 || !m) return nullptr;
  unsigned char* base = static_cast<unsigned char*>(m);
  unsigned char* data = base + kRedZone;
  std::memset(data, poison ? kPoison : 0, bytes);
  ASAN_POISON_MEMORY_REGION(base, kRedZone);
  ASAN_POISON_MEMORY_REGION(data + bytes, padded - bytes + kRedZone);
  std::lock_guard<std::mutex> lk(g_alloc_mtx);
  (*g_allocs)[reinterpret_cast<uintptr_t>(data)] = Alloc{base, total, data, bytes, padded};
  return data;
}

int pk_emu_free(void* p) {
  std::lock_guard<std::mutex> lk(g_alloc_mtx);
  auto it = g_allocs->find(reinterpret_cast<uintptr_t>(p));
  if (it == g_allocs->end()) return -1;
  ASAN_UNPOISON_MEMORY_REGION(it->second.map, it->second.map_len);
  std::free(it->second.map);
  g_allocs->erase(it);
  return 0;
}
#else
void* pk_emu_alloc(size_t bytes, int poison) {
  const size_t pg = page_size();
  const size_t padded = round_up(bytes, 16);
  const size_t map_len = round_up(padded + kCanaryBefore, pg) + pg;
  void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  unsigned char* map = static_cast<unsigned char*>(m);
  if (mprotect(map + map_len - pg, pg, PROT_NONE) != 0) {
    munmap(m, map_len);
    return nullptr;
  }
  unsigned char* data = map + map_len - pg - padded;
  std::memset(data - kCanaryBefore, kCanary, kCanaryBefore);
  if (poison) std::memset(data, kPoison, bytes);  // fresh mappings are zero otherwise
  std::memset(data + bytes, kCanary, padded - bytes);
  std::lock_guard<std::mutex> lk(g_alloc_mtx);
  (*g_allocs)[reinterpret_cast<uintptr_t>(data)] = Alloc{map, map_len, data, bytes, padded};
  return data;
}

int pk_emu_free(void* p) {
  std::lock_guard<std::mutex> lk(g_alloc_mtx);
  auto it = g_allocs->find(reinterpret_cast<uintptr_t>(p));
  if (it == g_allocs->end()) return -1;
  munmap(it->second.map, it->second.map_len);
  g_allocs->erase(it);
  return 0;
}
#endif

unsigned pk_emu_threads(void) {
  ensure_pool();
  return g_pool->threads;
}

// Runs a grid to completion. Returns 0, or -1 with a message in err.
int pk_emu_launch(const void* entry, const void* params, size_t param_size, const char* name, unsigned gx,
                  unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t dyn_smem, int order,
                  uint64_t seed, char* err, size_t err_len) {
  ensure_pool();
  // One launch at a time, as on one stream: the canary check after a launch can then
  // blame exactly that launch for a write next to any buffer.
  static std::mutex launch_mtx;
  std::lock_guard<std::mutex> one_at_a_time(launch_mtx);
  const uint64_t threads = (uint64_t)bx * by * bz;
  if (threads == 0 || threads > 1024 || bz > 64) {
    set_err(err, err_len, fmt("invalid block (%u,%u,%u): 1 to 1024 threads, z at most 64", bx, by, bz));
    return -1;
  }
  if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
    set_err(err, err_len, fmt("invalid grid (%u,%u,%u)", gx, gy, gz));
    return -1;
  }
  if (dyn_smem > 227 * 1024) {
    set_err(err, err_len, fmt("dynamic shared memory of %zu bytes exceeds 227 KiB", dyn_smem));
    return -1;
  }
  auto L = std::make_shared<Launch>();
  if (param_size > sizeof(L->params)) {
    set_err(err, err_len, "kernel parameters exceed 4096 bytes");
    return -1;
  }
  L->entry = reinterpret_cast<void (*)(const void*)>(const_cast<void*>(entry));
  std::memcpy(L->params, params, param_size);
  L->name = name;
  L->grid = dim3(gx, gy, gz);
  L->block = dim3(bx, by, bz);
  L->dyn_smem = dyn_smem;
  L->order = order;
  L->seed = seed;
  L->total = (uint64_t)gx * gy * gz;
  {
    std::lock_guard<std::mutex> lk(g_pool->mtx);
    g_pool->queue.push_back(L);
#ifdef PK_EMU_TSAN
    __tsan_release(&g_launch_start_sync);  // the host's writes happen before the kernel
#endif
  }
  g_pool->cv.notify_all();
  {
    std::unique_lock<std::mutex> lk(L->mtx);
    L->cv.wait(lk, [&L] { return L->completed.load() == L->total; });
  }
#ifdef PK_EMU_TSAN
  __tsan_acquire(&g_launch_end_sync);  // and the kernel's before the host's reads
#endif
  {
    std::lock_guard<std::mutex> lk(g_pool->mtx);
    for (auto it = g_pool->queue.begin(); it != g_pool->queue.end(); ++it) {
      if (*it == L) {
        g_pool->queue.erase(it);
        break;
      }
    }
  }
  int rc = 0;
  if (L->failed.load()) {
    set_err(err, err_len, L->error);
    rc = -1;
  }
  // Writes into the slack around a buffer (short of its guard page) are out of bounds too.
  // (With ASan the slack and the red zones are poisoned instead: ASan reports the write.)
#ifdef PK_EMU_ASAN
  if (false) {
#else
  if (rc == 0) {
#endif
    std::lock_guard<std::mutex> lk(g_alloc_mtx);
    for (const auto& kv : *g_allocs) {
      if (!canaries_intact(kv.second)) {
        set_err(err, err_len,
                fmt("out-of-bounds write: kernel %s wrote just outside a device buffer of %zu bytes", name,
                    kv.second.bytes));
        // Restore the canaries so that one bad write is reported once.
        const Alloc& a = kv.second;
        std::memset(a.data - kCanaryBefore, kCanary, kCanaryBefore);
        std::memset(a.data + a.bytes, kCanary, a.padded - a.bytes);
        rc = -1;
        break;
      }
    }
  }
  return rc;
}

}  // extern "C"
