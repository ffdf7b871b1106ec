// Per-(row, segment) percentile sparsification into CSR.
//
// The specification is in sparsify.py: for every row r and segment s of g
// (rows x n_cols, float32, C order) keep the entries whose |g| > threshold,
// where threshold = np.percentile(|g_rs| as float64, q) (NumPy's default
// 'linear' method).  The output must equal the NumPy path's bit for bit.
//
// Keys.  key(v) = bits(v) & 0x7FFFFFFF is |v| as an unsigned integer; for
// non-negative floats the integer order is the float order, so every
// comparison here is an integer one and flush-to-zero (CuPy compiles with
// -ftz=true) never touches a denormal.  NaN and Inf have keys >= 0x7F800000;
// the kernels raise a device-side flag for them.
//
// Threshold -> key bound.  With a = x_(lo) and b = x_(lo+1) the threshold thr
// lies in [a, b] and no entry lies strictly between a and b, so "|v| > thr"
// is "key(v) > key(a)" when thr < b and "key(v) > key(b)" when thr == b.
//
// The launch sequence (sparsify_launches in sparsify.py) reads g about twice:
//
//   1. sparsify_sample   one block per task (row, segment).  A segment of at
//      most `sample` entries (the host's per-segment plan) is staged in
//      shared memory once and resolved there: the exact order statistics,
//      the bound, and the kept count of each of its chunks.  A longer one
//      stages a sample (evenly spaced runs of 32 entries) and picks from it
//      two keys lo_key <= hi_key that bracket the target ranks with a margin.
//   2. sparsify_split    one block per chunk (blockDim.x * ITEMS entries) of
//      a sampled task: the one full read of g before the compaction.  Counts
//      the keys below lo_key (per task, a global atomic) and above hi_key
//      (per chunk), and appends the keys in [lo_key, hi_key] to the task's
//      candidate buffer (one global atomic per block, warp-aggregated
//      positions in shared memory).
//   3. sparsify_resolve  one block per sampled task: if the target ranks fall
//      among the candidates (and the buffer did not overflow), the exact
//      order statistics come from the candidates alone (staged in shared
//      memory when they fit), and each chunk's kept count is its count above
//      hi_key plus its candidates above the bound.  Otherwise the task is
//      marked for:
//   4. sparsify_fallback one block per marked task: the exact radix select
//      over the whole segment and the per-chunk counts (reads the segment
//      four more times; taken only when the sample misled).
//   5. cumsum of the per-chunk kept counts (host side of the sequence) gives
//      every chunk's output offset, in row-major chunk order.
//   6. sparsify_compact  one block per chunk: the second full read of g;
//      writes the kept entries in column order at the chunk's offset
//      (warp ballots and one block scan of the per-warp counts).
//
// Order statistics are found by an exact radix select (digits of 11, 10 and
// 10 key bits) with warp-aggregated histogram updates (__match_any_sync).
// Requirements of the launch: blockDim.x a power of two <= 1024.

#define BINS 2048           // the largest radix digit: key bits 30..20
#define ITEMS 16            // entries per thread in a chunk
#define SAMPLE_KEYS 8192    // shared-memory keys: a staged segment or sample
#define RUN 32              // consecutive entries per sample run
#define MAX_WARPS 32
#define KEY_MASK 0x7FFFFFFFu
#define NONFINITE_KEY 0x7F800000u
#define NO_BIN 0xFFFFFFFFu
#define INFO 8              // columns of the per-segment plan (sparsify.py)

__device__ __forceinline__ unsigned int abs_key(float v) {
    return __float_as_uint(v) & KEY_MASK;
}

