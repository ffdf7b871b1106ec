// CPU emulation of the CUDA subset our kernels use (tests/cuda_emulation).
//
// A .cu file is compiled unchanged as C++20 after this header.  A launch runs
// the blocks of the grid one after another; the threads of a block are host
// threads that stay alive for the whole launch, so
//   __shared__          is `static` storage in the section "emu_shared",
//                       which the launcher fills with 0xFF bytes before each
//                       block (poisoned, as uninitialised as on the GPU and
//                       never zero: a kernel must clear what it accumulates),
//   extern __shared__   (rewritten by emulator.py into a pointer) is a
//                       per-launch buffer, likewise 0xFF before each block,
//   __syncthreads()     is a barrier that is strict where CUDA is undefined:
//                       all threads must wait at the same one, and none may
//                       return while others wait at one or reach one later
//                       (the launch fails with a message naming the lines),
//   warp intrinsics     (__shfl_sync, __shfl_up/down/xor_sync, __ballot_sync,
//                       __any_sync, __all_sync, __match_any_sync,
//                       __match_all_sync, __syncwarp) run in lockstep: a warp
//                       is 32 consecutive linear thread ids, and every lane
//                       named in `mask` must reach the same intrinsic with the
//                       same mask; the values are exchanged once all have
//                       arrived.  Strict where CUDA is undefined: a mask
//                       without the caller's lane or with lanes the block
//                       lacks, lanes at different intrinsics or masks, a
//                       lane of the mask waiting at __syncthreads() or
//                       returned, a shuffle reading a lane outside the mask,
//                       or a width that is not a power of two up to 32 fail
//                       the launch,
//   atomics             are std::atomic_ref operations.
// Not emulated (a kernel using them does not compile here): __activemask,
// __syncthreads_count/and/or, inline PTX, textures, cooperative groups.
// Float arithmetic keeps IEEE denormals (CuPy's -ftz=true flushes them): do
// denormal-sensitive logic on integer bit patterns.  The __d*_rn / __f*_rn
// intrinsics are plain operations (emulator.py compiles with
// -ffp-contract=off).

#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static __attribute__((section("emu_shared")))
#define __constant__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1,
                   unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

