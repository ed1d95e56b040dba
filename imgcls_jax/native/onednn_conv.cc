// 2-D convolutions (forward, input gradient, weight gradient) by oneDNN, as XLA FFI handlers for
// JAX on the CPU. Built and loaded by imgcls_jax/native/build.py and onednn.py; see onednn.py for
// the JAX side (jax.ffi.ffi_call, custom_vjp, sharding).
//
// Layouts are JAX's: activations NHWC, kernels HWIO ([KH, KW, Cin / groups, Cout], output
// channels group-major, as lax.conv_general_dilated with feature_group_count). Data types:
// float32 and bfloat16 (same for every operand; oneDNN accumulates in float32).
//
// Handlers (attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups):
//   imgcls_onednn_conv_fwd          (x, w)  -> y
//   imgcls_onednn_conv_bwd_data     (dy, w) -> dx   (dx's shape from the result buffer)
//   imgcls_onednn_conv_bwd_weights  (x, dy) -> dw   (dw's shape from the result buffer)
//
// oneDNN picks its own weight layout for speed (format_tag::any); the kernel is reordered from
// HWIO into it (and a weight gradient back to HWIO) on each call, as PyTorch and TensorFlow do,
// in pieces of output channels run side by side on the pool's threads. Primitives are built once
// per shape and cached; temporaries (reordered kernels, partial weight gradients, scratchpads)
// come from a pool of buffers kept from call to call, so a training step does not fault in fresh
// pages for them.
//
// Threads: oneDNN runs single-threaded in each thread (its OpenMP runtime never starts a team),
// and the parallelism is XLA's own: the batch is split into as many chunks as XLA's intra-op
// pool has threads (IMGCLS_ONEDNN_THREADS caps it), and the chunks are taken one by one by the
// calling thread and by tasks scheduled on that pool (the FFI ThreadPool). So the cores are
// shared with XLA's other work through one pool (no oversubscription), and a chunk waits for no
// particular thread (an OpenMP team's barrier waits for every member: on a loaded machine a
// preempted member stalls the whole convolution). The weight gradient is the sum of the chunks'
// partial gradients, in chunk order, in float32 (each output-channel piece adds its chunks in
// that order): the same numbers on every run with the same number of threads (the same machine
// and settings).

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind : int { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw, o;      // kernel (and output channels)
  int64_t oh, ow;         // output
  int64_t g;              // groups
  int64_t sh, sw, pt, pb, pl, pr;
  memory::data_type dt;
};

// Activations [N, H, W, C] as oneDNN's logical (N, C, H, W) with NHWC strides.
memory::desc activation_md(int64_t n, int64_t c, int64_t h, int64_t w, memory::data_type dt) {
  return memory::desc({n, c, h, w}, dt, {h * w * c, 1, w * c, c});
}

// The HWIO kernel [KH, KW, C / G, O] as oneDNN's (O, I, KH, KW) or (G, O / G, I, KH, KW).
memory::desc hwio_md(const Geometry& q) {
  int64_t i = q.c / q.g;
  if (q.g == 1) return memory::desc({q.o, i, q.kh, q.kw}, q.dt, {1, q.o, q.kw * i * q.o, i * q.o});
  int64_t og = q.o / q.g;
  return memory::desc({q.g, og, i, q.kh, q.kw}, q.dt, {og, 1, q.o, q.kw * i * q.o, i * q.o});
}

memory::desc any_weights_md(const Geometry& q) {
  int64_t i = q.c / q.g;
  if (q.g == 1) return memory::desc({q.o, i, q.kh, q.kw}, q.dt, memory::format_tag::any);
  return memory::desc({q.g, q.o / q.g, i, q.kh, q.kw}, q.dt, memory::format_tag::any);
}

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One piece of a kernel reorder: a range of output channels, reordered on its own so that the
// pieces of one kernel run side by side on the pool's threads (a whole-kernel reorder is
// single-threaded: on VGG16's and ResNet50's kernels, a tenth of a training step with one core
// idle).
struct Piece {
  memory::desc from, to;
  dnnl::primitive reorder;
  dnnl::primitive reorder_sum;  // the weight gradient's: adds into its destination (dst = src + dst)
};

