// Runs one ggml_mul_mat_id_groups on a backend of the ggml it is linked against (tests/c/harness.h;
// the op is CPU-only, other backends answer "skip").
//
// usage: mul_mat_id_groups IN OUT [BACKEND]
//   IN : int32 header {n_groups, ne00, ne01, n_expert, ne11, n_used, n_tokens, n_threads}, then
//        the group types (int32 [n_groups]), the group slot counts (int32 [n_groups]), the map
//        (int32 [n_groups][n_expert]: slot of expert e in group g, or -1), each group's weights
//        (n_slots_g * ne01 rows of ggml_row_size(type_g, ne00) bytes), b (f32 [ne00, ne11,
//        n_tokens]), ids (i32 [n_used, n_tokens])
//   OUT: dst, f32 [ne01, n_used, n_tokens]
// dst is filled with NaN first, so a slot that no group writes shows up.
#include "harness.h"

int main(int argc, char ** argv) {
    int32_t h[8];
    FILE * in = open_input(argc, argv, h);
    const int n_groups = h[0];
    const int64_t ne00 = h[1], ne01 = h[2], n_expert = h[3], ne11 = h[4], n_used = h[5], n_tokens = h[6];
    if (n_groups < 1 || n_groups > GGML_MUL_MAT_ID_MAX_GROUPS) {
        fprintf(stderr, "bad n_groups %d\n", n_groups);
        return 2;
    }
    int32_t types[GGML_MUL_MAT_ID_MAX_GROUPS], slots[GGML_MUL_MAT_ID_MAX_GROUPS];
    read_exact(in, types, sizeof(int32_t) * n_groups);
    read_exact(in, slots, sizeof(int32_t) * n_groups);
    ggml_backend_t backend = open_backend(argc, argv, h[7]);
    struct ggml_context * ctx = new_meta_context();

    struct ggml_tensor * map = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_expert, n_groups);
    struct ggml_tensor * as[GGML_MUL_MAT_ID_MAX_GROUPS];
    for (int g = 0; g < n_groups; ++g) {
        as[g] = ggml_new_tensor_3d(ctx, (enum ggml_type) types[g], ne00, ne01, slots[g]);
    }
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne00, ne11, n_tokens);
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    struct ggml_tensor * dst = ggml_mul_mat_id_groups(ctx, as, n_groups, map, b, ids);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    read_tensor(in, map);
    for (int g = 0; g < n_groups; ++g) {
        read_tensor(in, as[g]);
    }
    read_tensor(in, b);
    read_tensor(in, ids);
    fclose(in);

    const int rc = compute_and_write(ctx, backend, dst, argv[2]);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    ggml_backend_free(backend);
    return rc;
}
