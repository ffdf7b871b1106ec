// Per-(row, segment) percentile sparsification into CSR.
//
// The specification is the NumPy reference in sparsify.py: for every row r and
// segment s of g (rows x n_cols, float32, C order) keep the entries whose
// |g| > threshold, where threshold = np.percentile(|g_rs| as float64, q)
// (NumPy's default 'linear' method).  The launch sequence (in sparsify.py):
//
//   1. percentile_select  one block per (row, segment) task: finds the two
//      order statistics the percentile interpolates between by an exact radix
//      select, computes the threshold like NumPy, and writes for the task the
//      key bound T (an entry is kept iff its key > T) and the kept count.
//   2. cumsum of the counts (on the host side of the launch sequence).
//   3. percentile_compact one block per task: writes the kept entries, in
//      ascending column order, at the task's offset of the CSR arrays.
//
// Keys.  key(v) = bits(v) & 0x7FFFFFFF is |v| as an unsigned integer; for
// non-negative floats the integer order is the float order, so every
// comparison here is an integer one and flush-to-zero (CuPy compiles with
// -ftz=true) never touches a denormal.  NaN and Inf have keys >= 0x7F800000;
// the select kernel raises a device-side flag for them.
//
// Threshold -> key bound.  With a = x_(lo) and b = x_(lo+1) the threshold thr
// lies in [a, b] (NumPy's lerp, evaluated in float64, cannot leave the
// interval) and no entry lies strictly between a and b.  So
// "|v| > thr" is "key(v) > key(a)" when thr < b and "key(v) > key(b)" when
// thr == b: the kernels never compare floats.
//
// Requirements of the launch: blockDim.x a power of two <= 1024; every
// segment length >= 1 and < 2^31.  No warp intrinsics are used, so the
// source also runs on the CPU through tests/cuda_emulation.

#define MAX_BLOCK 1024
#define TOP_BINS 2048      // radix digits: key bits 30..20, 19..10, 9..0
#define COMPACT_ITEMS 8    // consecutive entries per thread in the compaction
#define KEY_MASK 0x7FFFFFFFu
#define NONFINITE_KEY 0x7F800000u

__device__ __forceinline__ unsigned int abs_key(float v) {
    return __float_as_uint(v) & KEY_MASK;
}

// Exact float64 value of a finite non-negative float32 given by its bits,
// built without a float operation (a float -> double conversion would flush
// denormals under -ftz=true).
__device__ double key_to_double(unsigned int key) {
    const unsigned int exponent = key >> 23;
    const unsigned int mantissa = key & 0x7FFFFFu;
    if (exponent == 0) {  // zero or denormal: mantissa * 2^-149, exact
        return __dmul_rn((double)mantissa, 0x1p-149);
    }
    return __longlong_as_double(((long long)(exponent + 896) << 52) |
                                ((long long)mantissa << 29));
}