// One cached primitive: the convolution, and the reorder between the HWIO kernel and the
// primitive's weight layout when they differ (in pieces).
struct Entry {
  dnnl::primitive conv;
  std::vector<Piece> pieces;  // empty when the primitive takes HWIO as it is
  memory::desc weights_md;  // the primitive's weight (or weight-gradient) layout
  memory::desc user_weights_md;
  memory::desc src_md, dst_md;  // x / dx and y / dy (NHWC)
  size_t scratchpad_bytes = 0;
  std::string impl;
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& q) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      activation_md(q.n, q.c, q.h, q.w, q.dt), any_weights_md(q),
      activation_md(q.n, q.o, q.oh, q.ow, q.dt), {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr},
      user_scratchpad());
}

// The reorder of one range of output channels [o0, o0 + len) (the whole kernel when len = O), from
// HWIO into the primitive's layout (the weight gradient: back).
Piece make_piece(Kind kind, const Geometry& q, const Entry& e, int64_t o0, int64_t len) {
  auto& eng = cpu_engine();
  Piece p;
  const memory::desc& blocked = e.weights_md;
  const memory::desc& hwio = e.user_weights_md;
  if (len == q.o) {
    p.from = kind == kBwdWeights ? blocked : hwio;
    p.to = kind == kBwdWeights ? hwio : blocked;
  } else {
    memory::dims dims = {len, q.c, q.kh, q.kw}, offsets = {o0, 0, 0, 0};
    p.from = (kind == kBwdWeights ? blocked : hwio).submemory_desc(dims, offsets);
    p.to = (kind == kBwdWeights ? hwio : blocked).submemory_desc(dims, offsets);
  }
  p.reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, p.from, eng, p.to));
  if (kind == kBwdWeights) {
    dnnl::post_ops sum;
    sum.append_sum(1.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(sum);
    p.reorder_sum = dnnl::reorder(dnnl::reorder::primitive_desc(eng, p.from, eng, p.to, attr));
  }
  return p;
}

// The reorder's pieces: ranges of a multiple of 64 output channels (a multiple of every blocked
// layout's channel block), at most 16; one piece (the whole kernel) for grouped convolutions or
// where a range cannot be cut out of the blocked layout.
void add_pieces(Kind kind, const Geometry& q, Entry* e) {
  int64_t step = std::max<int64_t>(64, (q.o + 16 * 64 - 1) / (16 * 64) * 64);
  if (q.g == 1 && q.o > step) {
    try {
      for (int64_t o0 = 0; o0 < q.o; o0 += step)
        e->pieces.push_back(make_piece(kind, q, *e, o0, std::min(step, q.o - o0)));
      return;
    } catch (const dnnl::error&) {
      e->pieces.clear();
    }
  }
  e->pieces.push_back(make_piece(kind, q, *e, 0, q.o));
}

