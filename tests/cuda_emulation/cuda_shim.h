// CPU emulation of the CUDA subset our kernels use (tests/cuda_emulation).
//
// A .cu file is compiled unchanged as C++20 after this header.  A launch runs
// the blocks of the grid one after another; the threads of a block are host
// threads that stay alive for the whole launch, so
//   __shared__          is `static` storage, shared by the threads and kept
//                       from one block to the next (as uninitialised as on
//                       the GPU: a kernel must clear what it accumulates),
//   extern __shared__   (rewritten by emulator.py into a pointer) is a
//                       per-launch buffer filled with 0xFF bytes,
//   __syncthreads()     is a barrier that is strict where CUDA is undefined:
//                       all threads must wait at the same one, and none may
//                       return while others wait at one or reach one later
//                       (the launch fails with a message naming the lines),
//   atomics             are std::atomic_ref operations.
// Not emulated (a kernel using them does not compile here): warp intrinsics
// (__shfl*, __ballot*, __syncwarp, ...), __syncthreads_count/and/or, inline
// PTX, textures, cooperative groups.  Float arithmetic keeps IEEE denormals
// (CuPy's -ftz=true flushes them): do denormal-sensitive logic on integer
// bit patterns.  The __d*_rn / __f*_rn intrinsics are plain operations
// (emulator.py compiles with -ffp-contract=off).

#pragma once

#include <atomic>
#include <barrier>
#include <bit>
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
#define __shared__ static
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

// Thrown out of __syncthreads() once the block's barrier is broken.
struct BarrierError : std::exception {};

// The barrier of one block, strict where CUDA is undefined: all threads of
// the block must wait at the same __syncthreads() (file and line), and no
// thread may return while others wait at one or will reach one later.
// Such a divergence breaks the barrier: the launch fails with a message.
class BlockBarrier {
  public:
    void reset(int threads) {
        std::lock_guard<std::mutex> lock(mutex_);
        expected_ = threads;
        arrived_ = 0;
        exited_ = 0;
    }

    void arrive_and_wait(const char* file, int line) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (exited_ > 0) {
            fail(describe("reached __syncthreads() at", file, line) +
                 " after another thread of its block returned");
        } else if (arrived_ > 0 && (line != line_ || std::strcmp(file, file_))) {
            fail(describe("waits at __syncthreads()", file, line) +
                 ", others at " + file_ + ":" + std::to_string(line_));
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
            wake();
            return;
        }
        // Sleep on the wake counter without the mutex, so that the woken
        // threads do not queue for it (a futex wait on Linux).
        unsigned int seen = wakes_.load(std::memory_order_acquire);
        lock.unlock();
        for (;;) {
            wakes_.wait(seen, std::memory_order_acquire);
            seen = wakes_.load(std::memory_order_acquire);
            std::lock_guard<std::mutex> relock(mutex_);
            if (generation_ != generation) return;
            if (broken_) throw BarrierError();
        }
    }

    // A thread has finished the kernel (returned or left by BarrierError).
    void exit() {
        std::lock_guard<std::mutex> lock(mutex_);
        ++exited_;
        if (arrived_ > 0) {
            fail(describe("returned while others wait at __syncthreads()", file_, line_));
        }
    }

    bool broken() {
        std::lock_guard<std::mutex> lock(mutex_);
        return broken_;
    }

    const std::string& message() const { return message_; }

  private:
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
        wake();
    }

    // Wakes the waiting threads (called with mutex_ held).
    void wake() {
        wakes_.fetch_add(1, std::memory_order_release);
        wakes_.notify_all();
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
};

struct Launch {
    BlockBarrier barrier;
    std::vector<std::max_align_t> dynamic_shared;
};

inline thread_local Launch* current = nullptr;

inline void* dynamic_shared() { return current->dynamic_shared.data(); }

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cvref_t<A>*>(args[I])...);
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) where args[i] points
// to the value of argument i.  Returns 0, or 1 with a message in `error`
// (of `error_size` bytes) when a barrier divergence broke the launch.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes,
           void** args, char* error, std::size_t error_size) {
    const unsigned int threads = block.x * block.y * block.z;
    Launch state;
    const std::size_t words =
        (shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    state.dynamic_shared.resize(words);
    std::memset(state.dynamic_shared.data(), 0xFF, words * sizeof(std::max_align_t));
    state.barrier.reset(threads);
    bool stop = false;
    std::barrier block_done(threads, [&]() noexcept {
        stop = state.barrier.broken();
        state.barrier.reset(threads);
    });
    auto worker = [&](unsigned int t) {
        current = &state;
        blockDim = block;
        gridDim = grid;
        threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
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
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& thread : pool) thread.join();
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
