//! The load every system gets: how many devices, how fast, how big.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::Semaphore;

/// Simulated devices, their rate and message size.
#[derive(Debug, Clone)]
pub struct Load {
    pub devices: usize,
    /// Messages per second per device; `None` = as fast as it can (flood).
    pub rate: Option<f64>,
    pub message_bytes: usize,
    /// fleetlink only: every message's string differs (a counter at its start), so the store
    /// cannot code it once per chunk.
    pub unique_strings: bool,
}

impl Load {
    /// The pacing of device `i`: `None` for a flood; otherwise ticks at `rate` with a phase
    /// spread over the period, so the fleet's load is smooth rather than in lockstep.
    pub fn ticker(&self, i: usize, start: Instant) -> Option<tokio::time::Interval> {
        let rate = self.rate?;
        let period = Duration::from_secs_f64(1.0 / rate);
        let phase = period.mul_f64((i as f64 * 0.618_033_988_7).fract());
        let mut t = tokio::time::interval_at((start + phase).into(), period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(t)
    }
}

/// Printable text of `n` bytes (fleetlink carries it in a string value).
pub fn payload_text(n: usize) -> String {
    "x".repeat(n)
}

/// Bytes of a peer message: 8 bytes of send time (ns since [`epoch`]) then filler up to `n`.
pub fn stamped_payload(n: usize) -> Vec<u8> {
    let mut v = vec![b'x'; n.max(8)];
    let ns = epoch().elapsed().as_nanos() as u64;
    v[..8].copy_from_slice(&ns.to_le_bytes());
    v
}

/// When a stamped payload was sent, if it carries a stamp.
pub fn stamp_of(payload: &[u8]) -> Option<Instant> {
    let ns = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(epoch() + Duration::from_nanos(ns))
}

/// The process-wide time origin of payload stamps (sender and subscriber share the process).
pub fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// How many client endpoints (UDP sockets) `n` QUIC clients are spread over: one per 1000.
pub fn endpoints_for(n: usize) -> std::ops::Range<usize> {
    0..n.div_ceil(1000).clamp(1, 128)
}

/// Handshakes in flight at once while connecting a fleet.
pub const CONNECT_CONCURRENCY: usize = 64;

/// Connects `n` clients with at most [`CONNECT_CONCURRENCY`] handshakes in flight, in index order.
pub async fn connect_ramp<T, F, Fut>(n: usize, connect: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let limit = std::sync::Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let fut = connect(i);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// A tokio runtime on a thread of its own, for the peers' subscribers: on the load generator's
/// runtime a subscriber would queue behind a thousand flooding publishers and fall behind, which
/// measures the load generator instead of the broker. Stops when dropped.
#[derive(Debug)]
pub struct SideThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SideThread {
    /// Runs `setup` on a new thread's runtime, which keeps running what it spawned.
    pub async fn start<T, F, Fut>(setup: F) -> Result<(T, SideThread)>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
    {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let _ = ready_tx.send(setup().await);
                    let _ = stop_rx.await;
                });
            })?;
        let value = ready_rx.await??;
        Ok((
            value,
            SideThread {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        ))
    }
}

impl Drop for SideThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