std::unique_ptr<Entry> make_entry(Kind kind, const Geometry& q) {
  auto e = std::make_unique<Entry>();
  e->src_md = activation_md(q.n, q.c, q.h, q.w, q.dt);
  e->dst_md = activation_md(q.n, q.o, q.oh, q.ow, q.dt);
  e->user_weights_md = hwio_md(q);
  auto fwd = forward_pd(q);
  const char* impl = nullptr;
  if (kind == kFwd) {
    e->conv = dnnl::convolution_forward(fwd);
    e->weights_md = fwd.weights_desc();
    e->scratchpad_bytes = fwd.scratchpad_desc().get_size();
    impl = fwd.impl_info_str();
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, e->src_md, any_weights_md(q), e->dst_md,
        {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr}, fwd, user_scratchpad());
    e->conv = dnnl::convolution_backward_data(pd);
    e->weights_md = pd.weights_desc();
    e->scratchpad_bytes = pd.scratchpad_desc().get_size();
    impl = pd.impl_info_str();
  } else {  // the weight gradient in float32 whatever the inputs' type (summed over chunks)
    Geometry qw = q;
    qw.dt = memory::data_type::f32;
    e->user_weights_md = hwio_md(qw);
    dnnl::convolution_backward_weights::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, e->src_md, any_weights_md(qw), e->dst_md,
        {q.sh, q.sw}, {q.pt, q.pl}, {q.pb, q.pr}, fwd, user_scratchpad());
    e->conv = dnnl::convolution_backward_weights(pd);
    e->weights_md = pd.diff_weights_desc();
    e->scratchpad_bytes = pd.scratchpad_desc().get_size();
    impl = pd.impl_info_str();
  }
  e->impl = impl ? impl : "?";
  if (e->weights_md != e->user_weights_md) add_pieces(kind, q, e.get());
  return e;
}

std::string key_of(Kind kind, const Geometry& q) {
  std::ostringstream s;
  s << kind << ',' << static_cast<int>(q.dt);
  for (int64_t v : {q.n, q.h, q.w, q.c, q.kh, q.kw, q.o, q.oh, q.ow, q.g, q.sh, q.sw, q.pt, q.pb, q.pl, q.pr})
    s << ',' << v;
  return s.str();
}

// While alive, this thread's OpenMP setting is one thread (oneDNN then runs without a team); the
// thread's own setting comes back when it goes. The OpenMP runtime is the process's (PyTorch, for
// one, loads a libgomp.so.1 that this library then shares): leaving the setting at one made
// every later OpenMP parallel region started from that thread (PyTorch's operators on Python's
// main thread, after the Python side called imgcls_onednn_supports) run on one core.
class SingleThreaded {
 public:
  SingleThreaded() {
#ifdef _OPENMP
    previous_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~SingleThreaded() {
#ifdef _OPENMP
    omp_set_num_threads(previous_);
#endif
  }
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;

 private:
  int previous_ = 1;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<std::string, std::unique_ptr<Entry>>& cache() {
  static std::unordered_map<std::string, std::unique_ptr<Entry>> c;
  return c;
}

// The cached primitive of (kind, q); built on first use (single-threaded, as it will run).
Entry& entry(Kind kind, const Geometry& q) {
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& c = cache();
  std::string key = key_of(kind, q);
  auto it = c.find(key);
  if (it == c.end()) it = c.emplace(key, make_entry(kind, q)).first;
  return *it->second;
}

char* align64(char* p) { return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64); }

// A reusable buffer, kept between calls and never zeroed: a convolution's temporaries (kernels in
// oneDNN's layout, partial weight gradients, oneDNN's scratchpads) reuse the memory of the step
// before instead of asking for fresh pages (each fresh page costs a fault and the kernel's
// zeroing: measured ~6% of a VGG16 training step's CPU time when they and XLA's own buffers were
// fresh every step).
class Buffer {
 public:
  char* get(size_t bytes) {
    if (size_ < bytes) {
      data_.reset(new char[bytes + 64]);  // default-initialized: not written here
      size_ = bytes;
    }
    return align64(data_.get());
  }
  size_t size() const { return size_; }