// The static __shared__ variables of the module: the section "emu_shared"
// (the anchor keeps it present in a kernel without any).
static char shared_anchor __attribute__((section("emu_shared"), used));
extern "C" char __start_emu_shared[] __attribute__((visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((visibility("hidden")));
constexpr unsigned char POISON = 0xFF;

// The linear id of the calling thread in its block (x fastest); its lane is
// linear_thread % 32, its warp linear_thread / 32.
inline thread_local unsigned int linear_thread = 0;

// Thrown out of __syncthreads() once the block's barrier is broken.
struct BarrierError : std::exception {};

// The values of one warp collective as the lanes deposited them, and the
// lanes that took part.
struct WarpValues {
    unsigned long long value[32];
    unsigned int mask;
};

// The barrier of one block, strict where CUDA is undefined: all threads of
// the block must wait at the same __syncthreads() (file and line), and no
// thread may return while others wait at one or will reach one later.
// It also runs the warp collectives (see the top of this file).  Such a
// divergence breaks the barrier: the launch fails with a message.
class BlockBarrier {
  public:
    void reset(int threads) {
        std::lock_guard<std::mutex> lock(mutex_);
        expected_ = threads;
        arrived_ = 0;
        exited_ = 0;
        where_.assign(threads, Where::running);
        for (Warp& warp : warps_) warp.pending = 0;
    }

    void arrive_and_wait(const char* file, int line) {
        std::unique_lock<std::mutex> lock(mutex_);
        const Warp& warp = warps_[linear_thread / 32];
        if (exited_ > 0) {
            fail(describe("reached __syncthreads() at", file, line) +
                 " after another thread of its block returned");
        } else if (arrived_ > 0 && (line != line_ || std::strcmp(file, file_))) {
            fail(describe("waits at __syncthreads()", file, line) +
                 ", others at " + file_ + ":" + std::to_string(line_));
        } else if (warp.pending && (warp.mask >> (linear_thread % 32) & 1)) {
            fail(describe("waits at __syncthreads()", file, line) +
                 " while lanes of its warp wait for it at " + warp.kind +
                 " " + warp.file + ":" + std::to_string(warp.line));
        }
        if (broken_) throw BarrierError();
        if (arrived_ == 0) {
            file_ = file;
            line_ = line;
        }
        const unsigned long long generation = generation_;
        if (++arrived_ == expected_) {
            arrived_ = 0;
            ++generation_;
            // the waiters are released now, before they run again: a lane
            // that this thread meets at a warp intrinsic is not waiting
            for (Where& state : where_) {
                if (state == Where::block_barrier) state = Where::running;
            }
            wake(wakes_);
            return;
        }
        where_[linear_thread] = Where::block_barrier;
        wait(lock, wakes_, [&] { return generation_ != generation; });
        where_[linear_thread] = Where::running;
    }

    // Warp collective `kind` over the lanes of `mask`: deposits `value`
    // (the bits of the caller's operand) and returns, once every lane of the
    // mask has arrived, the values of all lanes.
    WarpValues exchange(const char* kind, unsigned int mask, unsigned long long value,
                        const char* file, int line) {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned int lane = linear_thread % 32;
        const unsigned int first = linear_thread - lane;
        Warp& warp = warps_[first / 32];
        const unsigned int lanes = std::min(32u, static_cast<unsigned int>(expected_) - first);
        const unsigned int existing = lanes == 32 ? ~0u : (1u << lanes) - 1;
        const std::string here = std::string(kind) + "(mask " + hex(mask) + ")";
        if (!(mask >> lane & 1)) {
            fail(describe(("calls " + here + " without its own lane at").c_str(), file, line));
        } else if (mask & ~existing) {
            fail(describe(("calls " + here + " naming lanes its block lacks at").c_str(),
                          file, line));
        } else if (warp.pending && (warp.mask != mask || std::strcmp(warp.kind, kind))) {
            fail(describe(("calls " + here + " at").c_str(), file, line) +
                 ", other lanes " + warp.kind + "(mask " + hex(warp.mask) + ") at " +
                 warp.file + ":" + std::to_string(warp.line));
        } else {
            for (unsigned int other = 0; other < 32 && !broken_; ++other) {
                if (!(mask >> other & 1) || (warp.pending >> other & 1) || other == lane) continue;
                const Where state = where_[first + other];
                if (state == Where::block_barrier || state == Where::exited) {
                    fail(describe(("calls " + here + " at").c_str(), file, line) +
                         " while lane " + std::to_string(other) +
                         (state == Where::exited ? " has returned"
                                                 : " waits at __syncthreads()"));
                }
            }
        }
        if (broken_) throw BarrierError();
        if (!warp.pending) {
            warp.mask = mask;
            warp.kind = kind;
            warp.file = file;
            warp.line = line;
        }
        const unsigned long long generation = warp.generation;
        unsigned long long* values = warp.values[generation % 2];
        values[lane] = value;
        warp.pending |= 1u << lane;
        if (warp.pending == mask) {
            warp.pending = 0;
            ++warp.generation;
            wake(warp.wakes);
        } else {
            where_[linear_thread] = Where::warp;
            wait(lock, warp.wakes, [&] { return warp.generation != generation; });
            where_[linear_thread] = Where::running;
        }
        // The next collective of this warp writes the other buffer, and the
        // one after it cannot start before this thread has arrived there.
        WarpValues result{{}, mask};
        std::memcpy(result.value, values, sizeof(result.value));
        return result;
    }

    // Fails the launch: the calling thread did `what` at file:line.
    [[noreturn]] void misuse(const std::string& what, const char* file, int line) {
        std::lock_guard<std::mutex> lock(mutex_);
        fail(describe(("calls " + what + " at").c_str(), file, line));
        throw BarrierError();
    }

    // A thread has finished the kernel (returned or left by BarrierError).
    void exit() {
        std::lock_guard<std::mutex> lock(mutex_);
        ++exited_;
        where_[linear_thread] = Where::exited;
        const Warp& warp = warps_[linear_thread / 32];
        if (arrived_ > 0) {
            fail(describe("returned while others wait at __syncthreads()", file_, line_));
        } else if (warp.pending && (warp.mask >> (linear_thread % 32) & 1)) {
            fail(describe((std::string("returned while lanes of its warp wait for it at ") +
                           warp.kind).c_str(), warp.file, warp.line));
        }
    }

    bool broken() {
        std::lock_guard<std::mutex> lock(mutex_);
        return broken_;
    }

    const std::string& message() const { return message_; }

  private:
    enum class Where : unsigned char { running, block_barrier, warp, exited };

    struct Warp {
        unsigned int pending = 0;  // lanes that arrived at the current collective
        unsigned int mask = 0;
        const char* kind = "";
        const char* file = "";
        int line = 0;
        unsigned long long generation = 0;
        unsigned long long values[2][32] = {};  // by generation parity
        std::atomic<unsigned int> wakes{0};
    };

    static std::string hex(unsigned int v) {
        char text[16];
        std::snprintf(text, sizeof(text), "0x%08x", v);
        return text;
    }

    static std::string describe(const char* what, const char* file, int line) {
        return "thread (" + std::to_string(threadIdx.x) + "," +
               std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) +
               ") of block (" + std::to_string(blockIdx.x) + "," +
               std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
               ") " + what + " " + file + ":" + std::to_string(line);
    }

    void fail(const std::string& message) {  // the first message is kept
        if (!broken_) message_ = message;
        broken_ = true;
        wake(wakes_);
        for (Warp& warp : warps_) wake(warp.wakes);
    }

    // Wakes the threads sleeping on `wakes` (called with mutex_ held).
    static void wake(std::atomic<unsigned int>& wakes) {
        wakes.fetch_add(1, std::memory_order_release);
        wakes.notify_all();
    }

    // Sleeps on `wakes` without the mutex, so that the woken threads do not
    // queue for it (a futex wait on Linux), until `done()` (checked with the
    // mutex held) or the barrier breaks.  Returns with `lock` held.
    template <class Done>
    void wait(std::unique_lock<std::mutex>& lock, std::atomic<unsigned int>& wakes, Done done) {
        unsigned int seen = wakes.load(std::memory_order_acquire);
        lock.unlock();
        for (;;) {
            wakes.wait(seen, std::memory_order_acquire);
            seen = wakes.load(std::memory_order_acquire);
            lock.lock();
            if (done()) return;
            if (broken_) throw BarrierError();
            lock.unlock();
        }
    }

    std::mutex mutex_;
    std::atomic<unsigned int> wakes_{0};
    int expected_ = 0;
    int arrived_ = 0;
    int exited_ = 0;
    const char* file_ = "";
    int line_ = 0;
    unsigned long long generation_ = 0;
    bool broken_ = false;
    std::string message_;
    std::vector<Where> where_;
    Warp warps_[32];
};

// Global-memory traffic.  emulator.py compiles the module with g++
// -fsanitize=thread but links no ThreadSanitizer runtime: the compiler calls
// a __tsan_* hook (defined at the end of this file) for every load, store
// and atomic of the compiled code, and the hooks count the bytes whose
// address lies in one of the launch's argument arrays (guard zones
// included).  Exactness: every access the g++ -O1 code makes, at its C++
// width; an atomic read-modify-write counts as a read and a write.  Not the
// GPU's DRAM traffic (no caches, 32-byte sectors or coalescing; g++ and
// nvcc may keep different values in registers).
struct Range {
    const char* begin;
    const char* end;
};
constexpr int MAX_RANGES = 64;  // array arguments of one kernel
inline const Range* global_ranges = nullptr;  // set for one launch
inline int global_range_count = 0;
// bytes read ([i][0]) and written ([i][1]) in range i by the calling thread
inline thread_local unsigned long long thread_traffic[MAX_RANGES][2] = {};

__attribute__((no_sanitize("thread"))) inline void count(const volatile void* address,
                                                         unsigned long long bytes, int written) {
    const char* p = const_cast<const char*>(static_cast<const volatile char*>(address));
    for (int i = 0; i < global_range_count; ++i) {
        if (p >= global_ranges[i].begin && p < global_ranges[i].end) {
            thread_traffic[i][written] += bytes;
            return;
        }
    }
}

struct Launch {
    BlockBarrier barrier;
    std::vector<std::max_align_t> dynamic_shared;
};

inline thread_local Launch* current = nullptr;

inline void* dynamic_shared() { return current->dynamic_shared.data(); }

// Fills the static and the dynamic shared memory with POISON bytes (before
// each block, while no thread of the launch runs).
inline void poison_shared(Launch& state) {
    std::memset(__start_emu_shared, POISON,
                static_cast<std::size_t>(__stop_emu_shared - __start_emu_shared));
    std::memset(state.dynamic_shared.data(), POISON,
                state.dynamic_shared.size() * sizeof(std::max_align_t));
}

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cvref_t<A>*>(args[I])...);
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) where args[i] points
// to the value of argument i; `ranges` holds `range_count` [begin, end)
// address pairs of global memory, and traffic[0] / traffic[1] receive the
// bytes the kernel read / wrote there.  Returns 0, or 1 with a message in
// `error` (of `error_size` bytes) when a barrier divergence broke the launch.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes,
           void** args, const Range* ranges, int range_count,
           unsigned long long* traffic, char* error, std::size_t error_size) {
    const unsigned int threads = block.x * block.y * block.z;
    global_ranges = ranges;
    global_range_count = std::min(range_count, MAX_RANGES);
    std::fill(traffic, traffic + 2 * range_count, 0ull);
    std::mutex traffic_mutex;
    Launch state;
    const std::size_t words =
        (shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    state.dynamic_shared.resize(words);
    poison_shared(state);
    state.barrier.reset(threads);
    bool stop = false;
    std::barrier block_done(threads, [&]() noexcept {
        stop = state.barrier.broken();
        state.barrier.reset(threads);
        poison_shared(state);
    });
    auto worker = [&](unsigned int t) {
        current = &state;
        linear_thread = t;
        blockDim = block;
        gridDim = grid;
        threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        [&] {
            for (unsigned int z = 0; z < grid.z; ++z)
                for (unsigned int y = 0; y < grid.y; ++y)
                    for (unsigned int x = 0; x < grid.x; ++x) {
                        blockIdx = uint3(x, y, z);
                        try {
                            call(kernel, args, std::index_sequence_for<A...>{});
                        } catch (const BarrierError&) {
                        }
                        state.barrier.exit();
                        block_done.arrive_and_wait();
                        if (stop) return;
                    }
        }();
        std::lock_guard<std::mutex> lock(traffic_mutex);
        for (int i = 0; i < global_range_count; ++i) {
            for (int w = 0; w < 2; ++w) {
                traffic[2 * i + w] += thread_traffic[i][w];
                thread_traffic[i][w] = 0;
            }
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& thread : pool) thread.join();
    global_range_count = 0;
    if (!stop) return 0;
    std::snprintf(error, error_size, "%s", state.barrier.message().c_str());
    return 1;
}

// Kernel signature as type codes, e.g. "f4*,i8,f8": NumPy kind and size,
// "*" for a pointer.  emulator.py checks launch arguments against it.
template <class T>
std::string type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        return type_code<std::remove_pointer_t<U>>() + "*";
    } else if constexpr (std::is_same_v<U, bool>) {
        return "b1";
    } else if constexpr (std::is_integral_v<U>) {
        return (std::is_signed_v<U> ? "i" : "u") + std::to_string(sizeof(U));
    } else {
        static_assert(std::is_floating_point_v<U>,
                      "kernel arguments must be scalars or pointers");
        return "f" + std::to_string(sizeof(U));
    }
}

