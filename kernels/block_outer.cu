// Sparse block-diagonal outer-product accumulation: G_b += w_i t_i[b] t_i[b]^T.
//
// The specification is the NumPy reference in block_outer.py; the launch
// sequence is sparse_launch there.  The selected blocks are cut into strips
// of TILE columns; `boundaries` are the first columns of the strips and the
// ends of the blocks, in ascending order (K of them), and `at_most[c]` is
// the number of boundaries <= column c.
//
//   1. block_outer_positions  one thread block per CSR row, one pass over
//      the row's entries (O(nnz) in all): pos[k * rows + i] = the first
//      entry of row i (relative to indptr[i]) whose column is >= boundary
//      k.  An entry writes the boundaries between its predecessor's column
//      and its own, so each (k, i) is written exactly once; no search.
//      The entries of row i in strip s are [pos[k_s], pos[k_s + 1]).
//   2. block_outer_rows       one thread block per strip: the rows with an
//      entry in it, ascending (rows[s * n_rows + j], count[s]), by warp
//      ballots and one block scan per blockDim.x rows.
//   3. block_outer<T, WARPS>  one thread block per upper-triangle TILE x TILE
//      tile (strip a, strip b) of a block: it visits only the rows of the
//      shorter of the two strips' row lists (a row missing from the other
//      strip adds zeros), ROWS at a time: their runs of entries in both
//      strips are densified into shared-memory panels (zeros elsewhere),
//      then warp w accumulates tile rows [w * TILE / WARPS, (w + 1) * TILE /
//      WARPS) and lane k column k in registers: three barriers per ROWS
//      rows.  An off-diagonal tile also writes its mirror image, so every
//      entry of G is owned by one thread block; no atomics.
//
// Every entry's terms w * (t_j * t_k) are added in row order into one
// accumulator of G's type T, which is then added to G: deterministic, the
// mirrored entries of a diagonal tile get bitwise equal terms (so G stays
// exactly symmetric), and the order does not depend on WARPS.  A row adds
// a term to entry (j, k) only when it has entries at both j and k.

#define TILE 32
#define ROWS 32             // rows densified at once
#define MAX_WARPS 32

__device__ __forceinline__ unsigned int warp_mask() {
    const unsigned int in_warp = blockDim.x - (threadIdx.x & ~31u);
    return in_warp >= 32 ? 0xFFFFFFFFu : (1u << in_warp) - 1u;
}

// Grid: one block per row.  indptr: int64 (rows + 1,); indices: int32;
// at_most: int32 (n_columns,); pos: int32 (n_boundaries * rows,).
extern "C" __global__ void block_outer_positions(
        const long long* __restrict__ indptr, const int* __restrict__ indices,
        long long rows, const int* __restrict__ at_most, int n_boundaries,
        int* __restrict__ pos) {
    __shared__ long long range[2];
    const long long row = blockIdx.x;
    if (threadIdx.x == 0) {
        range[0] = indptr[row];
        range[1] = indptr[row + 1];
    }
    __syncthreads();
    const long long first = range[0];
    const int len = (int)(range[1] - range[0]);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask = warp_mask();
    for (int base = 0; base < len; base += blockDim.x) {
        const int p = base + (int)threadIdx.x;
        const bool in = p < len;
        const int column = in ? indices[first + p] : 0;
        const int here = in ? at_most[column] : n_boundaries;
        // the predecessor's boundary count: from the lane below, or read
        int before = __shfl_up_sync(mask, here, 1);
        if (lane == 0) {
            before = p == 0 || !in ? 0 : at_most[indices[first + p - 1]];
        }
        if (in) {
            for (int k = before; k < here; ++k) pos[(long long)k * rows + row] = p;
            if (p == len - 1) {  // boundaries after the last entry
                for (int k = here; k < n_boundaries; ++k) {
                    pos[(long long)k * rows + row] = len;
                }
            }
        }
    }
    if (len == 0) {
        for (int k = threadIdx.x; k < n_boundaries; k += blockDim.x) {
            pos[(long long)k * rows + row] = 0;
        }
    }
}

// Grid: one block per strip.  strip_boundary: int32 (strips,) the boundary
// index of each strip's first column (its end is the next boundary).
// Writes rows_of[s * rows + j] (int32, ascending) and count[s].
extern "C" __global__ void block_outer_rows(
        const int* __restrict__ pos, long long rows,
        const int* __restrict__ strip_boundary, int* __restrict__ rows_of,
        int* __restrict__ count) {
    __shared__ unsigned int totals[MAX_WARPS + 1];
    __shared__ int boundary;
    __shared__ long long found;
    const long long strip = blockIdx.x;
    if (threadIdx.x == 0) {
        boundary = strip_boundary[strip];
        found = 0;
    }
    __syncthreads();
    const int* begin = pos + (long long)boundary * rows;
    const int* end = begin + rows;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int mask = warp_mask();
    const unsigned int warps = (blockDim.x + 31) / 32;
    int* out = rows_of + strip * rows;
    for (long long base = 0; base < rows; base += blockDim.x) {
        const long long row = base + threadIdx.x;
        const bool touches = row < rows && end[row] > begin[row];
        const unsigned int ballot = __ballot_sync(mask, touches);
        if (((mask >> lane) >> 1) == 0u) totals[warp] = __popc(ballot);
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int run = 0;
            for (unsigned int w = 0; w < warps; ++w) {
                const unsigned int t = totals[w];
                totals[w] = run;
                run += t;
            }
            totals[MAX_WARPS] = run;
        }
        __syncthreads();
        if (touches) {
            out[found + totals[warp] + __popc(ballot & ((1u << lane) - 1u))] =
                (int)row;
        }
        __syncthreads();
        if (threadIdx.x == 0) found += totals[MAX_WARPS];
    }
    __syncthreads();
    if (threadIdx.x == 0) count[strip] = (int)found;
}

