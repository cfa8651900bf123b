//! A pool of reusable threads, for build jobs and daemon connections: a thread per build
//! or per connection would otherwise cost a thread creation (stack mapping, guard page,
//! signal stack) on the hot path of every trivial build and every short connection.
//! Idle workers wait on a condition variable and leave after a minute without work, so an
//! idle daemon holds no threads.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

type Task = Box<dyn FnOnce() + Send + 'static>;

const IDLE_EXIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    queue: VecDeque<Task>,
    idle: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

/// Runs tasks on reusable named threads.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    name: &'static str,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({})", self.name)
    }
}

impl Pool {
    pub fn new(name: &'static str) -> Pool {
        Pool {
            shared: Arc::default(),
            name,
        }
    }

    /// Runs `task` on an idle worker, or on a new one if none is idle. Fails only when no
    /// thread can be created (the task is then dropped unrun).
    pub fn execute(&self, task: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        {
            let mut st = self
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if st.idle > st.queue.len() {
                st.queue.push_back(Box::new(task));
                self.shared.cv.notify_one();
                return Ok(());
            }
        }
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || worker(shared, Box::new(task)))
            .map(|_| ())
    }
}

fn worker(shared: Arc<Shared>, first: Task) {
    first();
    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(task) = st.queue.pop_front() {
            drop(st);
            task();
            st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        st.idle += 1;
        let (next, timeout) = shared
            .cv
            .wait_timeout(st, IDLE_EXIT)
            .unwrap_or_else(PoisonError::into_inner);
        st = next;
        st.idle -= 1;
        // A task queued while this worker counted as idle is taken even on timeout: the
        // queuer relied on it.
        if timeout.timed_out() && st.queue.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_every_task_and_reuses_threads() {
        let pool = Pool::new("test-pool");
        let (tx, rx) = mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            pool.execute(move || {
                tx.send((i, std::thread::current().id())).unwrap();
            })
            .unwrap();
            // Sequential use: the previous task's worker is idle again by the time the next
            // one is queued, so it is reused.
            let _ = rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx2, rx2) = mpsc::channel();
        let ids: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                let tx2 = tx2.clone();
                pool.execute(move || tx2.send(std::thread::current().id()).unwrap())
                    .unwrap();
                let id = rx2.recv().unwrap();
                std::thread::sleep(Duration::from_millis(1));
                id
            })
            .collect();
        assert!(ids.len() < 20, "threads were not reused: {}", ids.len());
    }

    #[test]
    fn concurrent_tasks_run_in_parallel() {
        let pool = Pool::new("test-pool");
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let (tx, rx) = mpsc::channel();
        for _ in 0..4 {
            let b = barrier.clone();
            let tx = tx.clone();
            // Each task waits for all four: this only finishes if four threads run at once.
            pool.execute(move || {
                b.wait();
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
    }
}
