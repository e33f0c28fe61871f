//! The worker pool of the forward pass.
//!
//! Built for two things a general-purpose pool does badly here:
//!
//! * **Many tiny jobs.** Decoding one token runs a few hundred matrix-vector
//!   products of tens of microseconds each. Workers therefore spin briefly
//!   for the next job, then yield, and only then park, so that back-to-back
//!   jobs never pay for a wake-up.
//! * **A busy machine.** On a home device another program may hold one of
//!   the cores. Work is handed out in small chunks from a shared counter, so
//!   a preempted thread delays only the chunk it holds; the caller works
//!   through the rest itself. A worker that has not joined a job by the time
//!   its chunks are gone is not waited for at all, and waiting threads yield
//!   the core instead of burning it. (llama.cpp's spinning OpenMP threads fall
//!   from about 105 to 8 tokens/s on a two-core machine with one core busy.)
//!
//! The calling thread takes part in every job, so a pool of `n` threads runs
//! `n - 1` workers.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long an idle worker spins, then yields, before it parks.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_micros(500);

/// Set in [`Inner::state`] once a job's chunks are all taken: no worker may
/// join it any more. The low bits count workers inside the job.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// One job: `n` chunks handed out through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

impl Job<'_> {
    fn run(&self) {
        let outer = IN_JOB.with(|f| f.replace(true));
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                break;
            }
            (self.f)(i);
        }
        IN_JOB.with(|f| f.set(outer));
    }
}

struct Inner {
    /// Bumped each time a job is published.
    epoch: AtomicUsize,
    /// `CLOSED` bit plus the number of workers inside the current job.
    state: AtomicUsize,
    /// The current job; only dereferenced by a worker counted in `state`.
    job: AtomicPtr<Job<'static>>,
    sleepers: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
    /// Set by [`Pool::rest`]: idle workers park at once instead of spinning
    /// and yielding; cleared by the next job.
    rest: AtomicBool,
}

/// A pool of worker threads for fork-join loops.
pub struct Pool {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises callers: one job at a time.
    caller: Mutex<()>,
}

thread_local! {
    /// Set while this thread runs chunks of a job: a job's closure that
    /// calls the pool again runs that inner loop inline.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Pool {
    /// A pool running jobs on `threads` threads in all (the caller included).
    pub fn new(threads: usize) -> Self {
        let inner = Arc::new(Inner {
            epoch: AtomicUsize::new(0),
            state: AtomicUsize::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            rest: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("prima-cpu-{i}"))
                    .spawn(move || worker(&inner))
                    .expect("spawning a CPU worker thread")
            })
            .collect();
        Self {
            inner,
            workers,
            caller: Mutex::new(()),
        }
    }

    /// Tells idle workers that no job comes soon (a ring device that sent
    /// its window on waits for the other devices): they park now instead
    /// of spinning and yielding for the next half-millisecond, leaving the
    /// cores to whatever else runs. The next job wakes them as usual.
    pub fn rest(&self) {
        self.inner.rest.store(true, Ordering::Relaxed);
    }

    /// Threads that run a job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i` in `0..n`, spread over the pool; returns
    /// when all calls have returned.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.workers.is_empty() || IN_JOB.with(|f| f.get()) {
            (0..n).for_each(f);
            return;
        }
        let _guard = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        let inner = &*self.inner;
        inner.rest.store(false, Ordering::Relaxed);
        // Publish: pointer first, then open the job, then announce it.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        inner.job.store(ptr, Ordering::Release);
        inner.state.store(0, Ordering::Release);
        inner.epoch.fetch_add(1, Ordering::Release);
        {
            let sleepers = inner.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                inner.wake.notify_all();
            }
        }
        job.run();
        // All chunks are taken: close the job to latecomers, then wait for
        // the workers still inside.
        inner.state.fetch_or(CLOSED, Ordering::AcqRel);
        wait_until(|| inner.state.load(Ordering::Acquire) & !CLOSED == 0);
        inner.job.store(std::ptr::null_mut(), Ordering::Release);
        // `job` may now be dropped: no worker is inside and none can join.
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.epoch.fetch_add(1, Ordering::Release);
        {
            let _s = self
                .inner
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.inner.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Spins, then yields, until `done()`; a waiting thread never holds a core
/// that another thread of ours (or another program) could use for long.
fn wait_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn worker(inner: &Inner) {
    // The epoch the pool was created with, not the current one: a worker
    // that starts late must still see a stop requested before it ran.
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin, yield, then park.
        let start = Instant::now();
        loop {
            let e = inner.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            let waited = start.elapsed();
            let resting = inner.rest.load(Ordering::Relaxed);
            if waited < SPIN && !resting {
                std::hint::spin_loop();
            } else if waited < SPIN + YIELD && !resting {
                std::thread::yield_now();
            } else {
                let mut sleepers = inner.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while inner.epoch.load(Ordering::Acquire) == seen {
                    sleepers = inner.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
            }
        }
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        // Join the current job unless it is already closed.
        let mut s = inner.state.load(Ordering::Acquire);
        let joined = loop {
            if s & CLOSED != 0 {
                break false;
            }
            match inner
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => s = now,
            }
        };
        if !joined {
            continue;
        }
        let ptr = inner.job.load(Ordering::Acquire);
        // SAFETY: this worker is counted in `state`, and the publishing
        // thread keeps the job alive (it waits in `Pool::run`) until every
        // counted worker has left; a job is only joinable between its
        // pointer being stored and `CLOSED` being set, so `ptr` is the live
        // job (never null or stale).
        let job = unsafe { &*ptr };
        job.run();
        inner.state.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `f(chunk_index, chunk)` over `data` cut into `chunk`-sized pieces
/// (the last may be shorter), in parallel on `pool`.
pub fn for_each_chunk_mut<T: Send>(
    pool: &Pool,
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let pieces: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk).map(Mutex::new).collect();
    pool.run(pieces.len(), &|i| {
        let mut piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i, &mut piece);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_exactly_once() {
        for threads in [1, 2, 3, 8] {
            let pool = Pool::new(threads);
            for n in [0, 1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads} n {n}"
                );
            }
        }
    }

    #[test]
    fn many_back_to_back_jobs_and_idle_gaps() {
        let pool = Pool::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.run(16, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // Long enough for the workers to park.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * (0..16).sum::<usize>());
    }

    #[test]
    fn chunks_cover_the_slice_and_nested_calls_run_inline() {
        let pool = Pool::new(4);
        let mut v = vec![0u32; 1001];
        for_each_chunk_mut(&pool, &mut v, 64, |c, piece| {
            for (k, x) in piece.iter_mut().enumerate() {
                *x = (c * 64 + k) as u32;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_callers_are_serialised() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(10, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 10);
    }
}
