// Runs one ggml_mul_mat_id_groups on the CPU backend of the ggml it is linked against.
//
// usage: mul_mat_id_groups IN OUT
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
    const int n_threads = h[7];
    if (n_groups < 1 || n_groups > GGML_MUL_MAT_ID_MAX_GROUPS) {
        fprintf(stderr, "bad n_groups %d\n", n_groups);
        return 2;
    }
    int32_t types[GGML_MUL_MAT_ID_MAX_GROUPS], slots[GGML_MUL_MAT_ID_MAX_GROUPS];
    read_exact(in, types, sizeof(int32_t) * n_groups);
    read_exact(in, slots, sizeof(int32_t) * n_groups);

    size_t w_bytes = 0;
    for (int g = 0; g < n_groups; ++g) {
        w_bytes += ggml_row_size((enum ggml_type) types[g], ne00) * ne01 * slots[g];
    }
    const size_t b_bytes = sizeof(float) * ne00 * ne11 * n_tokens;
    const size_t d_bytes = sizeof(float) * ne01 * n_used * n_tokens;
    struct ggml_init_params params = {
        /*.mem_size   =*/ w_bytes + b_bytes + d_bytes + sizeof(int32_t)*(n_used*n_tokens + n_groups*n_expert)
                          + 64*ggml_tensor_overhead() + ggml_graph_overhead() + (16 << 20), // + work buffer
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ false,
    };
    struct ggml_context * ctx = ggml_init(params);

    struct ggml_tensor * map = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_expert, n_groups);
    read_exact(in, map->data, ggml_nbytes(map));
    struct ggml_tensor * as[GGML_MUL_MAT_ID_MAX_GROUPS];
    for (int g = 0; g < n_groups; ++g) {
        as[g] = ggml_new_tensor_3d(ctx, (enum ggml_type) types[g], ne00, ne01, slots[g]);
        read_exact(in, as[g]->data, ggml_nbytes(as[g]));
    }
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne00, ne11, n_tokens);
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    read_exact(in, b->data, ggml_nbytes(b));
    read_exact(in, ids->data, ggml_nbytes(ids));
    fclose(in);

    struct ggml_tensor * dst = ggml_mul_mat_id_groups(ctx, as, n_groups, map, b, ids);
    return compute_and_write(ctx, dst, n_threads, argv[2]);
}