// The lanes of the calling thread's warp that exist in the block.
__device__ __forceinline__ unsigned int warp_mask() {
    const unsigned int in_warp = blockDim.x - (threadIdx.x & ~31u);
    return in_warp >= 32 ? 0xFFFFFFFFu : (1u << in_warp) - 1u;
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

// Exclusive prefix sum of v over the threads of the block (warp shuffles,
// then the warp totals in `totals`, MAX_WARPS + 1 entries); *total gets the
// block sum.  Every thread of the block must call it.
__device__ unsigned int block_exclusive_scan(unsigned int v,
                                             unsigned int* totals,
                                             unsigned int* total) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int mask = warp_mask();
    unsigned int inclusive = v;
    for (unsigned int offset = 1; offset < 32; offset <<= 1) {
        const unsigned int up = __shfl_up_sync(mask, inclusive, offset);
        if (lane >= offset) inclusive += up;
    }
    if (((mask >> lane) >> 1) == 0u) totals[warp] = inclusive;  // last lane
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int run = 0;
        for (unsigned int w = 0; w < (blockDim.x + 31) / 32; ++w) {
            const unsigned int t = totals[w];
            totals[w] = run;
            run += t;
        }
        totals[MAX_WARPS] = run;
    }
    __syncthreads();
    const unsigned int exclusive = totals[warp] + inclusive - v;
    *total = totals[MAX_WARPS];
    __syncthreads();  // totals may be reused right after
    return exclusive;
}

// found[0] = the bin of histogram `hist` (nbins counts, a multiple of
// blockDim.x) holding rank `rank` (< the sum of the counts), found[1] = the
// count of the bins below it, found[2] = its count.  Every thread must
// call it; `found` is valid for all on return.
__device__ void select_bin(const unsigned int* hist, unsigned int nbins,
                           unsigned int rank, unsigned int* totals,
                           unsigned int* found) {
    const unsigned int per_thread = nbins / blockDim.x;
    const unsigned int first = threadIdx.x * per_thread;
    unsigned int sum = 0;
    for (unsigned int b = first; b < first + per_thread; ++b) sum += hist[b];
    unsigned int total;
    unsigned int below = block_exclusive_scan(sum, totals, &total);
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

// The key of rank `rank` (0-based) among keys(0 .. len), with the number of
// keys below it and equal to it.
struct Found {
    unsigned int key, below, equal;
};

// Exact radix select over keys(i), i < len (keys < 2^31): three passes,
// digits of 11, 10 and 10 bits, warp-aggregated shared histogram updates.
// Every thread must call it with the same arguments; the result is the
// same in every thread.
template <class Keys>
__device__ Found block_select(const Keys& keys, unsigned int len,
                              unsigned int rank, unsigned int* hist,
                              unsigned int* totals, unsigned int* found) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask = warp_mask();
    const int shifts[4] = {31, 20, 10, 0};
    Found result = {0u, 0u, 0u};
    for (int level = 0; level < 3; ++level) {
        const int prefix_shift = shifts[level];
        const int shift = shifts[level + 1];
        const unsigned int nbins = 1u << (prefix_shift - shift);
        for (unsigned int i = threadIdx.x; i < nbins; i += blockDim.x) {
            hist[i] = 0u;
        }
        __syncthreads();
        for (unsigned int base = 0; base < len; base += blockDim.x) {
            const unsigned int i = base + threadIdx.x;
            unsigned int digit = NO_BIN;
            if (i < len) {
                const unsigned int key = keys(i);
                if ((key >> prefix_shift) == result.key) {
                    digit = (key >> shift) & (nbins - 1u);
                }
            }
            const unsigned int peers = __match_any_sync(mask, digit);
            if (digit != NO_BIN && lane == (unsigned int)(__ffs(peers) - 1)) {
                atomicAdd(&hist[digit], (unsigned int)__popc(peers));
            }
        }
        __syncthreads();
        select_bin(hist, nbins, rank, totals, found);
        result.key = (result.key << (prefix_shift - shift)) | found[0];
        rank -= found[1];
        result.below += found[1];
        result.equal = found[2];
        __syncthreads();  // hist and found are rewritten next
    }
    return result;
}

// The least key > a among keys(0 .. len) (there is one: the caller knows).
template <class Keys>
__device__ unsigned int block_successor(const Keys& keys, unsigned int len,
                                        unsigned int a, unsigned int* least) {
    if (threadIdx.x == 0) *least = NO_BIN;
    __syncthreads();
    unsigned int mine = NO_BIN;
    for (unsigned int i = threadIdx.x; i < len; i += blockDim.x) {
        const unsigned int key = keys(i);
        if (key > a && key < mine) mine = key;
    }
    if (mine != NO_BIN) atomicMin(least, mine);
    __syncthreads();
    const unsigned int b = *least;
    __syncthreads();
    return b;
}

