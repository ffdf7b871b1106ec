"""The CPU emulation harness itself: CUDA semantics it must reproduce and the
misuse it must catch."""
import numpy as np
import pytest

from cuda_emulation import EmulatedModule, EmulationError, kernel_names, require_tool

SOURCE = r'''
extern "C" __global__ void block_sums(const float* x, float* out, int n) {
    __shared__ float partial[256];
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < (unsigned int)n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

extern "C" __global__ void reverse_blocks(const int* x, int* y) {
    extern __shared__ int buffer[];
    const unsigned int base = blockIdx.x * blockDim.x;
    buffer[threadIdx.x] = x[base + threadIdx.x];
    __syncthreads();
    y[base + threadIdx.x] = buffer[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void atomics(unsigned int* counter, int* maximum,
                                   float* total, unsigned long long* cas_count) {
    atomicAdd(counter, 1u);
    atomicMax(maximum, (int)(blockIdx.x * blockDim.x + threadIdx.x));
    atomicAdd(total, 0.5f);
    unsigned long long old = *cas_count, seen;
    do {
        seen = old;
        old = atomicCAS(cas_count, seen, seen + 1);
    } while (old != seen);
}

extern "C" __global__ void thread_ids(int* out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    out[block * blockDim.x * blockDim.y * blockDim.z + thread] = block * 1000 + thread;
}

extern "C" __global__ void scalar_types(double d, long long q, unsigned int u,
                                        signed char c, double* out) {
    out[0] = d;
    out[1] = (double)q;
    out[2] = u;
    out[3] = c;
}

extern "C" __global__ void bit_counts(const unsigned int* x, int* out) {
    const unsigned int i = threadIdx.x;
    out[3 * i] = __popc(x[i]);
    out[3 * i + 1] = __clz((int)x[i]);
    out[3 * i + 2] = __ffs((int)x[i]);
}

extern "C" __global__ void divergent_barrier(int* out) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

extern "C" __global__ void return_before_barrier(int* out, int n) {
    if (threadIdx.x >= (unsigned int)n) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void overrun(int* out, int n) {
    out[n + threadIdx.x] = 7;
}

template <typename T, int STEP>
__global__ void strided_fill(T* out, T value) {
    __shared__ T first[1];
    if (threadIdx.x == 0) first[0] = value;
    __syncthreads();
    out[threadIdx.x * STEP] = first[0] + (T)threadIdx.x;
}
'''
TEMPLATES = ('strided_fill<float, 2>', 'strided_fill<long long, 1>')


@pytest.fixture(scope='module')
def module():
    require_tool('g++')
    return EmulatedModule(SOURCE, 'test_kernels.cu',
                          name_expressions=TEMPLATES)


def test_kernel_names():
    assert kernel_names(SOURCE) == [
        'block_sums', 'reverse_blocks', 'atomics', 'thread_ids', 'scalar_types',
        'bit_counts', 'divergent_barrier', 'return_before_barrier', 'overrun']


def test_template_kernels_through_name_expressions(module):
    floats = np.zeros(8, dtype=np.float32)
    module.launch('strided_fill<float, 2>', (1,), (4,), 0,
                  (floats, np.float32(0.5)))
    np.testing.assert_array_equal(floats, [0.5, 0, 1.5, 0, 2.5, 0, 3.5, 0])
    integers = np.zeros(3, dtype=np.int64)
    module.launch('strided_fill<long long, 1>', (1,), (3,), 0,
                  (integers, np.int64(10)))
    np.testing.assert_array_equal(integers, [10, 11, 12])
    assert module.signatures['strided_fill<float, 2>'] == ['f4*', 'f4']
    with pytest.raises(EmulationError, match='no kernel'):
        module.launch('strided_fill', (1,), (1,), 0, (integers, np.int64(1)))


def test_static_shared_memory_and_barriers_across_blocks(module, rng):
    x = rng.integers(-50, 50, size=1000).astype(np.float32)
    out = np.zeros(8, dtype=np.float32)
    module.launch('block_sums', (8,), (128,), 0, (x, out, np.int32(1000)))
    expected = np.add.reduceat(np.append(x, np.zeros(24, np.float32)),
                               np.arange(0, 1024, 128))
    np.testing.assert_array_equal(out, expected)


