// Runs one ggml_mul_mat_id on the CPU backend of the ggml it is linked against.
//
// usage: mul_mat_id_masked IN OUT
//   IN : int32 header {type, ne00, ne01, n_as, ne11, n_used, n_tokens, n_threads}, then the
//        weights (n_as * ne01 rows of ggml_row_size(type, ne00) bytes), b (f32 [ne00, ne11, n_tokens]),
//        ids (i32 [n_used, n_tokens]; negative = masked slot)
//   OUT: dst, f32 [ne01, n_used, n_tokens]
// dst is filled with NaN first, so a masked slot that is never written shows up.
#include "harness.h"

int main(int argc, char ** argv) {
    int32_t h[8];
    FILE * in = open_input(argc, argv, h);
    const enum ggml_type type = (enum ggml_type) h[0];
    const int64_t ne00 = h[1], ne01 = h[2], n_as = h[3], ne11 = h[4], n_used = h[5], n_tokens = h[6];
    const int n_threads = h[7];

    const size_t w_bytes = ggml_row_size(type, ne00) * ne01 * n_as;
    const size_t b_bytes = sizeof(float) * ne00 * ne11 * n_tokens;
    const size_t d_bytes = sizeof(float) * ne01 * n_used * n_tokens;
    struct ggml_init_params params = {
        /*.mem_size   =*/ w_bytes + b_bytes + d_bytes + sizeof(int32_t)*n_used*n_tokens + 64*ggml_tensor_overhead() + ggml_graph_overhead() + (16 << 20), // + work buffer
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ false,
    };
    struct ggml_context * ctx = ggml_init(params);

    struct ggml_tensor * as  = ggml_new_tensor_3d(ctx, type, ne00, ne01, n_as);
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne00, ne11, n_tokens);
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    read_exact(in, as->data, ggml_nbytes(as));
    read_exact(in, b->data, ggml_nbytes(b));
    read_exact(in, ids->data, ggml_nbytes(ids));
    fclose(in);

    struct ggml_tensor * dst = ggml_mul_mat_id(ctx, as, b, ids);
    return compute_and_write(ctx, dst, n_threads, argv[2]);
}