template <class... A>
std::string signature(void (*)(A...)) {
    std::string codes;
    ((codes += type_code<A>() + ","), ...);
    if (!codes.empty()) codes.pop_back();
    return codes;
}

}  // namespace emu

#define __syncthreads() emu::current->barrier.arrive_and_wait(__FILE__, __LINE__)

// Warp intrinsics (lockstep, see the top of this file).  Each is a macro
// that passes the call's file and line to its emu:: implementation.
namespace emu {

template <class T>
unsigned long long to_bits(T v) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                  "warp intrinsics take scalars of up to 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <class T>
T from_bits(unsigned long long bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

inline WarpValues exchange(const char* kind, unsigned int mask, unsigned long long value,
                           const char* file, int line) {
    return current->barrier.exchange(kind, mask, value, file, line);
}

[[noreturn]] inline void warp_misuse(const std::string& what, const char* file, int line) {
    current->barrier.misuse(what, file, line);
}

// A shuffle: lane `source` of the caller's segment of `width` lanes, or -1
// for the caller's own value (a source past the segment).
template <class T>
T shuffle(const char* kind, unsigned int mask, T var, int source, int width,
          const char* file, int line) {
    if (width < 1 || width > 32 || (width & (width - 1)))
        warp_misuse(std::string(kind) + " with width " + std::to_string(width), file, line);
    const WarpValues values = exchange(kind, mask, to_bits(var), file, line);
    if (source < 0) return var;
    if (!(values.mask >> source & 1))
        warp_misuse(std::string(kind) + " reading lane " + std::to_string(source) +
                    " outside its mask", file, line);
    return from_bits<T>(values.value[source]);
}

inline int lane() { return static_cast<int>(linear_thread % 32); }

template <class T>
T shfl_sync(const char* file, int line, unsigned int mask, T var, int src, int width = 32) {
    const int base = lane() & ~(width - 1);
    return shuffle("__shfl_sync", mask, var, base + (src & (width - 1)), width, file, line);
}

template <class T>
T shfl_up_sync(const char* file, int line, unsigned int mask, T var, unsigned int delta,
               int width = 32) {
    const int base = lane() & ~(width - 1);
    const int source = lane() - static_cast<int>(delta);
    return shuffle("__shfl_up_sync", mask, var, source < base ? -1 : source, width, file, line);
}

template <class T>
T shfl_down_sync(const char* file, int line, unsigned int mask, T var, unsigned int delta,
                 int width = 32) {
    const int base = lane() & ~(width - 1);
    const int source = lane() + static_cast<int>(delta);
    return shuffle("__shfl_down_sync", mask, var, source >= base + width ? -1 : source,
                   width, file, line);
}

template <class T>
T shfl_xor_sync(const char* file, int line, unsigned int mask, T var, int lane_mask,
                int width = 32) {
    // CUDA: a lane may read earlier segments, not later ones (own value)
    const int base = lane() & ~(width - 1);
    const int source = (lane() ^ lane_mask) & 31;
    return shuffle("__shfl_xor_sync", mask, var, source >= base + width ? -1 : source,
                   width, file, line);
}

inline unsigned int ballot_sync(const char* file, int line, unsigned int mask, int predicate) {
    const WarpValues values = exchange("__ballot_sync", mask, predicate != 0, file, line);
    unsigned int bits = 0;
    for (int l = 0; l < 32; ++l)
        if ((values.mask >> l & 1) && values.value[l]) bits |= 1u << l;
    return bits;
}

inline int any_sync(const char* file, int line, unsigned int mask, int predicate) {
    const WarpValues values = exchange("__any_sync", mask, predicate != 0, file, line);
    for (int l = 0; l < 32; ++l)
        if ((values.mask >> l & 1) && values.value[l]) return 1;
    return 0;
}

inline int all_sync(const char* file, int line, unsigned int mask, int predicate) {
    const WarpValues values = exchange("__all_sync", mask, predicate != 0, file, line);
    for (int l = 0; l < 32; ++l)
        if ((values.mask >> l & 1) && !values.value[l]) return 0;
    return 1;
}

// The lanes of the mask whose value has the same bits as the caller's.
template <class T>
unsigned int match_any_sync(const char* file, int line, unsigned int mask, T value) {
    static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                  "__match_any_sync takes 32- or 64-bit values");
    const unsigned long long mine = to_bits(value);
    const WarpValues values = exchange("__match_any_sync", mask, mine, file, line);
    unsigned int bits = 0;
    for (int l = 0; l < 32; ++l)
        if ((values.mask >> l & 1) && values.value[l] == mine) bits |= 1u << l;
    return bits;
}

template <class T>
unsigned int match_all_sync(const char* file, int line, unsigned int mask, T value, int* pred) {
    static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                  "__match_all_sync takes 32- or 64-bit values");
    const unsigned long long mine = to_bits(value);
    const WarpValues values = exchange("__match_all_sync", mask, mine, file, line);
    for (int l = 0; l < 32; ++l) {
        if ((values.mask >> l & 1) && values.value[l] != mine) {
            *pred = 0;
            return 0;
        }
    }
    *pred = 1;
    return mask;
}