// NumPy's _lerp in float64, operation by operation (no contraction into
// fma, hence the _rn intrinsics), turned into the key bound: a when the
// threshold is below b, else b.
__device__ unsigned int key_bound(unsigned int a, unsigned int b,
                                  double gamma) {
    const double da = key_to_double(a);
    const double db = key_to_double(b);
    const double diff = __dsub_rn(db, da);
    const double threshold =
        gamma >= 0.5 ? __dsub_rn(db, __dmul_rn(diff, __dsub_rn(1.0, gamma)))
                     : __dadd_rn(da, __dmul_rn(diff, gamma));
    return threshold < db ? a : b;
}

// The bound of a task from keys(0 .. len), which hold the population ranks
// [offset, offset + len) of the segment (`offset` keys lie below all of
// them, and the target ranks lo <= hi = lo or lo + 1 are inside).
template <class Keys>
__device__ unsigned int exact_bound(const Keys& keys, unsigned int len,
                                    unsigned int offset, unsigned int lo,
                                    unsigned int hi, double gamma,
                                    unsigned int* hist, unsigned int* totals,
                                    unsigned int* found) {
    const Found a = block_select(keys, len, lo - offset, hist, totals, found);
    // b: a itself when rank hi holds a key equal to a, else the least key
    // above a (then exactly rank hi)
    const bool same = hi == lo || offset + a.below + a.equal > hi;
    const unsigned int b =
        same ? a.key : block_successor(keys, len, a.key, found);
    return key_bound(a.key, b, gamma);
}

// The plan of one segment (sparsify.py, segment_plan): info is int64
// (n_seg + 1, INFO), row s = [start column, lo, hi, sample length, sample
// rank of lo_key (-1: none), sample rank of hi_key (>= sample: none), first
// chunk of the segment within a row, candidate buffer offset within a row];
// row n_seg holds the ends (n_cols, the most candidates resolve stages in
// shared memory, -, -, -, -, chunks per row, candidate entries per row).
struct Segment {
    long long start, len, lo, hi, sample, sample_lo, sample_hi;
    long long chunk0, chunks, cand_offset, cand_capacity;
    long long chunks_per_row, cand_per_row, stage_keys;
    double gamma;
};

__device__ void load_segment(const long long* info, const double* gamma,
                             int n_seg, int s, Segment* seg) {
    const long long* row = info + (long long)s * INFO;
    const long long* next = row + INFO;
    const long long* end = info + (long long)n_seg * INFO;
    seg->start = row[0];
    seg->len = next[0] - row[0];
    seg->lo = row[1];
    seg->hi = row[2];
    seg->sample = row[3];
    seg->sample_lo = row[4];
    seg->sample_hi = row[5];
    seg->chunk0 = row[6];
    seg->chunks = next[6] - row[6];
    seg->cand_offset = row[7];
    seg->cand_capacity = next[7] - row[7];
    seg->chunks_per_row = end[6];
    seg->cand_per_row = end[7];
    seg->stage_keys = end[1];
    seg->gamma = gamma[s];
}

struct SharedKeys {
    const unsigned int* keys;
    __device__ unsigned int operator()(unsigned int i) const { return keys[i]; }
};

struct GlobalKeys {
    const unsigned int* keys;
    __device__ unsigned int operator()(unsigned int i) const { return keys[i]; }
};

struct SegmentKeys {
    const float* x;
    __device__ unsigned int operator()(unsigned int i) const {
        return abs_key(x[i]);
    }
};

// Entry i (< sample) of a sampled segment of `len` entries: `sample / RUN`
// runs of RUN consecutive entries, evenly spaced from the first entry to
// the last.
__device__ __forceinline__ long long sample_position(unsigned int i,
                                                     long long sample,
                                                     long long len) {
    const long long runs = sample / RUN;
    const long long run = i / RUN;
    const long long first = runs > 1 ? run * (len - RUN) / (runs - 1) : 0;
    return first + i % RUN;
}

