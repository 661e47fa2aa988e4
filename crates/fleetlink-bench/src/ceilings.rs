//! Same-run machine ceilings, so each figure can be read as a fraction of what the machine can do.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ceilings {
    /// 100-byte UDP datagrams per second received over loopback, sender and receiver on
    /// different cores.
    pub udp_loopback_pps: f64,
    /// AES-128-GCM (QUIC's default cipher) sealing 1200-byte packets on one core, bytes/s.
    pub aes_gcm_bytes_per_s: f64,
}

pub fn measure(duration: Duration, receiver_core: Option<usize>) -> Result<Ceilings> {
    Ok(Ceilings {
        udp_loopback_pps: udp_pps(duration, receiver_core)?,
        aes_gcm_bytes_per_s: aes_gcm(duration)?,
    })
}

fn udp_pps(duration: Duration, receiver_core: Option<usize>) -> Result<f64> {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let addr = rx.local_addr()?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(addr)?;
    let receiver = std::thread::spawn(move || -> Result<(u64, Duration)> {
        if let Some(core) = receiver_core {
            crate::procs::pin_current_thread(core)?;
        }
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        while rx.recv(&mut buf).is_ok() {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            n += 1;
        }
        Ok((n, first.map_or(Duration::ZERO, |f| last - f)))
    });
    let msg = [7u8; 100];
    let end = Instant::now() + duration;
    while Instant::now() < end {
        for _ in 0..64 {
            let _ = tx.send(&msg); // a full receive buffer drops datagrams: that is the ceiling
        }
    }
    let (received, span) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP receiver panicked"))??;
    Ok(if span.is_zero() {
        0.0
    } else {
        received as f64 / span.as_secs_f64()
    })
}

fn aes_gcm(duration: Duration) -> Result<f64> {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[0x42; 16]).map_err(|_| anyhow::anyhow!("AES key"))?,
    );
    let mut packet = vec![0u8; 1200];
    let mut bytes = 0u64;
    let mut counter = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..256 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            counter += 1;
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([0u8; 16]),
                    &mut packet,
                )
                .map_err(|_| anyhow::anyhow!("AES-GCM seal"))?;
            let _ = std::hint::black_box(tag);
            bytes += packet.len() as u64;
        }
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}
