// Preloaded into a process (LD_PRELOAD), keeps large freed blocks mapped for the next allocation of their size.
//
// XLA's CPU runtime allocates each execution's scratch anew (one block per device, 166 MiB for the small model's
// step) and frees it at the end; glibc maps a block that large afresh every time (its worker threads' arenas cannot
// hold it), and hands mid-sized ones back with madvise, so the kernel zeroes their pages again on first touch, every
// step. Here blocks of at least KEEP_MIN_BYTES come from this file instead: mapped once (on transparent huge
// pages), returned to a small cache when freed, and handed out again to a request that fits (best fit, at most 1/8
// larger). The cache holds at most DSV3_KEEP_FREED_MB (default 2048) MiB of freed blocks; the least recently freed
// go back to the kernel first. Everything else is glibc's (__libc_malloc and friends), and a request this file
// cannot serve (every slot taken, a larger alignment than a page, mmap failing) falls back to it.
//
// Every block carries a chunk header shaped like glibc's for an mmap'd chunk (size | IS_MMAPPED), so that
// malloc_usable_size reads it correctly; free and realloc of a block here never reach glibc.

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

#define KEEP_MIN_BYTES ((size_t)4 << 20)
#define HEADER_BYTES ((size_t)4096)  // the returned pointer is page aligned; its chunk header ends the first page
#define ROUND_BYTES ((size_t)2 << 20)
#define SLOTS 1024  // blocks mapped at once, live and cached; past that a request goes to glibc
#define CHUNK_IS_MMAPPED ((size_t)2)

typedef struct {
  char *base;       // the mapping; NULL when the slot is empty
  size_t length;    // of the mapping, HEADER_BYTES included
  int in_use;
  uint64_t freed;   // when it was last freed (a counter), for eviction
} Slot;