 private:
  std::unique_ptr<char[]> data_;
  size_t size_ = 0;
};

// The buffers of every call, shared by all threads (XLA runs a custom call on whichever of its
// threads is free: per-thread buffers would be allocated again on each new thread for many steps).
// A call leases as many as it needs, largest first, and gives them back when it returns.
class Lease {
 public:
  explicit Lease(size_t count) {
    std::lock_guard<std::mutex> lock(mutex());
    auto& free = pool();
    for (size_t i = 0; i < count; ++i) {
      if (free.empty()) {
        held_.push_back(std::make_unique<Buffer>());
      } else {
        held_.push_back(std::move(free.back()));  // the pool is kept sorted by size: largest last
        free.pop_back();
      }
    }
  }
  ~Lease() {
    std::lock_guard<std::mutex> lock(mutex());
    auto& free = pool();
    for (auto& b : held_) free.push_back(std::move(b));
    std::sort(free.begin(), free.end(), [](const auto& a, const auto& b) { return a->size() < b->size(); });
  }
  Buffer& operator[](size_t i) { return *held_[i]; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<Buffer>>& pool() {
    static std::vector<std::unique_ptr<Buffer>> p;
    return p;
  }
  std::vector<std::unique_ptr<Buffer>> held_;
};

memory scratchpad(const Entry& e, Buffer& buffer) {
  return memory(memory::desc({static_cast<int64_t>(e.scratchpad_bytes)}, memory::data_type::u8,
                             memory::format_tag::a),
                cpu_engine(), buffer.get(e.scratchpad_bytes));
}

int pool_threads(ffi::ThreadPool* pool) {
  static int cap = [] {
    const char* v = std::getenv("IMGCLS_ONEDNN_THREADS");
    return v ? std::atoi(v) : 0;
  }();
  int n = pool ? static_cast<int>(pool->num_threads()) : 1;
  n = n < 1 ? 1 : n;
  return cap > 0 && cap < n ? cap : n;
}

// Runs work(0) ... work(chunks - 1) on the calling thread and on up to chunks - 1 tasks of
// `pool`; returns when all are done, with the first error message (empty if none).
std::string run_chunks(int chunks, ffi::ThreadPool* pool, const std::function<void(int)>& work) {
  struct State {
    std::atomic<int> next{0};
    int chunks = 0, done = 0;
    std::mutex m;
    std::condition_variable cv;
    std::string error;
    const std::function<void(int)>* work = nullptr;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->work = &work;
  auto loop = [](const std::shared_ptr<State>& st) {
    SingleThreaded one_thread;
    for (int c; (c = st->next.fetch_add(1)) < st->chunks;) {
      std::string error;
      try {
        (*st->work)(c);  // only reached while the caller waits: `work` is alive
      } catch (const dnnl::error& e) {
        error = std::string("oneDNN: ") + e.what() + " (status " + std::to_string(static_cast<int>(e.status)) + ")";
      } catch (const std::exception& e) {
        error = std::string("onednn conv: ") + e.what();
      }
      std::lock_guard<std::mutex> lock(st->m);
      if (!error.empty() && st->error.empty()) st->error = error;
      if (++st->done == st->chunks) st->cv.notify_all();
    }
  };
  for (int i = 1; i < chunks && pool; ++i) pool->Schedule([state, loop] { loop(state); });
  loop(state);
  std::unique_lock<std::mutex> lock(state->m);
  state->cv.wait(lock, [&] { return state->done == state->chunks; });
  return state->error;
}

size_t elements(const Geometry& q) { return static_cast<size_t>(q.kh * q.kw * (q.c / q.g) * q.o); }

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// Runs one convolution over `chunks` batch chunks: `a` is x (fwd, bwd_weights) or dy (bwd_data);
// `b` is w (fwd, bwd_data) or dy (bwd_weights); `out` is y, dx or dw.
std::string run(Kind kind, const Geometry& q, void* a, void* b, void* out, ffi::ThreadPool* pool) {
  SingleThreaded one_thread;
  int chunks = static_cast<int>(std::min<int64_t>(q.n, pool_threads(pool)));
  size_t esize = q.dt == memory::data_type::bf16 ? 2 : 4;
  auto chunk_geometry = [&](int c, int64_t* n0) {
    Geometry g = q;
    *n0 = q.n * c / chunks;
    g.n = q.n * (c + 1) / chunks - *n0;
    return g;
  };
  std::vector<Entry*> entries(chunks);
  for (int c = 0; c < chunks; ++c) {
    int64_t n0;
    entries[c] = &entry(kind, chunk_geometry(c, &n0));
  }
  auto& eng = cpu_engine();
  size_t in_step = q.h * q.w * q.c * esize, out_step = q.oh * q.ow * q.o * esize;
  char* src = static_cast<char*>(kind == kBwdData ? out : a);  // x / dx
  char* dst = static_cast<char*>(kind == kBwdData ? a : kind == kFwd ? out : b);  // y / dy
  if (kind != kBwdWeights) {
    // the kernel in each distinct layout the chunks' primitives want (one, unless they differ)
    Lease held(2 * chunks);  // [0, chunks): kernels in the primitives' layouts; then scratchpads
    std::vector<memory> weights(chunks);
    memory user_w(entries[0]->user_weights_md, eng, b);
    for (int c = 0; c < chunks; ++c) {
      Entry& e = *entries[c];
      for (int d = 0; d < c && !weights[c]; ++d)
        if (entries[d]->weights_md == e.weights_md) weights[c] = weights[d];
      if (weights[c]) continue;
      if (e.pieces.empty()) {
        weights[c] = user_w;
        continue;
      }
      char* w = held[c].get(e.weights_md.get_size());
      weights[c] = memory(e.weights_md, eng, w);
      std::string error = run_chunks(static_cast<int>(e.pieces.size()), pool, [&](int i) {
        const Piece& p = e.pieces[i];
        dnnl::stream stream(eng);
        p.reorder.execute(stream, {{DNNL_ARG_FROM, memory(p.from, eng, b)}, {DNNL_ARG_TO, memory(p.to, eng, w)}});
        stream.wait();
      });
      if (!error.empty()) return error;
    }
    return run_chunks(chunks, pool, [&](int c) {
      int64_t n0;
      chunk_geometry(c, &n0);
      Entry& e = *entries[c];
      dnnl::stream stream(eng);
      memory s(e.src_md, eng, src + n0 * in_step), d(e.dst_md, eng, dst + n0 * out_step);
      if (kind == kFwd)
        e.conv.execute(stream, {{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, weights[c]}, {DNNL_ARG_DST, d},
                                {DNNL_ARG_SCRATCHPAD, scratchpad(e, held[chunks + c])}});
      else
        e.conv.execute(stream, {{DNNL_ARG_DIFF_DST, d}, {DNNL_ARG_WEIGHTS, weights[c]}, {DNNL_ARG_DIFF_SRC, s},
                                {DNNL_ARG_SCRATCHPAD, scratchpad(e, held[chunks + c])}});
      stream.wait();
    });
  }
  // The weight gradient: each chunk's partial gradient (in the primitive's layout), added into
  // `total` (float32 HWIO: `out` itself for float32) in chunk order. With a layout reorder, the
  // reorders do the adding (chunk 0's plain, the others' with a sum post-op: dst = src + dst),
  // piece by piece on the pool's threads, each piece's chunks in order; without one, chunk 0
  // writes `total` directly and the others are added to it after.
  size_t k = elements(q);
  bool f32 = q.dt == memory::data_type::f32;
  Lease bufs(2 * chunks + 1);  // [0, chunks): partial gradients; chunks: total; then scratchpads
  float* total = f32 ? static_cast<float*>(out) : reinterpret_cast<float*>(bufs[chunks].get(k * sizeof(float)));
  std::vector<char*> parts(chunks);
  for (int c = 0; c < chunks; ++c)
    parts[c] = entries[c]->pieces.empty() && c == 0 ? reinterpret_cast<char*>(total)
                                              : bufs[c].get(entries[c]->weights_md.get_size());
  std::string error = run_chunks(chunks, pool, [&](int c) {
    int64_t n0;
    chunk_geometry(c, &n0);
    Entry& e = *entries[c];
    dnnl::stream stream(eng);
    e.conv.execute(stream, {{DNNL_ARG_SRC, memory(e.src_md, eng, src + n0 * in_step)},
                            {DNNL_ARG_DIFF_DST, memory(e.dst_md, eng, dst + n0 * out_step)},
                            {DNNL_ARG_DIFF_WEIGHTS, memory(e.weights_md, eng, parts[c])},
                            {DNNL_ARG_SCRATCHPAD, scratchpad(e, bufs[chunks + 1 + c])}});
    stream.wait();
  });
  if (!error.empty()) return error;
  // chunk c's partial gradient, piece i of its reorder, into `total` (added unless c is 0)
  auto add_piece = [&](int c, int i, dnnl::stream& stream) {
    const Piece& p = entries[c]->pieces[i];
    (c == 0 ? p.reorder : p.reorder_sum)
        .execute(stream, {{DNNL_ARG_FROM, memory(p.from, eng, parts[c])}, {DNNL_ARG_TO, memory(p.to, eng, total)}});
    stream.wait();
  };
  // pieces are the same output-channel ranges in every chunk's entry (they depend on O alone)
  int pieces = static_cast<int>(entries[0]->pieces.size());
  bool all_reorder = pieces > 0 && std::all_of(entries.begin(), entries.end(), [&](Entry* e) {
                       return static_cast<int>(e->pieces.size()) == pieces;
                     });
  if (all_reorder) {  // each piece on a pool thread, its chunks in order
    error = run_chunks(pieces, pool, [&](int i) {
      dnnl::stream stream(eng);
      for (int c = 0; c < chunks; ++c) add_piece(c, i, stream);
    });
    if (!error.empty()) return error;
  } else {  // chunks whose layouts differ (some HWIO as it is): one after another
    dnnl::stream stream(eng);
    for (int c = 0; c < chunks; ++c) {
      int n = static_cast<int>(entries[c]->pieces.size());
      for (int i = 0; i < n; ++i) add_piece(c, i, stream);
      if (n == 0 && c > 0) {
        const float* part = reinterpret_cast<const float*>(parts[c]);
        for (size_t i = 0; i < k; ++i) total[i] += part[i];
      }
    }
  }
  if (!f32) {
    auto* o = static_cast<uint16_t*>(out);
    for (size_t i = 0; i < k; ++i) o[i] = to_bf16(total[i]);
  }
  return "";
}

bool data_type_of(ffi::DataType t, memory::data_type* out) {
  if (t == ffi::DataType::F32) *out = memory::data_type::f32;
  else if (t == ffi::DataType::BF16) *out = memory::data_type::bf16;
  else return false;
  return true;
}

// Geometry from the NHWC activation (x or dx), the HWIO kernel (w or dw) and the NHWC output
// (y or dy) dimensions; checks them.
ffi::Error geometry(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd,
                    ffi::AnyBuffer::Dimensions yd, ffi::DataType t, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr, int64_t g, Geometry* q) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: expected 4-D NHWC activations and an HWIO kernel");
  if (!data_type_of(t, &q->dt))
    return ffi::Error::InvalidArgument("onednn conv: only float32 and bfloat16 are supported");
  *q = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2], g, sh, sw, pt, pb, pl, pr, q->dt};
  if (g < 1 || q->c % g || q->o % g || wd[2] * g != q->c || yd[0] != q->n || yd[3] != q->o)
    return ffi::Error::InvalidArgument("onednn conv: inconsistent shapes or groups");
  if ((q->h + pt + pb - q->kh) / sh + 1 != q->oh || (q->w + pl + pr - q->kw) / sw + 1 != q->ow)
    return ffi::Error::InvalidArgument("onednn conv: output size does not match strides and padding");
  return ffi::Error::Success();
}