// Instantiated (CuPy name expressions, see block_outer.py) as
// block_outer<float, 8> and block_outer<double, 8>: launched with 32 * WARPS
// threads, one block per tile.  tile_block, tile_row, tile_col: the tile's
// block and strips within it; strip_first: int32 (k,) the first strip of
// each block (-1 for blocks not selected).
template <typename T, int WARPS>
__global__ void block_outer(
        const long long* __restrict__ indptr, const int* __restrict__ indices,
        const float* __restrict__ data, const float* __restrict__ weights,
        long long rows, const int* __restrict__ pos,
        const int* __restrict__ strip_boundary,
        const int* __restrict__ rows_of, const int* __restrict__ count,
        const long long* __restrict__ starts, const long long* __restrict__ sizes,
        const long long* __restrict__ offsets,
        const int* __restrict__ strip_first, const int* __restrict__ tile_block,
        const int* __restrict__ tile_row, const int* __restrict__ tile_col,
        T* __restrict__ G) {
    constexpr int PER_WARP = TILE / WARPS;  // tile rows per warp
    __shared__ float panel_a[ROWS][TILE];
    __shared__ float panel_b[ROWS][TILE];
    __shared__ float weight[ROWS];
    __shared__ long long run[ROWS][3];      // first entry of the row, a0, b0
    __shared__ int length[ROWS][2];         // na, nb
    __shared__ long long tile_info[6];
    const int tile = blockIdx.x;
    if (threadIdx.x == 0) {
        const int block = tile_block[tile];
        const int first = strip_first[block];
        const int a = first + tile_row[tile];
        const int b = first + tile_col[tile];
        const bool b_shorter = count[b] < count[a];
        tile_info[0] = block;
        tile_info[1] = strip_boundary[a];
        tile_info[2] = strip_boundary[b];
        tile_info[3] = b_shorter ? b : a;  // the strip whose rows we visit
        tile_info[4] = b_shorter ? count[b] : count[a];
        tile_info[5] = starts[block];
    }
    __syncthreads();
    const int block = (int)tile_info[0];
    const long long a_boundary = tile_info[1], b_boundary = tile_info[2];
    const int* visit = rows_of + tile_info[3] * rows;
    const long long n_visit = tile_info[4];
    const long long start = tile_info[5];
    const long long size = sizes[block];
    const long long a_first = start + (long long)tile_row[tile] * TILE;
    const long long b_first = start + (long long)tile_col[tile] * TILE;
    const bool diagonal = a_first == b_first;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    T sum[PER_WARP];
#pragma unroll
    for (int j = 0; j < PER_WARP; ++j) sum[j] = (T)0;

    for (long long base = 0; base < n_visit; base += ROWS) {
        const int batch = n_visit - base < ROWS ? (int)(n_visit - base) : ROWS;
        for (int e = threadIdx.x; e < ROWS * TILE; e += blockDim.x) {
            panel_a[e / TILE][e % TILE] = 0.0f;
            panel_b[e / TILE][e % TILE] = 0.0f;
        }
        if (threadIdx.x < batch) {
            const int r = threadIdx.x;
            const long long row = visit[base + r];
            const long long first = indptr[row];
            const int a0 = pos[a_boundary * rows + row];
            const int a1 = pos[(a_boundary + 1) * rows + row];
            run[r][0] = first;
            run[r][1] = first + a0;
            length[r][0] = a1 - a0;
            if (!diagonal) {
                const int b0 = pos[b_boundary * rows + row];
                const int b1 = pos[(b_boundary + 1) * rows + row];
                run[r][2] = first + b0;
                length[r][1] = b1 - b0;
            }
            weight[r] = weights[row];
        }
        __syncthreads();
        // densify: the threads of a row scatter its runs into the panels
        const int per_row = blockDim.x / ROWS > 0 ? blockDim.x / ROWS : 1;
        for (int r = threadIdx.x / per_row; r < batch; r += blockDim.x / per_row) {
            for (int q = threadIdx.x % per_row; q < length[r][0]; q += per_row) {
                const long long p = run[r][1] + q;
                panel_a[r][indices[p] - a_first] = data[p];
            }
            if (!diagonal) {
                for (int q = threadIdx.x % per_row; q < length[r][1]; q += per_row) {
                    const long long p = run[r][2] + q;
                    panel_b[r][indices[p] - b_first] = data[p];
                }
            }
        }
        __syncthreads();
        for (int r = 0; r < batch; ++r) {
            const float tk = diagonal ? panel_a[r][lane] : panel_b[r][lane];
            if (tk != 0.0f) {
                const T w = (T)weight[r];
#pragma unroll
                for (int j = 0; j < PER_WARP; ++j) {
                    const float tj = panel_a[r][warp * PER_WARP + j];
                    if (tj != 0.0f) sum[j] += w * ((T)tj * (T)tk);
                }
            }
        }
        __syncthreads();  // the panels are rewritten next
    }
    const long long column = b_first - start + lane;  // of G_b
#pragma unroll
    for (int j = 0; j < PER_WARP; ++j) {
        const long long row = a_first - start + warp * PER_WARP + j;
        if (row < size && column < size) {
            G[offsets[block] + row * size + column] += sum[j];
            if (!diagonal) {
                G[offsets[block] + column * size + row] += sum[j];
            }
        }
    }
}
