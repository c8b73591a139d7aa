// Op-level benchmark (not a test) of one grouped expert projection on the CPU, in one process,
// the three graphs interleaved: the merged single-type mul_mat_id (a stock file), the fused
// ggml_mul_mat_id_groups (patched CPU), and the masked sum (patched, other backends). Each graph
// holds 24 projections of E=8 Q3_K experts, top-2, G groups; 2 threads, one reused threadpool.
//
//   S=$(python -c "from convert.patched import ensure_site; print(ensure_site())")
//   cc -O2 -o /tmp/bench_mmid_groups scripts/bench_mmid_groups.c -I$S/include -L$S/llama_cpp/lib \
//      -Wl,-rpath,$S/llama_cpp/lib -lggml -lggml-base -lggml-cpu -lm
//   /tmp/bench_mmid_groups N_TOKENS G ITERS NE00 NE01     (e.g. 1 2 3000 256 256)
//
// Results: bench/mmid-groups.txt. Weights are a constant byte pattern: speed, not values, is measured.
#include "ggml.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int n_tok=atoi(argv[1]); int G=atoi(argv[2]); int iters=atoi(argv[3]);
  const int L=24, E=8, K=2; int ne00=atoi(argv[4]), ne01=atoi(argv[5]); enum ggml_type T=GGML_TYPE_Q3_K;
  struct ggml_init_params ip={ (size_t)1<<31, NULL, false};
  struct ggml_context*ctx=ggml_init(ip);
  struct ggml_tensor *b=ggml_new_tensor_3d(ctx,GGML_TYPE_F32,ne00,1,n_tok);
  for(int i=0;i<ne00*n_tok;i++)((float*)b->data)[i]=(float)((i*7)%13-6)/6.f;
  struct ggml_tensor *ids=ggml_new_tensor_2d(ctx,GGML_TYPE_I32,K,n_tok);
  for(int t=0;t<n_tok;t++){ int a=(t*3)%E, c=(t*5+1)%E; if(c==a)c=(c+1)%E; ((int*)ids->data)[t*K]=a; ((int*)ids->data)[t*K+1]=c;}
  struct ggml_tensor *map=ggml_new_tensor_2d(ctx,GGML_TYPE_I32,E,G);
  int per=E/G;
  for(int g=0;g<G;g++)for(int e=0;e<E;e++)((int*)map->data)[g*E+e]=(e%G==g)? e/G : -1;
  struct ggml_tensor *merged[24], *grp[24][8];
  for(int l=0;l<L;l++){ merged[l]=ggml_new_tensor_3d(ctx,T,ne00,ne01,E); memset(merged[l]->data,0x11,ggml_nbytes(merged[l]));
    for(int g=0;g<G;g++){ grp[l][g]=ggml_new_tensor_3d(ctx,T,ne00,ne01,per); memset(grp[l][g]->data,0x11,ggml_nbytes(grp[l][g]));}}
  struct ggml_cgraph *gfs[3];
  for(int v=0;v<3;v++){
    struct ggml_cgraph*gf=ggml_new_graph_custom(ctx,8192,false);
    for(int l=0;l<L;l++){
      struct ggml_tensor*out;
      if(v==0) out=ggml_mul_mat_id(ctx,merged[l],b,ids);
      else if(v==1) out=ggml_mul_mat_id_groups(ctx,grp[l],G,map,b,ids);
      else { struct ggml_tensor*flat=ggml_reshape_1d(ctx,ggml_cont(ctx,ids),K*n_tok); out=NULL;
        for(int g=0;g<G;g++){ struct ggml_tensor*tab=ggml_view_2d(ctx,map,1,E,map->nb[0],g*map->nb[1]);
          struct ggml_tensor*sl=ggml_reshape_2d(ctx,ggml_get_rows(ctx,tab,flat),K,n_tok);
          struct ggml_tensor*p=ggml_mul_mat_id(ctx,grp[l][g],b,sl); out=out?ggml_add(ctx,out,p):p;}}
      ggml_build_forward_expand(gf,out);
    }
    gfs[v]=gf;
  }
  struct ggml_threadpool_params tpp=ggml_threadpool_params_default(2);
  struct ggml_threadpool*tp=ggml_threadpool_new(&tpp);
  struct ggml_cplan cp[3]; void*work[3];
  for(int v=0;v<3;v++){cp[v]=ggml_graph_plan(gfs[v],2,tp); work[v]=malloc(cp[v].work_size+64); cp[v].work_data=work[v];}
  double tot[3]={0,0,0};
  for(int r=0;r<iters;r++)for(int v=0;v<3;v++){double t0=now(); ggml_graph_compute(gfs[v],&cp[v]); tot[v]+=now()-t0;}
  const char*nm[3]={"merged","fused","masked-sum"};
  for(int v=0;v<3;v++)printf("n_tok %3d G %d %-10s %8.1f us/projection  (%.3fx merged)\n",n_tok,G,nm[v],tot[v]/iters/L*1e6,tot[0]/tot[v]);
  return 0;}
