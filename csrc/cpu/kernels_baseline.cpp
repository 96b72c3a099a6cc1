// The CPU kernels for the architecture's baseline instructions (x86-64: SSE2; aarch64: NEON).
#define CAPSROUTING_ISA baseline
#define CAPSROUTING_ISA_VECTOR_BYTES 16
#include "kernels/unit.inc"
