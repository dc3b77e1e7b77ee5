// Standalone fp32 gather loop: bag by bag (variant 0) against each distinct row read once and
// added into every bag that holds it (variant 1: ids sorted with their bag), Zipf or uniform
// ids over 8 tables of 1M x 64 fp32 rows, B=2048 bags of 32 ids. PRESORT=1 leaves the sort
// out of the timing (sorted once up front). Not part of the build; used for BENCHMARKS.md's
// "tried" list (Zen 4, 2026-11-23).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_dedup gather_dedup.cpp -lpthread
//   [PRESORT=1] ./gather_dedup <threads> <zipf exponent>
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <thread>
#include <chrono>
#include <random>
#include <algorithm>
#include <sys/mman.h>
#include "gather_common.h"
static inline void pf2(const void* a){ asm volatile("prefetcht2 %0"::"m"(*(const char*)a)); }
static inline void pfrow(uintptr_t row){ pf2((void*)row); pf2((void*)(row+64)); pf2((void*)(row+128)); pf2((void*)(row+192)); }
constexpr int PD=128;
void gather(const float* base, const int32_t* ind, int64_t n, int L, float* out){
  for(int64_t b=0;b<n/L;b++){ __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for(int64_t p=b*L;p<(b+1)*L;p++){ if(p+PD<n) pfrow((uintptr_t)(base+(int64_t)ind[p+PD]*64));
      const float* r=base+(int64_t)ind[p]*64; a0=_mm512_add_ps(a0,_mm512_loadu_ps(r)); a1=_mm512_add_ps(a1,_mm512_loadu_ps(r+16)); a2=_mm512_add_ps(a2,_mm512_loadu_ps(r+32)); a3=_mm512_add_ps(a3,_mm512_loadu_ps(r+48)); }
    _mm512_storeu_ps(out+b*64,a0);_mm512_storeu_ps(out+b*64+16,a1);_mm512_storeu_ps(out+b*64+32,a2);_mm512_storeu_ps(out+b*64+48,a3);}
}
// dedup: sort (id<<32|pos) then for each entry add row into out[bag(pos)]
void gather_dedup(const float* base, const int32_t* ind, int64_t n, int L, float* out, std::vector<uint64_t>& key){
  if(!getenv("PRESORT")){ key.resize(n); for(int64_t p=0;p<n;p++) key[p]=((uint64_t)(uint32_t)ind[p]<<32)|(uint64_t)(p/L);
  std::sort(key.begin(),key.end()); }
  memset(out,0,sizeof(float)*(n/L)*64);
  for(int64_t i=0;i<n;){ int32_t id=(int32_t)(key[i]>>32); const float* r=base+(int64_t)id*64;
    // prefetch next distinct rows ahead
    if(i+PD<n) pfrow((uintptr_t)(base+(int64_t)(int32_t)(key[i+PD]>>32)*64));
    __m512 r0=_mm512_loadu_ps(r),r1=_mm512_loadu_ps(r+16),r2=_mm512_loadu_ps(r+32),r3=_mm512_loadu_ps(r+48);
    do { float* o=out+(key[i]&0xffffffff)*64; _mm512_storeu_ps(o,_mm512_add_ps(_mm512_loadu_ps(o),r0)); _mm512_storeu_ps(o+16,_mm512_add_ps(_mm512_loadu_ps(o+16),r1)); _mm512_storeu_ps(o+32,_mm512_add_ps(_mm512_loadu_ps(o+32),r2)); _mm512_storeu_ps(o+48,_mm512_add_ps(_mm512_loadu_ps(o+48),r3)); ++i; } while(i<n && (int32_t)(key[i]>>32)==id);
  }
}
int main(int argc,char**argv){
  int nthr=atoi(argv[1]); double zipf=atof(argv[2]);
  const int64_t R=1000000,T=8,B=2048,L=32; size_t bytes=R*64*4*T;
  char* raw=(char*)aligned_alloc(2<<20,(bytes+(2<<20))&~((2ull<<20)-1)); madvise(raw,bytes,MADV_HUGEPAGE); memset(raw,1,bytes);
  float* tab=(float*)raw; for(size_t i=0;i<bytes/4;i+=97) tab[i]=(float)(i%13);
  std::mt19937_64 g(1); std::vector<int32_t> ind(T*B*L*8);
  fill_ids(ind, R, zipf, g);
  std::vector<float> out(2*B*64*2);
  std::vector<std::vector<uint64_t>> keys(8*T); for(int q=0;q<8*T;q++){ auto& key=keys[q]; key.resize(B*L); const int32_t* ii=ind.data()+(int64_t)q*B*L; for(int64_t p=0;p<B*L;p++) key[p]=((uint64_t)(uint32_t)ii[p]<<32)|(uint64_t)(p/L); std::sort(key.begin(),key.end()); }
  std::vector<double> rat; std::vector<double> tv[2];
  for(int rep=0;rep<120;rep++){ double t[2]; for(int v0=0;v0<2;v0++){ int v=(rep&1)?v0:1-v0;
    int req=rep%8; auto t0=std::chrono::steady_clock::now();
    std::vector<std::thread> th; for(int tt=0;tt<nthr;tt++) th.emplace_back([&,tt]{ std::vector<uint64_t>& key=keys[req*T+0]; (void)key; for(int tb=tt;tb<T;tb+=nthr){ const int32_t* ii=ind.data()+((int64_t)req*T+tb)*B*L; if(v==0) gather(tab+(int64_t)tb*R*64,ii,B*L,L,out.data()+tt*B*64); else gather_dedup(tab+(int64_t)tb*R*64,ii,B*L,L,out.data()+tt*B*64,keys[req*T+tb]);} });
    for(auto&x:th)x.join(); t[v]=std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-t0).count(); tv[v].push_back(t[v]); }
    rat.push_back(t[1]/t[0]); }
  std::sort(rat.begin(),rat.end()); for(int v=0;v<2;v++) std::sort(tv[v].begin(),tv[v].end());
  printf("zipf=%.2f thr=%d plain %.2f ms dedup %.2f ms; dedup/plain median %.3f IQR %.3f-%.3f\n",zipf,nthr,tv[0][60],tv[1][60],rat[60],rat[30],rat[90]);
  // correctness check
  std::vector<uint64_t>& key=keys[0]; std::vector<float> o1(B*64),o2(B*64); gather(tab,ind.data(),B*L,L,o1.data()); gather_dedup(tab,ind.data(),B*L,L,o2.data(),key); double md=0; for(int i=0;i<B*64;i++) md=std::max(md,(double)fabs(o1[i]-o2[i])); printf("maxdiff %g\n",md);
}
