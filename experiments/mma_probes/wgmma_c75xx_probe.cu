// Probe: which code shapes make ptxas serialize wgmma.mma_async.sp (C7510/C7511/C7515/C7520);
// compile only, read the ptxas messages (see docs/hopper.md, section 5). Variants by -D flags below.
#include <cstdint>
#define D8(i) "+f"(d[i]),"+f"(d[i+1]),"+f"(d[i+2]),"+f"(d[i+3]),"+f"(d[i+4]),"+f"(d[i+5]),"+f"(d[i+6]),"+f"(d[i+7])
#define DR "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#ifndef NOINL
#define INL __forceinline__
#else
#define INL __noinline__
#endif
INL __device__ void rs(float*d,const uint32_t*a,uint64_t b,uint32_t e){
 asm volatile("wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.f16.f16 " DR ",{%32,%33,%34,%35},%36,%37,0,1,1,1,0;\n"
 :D8(0),D8(8),D8(16),D8(24):"r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]),"l"(b),"r"(e));}
__global__ void k(const uint4*A,const uint32_t*M,uint64_t db,float*C,int nk){
 int t=threadIdx.x; float d[32]; for(int i=0;i<32;i++)d[i]=0.f;
 for(int kb=0;kb<nk;kb++){
  uint4 av=A[kb*128+t]; uint32_t a[4]={av.x,av.y,av.z,av.w};
#if V==1
  // separate regs per kblock, all issued, one commit, wait 0
  uint4 av2=A[(kb+1)*128+t]; uint32_t a2[4]={av2.x,av2.y,av2.z,av2.w};
  uint32_t e0=M[kb*128+t], e1=M[(kb+1)*128+t];
  asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
  rs(d,a,db,e0); rs(d,a2,db+2,e1);
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n":::"memory");
#elif V==2
  // accumulator touched by ALU between wgmma and wait
  asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
  rs(d,a,db,M[kb*128+t]);
  d[0]*=0.5f;
  rs(d,a,db+2,M[kb*128+t+1]);
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n":::"memory");
#elif V==3
  // wait<1>: keep one group in flight while next A/E regs loaded (register reuse across in-flight)
  asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
  rs(d,a,db,M[kb*128+t]);
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 1;\n":::"memory");
#else
  asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
  rs(d,a,db,M[kb*128+t]);
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n":::"memory");
#endif
 }
 asm volatile("wgmma.wait_group.sync.aligned 0;\n":::"memory");
 for(int i=0;i<32;i++)C[i*128+t]=d[i];
}
