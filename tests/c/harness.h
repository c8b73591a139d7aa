// Shared by the op test programs in tests/c: read the input file, run one op on a ggml backend,
// write its result. Each program reads an int32[8] header, then its own tensors.
//
// usage: PROG IN OUT [BACKEND]   BACKEND is a ggml backend name ("CPU", the default, or "CUDA0");
// a backend this ggml lacks, or one that does not support the op, exits with 77 ("skip").
#pragma once

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define EXIT_SKIP 77

static void read_exact(FILE * f, void * dst, size_t n) {
    if (fread(dst, 1, n, f) != n) {
        fprintf(stderr, "short read\n");
        exit(2);
    }
}

// argv = {prog, IN, OUT[, BACKEND]}; opens IN and reads the header (exits with 2 on a usage or I/O error)
static FILE * open_input(int argc, char ** argv, int32_t header[8]) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s IN OUT [BACKEND]\n", argv[0]);
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

// a context for tensor metadata only: the backend buffer holds the data
static struct ggml_context * new_meta_context(void) {
    struct ggml_init_params params = {
        /*.mem_size   =*/ 64*ggml_tensor_overhead() + ggml_graph_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(params);
}

// the tensor's bytes, read from the input file, copied into its backend buffer
static void read_tensor(FILE * in, struct ggml_tensor * t) {
    void * host = malloc(ggml_nbytes(t));
    read_exact(in, host, ggml_nbytes(t));
    ggml_backend_tensor_set(t, host, 0, ggml_nbytes(t));
    free(host);
}

static ggml_backend_t open_backend(int argc, char ** argv, int n_threads) {
    const char * name = argc > 3 ? argv[3] : "CPU";
    ggml_backend_t backend = ggml_backend_init_by_name(name, NULL);
    if (!backend) {
        fprintf(stderr, "this ggml has no backend %s\n", name);
        exit(EXIT_SKIP);
    }
    if (ggml_backend_is_cpu(backend)) {
        ggml_backend_cpu_set_n_threads(backend, n_threads);
    }
    return backend;
}

// dst filled with NaN first (a slot the op never writes shows up), computed, written to `out_path`
static int compute_and_write(struct ggml_context * ctx, ggml_backend_t backend, struct ggml_tensor * dst,
                             const char * out_path) {
    if (!ggml_backend_supports_op(backend, dst)) {
        fprintf(stderr, "backend %s does not support %s\n", ggml_backend_name(backend), ggml_op_desc(dst));
        return EXIT_SKIP;
    }
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, dst);
    float * d = (float *) malloc(ggml_nbytes(dst));
    for (int64_t i = 0; i < ggml_nelements(dst); ++i) {
        d[i] = NAN;
    }
    ggml_backend_tensor_set(dst, d, 0, ggml_nbytes(dst));
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        return 1;
    }
    ggml_backend_tensor_get(dst, d, 0, ggml_nbytes(dst));
    FILE * out = fopen(out_path, "wb");
    fwrite(d, 1, ggml_nbytes(dst), out);
    fclose(out);
    free(d);
    return 0;
}