// Grid: one block per task = row * n_seg + segment.  g: (rows, n_cols)
// float32; info, gamma: the plan; lo_key, hi_key, status, keep_above:
// per task; chunk_kept: int64 per chunk; bad: set to 1 on NaN or Inf.
// status: 1 = resolved here (keep_above and chunk_kept written), 0 =
// sampled (lo_key and hi_key written).
extern "C" __global__ void __launch_bounds__(MAX_WARPS * 32) sparsify_sample(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ info, const double* __restrict__ gamma,
        int n_seg, unsigned int* __restrict__ lo_key,
        unsigned int* __restrict__ hi_key, int* __restrict__ status,
        unsigned int* __restrict__ keep_above,
        long long* __restrict__ chunk_kept, int* __restrict__ bad) {
    __shared__ unsigned int keys[SAMPLE_KEYS];
    __shared__ unsigned int hist[BINS];
    __shared__ unsigned int totals[MAX_WARPS + 1];
    __shared__ unsigned int found[3];
    __shared__ Segment seg;
    const long long task = blockIdx.x;
    const long long row = task / n_seg;
    const int s = (int)(task - row * n_seg);
    if (threadIdx.x == 0) load_segment(info, gamma, n_seg, s, &seg);
    __syncthreads();
    const float* x = g + row * n_cols + seg.start;
    const unsigned int sample = (unsigned int)seg.sample;
    const bool exact = seg.sample == seg.len;
    bool nonfinite = false;
    for (unsigned int i = threadIdx.x; i < sample; i += blockDim.x) {
        const unsigned int key =
            abs_key(x[exact ? i : sample_position(i, seg.sample, seg.len)]);
        nonfinite |= key >= NONFINITE_KEY;
        keys[i] = key;
    }
    if (nonfinite) atomicOr(bad, 1);
    __syncthreads();
    const SharedKeys staged = {keys};
    if (!exact) {
        const unsigned int low =
            seg.sample_lo < 0
                ? 0u
                : block_select(staged, sample, (unsigned int)seg.sample_lo,
                               hist, totals, found).key;
        const unsigned int high =
            seg.sample_hi >= seg.sample
                ? KEY_MASK
                : block_select(staged, sample, (unsigned int)seg.sample_hi,
                               hist, totals, found).key;
        if (threadIdx.x == 0) {
            lo_key[task] = low;
            hi_key[task] = high;
            status[task] = 0;
        }
        return;
    }
    const unsigned int bound =
        exact_bound(staged, sample, 0u, (unsigned int)seg.lo,
                    (unsigned int)seg.hi, seg.gamma, hist, totals, found);
    // kept entries per chunk of the segment (chunks <= SAMPLE_KEYS / ITEMS
    // <= BINS counters), warp-aggregated
    const unsigned int chunk = blockDim.x * ITEMS;
    for (unsigned int c = threadIdx.x; c < seg.chunks; c += blockDim.x) {
        hist[c] = 0u;
    }
    __syncthreads();
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask = warp_mask();
    for (unsigned int base = 0; base < sample; base += blockDim.x) {
        const unsigned int i = base + threadIdx.x;
        const unsigned int c =
            i < sample && keys[i] > bound ? i / chunk : NO_BIN;
        const unsigned int peers = __match_any_sync(mask, c);
        if (c != NO_BIN && lane == (unsigned int)(__ffs(peers) - 1)) {
            atomicAdd(&hist[c], (unsigned int)__popc(peers));
        }
    }
    __syncthreads();
    const long long first_chunk = row * seg.chunks_per_row + seg.chunk0;
    for (unsigned int c = threadIdx.x; c < seg.chunks; c += blockDim.x) {
        chunk_kept[first_chunk + c] = hist[c];
    }
    if (threadIdx.x == 0) {
        keep_above[task] = bound;
        status[task] = 1;
    }
}

// A chunk of the launch: its task and entries x[0 .. len).
struct Chunk {
    long long task, row, index;
    const float* x;
    long long first_column;
    unsigned int len;
};

__device__ void load_chunk(const float* g, long long n_cols,
                           const long long* info, const double* gamma,
                           int n_seg, const int* chunk_seg, Segment* seg,
                           Chunk* chunk) {
    const long long chunks_per_row = info[(long long)n_seg * INFO + 6];
    chunk->index = blockIdx.x;
    chunk->row = chunk->index / chunks_per_row;
    const long long local = chunk->index - chunk->row * chunks_per_row;
    const int s = chunk_seg[local];
    load_segment(info, gamma, n_seg, s, seg);
    chunk->task = chunk->row * n_seg + s;
    const long long size = (long long)blockDim.x * ITEMS;
    const long long offset = (local - seg->chunk0) * size;
    chunk->first_column = seg->start + offset;
    chunk->x = g + chunk->row * n_cols + chunk->first_column;
    chunk->len = (unsigned int)(seg->len - offset < size ? seg->len - offset
                                                         : size);
}