def test_dynamic_shared_memory(module):
    x = np.arange(96, dtype=np.int32)
    y = np.zeros_like(x)
    module.launch('reverse_blocks', (3,), (32,), 32 * 4, (x, y))
    np.testing.assert_array_equal(y, x.reshape(3, 32)[:, ::-1].reshape(-1))


def test_atomics(module):
    counter = np.zeros(1, dtype=np.uint32)
    maximum = np.full(1, -1, dtype=np.int32)
    total = np.zeros(1, dtype=np.float32)
    cas_count = np.zeros(1, dtype=np.uint64)
    module.launch('atomics', (4,), (64,), 0, (counter, maximum, total, cas_count))
    assert (counter[0], maximum[0], total[0], cas_count[0]) == (256, 255, 128.0, 256)


def test_three_dimensional_grid_and_block(module):
    out = np.full(6 * 16, -1, dtype=np.int32)
    module.launch('thread_ids', (2, 3, 1), (4, 2, 2), 0, (out,))
    expected = (np.arange(6)[:, None] * 1000 + np.arange(16)).reshape(-1)
    np.testing.assert_array_equal(out, expected)


def test_scalar_arguments(module):
    out = np.zeros(4)
    assert module.signatures['scalar_types'] == ['f8', 'i8', 'u4', 'i1', 'f8*']
    module.launch('scalar_types', (1,), (1,), 0,
                  (np.float64(0.1), np.int64(-2**40), np.uint32(2**32 - 1),
                   np.int8(-7), out))
    assert out.tolist() == [0.1, -2.0**40, 2.0**32 - 1, -7.0]


def test_bit_counting_intrinsics(module):
    x = np.array([0, 1, 0x80000000, 0xF0, 0xFFFFFFFF], dtype=np.uint32)
    out = np.zeros(15, dtype=np.int32)
    module.launch('bit_counts', (1,), (5,), 0, (x, out))
    expected = [[bin(v).count('1'), 32 - int(v).bit_length(),
                 (int(v) & -int(v)).bit_length()] for v in x.tolist()]
    assert out.reshape(5, 3).tolist() == expected


@pytest.mark.parametrize('args, message', [
    ((np.zeros(4, dtype=np.int32), 1), 'expected a NumPy i4 scalar, got int'),
    ((np.zeros(4, dtype=np.int32), np.int64(1)), 'expected a NumPy i4 scalar'),
    ((np.zeros(4, dtype=np.int64), np.int32(1)), 'expected a i4 array'),
    ((np.zeros(8, dtype=np.int32)[::2], np.int32(1)), 'not C-contiguous'),
    ((np.zeros(4, dtype=np.int32),), 'takes 2 arguments')])
def test_argument_checks(module, args, message):
    with pytest.raises(TypeError, match=message):
        module.launch('return_before_barrier', (1,), (1,), 0, args)


@pytest.mark.parametrize('grid, block, shared', [
    ((0,), (32,), 0), ((1,), (2048,), 0), ((1,), (32, 32, 2), 0), ((1,), (32,), 64 * 1024)])
def test_invalid_configurations(module, grid, block, shared):
    with pytest.raises(EmulationError):
        module.launch('thread_ids', grid, block, shared, (np.zeros(4096, np.int32),))


def test_divergent_barrier_fails(module):
    lines = SOURCE.splitlines()
    first = lines.index('extern "C" __global__ void divergent_barrier(int* out) {')
    one, two = [number + 1 for number in range(first, first + 6)
                if '__syncthreads' in lines[number]]
    # which branch reaches the barrier first varies from run to run
    message = (rf'waits at __syncthreads\(\) test_kernels.cu:({one}, others at '
               rf'test_kernels.cu:{two}|{two}, others at test_kernels.cu:{one})')
    with pytest.raises(EmulationError, match=message):
        module.launch('divergent_barrier', (2,), (8,), 0, (np.zeros(8, np.int32),))


def test_return_before_barrier_fails(module):
    out = np.zeros(8, dtype=np.int32)
    module.launch('return_before_barrier', (2,), (8,), 0, (out, np.int32(8)))
    assert out.tolist() == [1] * 8
    with pytest.raises(EmulationError, match='return'):
        module.launch('return_before_barrier', (2,), (8,), 0, (out, np.int32(5)))


def test_out_of_bounds_write_is_detected(module):
    out = np.zeros(8, dtype=np.int32)
    module.launch('overrun', (1,), (4,), 0, (out, np.int32(4)))
    assert out.tolist() == [0] * 4 + [7] * 4
    with pytest.raises(EmulationError, match='wrote outside argument 0'):
        module.launch('overrun', (1,), (4,), 0, (out, np.int32(6)))


