//! Framing: every message on a stream is a 4-byte big-endian length, then that many bytes of one
//! protobuf message. The decoder checks the length against the maximum before it buffers the body,
//! so a peer cannot make us allocate more than `max_frame_bytes`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes in a frame's length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces a frame longer than the limit.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The frame's bytes are not a valid protobuf encoding of the expected message.
    #[error("malformed {message} frame: {reason}")]
    Malformed {
        /// The message type that was expected.
        message: &'static str,
        /// What prost reported.
        reason: String,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of an unfinished frame)")]
    Truncated {
        /// Bytes of the unfinished frame that were received.
        buffered: usize,
    },
}

/// Appends one frame holding `msg` to `buf`.
pub fn encode_frame<M: Message>(msg: &M, buf: &mut BytesMut) {
    let len = msg.encoded_len();
    buf.reserve(LENGTH_PREFIX_BYTES + len);
    // Messages we build are far below 4 GiB; the receiver enforces the real limit.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    msg.encode_raw(buf);
}

/// One frame holding `msg`, as bytes ready to write to a stream.
pub fn encoded_frame<M: Message>(msg: &M) -> Bytes {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf);
    buf.freeze()
}

/// Incremental frame decoder: feed it whatever bytes arrive, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: u32,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame_bytes,
        }
    }

    /// Changes the limit (after the handshake announced the session's).
    pub fn set_max_frame_bytes(&mut self, max: u32) {
        self.max_frame_bytes = max;
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The body of the next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let total = LENGTH_PREFIX_BYTES + len as usize;
        if self.buf.len() < total {
            // Reserve only what the announced (and bounded) frame needs.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(self.buf.split_to(len as usize).freeze()))
    }

    /// The next complete frame decoded as `M`, if one is buffered.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        match self.next_frame()? {
            None => Ok(None),
            Some(body) => M::decode(body)
                .map(Some)
                .map_err(|e| FrameError::Malformed {
                    message: short_type_name::<M>(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Call at end of stream: fails if an unfinished frame is buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{TelemetryBatch, TelemetryPoint, Value, value};
    use proptest::prelude::*;

    fn batch(seq: u64, n: usize) -> TelemetryBatch {
        TelemetryBatch {
            ack_now: false,
            seq,
            points: (0..n)
                .map(|i| TelemetryPoint {
                    metric: format!("m{i}"),
                    time_us: i as i64,
                    value: Some(Value {
                        kind: Some(value::Kind::DoubleValue(i as f64)),
                    }),
                })
                .collect(),
        }
    }

    #[test]
    fn worked_example_from_protocol_md() {
        // docs/protocol.md: TelemetryAck { seq: 300 } is 00 00 00 03 | 08 ac 02
        let frame = encoded_frame(&crate::v1::TelemetryAck { seq: 300 });
        assert_eq!(&frame[..], &[0x00, 0x00, 0x00, 0x03, 0x08, 0xac, 0x02]);
    }

    #[test]
    fn oversize_length_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&2048u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 2048,
                max: 1024
            })
        );
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        let err = d.next_message::<TelemetryBatch>().unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Malformed {
                    message: "TelemetryBatch",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_frame_is_reported_at_finish() {
        let mut d = FrameDecoder::new(1024);
        let frame = encoded_frame(&batch(1, 3));
        d.extend(&frame[..frame.len() - 1]);
        assert_eq!(d.next_message::<TelemetryBatch>(), Ok(None));
        assert_eq!(
            d.finish(),
            Err(FrameError::Truncated {
                buffered: frame.len() - 1
            })
        );
    }

    proptest! {
        /// Any sequence of frames split at arbitrary points decodes back to the same messages.
        #[test]
        fn frames_survive_arbitrary_splits(
            sizes in proptest::collection::vec(0usize..20, 1..10),
            cuts in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let batches: Vec<_> = sizes.iter().enumerate().map(|(i, n)| batch(i as u64 + 1, *n)).collect();
            let mut wire = BytesMut::new();
            for b in &batches {
                encode_frame(b, &mut wire);
            }
            let mut d = FrameDecoder::new(1 << 20);
            let mut out = Vec::new();
            let mut rest = &wire[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                d.extend(&rest[..n]);
                rest = &rest[n..];
                while let Some(m) = d.next_message::<TelemetryBatch>().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, batches);
            prop_assert!(d.finish().is_ok());
        }

        /// Arbitrary bytes never panic the decoder; they yield frames, an error, or a wait for more.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new(256);
            d.extend(&bytes);
            for _ in 0..bytes.len() + 1 {
                match d.next_message::<TelemetryBatch>() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
