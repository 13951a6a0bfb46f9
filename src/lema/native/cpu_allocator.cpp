// A caching allocator for PyTorch's CPU tensors of `min_bytes` or more (see lema/cpu_allocator.py).
//
// Each freed block is kept, keyed by its size in whole pages, and handed to the next request of that
// size: a layer's activations have the same sizes at every layer, so after the first layer they take
// no new pages (no mmap, no page faults, no zeroing). What it holds (blocks in use + cached) stays under
// the most it ever had in use plus `cap_bytes`: memory the process already needed at its peak is kept
// for reuse, and the peak grows by at most the cap. Beyond that, cached blocks go back to the OS, oldest
// first, and a size the cache does not hold then is mapped anew.
// Smaller requests go to the allocator that was there before (glibc malloc through c10).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kPage = 4096;

struct Block {
  void* ptr;
  size_t bytes;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(c10::Allocator* fallback, size_t min_bytes, size_t cap_bytes)
      : fallback_(fallback), min_bytes_(min_bytes), cap_bytes_(cap_bytes) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return fallback_->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        auto node = it->second.back();
        it->second.pop_back();
        ptr = node->ptr;
        lru_.erase(node);
        cached_ -= bytes;
        hits_++;
      }
    }
    if (ptr == nullptr) {
      std::deque<Block> out;
      {  // room for the new block under the limit, grown by this block if it sets a new high-water mark
        std::lock_guard<std::mutex> lock(mu_);
        take_over_limit(std::max(high_water_, in_use_ + bytes) + cap_bytes_ - bytes, out);
      }
      unmap(out);
      ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (ptr == MAP_FAILED) {
        release(0);  // what the cache holds goes first, then one more try
        ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        TORCH_CHECK(ptr != MAP_FAILED, "LEMA's CPU allocator: out of memory mapping ", bytes, " bytes");
      }
      std::lock_guard<std::mutex> lock(mu_);
      mapped_ += bytes;
      misses_++;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[ptr] = bytes;
      in_use_ += bytes;
      if (in_use_ > high_water_) high_water_ = in_use_;
    }
    return {ptr, ptr, &CachingCPUAllocator::Delete, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate (oneDNN's scratchpads, some kernels) free through this: a block of ours goes to
  // the cache, a smaller one back to the allocator that made it
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::Delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Frees cached blocks, oldest first, until at most `keep` bytes stay cached.
  void release(size_t keep) {
    std::deque<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (cached_ > keep && !lru_.empty()) take_oldest(out);
    }
    unmap(out);
  }

  void set_cap(size_t cap_bytes) {
    std::deque<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cap_bytes_ = cap_bytes;
      take_over_limit(high_water_ + cap_bytes_, out);
    }
    unmap(out);
  }

  void stats(uint64_t* out) {
    std::lock_guard<std::mutex> lock(mu_);
    out[0] = in_use_; out[1] = cached_; out[2] = hits_; out[3] = misses_;
    out[4] = releases_; out[5] = mapped_; out[6] = cap_bytes_; out[7] = high_water_;
  }

  static void Delete(void* ptr);

  // fork() while another thread holds the lock would leave it held forever in the child (a DataLoader worker):
  // the lock is taken around the fork, and released on both sides
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }

 private:
  // Under the lock: the oldest cached block out of the cache (into `out`, to unmap after the lock).
  void take_oldest(std::deque<Block>& out) {
    Block b = lru_.front();
    free_[b.bytes].pop_front();  // the oldest of its size is the front of its queue
    lru_.pop_front();
    cached_ -= b.bytes;
    mapped_ -= b.bytes;
    releases_++;
    out.push_back(b);
  }

  // Under the lock: cached blocks out, oldest first, until in use + cached is at most `limit`.
  void take_over_limit(size_t limit, std::deque<Block>& out) {
    while (in_use_ + cached_ > limit && !lru_.empty()) take_oldest(out);
  }

  static void unmap(const std::deque<Block>& out) {
    for (auto& b : out) munmap(b.ptr, b.bytes);
  }

  void give_back(void* ptr) {
    std::deque<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(ptr);
      if (it == sizes_.end()) {  // not ours: a raw allocation under min_bytes, made by the fallback
        c10::DeleterFnPtr fallback_delete = fallback_->raw_deleter();
        TORCH_CHECK(fallback_delete != nullptr, "LEMA's CPU allocator: cannot free a block it did not make");
        fallback_delete(ptr);
        return;
      }
      const size_t bytes = it->second;
      sizes_.erase(it);
      in_use_ -= bytes;
      lru_.push_back({ptr, bytes});
      free_[bytes].push_back(std::prev(lru_.end()));
      cached_ += bytes;
      take_over_limit(high_water_ + cap_bytes_, out);
    }
    unmap(out);
  }

  c10::Allocator* fallback_;
  size_t min_bytes_, cap_bytes_;
  std::mutex mu_;
  std::list<Block> lru_;  // cached blocks, oldest first
  std::unordered_map<size_t, std::deque<std::list<Block>::iterator>> free_;
  std::unordered_map<void*, size_t> sizes_;  // blocks handed out, and their sizes
  size_t in_use_ = 0, cached_ = 0, mapped_ = 0;
  size_t high_water_ = 0;  // the most ever in use: what the cache may fill back to
  uint64_t hits_ = 0, misses_ = 0, releases_ = 0;
};

CachingCPUAllocator* instance = nullptr;

void CachingCPUAllocator::Delete(void* ptr) { instance->give_back(ptr); }

void before_fork() { instance->lock_for_fork(); }
void after_fork() { instance->unlock_after_fork(); }

}  // namespace

extern "C" {

// Installs the allocator as PyTorch's CPU allocator (once per process); later calls change the cap.
int lema_cpu_allocator_install(uint64_t min_bytes, uint64_t cap_bytes) {
  const bool first = instance == nullptr;
  if (first) {
    instance = new CachingCPUAllocator(c10::GetCPUAllocator(), min_bytes, cap_bytes);
    pthread_atfork(before_fork, after_fork, after_fork);
    c10::SetCPUAllocator(instance, /*priority=*/UINT8_MAX);
  } else {
    instance->set_cap(cap_bytes);
  }
  if (c10::GetCPUAllocator() != instance) return -1;  // another allocator holds a higher priority
  return first ? 1 : 0;
}

void lema_cpu_allocator_release(uint64_t keep_bytes) {
  if (instance != nullptr) instance->release(keep_bytes);
}

void lema_cpu_allocator_stats(uint64_t* out) {
  if (instance != nullptr) instance->stats(out);
}
}