static Slot slots[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t lowest = UINTPTR_MAX, highest = 0;  // every mapping ever made lies in [lowest, highest)
static size_t cached_bytes, cache_limit = (size_t)2048 << 20;
static uint64_t clock_ticks, reuses, mappings;

// A fork while another thread holds the lock would leave the child's copy locked for good: hold it across fork.
static void lock_for_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void start(void) {
  const char *mb = getenv("DSV3_KEEP_FREED_MB");
  if (mb != NULL && *mb != '\0') cache_limit = (size_t)strtoull(mb, NULL, 10) << 20;
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

static void *user_pointer(Slot *s) {
  char *p = s->base + HEADER_BYTES;
  ((size_t *)p)[-1] = (s->length - HEADER_BYTES + 2 * sizeof(size_t)) | CHUNK_IS_MMAPPED;  // glibc's size field
  ((size_t *)p)[-2] = 0;
  return p;
}

static void evict_one(void) {  // unmaps the least recently freed cached block; lock held
  Slot *oldest = NULL;
  for (int i = 0; i < SLOTS; ++i)
    if (slots[i].base != NULL && !slots[i].in_use && (oldest == NULL || slots[i].freed < oldest->freed))
      oldest = &slots[i];
  if (oldest == NULL) return;
  munmap(oldest->base, oldest->length);
  cached_bytes -= oldest->length;
  oldest->base = NULL;
}

static void *keep_alloc(size_t size) {  // NULL: not served here (the caller asks glibc)
  size_t length = (size + HEADER_BYTES + ROUND_BYTES - 1) / ROUND_BYTES * ROUND_BYTES;
  if (length < size) return NULL;  // overflow
  pthread_mutex_lock(&lock);
  Slot *best = NULL, *empty = NULL;
  for (int i = 0; i < SLOTS; ++i) {
    Slot *s = &slots[i];
    if (s->base == NULL) {
      if (empty == NULL) empty = s;
    } else if (!s->in_use && s->length >= length && s->length - length <= length / 8 &&
               (best == NULL || s->length < best->length)) {
      best = s;
    }
  }
  if (best != NULL) {
    ++reuses;
    best->in_use = 1;
    cached_bytes -= best->length;
    void *p = user_pointer(best);
    pthread_mutex_unlock(&lock);
    return p;
  }
  if (empty == NULL) {  // every slot holds a block: free one cached block's slot, or give up
    evict_one();
    for (int i = 0; i < SLOTS && empty == NULL; ++i)
      if (slots[i].base == NULL) empty = &slots[i];
    if (empty == NULL) {
      pthread_mutex_unlock(&lock);
      return NULL;
    }
  }
  char *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  madvise(base, length, MADV_HUGEPAGE);
  ++mappings;
  empty->base = base;
  empty->length = length;
  empty->in_use = 1;
  if ((uintptr_t)base < lowest) __atomic_store_n(&lowest, (uintptr_t)base, __ATOMIC_RELEASE);
  if ((uintptr_t)base + length > highest) __atomic_store_n(&highest, (uintptr_t)base + length, __ATOMIC_RELEASE);
  void *p = user_pointer(empty);
  pthread_mutex_unlock(&lock);
  return p;
}

static Slot *find_locked(void *p) {
  for (int i = 0; i < SLOTS; ++i)
    if (slots[i].base != NULL && slots[i].in_use && slots[i].base + HEADER_BYTES == (char *)p) return &slots[i];
  return NULL;
}

static int maybe_ours(void *p) {
  uintptr_t a = (uintptr_t)p;
  return a >= __atomic_load_n(&lowest, __ATOMIC_ACQUIRE) && a < __atomic_load_n(&highest, __ATOMIC_ACQUIRE) &&
         (a & (HEADER_BYTES - 1)) == 0;
}

static int keep_free(void *p) {  // 0: not a block of this file
  if (!maybe_ours(p)) return 0;
  pthread_mutex_lock(&lock);
  Slot *s = find_locked(p);
  if (s != NULL) {
    s->in_use = 0;
    s->freed = ++clock_ticks;
    cached_bytes += s->length;
    while (cached_bytes > cache_limit) evict_one();
  }
  pthread_mutex_unlock(&lock);
  return s != NULL;
}

static size_t usable_size(void *p) {  // of a block of this file, 0 if it is not one
  if (!maybe_ours(p)) return 0;
  pthread_mutex_lock(&lock);
  Slot *s = find_locked(p);
  size_t n = s != NULL ? s->length - HEADER_BYTES : 0;
  pthread_mutex_unlock(&lock);
  return n;
}

// Marks the library as loaded (dsv3_jax/keep_freed.py looks for it) and reports: blocks mapped now, of them in use,
// bytes cached (freed and kept), allocations served from the cache, mappings made.
void dsv3_keep_freed_stats(uint64_t out[5]) {
  pthread_mutex_lock(&lock);
  uint64_t mapped = 0, in_use = 0;
  for (int i = 0; i < SLOTS; ++i) {
    mapped += slots[i].base != NULL;
    in_use += slots[i].base != NULL && slots[i].in_use;
  }
  out[0] = mapped;
  out[1] = in_use;
  out[2] = cached_bytes;
  out[3] = reuses;
  out[4] = mappings;
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t size) {
  void *p = size >= KEEP_MIN_BYTES ? keep_alloc(size) : NULL;
  return p != NULL ? p : __libc_malloc(size);
}

void free(void *ptr) {
  if (ptr != NULL && !keep_free(ptr)) __libc_free(ptr);
}

void *realloc(void *ptr, size_t size) {
  size_t old = ptr != NULL ? usable_size(ptr) : 0;
  if (old == 0) return __libc_realloc(ptr, size);  // glibc's block (or NULL): glibc's realloc
  if (size <= old && size >= KEEP_MIN_BYTES) return ptr;
  void *q = malloc(size);
  if (q == NULL) return NULL;
  memcpy(q, ptr, size < old ? size : old);
  free(ptr);
  return q;
}

static void *aligned(size_t alignment, size_t size) {
  void *p = size >= KEEP_MIN_BYTES && alignment <= HEADER_BYTES ? keep_alloc(size) : NULL;
  return p != NULL ? p : __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void *p = aligned(alignment, size);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }

void *memalign(size_t alignment, size_t size) { return aligned(alignment, size); }
