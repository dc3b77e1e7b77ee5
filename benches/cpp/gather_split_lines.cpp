// Standalone fp32 gather loop: rows 16 bytes past a line boundary read with four split loads
// (variant 0) or as five aligned lines recombined with vpermt2ps (variant 1), over 8 tables of
// 1M x 64 fp32 rows, B=2048 bags of 32 ids, interleaved. DUMP=1 prints every call's time. Not
// part of the build; used for BENCHMARKS.md's "tried" list (Zen 4, 2026-11-23).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_split_lines gather_split_lines.cpp -lpthread
//   DUMP=1 ./gather_split_lines <table offset bytes: 0|16> <threads> [zipf exponent]
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>
#include <thread>
#include <chrono>
#include <random>
#include <algorithm>
#include <sys/mman.h>
#include "gather_common.h"
static inline void pf2(const void* a){ asm volatile("prefetcht2 %0"::"m"(*(const char*)a)); }
static inline void pfrow(uintptr_t row, int64_t nb){ pf2((void*)row); for(uintptr_t a=(row&~63ull)+64; a+64<row+nb; a+=64) pf2((void*)a); pf2((void*)(row+nb-1)); }
constexpr int PD=128;
// variant 0: unaligned loads
void gather0(const float* base, const int32_t* ind, int64_t n, int L, float* out){
  for(int64_t b=0;b<n/L;b++){ __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for(int64_t p=b*L;p<(b+1)*L;p++){ if(p+PD<n) pfrow((uintptr_t)(base+(int64_t)ind[p+PD]*64),256);
      const float* r=base+(int64_t)ind[p]*64; a0=_mm512_add_ps(a0,_mm512_loadu_ps(r)); a1=_mm512_add_ps(a1,_mm512_loadu_ps(r+16)); a2=_mm512_add_ps(a2,_mm512_loadu_ps(r+32)); a3=_mm512_add_ps(a3,_mm512_loadu_ps(r+48)); }
    _mm512_storeu_ps(out+b*64,a0);_mm512_storeu_ps(out+b*64+16,a1);_mm512_storeu_ps(out+b*64+32,a2);_mm512_storeu_ps(out+b*64+48,a3);}
}
// variant 1: aligned lines + vpermt2ps
void gather1(const float* base, const int32_t* ind, int64_t n, int L, float* out){
  int sh=(int)(((uintptr_t)base&63)/4); __m512i idx=_mm512_add_epi32(_mm512_set_epi32(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0),_mm512_set1_epi32(sh));
  const float* abase=(const float*)((uintptr_t)base&~63ull);
  for(int64_t b=0;b<n/L;b++){ __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for(int64_t p=b*L;p<(b+1)*L;p++){ if(p+PD<n) pfrow((uintptr_t)(base+(int64_t)ind[p+PD]*64),256);
      const float* r=abase+(int64_t)ind[p]*64; __m512 l0=_mm512_load_ps(r),l1=_mm512_load_ps(r+16),l2=_mm512_load_ps(r+32),l3=_mm512_load_ps(r+48),l4=_mm512_load_ps(r+64);
      a0=_mm512_add_ps(a0,_mm512_permutex2var_ps(l0,idx,l1)); a1=_mm512_add_ps(a1,_mm512_permutex2var_ps(l1,idx,l2)); a2=_mm512_add_ps(a2,_mm512_permutex2var_ps(l2,idx,l3)); a3=_mm512_add_ps(a3,_mm512_permutex2var_ps(l3,idx,l4)); }
    _mm512_storeu_ps(out+b*64,a0);_mm512_storeu_ps(out+b*64+16,a1);_mm512_storeu_ps(out+b*64+32,a2);_mm512_storeu_ps(out+b*64+48,a3);}
}
int main(int argc,char**argv){
  int off=atoi(argv[1]); int nthr=atoi(argv[2]); double zipf=argc>3?atof(argv[3]):0;
  const int64_t R=1000000,T=8,B=2048,L=32;
  float* tab=make_tables(R,T,off);
  std::mt19937_64 g(1); std::vector<int32_t> ind(T*B*L*8);
  fill_ids(ind, R, zipf, g);
  std::vector<float> out(T*B*64*2);
  for(int v=0; v<2; v++){} 
  double best[2]={1e9,1e9}; std::vector<double> ts[2];
  for(int rep=0;rep<160;rep++) for(int v=0;v<2;v++){
    int req=rep%8; auto t0=std::chrono::steady_clock::now();
    std::vector<std::thread> th; for(int t=0;t<nthr;t++) th.emplace_back([&,t]{ for(int tb=t;tb<T;tb+=nthr){ const int32_t* ii=ind.data()+((int64_t)req*T+tb)*B*L; const float* tb_base=tab+(int64_t)tb*R*64; if(v==0) gather0(tb_base,ii,B*L,L,out.data()+t*B*64); else gather1(tb_base,ii,B*L,L,out.data()+t*B*64);} });
    for(auto&x:th)x.join(); double ms=std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-t0).count(); ts[v].push_back(ms);
  }
  for(int v=0;v<2;v++){ if(getenv("DUMP")){for(size_t i=0;i<ts[v].size();i++)printf("%.1f ",ts[v][i]);printf("\n");} std::sort(ts[v].begin(),ts[v].end()); printf("off=%d thr=%d zipf=%.2f variant %d: median %.2f ms min %.2f\n",off,nthr,zipf,v,ts[v][ts[v].size()/2],ts[v][0]); }
  // check
  gather0(tab,ind.data(),B*L,L,out.data()); gather1(tab,ind.data(),B*L,L,out.data()+B*64); printf("same=%d\n", memcmp(out.data(),out.data()+B*64,B*64*4)==0);
}