// Exclusive prefix sum of v over the threads of the block (Hillis-Steele in
// shared memory `buf` of blockDim.x entries); *total gets the block sum.
// Every thread of the block must call it.
__device__ unsigned int block_exclusive_scan(unsigned int v, unsigned int* buf,
                                             unsigned int* total) {
    const unsigned int tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (unsigned int offset = 1; offset < blockDim.x; offset <<= 1) {
        const unsigned int add = tid >= offset ? buf[tid - offset] : 0u;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    const unsigned int inclusive = buf[tid];
    *total = buf[blockDim.x - 1];
    __syncthreads();  // buf may be reused right after
    return inclusive - v;
}

// Finds the bin holding rank `rank` (0-based) of a histogram of `nbins`
// counts (nbins a multiple of blockDim.x, rank < sum of the counts):
// found[0] = bin, found[1] = count of the bins below it, found[2] = its
// count.  Every thread of the block must call it; `found` is valid for all
// threads on return, until they call select_bin again (which writes it only
// after the barriers of its scan).
__device__ void select_bin(const unsigned int* hist, unsigned int nbins,
                           unsigned int rank, unsigned int* buf,
                           unsigned int* found) {
    const unsigned int per_thread = nbins / blockDim.x;
    const unsigned int first = threadIdx.x * per_thread;
    unsigned int sum = 0;
    for (unsigned int b = first; b < first + per_thread; ++b) sum += hist[b];
    unsigned int total;
    unsigned int below = block_exclusive_scan(sum, buf, &total);
    if (below <= rank && rank < below + sum) {  // exactly one thread
        for (unsigned int b = first; b < first + per_thread; ++b) {
            if (rank < below + hist[b]) {
                found[0] = b;
                found[1] = below;
                found[2] = hist[b];
                break;
            }
            below += hist[b];
        }
    }
    __syncthreads();
}

// Task (row, segment) of the block: its entries x[0..len) and first column.
struct Task {
    const float* x;
    long long first_column;
    unsigned int len;
};

__device__ Task block_task(const float* g, long long n_cols,
                           const long long* seg_start, int n_seg) {
    const long long task = blockIdx.x;
    const long long row = task / n_seg;
    const int seg = (int)(task - row * n_seg);
    Task t;
    t.first_column = seg_start[seg];
    t.len = (unsigned int)(seg_start[seg + 1] - seg_start[seg]);
    t.x = g + row * n_cols + t.first_column;
    return t;
}

// Grid: one block per task, task = row * n_seg + segment.
// g: (rows, n_cols) float32; seg_start: (n_seg + 1,) int64 column offsets;
// quantile = q / 100 as float64.  Writes per task keep_above (uint32 key
// bound) and counts (int64 kept entries); sets *bad = 1 on NaN or Inf.
extern "C" __global__ void percentile_select(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ seg_start, int n_seg, double quantile,
        unsigned int* __restrict__ keep_above, long long* __restrict__ counts,
        int* __restrict__ bad) {
    __shared__ unsigned int hist[2][TOP_BINS];
    __shared__ unsigned int buf[MAX_BLOCK];
    __shared__ unsigned int found[3];
    const Task task = block_task(g, n_cols, seg_start, n_seg);
    const unsigned int tid = threadIdx.x;

    // NumPy: virtual index (n - 1) * quantile, order statistics floor() and
    // floor() + 1 (both the last one when the index reaches n - 1), gamma
    // the fractional part.
    const double last = (double)(task.len - 1);
    const double virtual_index = __dmul_rn(last, quantile);
    unsigned int rank[2];
    double gamma = 0.0;
    if (virtual_index >= last) {
        rank[0] = rank[1] = task.len - 1;
    } else {
        rank[0] = (unsigned int)virtual_index;
        rank[1] = rank[0] + 1;
        gamma = __dsub_rn(virtual_index, (double)rank[0]);
    }

    // Radix select of both ranks at once, most significant digit first.
    // prefix[t]: the key bits of target t fixed so far; rank[t]: its rank
    // among the entries sharing that prefix; below[t]: entries with a
    // smaller key; equal[t]: entries with the target's key (after the last
    // level).
    unsigned int prefix[2] = {0u, 0u};
    unsigned int below[2] = {0u, 0u};
    unsigned int equal[2] = {0u, 0u};
    bool nonfinite = false;
    const int shifts[4] = {31, 20, 10, 0};
    for (int level = 0; level < 3; ++level) {
        const int prefix_shift = shifts[level];
        const int shift = shifts[level + 1];
        const unsigned int nbins = 1u << (prefix_shift - shift);
        const bool one_hist = prefix[0] == prefix[1];
        for (unsigned int i = tid; i < 2 * TOP_BINS; i += blockDim.x) {
            hist[i / TOP_BINS][i % TOP_BINS] = 0u;
        }
        __syncthreads();
        for (unsigned int i = tid; i < task.len; i += blockDim.x) {
            const unsigned int key = abs_key(task.x[i]);
            if (level == 0) nonfinite |= key >= NONFINITE_KEY;
            const unsigned int top = key >> prefix_shift;  // 0 at level 0
            const unsigned int digit = (key >> shift) & (nbins - 1);
            if (top == prefix[0]) atomicAdd(&hist[0][digit], 1u);
            if (!one_hist && top == prefix[1]) atomicAdd(&hist[1][digit], 1u);
        }
        __syncthreads();
        for (int t = 0; t < 2; ++t) {
            select_bin(hist[one_hist ? 0 : t], nbins, rank[t], buf, found);
            prefix[t] = (prefix[t] << (prefix_shift - shift)) | found[0];
            rank[t] -= found[1];
            below[t] += found[1];
            equal[t] = found[2];
        }
    }
    if (nonfinite) atomicOr(bad, 1);

    if (tid == 0) {
        // NumPy's _lerp in float64, operation by operation (no contraction
        // into fma, hence the _rn intrinsics).
        const double a = key_to_double(prefix[0]);
        const double b = key_to_double(prefix[1]);
        const double diff = __dsub_rn(b, a);
        const double threshold =
            gamma >= 0.5 ? __dsub_rn(b, __dmul_rn(diff, __dsub_rn(1.0, gamma)))
                         : __dadd_rn(a, __dmul_rn(diff, gamma));
        const int t = threshold < b ? 0 : 1;
        keep_above[blockIdx.x] = prefix[t];
        counts[blockIdx.x] = (long long)(task.len - below[t] - equal[t]);
    }
}

// Shared-memory tile index with one pad word per 32 entries, so that threads
// reading COMPACT_ITEMS consecutive entries hit distinct banks.
#define PADDED(i) ((i) + ((i) >> 5))

// Grid: one block per task, as percentile_select.  keep_above from
// percentile_select; ends: (tasks,) int64 inclusive cumsum of its counts.
// Writes the kept entries of each task to indices (int32 column) and data
// (float32 value, bit for bit) at positions [ends[task-1], ends[task]).
extern "C" __global__ void percentile_compact(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ seg_start, int n_seg,
        const unsigned int* __restrict__ keep_above,
        const long long* __restrict__ ends, int* __restrict__ indices,
        float* __restrict__ data) {
    __shared__ unsigned int tile[PADDED(MAX_BLOCK * COMPACT_ITEMS)];
    __shared__ unsigned int buf[MAX_BLOCK];
    const Task task = block_task(g, n_cols, seg_start, n_seg);
    const unsigned int tid = threadIdx.x;
    const unsigned int bound = keep_above[blockIdx.x];
    long long out = blockIdx.x == 0 ? 0 : ends[blockIdx.x - 1];
    const unsigned int tile_len = blockDim.x * COMPACT_ITEMS;

    for (unsigned int base = 0; base < task.len; base += tile_len) {
        const unsigned int m = min(tile_len, task.len - base);
        for (unsigned int i = tid; i < m; i += blockDim.x) {  // coalesced
            tile[PADDED(i)] = __float_as_uint(task.x[base + i]);
        }
        __syncthreads();
        const unsigned int first = tid * COMPACT_ITEMS;
        unsigned int kept = 0;
        for (unsigned int i = first; i < first + COMPACT_ITEMS && i < m; ++i) {
            kept += (tile[PADDED(i)] & KEY_MASK) > bound;
        }
        unsigned int tile_kept;
        long long pos = out + block_exclusive_scan(kept, buf, &tile_kept);
        for (unsigned int i = first; i < first + COMPACT_ITEMS && i < m; ++i) {
            const unsigned int bits = tile[PADDED(i)];
            if ((bits & KEY_MASK) > bound) {
                indices[pos] = (int)(task.first_column + base + i);
                data[pos] = __uint_as_float(bits);
                ++pos;
            }
        }
        out += tile_kept;
        __syncthreads();  // the tile is overwritten next
    }
}