ffi::Error guarded(Kind kind, const Geometry& q, void* a, void* b, void* out, ffi::ThreadPool* pool) {
  std::string error;
  try {
    error = run(kind, q, a, b, out, pool);
  } catch (const dnnl::error& e) {
    error = std::string("oneDNN: ") + e.what() + " (status " + std::to_string(static_cast<int>(e.status)) + ")";
  } catch (const std::exception& e) {
    error = std::string("onednn conv: ") + e.what();
  }
  return error.empty() ? ffi::Error::Success() : ffi::Error::Internal(error);
}

ffi::Error Fwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  Geometry q;
  if (auto err = geometry(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), sh, sw, pt, pb,
                          pl, pr, g, &q);
      err.failure())
    return err;
  return guarded(kFwd, q, x.untyped_data(), w.untyped_data(), y->untyped_data(), &pool);
}

ffi::Error BwdData(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  Geometry q;
  if (auto err = geometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), sh, sw, pt,
                          pb, pl, pr, g, &q);
      err.failure())
    return err;
  return guarded(kBwdData, q, dy.untyped_data(), w.untyped_data(), dx->untyped_data(), &pool);
}

ffi::Error BwdWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  Geometry q;
  if (auto err = geometry(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), sh, sw, pt,
                          pb, pl, pr, g, &q);
      err.failure())
    return err;
  return guarded(kBwdWeights, q, x.untyped_data(), dy.untyped_data(), dw->untyped_data(), &pool);
}