// Grid: one block per chunk (row-major: row * chunks_per_row + chunk of the
// row).  For the tasks that sparsify_sample left sampled (status 0): below
// (per task) += keys < lo_key; chunk_kept[chunk] = keys > hi_key; the keys
// in [lo_key, hi_key] go to the task's region of cand, at cand_start[chunk]
// (cand_count[chunk] of them), reserved through cand_n (per task; past the
// region's capacity nothing is written, and resolve sees the overflow).
extern "C" __global__ void __launch_bounds__(MAX_WARPS * 32) sparsify_split(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ info, const double* __restrict__ gamma,
        int n_seg, const int* __restrict__ chunk_seg,
        const int* __restrict__ status, const unsigned int* __restrict__ lo_key,
        const unsigned int* __restrict__ hi_key,
        unsigned int* __restrict__ below, unsigned int* __restrict__ cand_n,
        unsigned int* __restrict__ cand,
        unsigned int* __restrict__ cand_start,
        unsigned int* __restrict__ cand_count,
        long long* __restrict__ chunk_kept, int* __restrict__ bad) {
    __shared__ Segment seg;
    __shared__ Chunk chunk;
    __shared__ unsigned int limits[3];      // status, lo_key, hi_key
    __shared__ unsigned int counts[3];      // below, above, candidates
    __shared__ unsigned int cursor, base;
    if (threadIdx.x == 0) {
        load_chunk(g, n_cols, info, gamma, n_seg, chunk_seg, &seg, &chunk);
        limits[0] = (unsigned int)status[chunk.task];
        limits[1] = lo_key[chunk.task];
        limits[2] = hi_key[chunk.task];
        counts[0] = counts[1] = counts[2] = 0u;
        cursor = 0u;
    }
    __syncthreads();
    if (limits[0] != 0u) return;  // resolved by sparsify_sample
    const unsigned int low = limits[1], high = limits[2];
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask = warp_mask();
    unsigned int keys[ITEMS];
    bool nonfinite = false;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {  // coalesced, independent loads first
        const unsigned int i = j * blockDim.x + threadIdx.x;
        keys[j] = i < chunk.len ? abs_key(chunk.x[i]) : NO_BIN;
    }
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const unsigned int key = keys[j];
        const bool in = key != NO_BIN;
        nonfinite |= in && key >= NONFINITE_KEY;
        const unsigned int n_below = __popc(__ballot_sync(mask, in && key < low));
        const unsigned int n_above = __popc(__ballot_sync(mask, in && key > high));
        const unsigned int n_cand =
            __popc(__ballot_sync(mask, in && key >= low && key <= high));
        if (lane == 0) {
            if (n_below) atomicAdd(&counts[0], n_below);
            if (n_above) atomicAdd(&counts[1], n_above);
            if (n_cand) atomicAdd(&counts[2], n_cand);
        }
    }
    if (nonfinite) atomicOr(bad, 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        if (counts[0]) atomicAdd(&below[chunk.task], counts[0]);
        chunk_kept[chunk.index] = counts[1];
        base = counts[2] ? atomicAdd(&cand_n[chunk.task], counts[2]) : 0u;
        cand_start[chunk.index] = base;
        cand_count[chunk.index] = counts[2];
    }
    __syncthreads();
    if ((long long)base + counts[2] > seg.cand_capacity) return;  // overflow
    unsigned int* out = cand + chunk.row * seg.cand_per_row + seg.cand_offset +
                        base;
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const unsigned int key = keys[j];
        const bool take = key != NO_BIN && key >= low && key <= high;
        const unsigned int ballot = __ballot_sync(mask, take);
        unsigned int first = 0u;
        if (lane == 0 && ballot) first = atomicAdd(&cursor, (unsigned int)__popc(ballot));
        first = __shfl_sync(mask, first, 0);
        if (take) out[first + __popc(ballot & ((1u << lane) - 1u))] = key;
    }
}

