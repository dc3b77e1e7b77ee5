// Standalone fp32 gather loop: prefetch variants of the embedding kernel's inner loop, over
// 8 tables of 1M x 64 fp32 rows (2 MB-aligned, huge pages advised), B=2048 bags of 32 ids,
// 8 requests cycled, variants interleaved; prints each variant's time over the first's
// (median and IQR of 240 rounds). Not part of the build; used for BENCHMARKS.md's "tried"
// lists (Zen 4, 2026-11-23).
//
//   g++ -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -o gather_prefetch gather_prefetch.cpp -lpthread
//   ./gather_prefetch <table offset bytes: 0|16> <threads> <zipf exponent, 0 = uniform> [distance|near|lines|order]
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
static inline void pf0(const void* a){ asm volatile("prefetcht0 %0"::"m"(*(const char*)a)); }
static inline void pf1(const void* a){ asm volatile("prefetcht1 %0"::"m"(*(const char*)a)); }
template<int H> static inline void pfl(const void* a){ if(H==2)pf2(a); else if(H==1) pf1(a); else pf0(a);}
template<int H> static inline void pfrow2(uintptr_t row){ pfl<H>((void*)row); pfl<H>((void*)(row+128)); }
template<int H> static inline void pfrow1(uintptr_t row){ pfl<H>((void*)row); }
// Straight-line: the lines at +0, +64, +128, +192 and the row's last byte (the kernel's
// prefetch_row_fixed<4>), in address order, and the same five in a mixed order.
template<int H> static inline void pfrow_straight(uintptr_t row){ pfl<H>((void*)row); pfl<H>((void*)(row+64)); pfl<H>((void*)(row+128)); pfl<H>((void*)(row+192)); pfl<H>((void*)(row+255)); }
template<int H> static inline void pfrow_mixed(uintptr_t row){ pfl<H>((void*)(row+128)); pfl<H>((void*)row); pfl<H>((void*)(row+255)); pfl<H>((void*)(row+64)); pfl<H>((void*)(row+192)); }
template<int H> static inline void pfrow_desc(uintptr_t row){ pfl<H>((void*)(row+255)); for(uintptr_t a=((row+255)&~63ull)-64; a>row; a-=64) pfl<H>((void*)a); pfl<H>((void*)row); }
template<int H> static inline void pfrow(uintptr_t row, int64_t nb){ pfl<H>((void*)row); for(uintptr_t a=(row&~63ull)+64; a+64<row+nb; a+=64) pfl<H>((void*)a); pfl<H>((void*)(row+nb-1)); }
template<int PD,int H,int ND=0,int MODE=0>
void gather(const float* base, const int32_t* ind, int64_t n, int L, float* out){
  for(int64_t b=0;b<n/L;b++){ __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for(int64_t p=b*L;p<(b+1)*L;p++){ if(PD>0 && p+PD<n) { uintptr_t rr=(uintptr_t)(base+(int64_t)ind[p+PD]*64); if(MODE==0) pfrow<H>(rr,256); else if(MODE==2) pfrow2<H>(rr); else if(MODE==3) pfrow_straight<H>(rr); else if(MODE==4) pfrow_desc<H>(rr); else if(MODE==5) pfrow_mixed<H>(rr); else pfrow1<H>(rr);}
      if(ND>0 && p+ND<n) pfrow<0>((uintptr_t)(base+(int64_t)ind[p+ND]*64),256);
      const float* r=base+(int64_t)ind[p]*64; a0=_mm512_add_ps(a0,_mm512_loadu_ps(r)); a1=_mm512_add_ps(a1,_mm512_loadu_ps(r+16)); a2=_mm512_add_ps(a2,_mm512_loadu_ps(r+32)); a3=_mm512_add_ps(a3,_mm512_loadu_ps(r+48)); }
    _mm512_storeu_ps(out+b*64,a0);_mm512_storeu_ps(out+b*64+16,a1);_mm512_storeu_ps(out+b*64+32,a2);_mm512_storeu_ps(out+b*64+48,a3);}
}
typedef void (*GF)(const float*, const int32_t*, int64_t, int, float*);
int main(int argc,char**argv){
  int off=atoi(argv[1]); int nthr=atoi(argv[2]); double zipf=atof(argv[3]);
  // argv[4]: which variants (each set starts with, and repeats, the kernel's own: d128 t2).
  const char* set=argc>4?argv[4]:"distance";
  GF fs[8]; const char* names[8]; const int NV=8;
  if(!strcmp(set,"near")){ GF f[]={gather<128,2>,gather<128,2,16>,gather<128,2,8>,gather<128,2>,gather<128,2,4>,gather<16,0,0,1>,gather<256,2,16>,gather<128,2>};
    const char* n[]={"d128 t2","+near16","+near8","d128 again","+near4","d16 t0 line0","d256+near16","d128 again"}; for(int i=0;i<8;i++){fs[i]=f[i];names[i]=n[i];} }
  else if(!strcmp(set,"lines")){ GF f[]={gather<128,2>,gather<128,2,0,2>,gather<128,2,0,1>,gather<128,2>,gather<64,2,0,2>,gather<256,2,0,2>,gather<16,0,0,1>,gather<128,2>};
    const char* n[]={"d128 t2","lines 0,2","line 0","d128 again","d64 0,2","d256 0,2","d16 t0 line0","d128 again"}; for(int i=0;i<8;i++){fs[i]=f[i];names[i]=n[i];} }
  else if(!strcmp(set,"order")){ GF f[]={gather<128,2>,gather<128,2,0,3>,gather<128,2,0,5>,gather<128,2>,gather<128,2,0,4>,gather<192,2,0,3>,gather<96,2,0,3>,gather<128,2>};
    const char* n[]={"d128 t2","straight","mixed","d128 again","desc loop","straight192","straight96","d128 again"}; for(int i=0;i<8;i++){fs[i]=f[i];names[i]=n[i];} }
  else { GF f[]={gather<128,2>,gather<64,2>,gather<32,2>,gather<128,2>,gather<256,2>,gather<16,0>,gather<64,1>,gather<128,2>};
    const char* n[]={"d128 t2","d64 t2","d32 t2","d128 again","d256 t2","d16 t0","d64 t1","d128 again"}; for(int i=0;i<8;i++){fs[i]=f[i];names[i]=n[i];} }
  const int64_t R=1000000,T=8,B=2048,L=32;
  float* tab=make_tables(R,T,off);
  std::mt19937_64 g(1); std::vector<int32_t> ind(T*B*L*8);
  fill_ids(ind, R, zipf, g);
  std::vector<float> out(T*B*64*2);
  std::vector<std::vector<double>> rat(NV); std::vector<double> abst;
  for(int rep=0;rep<240;rep++){ double t[NV]; for(int v=0;v<NV;v++){
    int req=rep%8; auto t0=std::chrono::steady_clock::now();
    std::vector<std::thread> th; for(int tt=0;tt<nthr;tt++) th.emplace_back([&,tt]{ for(int tb=tt;tb<T;tb+=nthr){ const int32_t* ii=ind.data()+((int64_t)req*T+tb)*B*L; fs[v](tab+(int64_t)tb*R*64,ii,B*L,L,out.data()+tt*B*64);} });
    for(auto&x:th)x.join(); t[v]=std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-t0).count(); }
    for(int v=0;v<NV;v++) rat[v].push_back(t[v]/t[0]); abst.push_back(t[0]); }
  std::sort(abst.begin(),abst.end()); printf("abs median %.2f ms\n",abst[abst.size()/2]); for(int v=0;v<NV;v++){ std::sort(rat[v].begin(),rat[v].end()); printf("off=%d zipf=%.2f %-8s time/d128: median %.3f IQR %.3f-%.3f\n",off,zipf,names[v],rat[v][rat[v].size()/2],rat[v][rat[v].size()/4],rat[v][3*rat[v].size()/4]); }
}