# --- warp intrinsics, shared memory limits and poisoning, global traffic ---

WARP_SOURCE = r'''
// Some lanes arrive late: a shuffle that did not wait for every lane of its
// mask (or read a lane's value before the lane deposited it) would differ.
__device__ void stagger() {
    if (threadIdx.x % 3 == 0) {
        volatile int spin = 0;
        for (int k = 0; k < 3000; ++k) spin = spin + k;
    }
}

// A barrier, then at once a warp vote, many times: the thread that
// completes the barrier runs on while the others are still being woken.
extern "C" __global__ void barrier_then_vote(int* out, int rounds) {
    __shared__ int flag[64];
    int votes = 0;
    for (int r = 0; r < rounds; ++r) {
        flag[threadIdx.x] = (threadIdx.x + r) % 3 == 0;
        __syncthreads();
        votes += __popc(__ballot_sync(0xffffffffu, flag[threadIdx.x ^ 1]));
        __syncthreads();
    }
    out[threadIdx.x] = votes;
}

extern "C" __global__ void rotate(const int* x, int* out, int rounds) {
    const int lane = threadIdx.x % 32;
    int v = x[threadIdx.x];
    for (int r = 0; r < rounds; ++r) {
        stagger();
        v = __shfl_sync(0xffffffffu, v, lane + 1);  // lane 31 reads lane 0
    }
    out[threadIdx.x] = v;
}

extern "C" __global__ void shuffles(const float* x, const double* d, float* out,
                                    double* out_d) {
    const float v = x[threadIdx.x];
    float* o = out + 8 * threadIdx.x;
    stagger();
    o[0] = __shfl_up_sync(0xffffffffu, v, 3);
    o[1] = __shfl_down_sync(0xffffffffu, v, 5);
    o[2] = __shfl_xor_sync(0xffffffffu, v, 6);
    o[3] = __shfl_sync(0xffffffffu, v, 2, 8);
    o[4] = __shfl_up_sync(0xffffffffu, v, 2, 8);
    o[5] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[6] = __shfl_xor_sync(0xffffffffu, v, 12, 8);
    o[7] = __shfl_sync(0xffffffffu, v, -1);
    out_d[threadIdx.x] = __shfl_xor_sync(0xffffffffu, d[threadIdx.x], 1);
}

extern "C" __global__ void votes(const int* key, unsigned int* out) {
    const unsigned int lane = threadIdx.x % 32;
    unsigned int* o = out + 8 * threadIdx.x;
    stagger();
    o[0] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    o[1] = __any_sync(0xffffffffu, lane == 17);
    o[2] = __any_sync(0xffffffffu, lane > 40);
    o[3] = __all_sync(0xffffffffu, lane < 32);
    o[4] = __all_sync(0xffffffffu, lane < 31);
    o[5] = __match_any_sync(0xffffffffu, key[threadIdx.x]);
    int all = -1;
    o[6] = __match_all_sync(0xffffffffu, key[threadIdx.x] / 100, &all);
    o[7] = all;
    if (lane < 16) out[8 * 64 + 16 * (threadIdx.x / 32) + lane] = __ballot_sync(0x0000ffffu, lane & 1);
}

extern "C" __global__ void warp_sum(const unsigned int* x, unsigned int* out) {
    unsigned int v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) {
        stagger();
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    out[threadIdx.x] = v;
}

extern "C" __global__ void syncwarp_exchange(int* out) {
    __shared__ int slot[64];
    const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
    stagger();
    slot[threadIdx.x] = 100 * threadIdx.x;
    __syncwarp();
    out[threadIdx.x] = slot[base + (lane + 1) % 32];
    __syncwarp(0xffffffffu);
}

extern "C" __global__ void misuse(int* out, int which) {
    const int lane = threadIdx.x % 32;
    int v = lane;
    if (which == 0) {            // two masks at once
        v = __shfl_sync(lane < 16 ? 0x0000ffffu : 0xffffffffu, v, 0);
    } else if (which == 1) {     // a mask without the caller's lane
        v = __shfl_sync(0x0000fffeu, v, 1);
    } else if (which == 2) {     // lane 0 at a block barrier, the rest shuffle
        if (lane == 0) __syncthreads(); else v = __shfl_sync(0xffffffffu, v, 1);
    } else if (which == 3) {     // lane 5 returns before the shuffle
        if (lane == 5) return;
        v = __shfl_sync(0xffffffffu, v, 1);
    } else if (which == 4) {     // reads a lane outside the mask
        if (lane < 2) v = __shfl_sync(0x3u, v, 5);
    } else if (which == 5) {     // width not a power of two
        v = __shfl_sync(0xffffffffu, v, 1, 3);
    } else if (which == 6) {     // a full mask in a block of 16 threads
        v = __shfl_sync(0xffffffffu, v, 1);
    } else if (which == 7) {     // different intrinsics, one mask
        if (lane < 16) v = __ballot_sync(0xffffffffu, 1); else __syncwarp();
    }
    out[threadIdx.x] = v;
}

extern "C" __global__ void large_dynamic_shared(const int* x, int* out, int n) {
    extern __shared__ int big[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) big[i] = x[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        long long sum = 0;
        for (int i = 0; i < n; ++i) sum += big[n - 1 - i] * (long long)(i + 1);
        out[0] = (int)(sum % 1000003);
    }
}

extern "C" __global__ void read_before_write(unsigned int* out) {
    __shared__ unsigned int scratch[4];
    __shared__ double value;
    out[5 * blockIdx.x + threadIdx.x] = scratch[threadIdx.x];
    if (threadIdx.x == 0) out[5 * blockIdx.x + 4] = value != value;  // NaN
    __syncthreads();
    scratch[threadIdx.x] = 7;
    value = 0.0;
}

extern "C" __global__ void traffic(const float* x, float* y, const int* twice,
                                   unsigned int* counter, int n) {
    __shared__ float stage[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        stage[threadIdx.x] = x[i];
        y[i] = stage[threadIdx.x] + 1.0f;
    }
    if (i < 10) {
        const volatile int* t = twice;
        y[i] += (float)(t[i] + t[i]);
        atomicAdd(counter, 1u);
    }
}
'''


