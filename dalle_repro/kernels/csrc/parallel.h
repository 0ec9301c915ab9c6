// The one parallel loop of the CPU kernels (local_attention.cpp, gumbel_softmax.cpp).
#pragma once
#include <algorithm>
#include <cstdint>

namespace dalle_repro {

// fn(i) for i in [0, n), shared out by OpenMP over at most `threads` threads. Loaded after
// PyTorch, the kernels' library binds to the libgomp PyTorch has already loaded (the loader
// matches the soname), so this runs on PyTorch's own worker threads. With threads of its own the
// attention kernel competed with PyTorch's spinning workers, and two threads ran slower than one.
template <typename F>
void parallel_for(int64_t n, int64_t threads, F fn) {
  threads = std::max<int64_t>(1, std::min(threads, n));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace dalle_repro