// Grid: one block per task.  For a sampled task (status 0): the exact bound
// from its candidates when the target ranks lie among them (keep_above,
// chunk_kept[chunk] += candidates above it), else status = 2.
extern "C" __global__ void __launch_bounds__(MAX_WARPS * 32) sparsify_resolve(
        const long long* __restrict__ info, const double* __restrict__ gamma,
        int n_seg, int* __restrict__ status,
        const unsigned int* __restrict__ below,
        const unsigned int* __restrict__ cand_n,
        const unsigned int* __restrict__ cand,
        const unsigned int* __restrict__ cand_start,
        const unsigned int* __restrict__ cand_count,
        unsigned int* __restrict__ keep_above,
        long long* __restrict__ chunk_kept) {
    __shared__ unsigned int keys[SAMPLE_KEYS];
    __shared__ unsigned int hist[BINS];
    __shared__ unsigned int totals[MAX_WARPS + 1];
    __shared__ unsigned int found[3];
    __shared__ Segment seg;
    __shared__ unsigned int state[3];  // status, below, candidates
    const long long task = blockIdx.x;
    const long long row = task / n_seg;
    const int s = (int)(task - row * n_seg);
    if (threadIdx.x == 0) {
        load_segment(info, gamma, n_seg, s, &seg);
        state[0] = (unsigned int)status[task];
        state[1] = state[0] == 0u ? below[task] : 0u;
        state[2] = state[0] == 0u ? cand_n[task] : 0u;
    }
    __syncthreads();
    if (state[0] != 0u) return;
    const unsigned int offset = state[1], n = state[2];
    if (n > seg.cand_capacity || offset > seg.lo || offset + n <= seg.hi) {
        if (threadIdx.x == 0) status[task] = 2;  // the sample misled
        return;
    }
    const unsigned int* mine = cand + row * seg.cand_per_row + seg.cand_offset;
    const bool fits = n <= seg.stage_keys;  // <= SAMPLE_KEYS
    if (fits) {
        for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
            keys[i] = mine[i];
        }
        __syncthreads();
    }
    const SharedKeys staged = {keys};
    const GlobalKeys global = {mine};
    const unsigned int bound =
        fits ? exact_bound(staged, n, offset, (unsigned int)seg.lo,
                           (unsigned int)seg.hi, seg.gamma, hist, totals, found)
             : exact_bound(global, n, offset, (unsigned int)seg.lo,
                           (unsigned int)seg.hi, seg.gamma, hist, totals, found);
    const long long first_chunk = row * seg.chunks_per_row + seg.chunk0;
    for (long long c = first_chunk + threadIdx.x; c < first_chunk + seg.chunks;
         c += blockDim.x) {
        const unsigned int start = cand_start[c], stop = start + cand_count[c];
        unsigned int kept = 0;
        for (unsigned int i = start; i < stop; ++i) {
            kept += (fits ? keys[i] : mine[i]) > bound;
        }
        chunk_kept[c] += kept;
    }
    if (threadIdx.x == 0) keep_above[task] = bound;
}

// Grid: one block per task.  For a task resolve marked (status 2): the
// exact bound from the whole segment and every chunk's kept count.
extern "C" __global__ void __launch_bounds__(MAX_WARPS * 32) sparsify_fallback(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ info, const double* __restrict__ gamma,
        int n_seg, const int* __restrict__ status,
        unsigned int* __restrict__ keep_above,
        long long* __restrict__ chunk_kept) {
    __shared__ unsigned int hist[BINS];
    __shared__ unsigned int totals[MAX_WARPS + 1];
    __shared__ unsigned int found[3];
    __shared__ Segment seg;
    __shared__ int state;
    __shared__ unsigned int kept;
    const long long task = blockIdx.x;
    const long long row = task / n_seg;
    const int s = (int)(task - row * n_seg);
    if (threadIdx.x == 0) {
        load_segment(info, gamma, n_seg, s, &seg);
        state = status[task];
    }
    __syncthreads();
    if (state != 2) return;
    const SegmentKeys keys = {g + row * n_cols + seg.start};
    const unsigned int bound =
        exact_bound(keys, (unsigned int)seg.len, 0u, (unsigned int)seg.lo,
                    (unsigned int)seg.hi, seg.gamma, hist, totals, found);
    const unsigned int size = blockDim.x * ITEMS;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask = warp_mask();
    const long long first_chunk = row * seg.chunks_per_row + seg.chunk0;
    for (long long c = 0; c < seg.chunks; ++c) {
        if (threadIdx.x == 0) kept = 0u;
        __syncthreads();
        const unsigned int first = (unsigned int)c * size;
        for (unsigned int j = 0; j < ITEMS; ++j) {
            const unsigned int i = first + j * blockDim.x + threadIdx.x;
            const bool keep = i < seg.len && keys(i) > bound;
            const unsigned int n = __popc(__ballot_sync(mask, keep));
            if (lane == 0 && n) atomicAdd(&kept, n);
        }
        __syncthreads();
        if (threadIdx.x == 0) chunk_kept[first_chunk + c] = kept;
        __syncthreads();
    }
    if (threadIdx.x == 0) keep_above[task] = bound;
}