template <typename B>
auto with_attrs(B binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right")
      .template Attr<int64_t>("groups");
}

}  // namespace

// The library is built with -fvisibility=hidden: only these symbols are exported.
#define IMGCLS_EXPORT __attribute__((visibility("default")))
extern "C" {
IMGCLS_EXPORT XLA_FFI_Error* imgcls_onednn_conv_fwd(XLA_FFI_CallFrame* call_frame);
IMGCLS_EXPORT XLA_FFI_Error* imgcls_onednn_conv_bwd_data(XLA_FFI_CallFrame* call_frame);
IMGCLS_EXPORT XLA_FFI_Error* imgcls_onednn_conv_bwd_weights(XLA_FFI_CallFrame* call_frame);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(imgcls_onednn_conv_fwd, Fwd,
                              with_attrs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(imgcls_onednn_conv_bwd_data, BwdData,
                              with_attrs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(imgcls_onednn_conv_bwd_weights, BwdWeights,
                              with_attrs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()));

// Plain C entry points for the loader (ctypes).
extern "C" {

// oneDNN's version as "major.minor.patch".
IMGCLS_EXPORT const char* imgcls_onednn_version() {
  static std::string v = [] {
    const dnnl_version_t* d = dnnl_version();
    return std::to_string(d->major) + "." + std::to_string(d->minor) + "." + std::to_string(d->patch);
  }();
  return v.c_str();
}

// 1 if oneDNN can build all three primitives of a small 3x3 convolution of `dtype` (0 float32,
// 1 bfloat16) on this CPU, else 0.
IMGCLS_EXPORT int imgcls_onednn_supports(int dtype) {
  Geometry q{2, 8, 8, 16, 3, 3, 16, 8, 8, 1, 1, 1, 1, 1, 1, 1,
             dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32};
  SingleThreaded one_thread;
  try {
    for (Kind k : {kFwd, kBwdData, kBwdWeights}) make_entry(k, q);
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}

// The oneDNN implementation chosen for one convolution (e.g. "brg:avx512_core"), for profiles;
// kind 0/1/2 = forward / input gradient / weight gradient. Empty if it cannot be built.
IMGCLS_EXPORT const char* imgcls_onednn_impl(int kind, int dtype, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh,
                               int64_t kw, int64_t o, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                               int64_t pl, int64_t pr, int64_t g) {
  static thread_local std::string out;
  Geometry q{n, h, w, c, kh, kw, o, (h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1, g, sh, sw,
             pt, pb, pl, pr, dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32};
  SingleThreaded one_thread;
  try {
    auto e = make_entry(static_cast<Kind>(kind), q);
    out = e->impl + (e->pieces.empty() ? "" : " (+weight reorder)");
  } catch (const std::exception&) {
    out.clear();
  }
  return out.c_str();
}

}  // extern "C"
