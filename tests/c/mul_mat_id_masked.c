// Runs one ggml_mul_mat_id on a backend of the ggml it is linked against (tests/c/harness.h).
//
// usage: mul_mat_id_masked IN OUT [BACKEND]
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
    ggml_backend_t backend = open_backend(argc, argv, h[7]);
    struct ggml_context * ctx = new_meta_context();

    struct ggml_tensor * as  = ggml_new_tensor_3d(ctx, type, ne00, ne01, n_as);
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne00, ne11, n_tokens);
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    struct ggml_tensor * dst = ggml_mul_mat_id(ctx, as, b, ids);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    read_tensor(in, as);
    read_tensor(in, b);
    read_tensor(in, ids);
    fclose(in);

    const int rc = compute_and_write(ctx, backend, dst, argv[2]);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    ggml_backend_free(backend);
    return rc;
}
