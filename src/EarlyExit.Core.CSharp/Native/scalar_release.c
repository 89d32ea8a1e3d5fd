/*
 * Deferred release of TorchSharp's native scalars (libearlyexit-scalars.so).
 *
 * TorchSharp passes a Scalar to native code as a raw handle and keeps nothing alive for the duration of the call:
 * every `tensor + tensor` (alpha = 1), `tensor * 0.5`, and its own optimisers create Scalars that the garbage
 * collector may finalize while the native call still reads them. The finalizer calls THSTorch_dispose_scalar, which
 * frees the c10::Scalar; the call then reads freed memory ("Unknown scalar type", "alpha must not be a floating point
 * number", or heap corruption) and the process aborts.
 *
 * This library is what TorchSharp's DllImports of "LibTorchSharp" resolve to (EarlyExit.Native.NativeScalars sets the
 * resolver). It defines THSTorch_dispose_scalar itself and finds every other symbol in libLibTorchSharp.so, its
 * DT_NEEDED. A disposed scalar is queued, not freed. EarlyExit_release_scalars(), called at a safe point (between two
 * batches of the thread that runs torch, when none of its native calls is in flight), frees the scalars queued before
 * the previous safe point: two generations, so that a native call of another thread that spans one safe point is
 * safe too. A backstop releases the older generation when the queue passes a limit, so that code which never reaches
 * a safe point does not grow without bound.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef void (*dispose_fn)(void *);

static pthread_mutex_t gate = PTHREAD_MUTEX_INITIALIZER;
static dispose_fn real_dispose;
static void **young, **old;               /* queued since the last safe point; queued before it */
static size_t young_count, young_cap, old_count, old_cap;
static size_t limit = (size_t)1 << 22;     /* backstop: about 4 million scalars (~130 MB of c10::Scalar) */
static uint64_t deferred_total, released_total;

void EarlyExit_set_scalar_dispose(dispose_fn f) { real_dispose = f; }

void EarlyExit_set_scalar_limit(size_t n) { limit = n; }

/* Frees the older generation and makes the young one old. Called with the gate held. */
static size_t release_locked(void)
{
    size_t freed = 0;
    if (real_dispose != NULL)
    {
        for (size_t i = 0; i < old_count; i++) real_dispose(old[i]);
        freed = old_count;
        released_total += old_count;
        void **buffer = old;
        size_t cap = old_cap;
        old = young; old_count = young_count; old_cap = young_cap;
        young = buffer; young_count = 0; young_cap = cap;
    }
    return freed;
}

size_t EarlyExit_release_scalars(void)
{
    pthread_mutex_lock(&gate);
    size_t freed = release_locked();
    pthread_mutex_unlock(&gate);
    return freed;
}

/* Counters: scalars queued so far, released so far, and queued now. */
void EarlyExit_scalar_counts(uint64_t *deferred, uint64_t *released, uint64_t *pending)
{
    pthread_mutex_lock(&gate);
    *deferred = deferred_total;
    *released = released_total;
    *pending = young_count + old_count;
    pthread_mutex_unlock(&gate);
}

void THSTorch_dispose_scalar(void *scalar)
{
    if (scalar == NULL) return;
    pthread_mutex_lock(&gate);
    if (young_count == young_cap)
    {
        size_t cap = young_cap ? 2 * young_cap : 4096;
        void **grown = realloc(young, cap * sizeof(void *));
        if (grown == NULL)
        {
            /* Out of memory for the queue: free now, as TorchSharp would have. */
            pthread_mutex_unlock(&gate);
            if (real_dispose != NULL) real_dispose(scalar);
            return;
        }
        young = grown;
        young_cap = cap;
    }
    young[young_count++] = scalar;
    deferred_total++;
    if (young_count + old_count > limit) release_locked();
    pthread_mutex_unlock(&gate);
}
