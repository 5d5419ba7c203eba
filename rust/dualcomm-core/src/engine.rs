//! The progress engine: one thread per endpoint that runs its operations, in the order they
//! were issued, while the caller goes on computing (the CPU proxy of DeepEP's successors:
//! "a virtual DPU on the GPU"). The caller gets a [`Ticket`] per operation and waits on it
//! only when it needs the result.
//!
//! The thread sleeps on its job queue when idle and on the transport's completion queue while
//! an operation waits for peers, so an idle or blocked engine burns no core, which is what an
//! oversubscribed box (many ranks on few cores) needs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::channels::Channels;
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::transport::Transport;

/// What a progress thread drives: one endpoint, or one rank's channels.
pub trait Driven: Send + 'static {
    fn rank(&self) -> usize;
    /// Every transport it runs on, with the count of operations completed on it, so that
    /// `Engine::stop` can leave the world from another thread while an operation waits.
    fn departures(&self) -> Vec<(Arc<dyn Transport>, Arc<AtomicU64>)>;
    /// A job panicked: refuse further work and leave the world (`Endpoint::fail`).
    fn fail(&mut self, e: &Error);
    fn destroy(&mut self);
}

impl Driven for Endpoint {
    fn rank(&self) -> usize {
        Endpoint::rank(self)
    }

    fn departures(&self) -> Vec<(Arc<dyn Transport>, Arc<AtomicU64>)> {
        vec![(self.transport_handle(), self.completed_ops_handle())]
    }

    fn fail(&mut self, e: &Error) {
        Endpoint::fail(self, e);
    }

    fn destroy(&mut self) {
        Endpoint::destroy(self);
    }
}

impl Driven for Channels {
    fn rank(&self) -> usize {
        Channels::rank(self)
    }

    fn departures(&self) -> Vec<(Arc<dyn Transport>, Arc<AtomicU64>)> {
        self.endpoints()
            .iter()
            .flat_map(Driven::departures)
            .collect()
    }

    fn fail(&mut self, e: &Error) {
        for ep in self.endpoints_mut() {
            ep.fail(e);
        }
    }

    fn destroy(&mut self) {
        for ep in self.endpoints_mut() {
            ep.destroy();
        }
    }
}

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

enum State<T> {
    Pending,
    Done(T),
    Taken,
    /// The job never ran to the end (the engine stopped, or the job panicked).
    Abandoned(Error),
}

struct Slot<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

/// The result of one submitted operation, available once the engine has run it.
pub struct Ticket<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Ticket<T> {
    pub fn is_done(&self) -> bool {
        !matches!(*self.slot.state.lock().unwrap(), State::Pending)
    }

    /// As `wait`, for at most `limit`: None if the job is still running then (so that a
    /// caller can look at other things, such as a user's interrupt, and wait again).
    pub fn wait_for(&self, limit: Duration) -> Option<Result<T>> {
        let s = self.slot.state.lock().unwrap();
        let (s, _) = self
            .slot
            .changed
            .wait_timeout_while(s, limit, |s| matches!(s, State::Pending))
            .unwrap();
        if matches!(*s, State::Pending) {
            return None;
        }
        drop(s);
        Some(self.wait())
    }

    /// Blocks until the job has run, then hands over its result (once).
    ///
    /// Needs no deadline of its own: every operation has one, so each job ends in bounded
    /// time, and a job that cannot run is marked abandoned.
    pub fn wait(&self) -> Result<T> {
        let mut s = self.slot.state.lock().unwrap();
        loop {
            match std::mem::replace(&mut *s, State::Taken) {
                State::Pending => {
                    *s = State::Pending;
                    s = self.slot.changed.wait(s).unwrap();
                }
                State::Done(v) => return Ok(v),
                State::Taken => {
                    return Err(Error::invalid(
                        "event",
                        "an event not waited on before",
                        "one whose result was already taken",
                    ));
                }
                State::Abandoned(e) => {
                    *s = State::Abandoned(e.clone());
                    return Err(e);
                }
            }
        }
    }
}

