// The CPU kernels for x86-64 CPUs with AVX-512 F, VL, BW and DQ (Intel Skylake-SP and later, AMD Zen 4).
#include "isa.h"
#if CAPSROUTING_X86_LEVELS
#define CAPSROUTING_ISA avx512
#define CAPSROUTING_ISA_VECTOR_BYTES 64
#define CAPSROUTING_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#include "kernels/unit.inc"
#endif
