// Shared by the op test programs in tests/c: read the input file, run one op on the CPU backend,
// write its result. Each program reads an int32[8] header, then its own tensors.
#pragma once

#include "ggml.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void read_exact(FILE * f, void * dst, size_t n) {
    if (fread(dst, 1, n, f) != n) {
        fprintf(stderr, "short read\n");
        exit(2);
    }
}

// argv = {prog, IN, OUT}; opens IN and reads the header (exits with 2 on a usage or I/O error)
static FILE * open_input(int argc, char ** argv, int32_t header[8]) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        exit(2);
    }
    FILE * in = fopen(argv[1], "rb");
    if (!in) {
        perror(argv[1]);
        exit(2);
    }
    read_exact(in, header, 8 * sizeof(int32_t));
    return in;
}

// dst filled with NaN first (a slot the op never writes shows up), computed, written to `out_path`
static int compute_and_write(struct ggml_context * ctx, struct ggml_tensor * dst, int n_threads, const char * out_path) {
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, dst);
    float * d = (float *) dst->data;
    for (int64_t i = 0; i < ggml_nelements(dst); ++i) {
        d[i] = NAN;
    }
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        return 1;
    }
    FILE * out = fopen(out_path, "wb");
    fwrite(dst->data, 1, ggml_nbytes(dst), out);
    fclose(out);
    ggml_free(ctx);
    return 0;
}
