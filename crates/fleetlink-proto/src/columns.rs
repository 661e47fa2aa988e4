//! The packed columns of `TelemetryColumns` (see `docs/protocol.md`): times as zigzag varint
//! deltas, numbers as little-endian arrays.

use prost::encoding::{decode_varint, encode_varint};

/// A column that does not hold the announced number of entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("TelemetryColumns.{column}: {problem}")]
pub struct ColumnError {
    /// Which column.
    pub column: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn error(column: &'static str, problem: impl Into<String>) -> ColumnError {
    ColumnError {
        column,
        problem: problem.into(),
    }
}

/// `time_us`: each time as the zigzag varint of its difference to the previous one (from 0).
pub fn encode_times(times: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(times.len() * 3);
    let mut previous = 0i64;
    for &t in times {
        let delta = t.wrapping_sub(previous);
        encode_varint(((delta << 1) ^ (delta >> 63)) as u64, &mut out);
        previous = t;
    }
    out
}

/// Inverse of [`encode_times`]: exactly `count` times, nothing after them.
pub fn decode_times(mut data: &[u8], count: usize) -> Result<Vec<i64>, ColumnError> {
    if count > data.len() {
        return Err(error(
            "time_us",
            format!("{count} times cannot fit in {} bytes", data.len()),
        ));
    }
    let mut out = Vec::with_capacity(count);
    let mut t = 0i64;
    for _ in 0..count {
        // one- and two-byte varints (most deltas) without the general decoder
        let z = match *data {
            [a, ..] if a < 0x80 => {
                data = &data[1..];
                u64::from(a)
            }
            [a, b, ..] if b < 0x80 => {
                data = &data[2..];
                u64::from(a & 0x7F) | (u64::from(b) << 7)
            }
            _ => decode_varint(&mut data).map_err(|e| error("time_us", e.to_string()))?,
        };
        t = t.wrapping_add(((z >> 1) as i64) ^ -((z & 1) as i64));
        out.push(t);
    }
    if !data.is_empty() {
        return Err(error(
            "time_us",
            format!("{} bytes after {count} times", data.len()),
        ));
    }
    Ok(out)
}

/// `doubles`: little-endian f64s.
pub fn encode_doubles(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `ints`: little-endian i64s.
pub fn encode_ints(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `bools`: a byte each.
pub fn encode_bools(values: &[bool]) -> Vec<u8> {
    values.iter().map(|&v| u8::from(v)).collect()
}

fn eight_bytes(column: &'static str, data: &[u8], count: usize) -> Result<(), ColumnError> {
    if data.len() != count.saturating_mul(8) {
        return Err(error(
            column,
            format!("{} bytes for {count} values of 8 bytes", data.len()),
        ));
    }
    Ok(())
}

/// Inverse of [`encode_doubles`].
pub fn decode_doubles(data: &[u8], count: usize) -> Result<Vec<f64>, ColumnError> {
    eight_bytes("doubles", data, count)?;
    Ok(data
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect())
}

/// Inverse of [`encode_ints`].
pub fn decode_ints(data: &[u8], count: usize) -> Result<Vec<i64>, ColumnError> {
    eight_bytes("ints", data, count)?;
    Ok(data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect())
}

/// Inverse of [`encode_bools`].
pub fn decode_bools(data: &[u8], count: usize) -> Result<Vec<bool>, ColumnError> {
    if data.len() != count {
        return Err(error(
            "bools",
            format!("{} bytes for {count} values", data.len()),
        ));
    }
    data.iter()
        .map(|&b| match b {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(error("bools", format!("byte {other} is not 0 or 1"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_time_a_second_costs_three_bytes() {
        let times: Vec<i64> = (0..1000)
            .map(|i| 1_700_000_000_000_000 + i * 1_000_000)
            .collect();
        let data = encode_times(&times);
        assert!(data.len() <= 10 + 999 * 3, "{} bytes", data.len());
        assert_eq!(decode_times(&data, times.len()).unwrap(), times);
    }

    #[test]
    fn one_two_and_three_byte_deltas_decode() {
        let times: Vec<i64> = [0i64, 5, -60, 100, 8_000, -8_000, 9_000_000, 1]
            .iter()
            .scan(0i64, |t, d| {
                *t += d;
                Some(*t)
            })
            .collect();
        let data = encode_times(&times);
        assert_eq!(data.len(), 1 + 1 + 1 + 2 + 2 + 2 + 4 + 1);
        assert_eq!(decode_times(&data, times.len()).unwrap(), times);
    }

    #[test]
    fn wrong_counts_are_errors() {
        let data = encode_times(&[1, 2, 3]);
        assert!(
            decode_times(&data, 2)
                .unwrap_err()
                .problem
                .contains("after 2 times")
        );
        assert!(decode_times(&data, 4).is_err());
        assert!(decode_doubles(&encode_doubles(&[1.0, 2.0]), 3).is_err());
        assert!(decode_ints(&[0; 7], 1).is_err());
        assert_eq!(
            decode_bools(&[0, 2], 2).unwrap_err().to_string(),
            "TelemetryColumns.bools: byte 2 is not 0 or 1"
        );
    }

    proptest! {
        #[test]
        fn columns_roundtrip(times in prop::collection::vec(any::<i64>(), 0..100), ints in prop::collection::vec(any::<i64>(), 0..100)) {
            prop_assert_eq!(decode_times(&encode_times(&times), times.len()).unwrap(), times);
            prop_assert_eq!(decode_ints(&encode_ints(&ints), ints.len()).unwrap(), ints.clone());
            let doubles: Vec<f64> = ints.iter().map(|&i| i as f64).collect();
            prop_assert_eq!(decode_doubles(&encode_doubles(&doubles), doubles.len()).unwrap(), doubles);
            let bools: Vec<bool> = ints.iter().map(|&i| i % 2 == 0).collect();
            prop_assert_eq!(decode_bools(&encode_bools(&bools), bools.len()).unwrap(), bools);
        }
    }
}
