// Sparse block-diagonal outer-product accumulation: G_b += w_i t_i[b] t_i[b]^T.
//
// The specification is the NumPy reference in block_outer.py. The launch
// (also in block_outer.py) gives every thread block one TILE x TILE output
// tile of one diagonal block G_b, upper triangle only (tile_row <= tile_col):
// an off-diagonal tile also writes its mirror image, so every entry of G is
// owned by exactly one thread block and no global atomics are needed.
//
// A thread block walks the rows in chunks of ROW_CHUNK. First every thread
// finds, for its own rows of the chunk, by binary search on the row's sorted
// column indices, the run of nonzeros inside the tile's row range A and the
// run inside its column range B (independent searches, so their latencies
// overlap). Then the threads, as GROUPS groups of blockDim.x / GROUPS, take
// the chunk's rows in lock step, one row per group and round (one
// __syncthreads per round): every pair (j in A, k in B) of the row is a
// distinct tile entry, so the group's threads add w * (t_j * t_k) to the
// group's private shared-memory tile without atomics. Which thread of a group adds which pair does not change any sum (each
// entry of a group's tile gets one term per row, the rows of the group in
// order), so the launch may pick the threads per group freely: block_outer.py
// gives double tiles 64 threads per group, so that the 32 KiB of tiles are
// shared by 256 threads (50% occupancy on sm_80, shared-memory bound).
// At the end the GROUPS private tiles are summed in group order and added to
// G. The order of every sum is fixed, so the result is deterministic; the work per (row, tile) is
// two to four binary searches plus one term per pair of nonzeros.
//
// Terms and sums are formed in G's type T (float or double); t_j * t_k is
// computed first, so that the tile entries (j, k) and (k, j) of a diagonal
// tile get bitwise equal terms and G stays exactly symmetric.
//
// No warp intrinsics are used, so the source also runs on the CPU through
// tests/cuda_emulation.

#define TILE 32
#define ROW_CHUNK 256  // rows whose runs are searched at once: 8 KiB

// First position p in [lo, hi) with indices[p] >= value (hi when none).
__device__ long long first_at_least(const int* indices, long long lo,
                                 long long hi, long long value) {
    while (lo < hi) {
        const long long mid = lo + (hi - lo) / 2;
        if (indices[mid] < value) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Instantiated (CuPy name expressions, see block_outer.py) as
// block_outer<float, 8> and block_outer<double, 4>: GROUPS private tiles of
// TILE x TILE entries take 32 KiB of shared memory either way. Launch: one
// thread block per tile, blockDim.x a multiple of GROUPS (blockDim.x / GROUPS
// threads per group).
template <typename T, int GROUPS>
__global__ void block_outer(
        const long long* indptr, const int* indices, const float* data,
        const float* weights, long long rows, const long long* starts,
        const long long* sizes, const long long* offsets,
        const int* tile_block, const int* tile_row, const int* tile_col,
        T* G) {
    __shared__ T tiles[GROUPS * TILE * TILE];
    __shared__ long long runs[ROW_CHUNK][4];
    const int tile = blockIdx.x;
    const int block = tile_block[tile];
    const long long start = starts[block];
    const long long size = sizes[block];
    const long long a_first = start + (long long)tile_row[tile] * TILE;
    const long long b_first = start + (long long)tile_col[tile] * TILE;
    const long long a_end =
        a_first + TILE < start + size ? a_first + TILE : start + size;
    const long long b_end =
        b_first + TILE < start + size ? b_first + TILE : start + size;
    const bool diagonal = a_first == b_first;
    const int group_threads = blockDim.x / GROUPS;
    const int group = threadIdx.x / group_threads;
    const int lane = threadIdx.x % group_threads;
    T* mine = tiles + group * TILE * TILE;

    for (int e = threadIdx.x; e < GROUPS * TILE * TILE; e += blockDim.x) {
        tiles[e] = (T)0;
    }
    for (long long chunk = 0; chunk < rows; chunk += ROW_CHUNK) {
        // every thread searches the runs of its own rows of the chunk ...
        for (int i = threadIdx.x; i < ROW_CHUNK; i += blockDim.x) {
            const long long row = chunk + i;
            if (row < rows) {
                const long long end = indptr[row + 1];
                const long long a0 = first_at_least(indices, indptr[row], end,
                                                    a_first);
                const long long a1 = first_at_least(indices, a0, end, a_end);
                // off the diagonal, range B lies right of range A
                runs[i][0] = a0;
                runs[i][1] = a1;
                runs[i][2] = diagonal ? a0 : first_at_least(indices, a1, end,
                                                            b_first);
                runs[i][3] = diagonal ? a1 : first_at_least(indices, runs[i][2],
                                                            end, b_end);
            }
        }
        __syncthreads();
        // ... then each group adds the pairs of one row per round
        for (int round = 0; round < ROW_CHUNK && chunk + round < rows;
             round += GROUPS) {
            const int i = round + group;
            if (chunk + i < rows) {
                const long long a0 = runs[i][0];
                const long long b0 = runs[i][2];
                const int na = (int)(runs[i][1] - a0);
                const int nb = (int)(runs[i][3] - b0);
                const T w = (T)weights[chunk + i];
                for (int p = lane; p < na * nb; p += group_threads) {
                    const long long j = a0 + p / nb;
                    const long long k = b0 + p % nb;
                    const T product = (T)data[j] * (T)data[k];
                    mine[(indices[j] - a_first) * TILE +
                         (indices[k] - b_first)] += w * product;
                }
            }
            __syncthreads();
        }
    }
    __syncthreads();  // the tiles are complete (or just cleared: no rows)
    for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
        T sum = tiles[e];
        for (int g = 1; g < GROUPS; ++g) {
            sum += tiles[g * TILE * TILE + e];
        }
        const long long a = a_first - start + e / TILE;  // row of G_b
        const long long b = b_first - start + e % TILE;  // column of G_b
        if (a < size && b < size) {
            G[offsets[block] + a * size + b] += sum;
            if (!diagonal) {
                G[offsets[block] + b * size + a] += sum;
            }
        }
    }
}
