// Standalone fp32 gather loop: prefetcht2 for every row against an oracle that knows each id's
// Zipf rank and prefetches the top HOT rows with prefetcht2 and the rest with prefetchnta (or
// prefetcht1), and prefetchnta for all. 8 tables of 1M x 64 fp32 rows, B=2048 bags of 32 ids.
// Not part of the build; used for BENCHMARKS.md's "tried" list (Zen 4, 2026-11-23).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_hotcold gather_hotcold.cpp -lpthread
//   ./gather_hotcold <threads> <zipf exponent> <HOT: 1024|4096|16384>
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
template<int H> static inline void pfl(const void* a){ if(H==2) asm volatile("prefetcht2 %0"::"m"(*(const char*)a)); else if(H==1) asm volatile("prefetcht1 %0"::"m"(*(const char*)a)); else if(H==0) asm volatile("prefetcht0 %0"::"m"(*(const char*)a)); else asm volatile("prefetchnta %0"::"m"(*(const char*)a)); }
template<int H> static inline void pfrow(uintptr_t r){ pfl<H>((void*)r); pfl<H>((void*)(r+64)); pfl<H>((void*)(r+128)); pfl<H>((void*)(r+192)); }
constexpr int PD=128;
// MODE 0: all t2. 1: oracle hot->t2, cold->nta. 2: all nta. 3: oracle hot->t2 cold->t0?
template<int MODE>
void gather(const float* base, const int32_t* ind, const uint8_t* hot, int64_t n, int L, float* out){
  for(int64_t b=0;b<n/L;b++){ __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for(int64_t p=b*L;p<(b+1)*L;p++){ if(p+PD<n){ int32_t id=ind[p+PD]; uintptr_t r=(uintptr_t)(base+(int64_t)id*64);
        if(MODE==0) pfrow<2>(r); else if(MODE==2) pfrow<3>(r); else if(MODE==1){ if(hot[id]) pfrow<2>(r); else pfrow<3>(r);} else { if(hot[id]) pfrow<2>(r); else pfrow<1>(r);} }
      const float* r=base+(int64_t)ind[p]*64; a0=_mm512_add_ps(a0,_mm512_loadu_ps(r)); a1=_mm512_add_ps(a1,_mm512_loadu_ps(r+16)); a2=_mm512_add_ps(a2,_mm512_loadu_ps(r+32)); a3=_mm512_add_ps(a3,_mm512_loadu_ps(r+48)); }
    _mm512_storeu_ps(out+b*64,a0);_mm512_storeu_ps(out+b*64+16,a1);_mm512_storeu_ps(out+b*64+32,a2);_mm512_storeu_ps(out+b*64+48,a3);}
}
typedef void (*GF)(const float*, const int32_t*, const uint8_t*, int64_t, int, float*);
int main(int argc,char**argv){
  int nthr=atoi(argv[1]); double zipf=atof(argv[2]); int HOT=atoi(argv[3]);
  GF fs[]={gather<0>,gather<1>,gather<2>,gather<3>,gather<0>}; const char* names[]={"all t2","oracle t2/nta","all nta","oracle t2/t1","all t2 again"}; const int NV=5;
  const int64_t R=1000000,T=8,B=2048,L=32; size_t bytes=R*64*4*T;
  char* raw=(char*)aligned_alloc(2<<20,(bytes+(2<<20))&~((2ull<<20)-1)); madvise(raw,bytes,MADV_HUGEPAGE); memset(raw,1,bytes);
  float* tab=(float*)raw;
  std::mt19937_64 g(1); std::vector<int32_t> ind(T*B*L*8); std::vector<uint8_t> hot(R,0);
  { const std::vector<int32_t> perm = fill_ids(ind, R, zipf, g); for(int i=0;i<HOT;i++) hot[perm[i]]=1; }
  std::vector<float> out(T*B*64*2);
  std::vector<std::vector<double>> rat(NV);
  for(int rep=0;rep<200;rep++){ double t[NV]; for(int v0=0;v0<NV;v0++){ int v=(rep&1)?v0:NV-1-v0;
    int req=rep%8; auto t0=std::chrono::steady_clock::now();
    std::vector<std::thread> th; for(int tt=0;tt<nthr;tt++) th.emplace_back([&,tt]{ for(int tb=tt;tb<T;tb+=nthr){ const int32_t* ii=ind.data()+((int64_t)req*T+tb)*B*L; fs[v](tab+(int64_t)tb*R*64,ii,hot.data(),B*L,L,out.data()+tt*B*64);} });
    for(auto&x:th)x.join(); t[v]=std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-t0).count(); }
    for(int v=0;v<NV;v++) rat[v].push_back(t[v]/t[0]); }
  for(int v=0;v<NV;v++){ std::sort(rat[v].begin(),rat[v].end()); printf("zipf=%.2f hot=%d %-14s time/allt2: median %.3f IQR %.3f-%.3f\n",zipf,HOT,names[v],rat[v][rat[v].size()/2],rat[v][rat[v].size()/4],rat[v][3*rat[v].size()/4]); }
}
