// The CPU kernels for x86-64 CPUs with AVX2 and FMA (Intel since 2013, AMD since 2015).
#include "isa.h"
#if CAPSROUTING_X86_LEVELS
#define CAPSROUTING_ISA avx2
#define CAPSROUTING_ISA_VECTOR_BYTES 32
#define CAPSROUTING_ISA_TARGET "avx2,fma"
#include "kernels/unit.inc"
#endif