@pytest.fixture(scope='module')
def warps():
    require_tool('g++')
    return EmulatedModule(WARP_SOURCE, 'warp_kernels.cu')


def lanes(block):
    """Lane id of each thread of a 1-D block."""
    return np.arange(block) % 32


def test_warp_intrinsic_right_after_a_barrier(warps):
    """Threads released by a __syncthreads() count as running at once: the
    last one to arrive may reach a warp intrinsic before the others are
    scheduled again, which is no misuse."""
    out = np.zeros(64, dtype=np.int32)
    warps.launch('barrier_then_vote', (2,), (64,), 0, (out, np.int32(300)))
    flags = [[(t + r) % 3 == 0 for t in range(64)] for r in range(300)]
    expected = [sum(sum(f[(t // 32) * 32:(t // 32) * 32 + 32]) for f in flags)
                for t in range(64)]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('rounds', [1, 5, 32])
def test_shuffle_is_lockstep(warps, rounds):
    x = np.arange(64, dtype=np.int32) * 10 + 1
    out = np.zeros(64, dtype=np.int32)
    warps.launch('rotate', (2,), (64,), 0, (x, out, np.int32(rounds)))
    # every lane reads its neighbour's value of the same round: after
    # `rounds` rounds lane l holds the original value of lane l + rounds
    expected = np.concatenate([w * 32 + (np.arange(32) + rounds) % 32 for w in (0, 1)])
    np.testing.assert_array_equal(out, x[expected])


def shuffle_oracle(values, kind, operand, width=32):
    """CUDA's rules for one shuffle of a warp's ``values`` (32)."""
    result = []
    for lane in range(32):
        base = lane & ~(width - 1)
        if kind == 'idx':
            source = base + (operand & (width - 1))
        elif kind == 'up':
            source = lane - operand if lane - operand >= base else lane
        elif kind == 'down':
            source = lane + operand if lane + operand < base + width else lane
        else:
            source = lane ^ operand
            source = source if source < base + width else lane
        result.append(values[source])
    return np.array(result)


def test_shuffle_variants_and_widths(warps, rng):
    x = rng.standard_normal(64).astype(np.float32)
    d = rng.standard_normal(64)
    out = np.zeros((64, 8), dtype=np.float32)
    out_d = np.zeros(64)
    warps.launch('shuffles', (1,), (64,), 0, (x, d, out, out_d))
    cases = [('up', 3, 32), ('down', 5, 32), ('xor', 6, 32), ('idx', 2, 8),
             ('up', 2, 8), ('down', 3, 16), ('xor', 12, 8), ('idx', -1, 32)]
    for w in (0, 1):
        warp = slice(32 * w, 32 * w + 32)
        for column, (kind, operand, width) in enumerate(cases):
            np.testing.assert_array_equal(
                out[warp, column], shuffle_oracle(x[warp], kind, operand, width),
                err_msg=f'{kind} {operand} width {width}')
        np.testing.assert_array_equal(out_d[warp], shuffle_oracle(d[warp], 'xor', 1))
    # hand-checked lanes: up 3 keeps lanes 0-2; xor 12 in width 8 reads an
    # earlier segment (lane 13 -> 1) but not a later one (lane 1 keeps its own)
    assert out[1, 0] == x[1] and out[5, 0] == x[2]
    assert out[13, 6] == x[1] and out[1, 6] == x[1]


def test_votes_and_matches(warps):
    key = np.array([lane // 4 * 100 + lane % 2 for lane in range(32)] * 2, np.int32)
    out = np.zeros(8 * 64 + 32, dtype=np.uint32)
    warps.launch('votes', (1,), (64,), 0, (key, out))
    table = out[:8 * 64].reshape(64, 8)
    every_third = sum(1 << lane for lane in range(0, 32, 3))
    assert (table[:, 0] == every_third).all()
    assert (table[:, 1] == 1).all() and (table[:, 2] == 0).all()
    assert (table[:, 3] == 1).all() and (table[:, 4] == 0).all()
    for thread in range(64):
        lane = thread % 32
        same = sum(1 << other for other in range(32)
                   if key[other] == key[lane])
        assert table[thread, 5] == same, thread
    assert (table[:, 6] == 0).all() and (table[:, 7] == 0).all()  # keys differ
    # a half-warp ballot counts only the lanes of its mask
    assert (out[8 * 64:] == 0xAAAA).all()


def test_match_all_when_equal(warps):
    key = np.full(32, 250, dtype=np.int32)  # key / 100 == 2 everywhere
    out = np.zeros(8 * 64 + 32, dtype=np.uint32)
    warps.launch('votes', (1,), (32,), 0, (np.concatenate([key, key]), out))
    table = out[:8 * 32].reshape(32, 8)
    assert (table[:, 6] == 0xFFFFFFFF).all() and (table[:, 7] == 1).all()
    assert (table[:, 5] == 0xFFFFFFFF).all()


def test_butterfly_reduction(warps, rng):
    x = rng.integers(0, 1000, size=96).astype(np.uint32)
    out = np.zeros(96, dtype=np.uint32)
    warps.launch('warp_sum', (1,), (96,), 0, (x, out))
    np.testing.assert_array_equal(out, np.repeat(x.reshape(3, 32).sum(1), 32))


def test_syncwarp_orders_shared_memory(warps):
    out = np.zeros(64, dtype=np.int32)
    warps.launch('syncwarp_exchange', (3,), (64,), 0, (out,))
    expected = [100 * (t - t % 32 + (t % 32 + 1) % 32) for t in range(64)]
    assert out.tolist() == expected


@pytest.mark.parametrize('which, block, message', [
    # lanes 0-15 may finish their (valid) half-warp shuffle and return
    # before lanes 16-31 name them in a full mask: either report is right
    (0, 32, r'__shfl_sync\(mask 0x(0000ffff|ffffffff)\) at warp_kernels.cu:\d+'
            r'(, other lanes __shfl_sync| while lane \d+ has returned)'),
    (1, 32, 'without its own lane'),
    (2, 32, '__syncthreads'),
    (3, 32, 'return'),
    (4, 32, 'reading lane 5 outside its mask'),
    (5, 32, 'width 3'),
    (6, 16, 'lanes its block lacks'),
    (7, 32, 'other lanes')])
def test_warp_misuse_fails_the_launch(warps, which, block, message):
    with pytest.raises(EmulationError, match=message):
        warps.launch('misuse', (1,), (block,), 0, (np.zeros(block, np.int32), np.int32(which)))


def test_dynamic_shared_memory_above_48k_is_opt_in(warps, rng):
    n = 20_000                     # 80,000 bytes of int
    x = rng.integers(-1000, 1000, size=n).astype(np.int32)
    out = np.zeros(1, dtype=np.int32)
    args = (x, out, np.int32(n))
    with pytest.raises(EmulationError, match='set_max_dynamic_shared_size_bytes'):
        warps.launch('large_dynamic_shared', (1,), (128,), 4 * n, args)
    warps.set_max_dynamic_shared_size_bytes('large_dynamic_shared', 4 * n)
    warps.launch('large_dynamic_shared', (1,), (128,), 4 * n, args)
    total = int((x[::-1].astype(np.int64) * np.arange(1, n + 1)).sum())
    expected = int(np.fmod(total, 1000003))  # C's %: the sign of the dividend
    assert out[0] == expected
    with pytest.raises(EmulationError, match='more than 80000'):
        warps.launch('large_dynamic_shared', (1,), (128,), 4 * n + 4, args)
    # the opt-in limits of the architectures: 227 KiB on sm_90, 163 on sm_80
    warps.set_max_dynamic_shared_size_bytes('large_dynamic_shared', 227 * 1024)
    with pytest.raises(EmulationError, match='outside'):
        warps.set_max_dynamic_shared_size_bytes('large_dynamic_shared', 227 * 1024 + 1)
    ampere = EmulatedModule(WARP_SOURCE, 'warp_kernels.cu', arch='sm_80')
    with pytest.raises(EmulationError, match='sm_80'):
        ampere.set_max_dynamic_shared_size_bytes('large_dynamic_shared', 164 * 1024)
    with pytest.raises(EmulationError, match='unknown arch'):
        EmulatedModule(WARP_SOURCE, 'warp_kernels.cu', arch='sm_70')


def test_static_shared_memory_is_poisoned_for_every_block(warps):
    out = np.zeros(5 * 3, dtype=np.uint32)
    warps.launch('read_before_write', (3,), (4,), 0, (out,))
    # blocks 1 and 2 run after a block wrote 7s and 0.0: they still see poison
    assert out.reshape(3, 5).tolist() == [[0xFFFFFFFF] * 4 + [1]] * 3


def test_global_traffic_counter(warps):
    n = 100
    x = np.arange(n, dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    twice = np.arange(10, dtype=np.int32)
    counter = np.zeros(1, dtype=np.uint32)
    counts = warps.launch('traffic', (2,), (64,), 0,
                          (x, y, twice, counter, np.int32(n)))
    # x: one 4-byte load per element; y: one store per element, plus a load
    # and a store for the first 10; twice: two volatile loads for the first
    # 10; counter: 10 atomic read-modify-writes; shared memory and scalars
    # are not global memory
    assert counts.by_argument == {0: (4 * n, 0), 1: (4 * 10, 4 * n + 4 * 10),
                                  2: (2 * 4 * 10, 0), 3: (4 * 10, 4 * 10)}
    assert counts.read == 4 * n + 40 + 80 + 40
    assert counts.written == 4 * n + 40 + 40
    np.testing.assert_array_equal(y, x + 1 + np.where(np.arange(n) < 10, 2 * np.arange(n), 0))
    assert counter[0] == 10


def test_traffic_of_the_sparsify_kernels(rng):
    """The counter on a real launch sequence (g of 4 x 25,000 float32, 512
    threads): the 5,000-entry segment is staged whole by sparsify_sample;
    of the 20,000-entry one it reads a sample of 1,504 entries, split reads
    it once; the compaction reads all of g once: 2.06 reads of g, and at
    most 2.2 x the bytes of g from every argument together."""
    from cuda_emulation import package_module
    from gradnet_cupy.kernels.sparsify import (check_q, segment_offsets,
                                               sparsify_launch_sequence)

    g = rng.standard_normal((4, 25_000)).astype(np.float32)
    module = package_module('sparsify.cu')
    reads, total = {}, []

    def launch(name, grid, block, shared_mem, args):
        counts = module.launch(name, grid, block, shared_mem, args)
        if args[0] is g:
            reads[name] = counts.by_argument[0][0] / g.nbytes
        total.append(counts.read)

    sparsify_launch_sequence(g, segment_offsets([20_000, 5_000], g.shape[1]),
                             check_q(85.0) / 100.0, launch, np, 512)
    assert reads == {'sparsify_sample': (5_000 + 1_504) / 25_000,
                     'sparsify_split': 20_000 / 25_000,
                     'sparsify_fallback': 0.0, 'sparsify_compact': 1.0}
    assert sum(total) <= 2.2 * g.nbytes