// Grid: one block per chunk, as sparsify_split.  keep_above: per task;
// ends: int64 inclusive cumsum of chunk_kept.  Writes the chunk's kept
// entries to indices (int32 column) and data (float32, bit for bit) at
// [ends[chunk - 1], ends[chunk]), in column order.
extern "C" __global__ void __launch_bounds__(MAX_WARPS * 32) sparsify_compact(
        const float* __restrict__ g, long long n_cols,
        const long long* __restrict__ info, const double* __restrict__ gamma,
        int n_seg, const int* __restrict__ chunk_seg,
        const unsigned int* __restrict__ keep_above,
        const long long* __restrict__ ends, int* __restrict__ indices,
        float* __restrict__ data) {
    __shared__ Segment seg;
    __shared__ Chunk chunk;
    __shared__ unsigned int bound_shared;
    __shared__ long long out;
    __shared__ unsigned int offsets[ITEMS * MAX_WARPS];
    __shared__ unsigned int ballots[ITEMS * MAX_WARPS];  // kept lanes
    __shared__ unsigned int totals[MAX_WARPS + 1];
    if (threadIdx.x == 0) {
        load_chunk(g, n_cols, info, gamma, n_seg, chunk_seg, &seg, &chunk);
        bound_shared = keep_above[chunk.task];
        out = chunk.index == 0 ? 0 : ends[chunk.index - 1];
    }
    __syncthreads();
    const unsigned int bound = bound_shared;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int warps = (blockDim.x + 31) / 32;
    const unsigned int mask = warp_mask();
    unsigned int bits[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {  // coalesced, independent loads first
        const unsigned int i = j * blockDim.x + threadIdx.x;
        bits[j] = i < chunk.len ? __float_as_uint(chunk.x[i]) : 0u;
    }
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const unsigned int i = j * blockDim.x + threadIdx.x;
        const unsigned int ballot = __ballot_sync(
            mask, i < chunk.len && (bits[j] & KEY_MASK) > bound);
        if (lane == 0) {
            ballots[j * warps + warp] = ballot;
            offsets[j * warps + warp] = __popc(ballot);
        }
    }
    __syncthreads();
    // exclusive scan of the (item, warp) counts in that order: each thread
    // sums a run of them, one block scan, then the runs are rewritten
    const unsigned int entries = ITEMS * warps;
    const unsigned int per_thread = (entries + blockDim.x - 1) / blockDim.x;
    const unsigned int first = threadIdx.x * per_thread;
    unsigned int sum = 0;
    for (unsigned int e = first; e < first + per_thread && e < entries; ++e) {
        sum += offsets[e];
    }
    unsigned int total;
    unsigned int run = block_exclusive_scan(sum, totals, &total);
    for (unsigned int e = first; e < first + per_thread && e < entries; ++e) {
        const unsigned int count = offsets[e];
        offsets[e] = run;
        run += count;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const unsigned int ballot = ballots[j * warps + warp];
        if ((ballot >> lane) & 1u) {
            const unsigned int i = j * blockDim.x + threadIdx.x;
            const long long position = out + offsets[j * warps + warp] +
                                       __popc(ballot & ((1u << lane) - 1u));
            indices[position] = (int)(chunk.first_column + i);
            data[position] = __uint_as_float(bits[j]);
        }
    }
}
