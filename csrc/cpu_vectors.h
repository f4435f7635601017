// What the CPU kernels that write explicit vectors (GCC's vector extensions) share: their helpers are
// always inlined, so no vector crosses a call (whose ABI differs between the clones; hence GCC's ABI
// note is silenced for the including file: it is emitted as the functions are compiled, after a pop),
// and each kernel's entry is compiled for AVX-512, AVX2 and the baseline, the best chosen at load time.
#pragma once

#pragma GCC diagnostic ignored "-Wpsabi"
#define EXPSEG_VEC __attribute__((always_inline)) inline
#if defined(__x86_64__) && !defined(__clang__)
#define EXPSEG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EXPSEG_CLONES  // elsewhere: the build's own ISA
#endif