/// Completes a ticket; if dropped unused (a panic, a stopped engine) it marks it abandoned.
struct Completer<T> {
    slot: Option<Arc<Slot<T>>>,
}

impl<T> Completer<T> {
    fn complete(self, v: T) {
        self.settle(State::Done(v));
    }

    fn abandon(self, why: Error) {
        self.settle(State::Abandoned(why));
    }

    fn settle(mut self, state: State<T>) {
        if let Some(slot) = self.slot.take() {
            *slot.state.lock().unwrap() = state;
            slot.changed.notify_all();
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // The engine stopped before it ran this job.
            *slot.state.lock().unwrap() = State::Abandoned(Error::Destroyed);
            slot.changed.notify_all();
        }
    }
}

pub struct Engine<S: Driven = Endpoint> {
    jobs: Mutex<Option<Sender<Job<S>>>>,
    worker: Mutex<Option<JoinHandle<S>>>,
    departures: Vec<(Arc<dyn Transport>, Arc<AtomicU64>)>,
}

impl<S: Driven> Engine<S> {
    /// Moves `ep` onto its own progress thread.
    pub fn start(ep: S) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let departures = ep.departures();
        let worker = thread::Builder::new()
            .name(format!("dualcomm-progress-{}", ep.rank()))
            .spawn(move || {
                let mut ep = ep;
                for job in rx {
                    job(&mut ep);
                }
                ep
            })
            .map_err(|e| Error::os_from("starting the progress thread", e))?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            departures,
        })
    }

    /// Runs the operations already queued, ends the thread and hands back what it drove,
    /// still in its world (so that several can be joined into channels). Later submissions
    /// fail with `Destroyed`.
    pub fn detach(&self) -> Result<S> {
        drop(self.jobs.lock().unwrap().take().ok_or(Error::Destroyed)?);
        let worker = self.worker.lock().unwrap().take().ok_or(Error::Destroyed)?;
        worker.join().map_err(|p| Error::Internal {
            rank: usize::MAX,
            detail: format!("the progress thread panicked: {}", panic_text(&*p)),
        })
    }

    /// Queues `f` behind the operations already submitted.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
    ) -> Result<Ticket<T>> {
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Pending),
            changed: Condvar::new(),
        });
        let completer = Completer {
            slot: Some(Arc::clone(&slot)),
        };
        let job: Job<S> = Box::new(move |ep: &mut S| {
            // A panic is a bug, never the caller's: it must not cross into the caller (or
            // Python). The ticket reports it, the endpoint refuses further work and leaves
            // the world, so peers fail fast with a peer-loss error instead of timing out.
            match catch_unwind(AssertUnwindSafe(|| f(ep))) {
                Ok(v) => completer.complete(v),
                Err(panic) => {
                    let e = Error::Internal {
                        rank: ep.rank(),
                        detail: format!("an operation panicked: {}", panic_text(&*panic)),
                    };
                    ep.fail(&e);
                    completer.abandon(e);
                }
            }
        });
        let jobs = self.jobs.lock().unwrap();
        match jobs.as_ref() {
            Some(tx) if tx.send(job).is_ok() => Ok(Ticket { slot }),
            _ => Err(Error::Destroyed),
        }
    }

    /// Runs `f` on the engine and waits for it.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> T + Send + 'static,
    ) -> Result<T> {
        self.submit(f)?.wait()
    }

    /// Leaves the world at once: operations in flight fail now instead of at their deadline,
    /// peers see this rank gone; then the thread drains its queue and exits.
    pub fn stop(&self) {
        let mut worker = self.worker.lock().unwrap();
        let Some(thread) = worker.take() else {
            // Stopped already, or detached: what it drove is no longer this engine's.
            return;
        };
        for (transport, completed) in &self.departures {
            transport.shutdown(completed.load(Ordering::Relaxed));
        }
        let tx = self.jobs.lock().unwrap().take();
        if let Some(tx) = tx {
            let _ = tx.send(Box::new(|ep: &mut S| ep.destroy()));
        }
        let _ = thread.join();
    }
}

impl<S: Driven> Drop for Engine<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
