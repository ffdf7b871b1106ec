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