inline void syncwarp(const char* file, int line, unsigned int mask = 0xffffffffu) {
    exchange("__syncwarp", mask, 0, file, line);
}

}  // namespace emu

#define __shfl_sync(...) emu::shfl_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) emu::shfl_up_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) emu::shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) emu::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(...) emu::ballot_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __any_sync(...) emu::any_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __all_sync(...) emu::all_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __match_any_sync(...) emu::match_any_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __match_all_sync(...) emu::match_all_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __syncwarp(...) emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { __threadfence(); }

// Atomics: the second operand takes the pointee type, as CUDA's overloads do.
template <class T>
T atomicAdd(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T>
T atomicSub(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T>
T atomicAnd(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <class T>
T atomicOr(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <class T>
T atomicXor(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_xor(v); }
template <class T>
T atomicExch(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T>
T atomicCAS(T* p, std::type_identity_t<T> compare, std::type_identity_t<T> v) {
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, v);
    return compare;  // the old value either way
}
template <class T>
T atomicMax(T* p, std::type_identity_t<T> v) {
    std::atomic_ref<T> ref(*p);
    T old = ref.load();
    while (old < v && !ref.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T>
T atomicMin(T* p, std::type_identity_t<T> v) {
    std::atomic_ref<T> ref(*p);
    T old = ref.load();
    while (v < old && !ref.compare_exchange_weak(old, v)) {}
    return old;
}

// Reinterpretation and correctly rounded arithmetic intrinsics.
inline unsigned int __float_as_uint(float v) { return std::bit_cast<unsigned int>(v); }
inline float __uint_as_float(unsigned int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <class T>
T __ldg(const T* p) { return *p; }

// Bit counting, and the fast math intrinsics (exact here, approximate on
// the GPU: compare their results with a tolerance).
inline int __popc(unsigned int v) { return std::popcount(v); }
inline int __popcll(unsigned long long v) { return std::popcount(v); }
inline int __clz(int v) { return std::countl_zero(static_cast<unsigned int>(v)); }
inline int __clzll(long long v) { return std::countl_zero(static_cast<unsigned long long>(v)); }
inline int __ffs(int v) { return v ? std::countr_zero(static_cast<unsigned int>(v)) + 1 : 0; }
inline int __ffsll(long long v) {
    return v ? std::countr_zero(static_cast<unsigned long long>(v)) + 1 : 0;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// CUDA's min/max overloads for equal argument types.
template <class T>
T min(T a, T b) { return b < a ? b : a; }
template <class T>
T max(T a, T b) { return a < b ? b : a; }

// The ThreadSanitizer hooks g++ -fsanitize=thread calls (see emu::count);
// the atomics perform the operation itself (seq_cst).
#define EMU_HOOK extern "C" __attribute__((no_sanitize("thread"), visibility("default")))
EMU_HOOK void __tsan_init() {}
EMU_HOOK void __tsan_func_entry(void*) {}
EMU_HOOK void __tsan_func_exit() {}
EMU_HOOK void __tsan_vptr_update(void**, void*) {}
EMU_HOOK void __tsan_vptr_read(void**) {}
EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { emu::count(p, n, 0); }
EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { emu::count(p, n, 1); }
#define EMU_ACCESS(N)                                                                           \
    EMU_HOOK void __tsan_read##N(void* p) { emu::count(p, N, 0); }                              \
    EMU_HOOK void __tsan_write##N(void* p) { emu::count(p, N, 1); }                             \
    EMU_HOOK void __tsan_unaligned_read##N(void* p) { emu::count(p, N, 0); }                    \
    EMU_HOOK void __tsan_unaligned_write##N(void* p) { emu::count(p, N, 1); }                   \
    EMU_HOOK void __tsan_volatile_read##N(void* p) { emu::count(p, N, 0); }                     \
    EMU_HOOK void __tsan_volatile_write##N(void* p) { emu::count(p, N, 1); }
EMU_ACCESS(1)
EMU_ACCESS(2)
EMU_ACCESS(4)
EMU_ACCESS(8)
EMU_ACCESS(16)
#define EMU_RMW(N, T, OP, BUILTIN)                                                              \
    EMU_HOOK T __tsan_atomic##N##_##OP(volatile T* a, T v, int) {                               \
        emu::count(a, sizeof(T), 0);                                                            \
        emu::count(a, sizeof(T), 1);                                                            \
        return BUILTIN(a, v, __ATOMIC_SEQ_CST);                                                 \
    }
#define EMU_ATOMICS(N, T)                                                                       \
    EMU_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) {                              \
        emu::count(a, sizeof(T), 0);                                                            \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
    }                                                                                           \
    EMU_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) {                           \
        emu::count(a, sizeof(T), 1);                                                            \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                               \
    }                                                                                           \
    EMU_RMW(N, T, exchange, __atomic_exchange_n)                                                \
    EMU_RMW(N, T, fetch_add, __atomic_fetch_add)                                                \
    EMU_RMW(N, T, fetch_sub, __atomic_fetch_sub)                                                \
    EMU_RMW(N, T, fetch_and, __atomic_fetch_and)                                                \
    EMU_RMW(N, T, fetch_or, __atomic_fetch_or)                                                  \
    EMU_RMW(N, T, fetch_xor, __atomic_fetch_xor)                                                \
    EMU_RMW(N, T, fetch_nand, __atomic_fetch_nand)                                              \
    EMU_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int,      \
                                                            int) {                              \
        emu::count(a, sizeof(T), 0);                                                            \
        emu::count(a, sizeof(T), 1);                                                            \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST,                    \
                                           __ATOMIC_SEQ_CST);                                   \
    }                                                                                           \
    EMU_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int,        \
                                                          int) {                                \
        return __tsan_atomic##N##_compare_exchange_strong(a, c, v, 0, 0);                       \
    }                                                                                           \
    EMU_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {     \
        __tsan_atomic##N##_compare_exchange_strong(a, &c, v, 0, 0);                             \
        return c;                                                                               \
    }
EMU_ATOMICS(8, unsigned char)
EMU_ATOMICS(16, unsigned short)
EMU_ATOMICS(32, unsigned int)
EMU_ATOMICS(64, unsigned long long)
EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef EMU_ATOMICS
#undef EMU_RMW
#undef EMU_ACCESS
#undef EMU_HOOK
