// Probe: one m64n64k32 wgmma.mma_async.sp (f16 -> f32) with A in the cache's 2:4 fragment and
// metadata format, RS (sel 0 and 1), SS, unordered indices, replicated metadata; each variant
// against a CPU reference (see docs/hopper.md). Build: nvcc -gencode=arch=compute_90a,code=sm_90a
// -O2 -o probe experiments/mma_probes/wgmma_sp_probe.cu && ./probe  (variants 0, 1, 2, 4 should print err ~0).
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cuda_fp16.h>
#define D8(i) "+f"(d[i]),"+f"(d[i+1]),"+f"(d[i+2]),"+f"(d[i+3]),"+f"(d[i+4]),"+f"(d[i+5]),"+f"(d[i+6]),"+f"(d[i+7])
#define DR "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
template<int S> __device__ void rs(float*d,uint32_t*a,uint64_t b,uint32_t e){
 asm volatile("{.reg .pred p; setp.ne.b32 p,%38,0;\nwgmma.mma_async.sp.sync.aligned.m64n64k32.f32.f16.f16 " DR ",{%32,%33,%34,%35},%36,%37,%39,p,1,1,0;}\n"
 :D8(0),D8(8),D8(16),D8(24):"r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]),"l"(b),"r"(e),"r"(0),"n"(S));}
__device__ void ss(float*d,uint64_t a,uint64_t b,uint32_t e){
 asm volatile("{.reg .pred p; setp.ne.b32 p,%35,0;\nwgmma.mma_async.sp.sync.aligned.m64n64k32.f32.f16.f16 " DR ",%32,%33,%34,0,p,1,1,0,0;}\n"
 :D8(0),D8(8),D8(16),D8(24):"l"(a),"l"(b),"r"(e),"r"(0));}
__device__ uint64_t dsc(void*p,int sbo,int lt){uint32_t s=(uint32_t)__cvta_generic_to_shared(p);
 return (uint64_t)((s&0x3FFFF)>>4)|(1ull<<16)|((uint64_t)(sbo>>4)<<32)|((uint64_t)lt<<62);}
__global__ void k(const __half*Ac,const uint32_t*M,const __half*B,float*C,int mode){
 __shared__ __align__(1024) __half sB[64*32]; __shared__ __align__(1024) __half sA[64*16];
 int t=threadIdx.x,w=t>>5,l=t&31,g=l>>2,q=l&3;
 for(int i=t;i<64*32;i+=128){int n=i/32,kk=i%32,by=n*64+kk*2;by^=((by>>7)&3)<<4;sB[by/2]=B[i];}
 for(int i=t;i<64*16;i+=128){int m=i/16,c=i%16,by=m*32+c*2;by^=((by>>7)&1)<<4;sA[by/2]=Ac[i];}
 __syncthreads(); asm volatile("fence.proxy.async.shared::cta;\n":::"memory"); __syncthreads();
 uint32_t a[4]; for(int j=0;j<4;j++){int r=16*w+g+8*(j&1),c=2*q+8*(j>>1);
  __half2 h=__halves2half2(Ac[r*16+c],Ac[r*16+c+1]); a[j]=*(uint32_t*)&h;}
 uint32_t e=M[t]; float d[32]; for(int i=0;i<32;i++)d[i]=0.f;
 uint64_t db=dsc(sB,512,2),da=dsc(sA,256,3);
 asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
 if(mode==1) rs<1>(d,a,db,e); else if(mode==2) ss(d,da,db,e); else rs<0>(d,a,db,e);
 asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n":::"memory");
 for(int i=0;i<32;i++){int v0=i&1,v1=(i>>1)&1,v2=i>>2;C[(16*w+g+8*v1)*64+2*q+v0+8*v2]=d[i];}
}
int main(){srand(1);static float A[64*32],Bf[64*32],R[64*64],C[64*64];static __half Ac[64*16],Acs[64*16],Bh[64*32];
 static unsigned char idx[64][8][2];static uint32_t M[5][128];
 for(int i=0;i<64*32;i++){Bh[i]=__float2half((rand()%17-8)/8.f);Bf[i]=__half2float(Bh[i]);}
 for(int m=0;m<64;m++)for(int c=0;c<8;c++){int i0=rand()%4,i1;do i1=rand()%4;while(i1==i0);if(i0>i1){int x=i0;i0=i1;i1=x;}
  idx[m][c][0]=i0;idx[m][c][1]=i1;for(int j=0;j<4;j++)A[m*32+4*c+j]=0;
  for(int s=0;s<2;s++){__half h=__float2half((rand()%15-7)/4.f+(s?0:0.125f));A[m*32+4*c+idx[m][c][s]]=__half2float(h);Ac[m*16+2*c+s]=h;Acs[m*16+2*c+1-s]=h;}}
 for(int m=0;m<64;m++)for(int n=0;n<64;n++){float s=0;for(int kk=0;kk<32;kk++)s+=A[m*32+kk]*Bf[n*32+kk];R[m*64+n]=s;}
 // word(row m, k16 h): 4 nibbles; sw=1 -> swapped order
 auto wd=[&](int m,int h,int sw){uint32_t x=0;for(int c=0;c<4;c++){int i0=idx[m][4*h+c][0],i1=idx[m][4*h+c][1];if(sw){int y=i0;i0=i1;i1=y;}x|=(uint32_t)(i0|(i1<<2))<<(4*c);}return x;};
 for(int t=0;t<128;t++){int w=t>>5,g=(t&31)>>2,q=t&3,r=16*w+g;
  uint32_t good=wd(r,q&1,0)|(wd(r+8,q&1,0)<<16),bad=0x44444444u,sw=wd(r,q&1,1)|(wd(r+8,q&1,1)<<16);
  M[0][t]=q<2?good:bad; M[1][t]=q<2?bad:good; M[2][t]=M[0][t]; M[3][t]=q<2?sw:bad; M[4][t]=good;}
 __half *dA,*dAs,*dB;uint32_t*dM;float*dC;cudaMalloc(&dA,2048);cudaMalloc(&dAs,2048);cudaMalloc(&dB,4096);cudaMalloc(&dM,512);cudaMalloc(&dC,16384);
 cudaMemcpy(dA,Ac,2048,cudaMemcpyHostToDevice);cudaMemcpy(dAs,Acs,2048,cudaMemcpyHostToDevice);cudaMemcpy(dB,Bh,4096,cudaMemcpyHostToDevice);
 const char*nm[5]={"RS spsel0 (q0,q1 meta; junk q2,q3)","RS spsel1 (q2,q3 meta; junk q0,q1)","SS spsel0 (A smem SW32, B SW64)","RS spsel0 UNORDERED pairs (i0>i1, values swapped)","RS spsel0 meta replicated in all 4 lanes"};
 for(int v=0;v<5;v++){cudaMemcpy(dM,M[v],512,cudaMemcpyHostToDevice);cudaMemset(dC,0,16384);
  k<<<1,128>>>(v==3?dAs:dA,dM,dB,dC,v==1?1:v==2?2:0);cudaError_t er=cudaDeviceSynchronize();
  cudaMemcpy(C,dC,16384,cudaMemcpyDeviceToHost);double me=0;for(int i=0;i<4096;i++){double x=fabs(C[i]-R[i]);if(x>me)me=x;}
  printf("%-55s err=%s maxabs=%g  C[0]=%g R[0]=%g\n",nm[v],cudaGetErrorString(er),me,C[0],R[0]);}
}
