// top_k.cc's lane code, compiled once per instruction set (simd_targets.h); integer keys, so either gives the same
// result.

inline Ints Keys(const float* x, uint32_t m) {  // Key() of 16 entries (0 in lanes not in m)
  const Ints bits = LoadInts(reinterpret_cast<const int32_t*>(x), m);
  return Xor(bits, And(ShiftRightSigned<31>(bits), SetInts(0x7FFFFFFF)));
}

// The largest key of each block of `block` entries of x [V] (block >= kLanes).
void BlockMaxima(const float* x, int64_t V, int64_t block, std::vector<int32_t>& maxima) {
  for (size_t i = 0; i < maxima.size(); ++i) {
    const int64_t start = i * block, end = std::min(V, start + block);
    Ints top = SetInts(INT32_MIN);
    for (int64_t j = start; j < end; j += kLanes) {
      const uint32_t m = Lanes(end - j);
      top = Select(m, top, MaxInts(top, Keys(x + j, m)));
    }
    maxima[i] = ReduceMaxInts(top);
  }
}

// (key, index) of every entry of x [V] whose key is at least `bound`, in index order.
void Collect(const float* x, int64_t V, int32_t bound, std::vector<std::pair<int32_t, int32_t>>& found) {
  const Ints at_least = SetInts(bound);
  for (int64_t j = 0; j < V; j += kLanes) {
    const uint32_t m = Lanes(V - j);
    for (uint32_t hit = AtLeast(Keys(x + j, m), at_least) & m; hit; hit &= hit - 1) {
      const int lane = __builtin_ctz(hit);
      found.emplace_back(Key(x[j + lane]), static_cast<int32_t>(j + lane));
    }
  }
}
