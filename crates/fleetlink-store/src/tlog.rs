//! The telemetry log: the commits of small batches, appended to a file next to the database.
//!
//! A fleet of slow devices sends a point or two per device per commit. Stored in SQLite, each
//! such commit pays for a transaction (the write lock, a WAL frame per touched page, the commit
//! record) and for a journal row per device and metric. Here it is one `write` of one record: the
//! commit's bookkeeping and points, encoded. The writer keeps the same points in its overlay for
//! readers and folds them into chunks every `fold_interval`; a fold commits in SQLite, marks this
//! log's generation as folded in the same transaction, and then empties the log. Opening a store
//! replays a log whose generation is not marked folded (a crash before the fold).
//!
//! File: a 16-byte header (`FLTLOG01`, then the generation as a little-endian u64), then records:
//! a little-endian u32 payload length, a little-endian u32 CRC-32 of the payload, the payload. A
//! record cut short or failing its checksum ends the log (a torn write at a power loss). A payload
//! is a varint count of devices, then per device its row id, highest stored seq and stored point
//! count (varints); then a varint count of groups, then per group the device and metric row ids
//! and a count of points (varints), then per point its device time and arrival time (zigzag
//! varints, µs), its batch's seq and its index in the batch (varints) and its value (see
//! `put_value`).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::encoding::{decode_varint, encode_varint};

use std::borrow::Borrow;

use fleetlink_core::{GeoPosition, Value, ValueKind};

use crate::StoreError;
use crate::chunk::{Row, unzigzag, zigzag};

const MAGIC: &[u8; 8] = b"FLTLOG01";
const HEADER: u64 = 16;
/// A record larger than this is damage, not a commit (a commit holds at most
/// `max_commit_points` points, and only small groups go to the log).
const MAX_RECORD: usize = 256 << 20;

/// The open log, appended to by the writer thread alone.
#[derive(Debug)]
pub(crate) struct TelemetryLog {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Bytes in the file: where the next record goes.
    len: u64,
    /// Sync every record to the disk (`Synchronous::Full`).
    sync: bool,
}

/// What a log left by an earlier run holds.
#[derive(Debug, Default)]
pub(crate) struct Leftover {
    /// Its generation (0 when there was no log).
    pub generation: u64,
    /// Its records' payloads, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes after the last whole record (a torn write), dropped.
    pub torn_bytes: u64,
}

/// The path of the log of the database at `db`.
pub(crate) fn path_of(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-tlog");
    PathBuf::from(p)
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Task(format!("cannot {what} {}: {e}", path.display()))
}

/// Reads the log at `path`, if any, without changing it.
pub(crate) fn read(path: &Path) -> Result<Leftover, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| io_error(path, "read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Leftover::default()),
        Err(e) => return Err(io_error(path, "open", e)),
    }
    if bytes.is_empty() {
        return Ok(Leftover::default()); // emptied, and the header not yet written
    }
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return Err(StoreError::Corrupt(format!(
            "{} is not a fleetlink telemetry log (bad header); move it away to open the store without it",
            path.display()
        )));
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    let mut at = HEADER as usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || bytes.len() - at - 8 < len {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        at += 8 + len;
    }
    Ok(Leftover {
        generation,
        records,
        torn_bytes: (bytes.len() - at) as u64,
    })
}

impl TelemetryLog {
    /// Opens the log at `path` empty, as generation `generation` (whatever it held is folded).
    pub(crate) fn create(path: &Path, generation: u64, sync: bool) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, "open", e))?;
        let mut log = Self {
            file,
            path: path.to_path_buf(),
            generation,
            len: 0,
            sync,
        };
        log.reset(generation)?;
        Ok(log)
    }

    /// The generation the records now in the log belong to.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the log holds records.
    pub(crate) fn is_empty(&self) -> bool {
        self.len <= HEADER
    }

    /// Appends one record. On an error the log is cut back to what it held before, so that a
    /// torn record cannot hide the ones after it; if even that fails, the error says so and the
    /// log must not be used again.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<(), LogError> {
        let mut record = Vec::with_capacity(8 + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        let written = self.file.write_all_at(&record, self.len).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                let error = io_error(&self.path, "append to", e);
                match self.file.set_len(self.len) {
                    Ok(()) => Err(LogError::Failed(error)),
                    Err(_) => Err(LogError::Broken(error)),
                }
            }
        }
    }

    /// Empties the log and starts generation `generation`: called once a fold has committed
    /// the records of the current one. On an error the log must not be used again.
    pub(crate) fn reset(&mut self, generation: u64) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .map_err(|e| io_error(&self.path, "empty", e))?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&generation.to_le_bytes());
        self.file
            .write_all_at(&header, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error(&self.path, "write the header of", e))?;
        self.generation = generation;
        self.len = HEADER;
        Ok(())
    }
}

/// Why an append failed.
#[derive(Debug)]
pub(crate) enum LogError {
    /// Nothing was appended; the log can be used again.
    Failed(StoreError),
    /// The log may end in a torn record: stop using it.
    Broken(StoreError),
}

/// A record's payload, decoded.
#[derive(Debug, PartialEq, Default)]
pub(crate) struct Record {
    /// (device row id, highest stored seq, stored point count)
    pub devices: Vec<(i64, u64, u64)>,
    /// (device row id, metric row id, that device's points of that metric in the commit)
    pub groups: Vec<(i64, i64, Vec<Row<Value>>)>,
}

/// Builds a record's payload: the devices first, then the groups.
#[derive(Debug, Default)]
pub(crate) struct RecordWriter {
    buf: Vec<u8>,
}

impl RecordWriter {
    pub(crate) fn new(devices: usize, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        encode_varint(devices as u64, &mut buf);
        Self { buf }
    }

    /// Adds a device's bookkeeping; `devices` of them, then [`RecordWriter::groups`].
    pub(crate) fn device(&mut self, device: i64, last_seq: u64, point_count: u64) {
        encode_varint(device as u64, &mut self.buf);
        encode_varint(last_seq, &mut self.buf);
        encode_varint(point_count, &mut self.buf);
    }

    /// Starts the `groups` groups.
    pub(crate) fn groups(&mut self, groups: usize) {
        encode_varint(groups as u64, &mut self.buf);
    }

    /// Adds one group: the points of a device and metric.
    pub(crate) fn group<V: Borrow<Value>>(&mut self, device: i64, metric: i64, rows: &[Row<V>]) {
        let buf = &mut self.buf;
        encode_varint(device as u64, buf);
        encode_varint(metric as u64, buf);
        encode_varint(rows.len() as u64, buf);
        for r in rows {
            encode_varint(zigzag(r.time_us), buf);
            encode_varint(zigzag(r.received_us), buf);
            encode_varint(r.seq, buf);
            encode_varint(u64::from(r.idx), buf);
            put_value(buf, r.value.borrow());
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// A value: its kind's storage code, then a double's 8 bytes, an int's zigzag varint, a bool's
/// byte, a string's varint length and bytes, or a position's latitude and longitude (8 bytes
/// each), a byte with a bit per optional field (altitude, speed, heading, accuracy) and those
/// present (8 bytes each). Doubles are little-endian IEEE 754.
fn put_value(buf: &mut Vec<u8>, value: &Value) {
    buf.push(value.kind().code() as u8);
    match value {
        Value::Double(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Int(x) => encode_varint(zigzag(*x), buf),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(x) => {
            encode_varint(x.len() as u64, buf);
            buf.extend_from_slice(x.as_bytes());
        }
        Value::Geo(g) => {
            buf.extend_from_slice(&g.lat.to_le_bytes());
            buf.extend_from_slice(&g.lon.to_le_bytes());
            let optional = [g.alt_m, g.speed_mps, g.heading_deg, g.accuracy_m];
            let mut present = 0u8;
            for (bit, x) in optional.iter().enumerate() {
                if x.is_some() {
                    present |= 1 << bit;
                }
            }
            buf.push(present);
            for x in optional.into_iter().flatten() {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

fn damaged(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a telemetry log record is damaged: {what}"))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, StoreError> {
        decode_varint(&mut self.0).map_err(|e| damaged(&e.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if n > self.0.len() {
            return Err(damaged("it ends inside a value"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn f64(&mut self) -> Result<f64, StoreError> {
        Ok(f64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn value(&mut self) -> Result<Value, StoreError> {
        let code = self.bytes(1)?[0];
        let kind = ValueKind::from_code(i64::from(code))
            .ok_or_else(|| damaged(&format!("unknown value kind {code}")))?;
        Ok(match kind {
            ValueKind::Double => Value::Double(self.f64()?),
            ValueKind::Int => Value::Int(unzigzag(self.varint()?)),
            ValueKind::Bool => Value::Bool(self.bytes(1)?[0] != 0),
            ValueKind::String => {
                let n = self.varint()? as usize;
                let bytes = self.bytes(n)?;
                Value::String(
                    std::str::from_utf8(bytes)
                        .map_err(|_| damaged("a string is not UTF-8"))?
                        .to_owned(),
                )
            }
            ValueKind::Geo => {
                let (lat, lon) = (self.f64()?, self.f64()?);
                let present = self.bytes(1)?[0];
                let mut optional = [None; 4];
                for (bit, x) in optional.iter_mut().enumerate() {
                    if present & (1 << bit) != 0 {
                        *x = Some(self.f64()?);
                    }
                }
                let [alt_m, speed_mps, heading_deg, accuracy_m] = optional;
                Value::Geo(GeoPosition {
                    lat,
                    lon,
                    alt_m,
                    speed_mps,
                    heading_deg,
                    accuracy_m,
                })
            }
        })
    }
}

/// Decodes a record's payload.
pub(crate) fn decode(buf: &[u8]) -> Result<Record, StoreError> {
    let mut r = Reader(buf);
    let mut record = Record::default();
    let devices = r.varint()?;
    for _ in 0..devices {
        let device = r.varint()? as i64;
        record.devices.push((device, r.varint()?, r.varint()?));
    }
    let groups = r.varint()?;
    for _ in 0..groups {
        let (device, metric) = (r.varint()? as i64, r.varint()? as i64);
        let n = r.varint()?;
        let mut rows = Vec::with_capacity(n.min(4096) as usize);
        for _ in 0..n {
            rows.push(Row {
                time_us: unzigzag(r.varint()?),
                received_us: unzigzag(r.varint()?),
                seq: r.varint()?,
                idx: u32::try_from(r.varint()?)
                    .map_err(|_| damaged("a point index is too large"))?,
                value: r.value()?,
            });
        }
        record.groups.push((device, metric, rows));
    }
    if !r.0.is_empty() {
        return Err(damaged("bytes after the last group"));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time_us: i64, seq: u64, idx: u32, value: Value) -> Row<Value> {
        Row {
            time_us,
            received_us: 1_700_000_000_000_000 + time_us,
            seq,
            idx,
            value,
        }
    }

    fn sample() -> Record {
        Record {
            devices: vec![(7, 12, 40), (9, 1, 0)],
            groups: vec![
                (
                    7,
                    1,
                    vec![
                        row(-5, 12, 0, Value::Double(-0.25)),
                        row(10, 12, 1, Value::Int(i64::MIN)),
                        row(11, 12, 2, Value::Bool(true)),
                    ],
                ),
                (
                    7,
                    2,
                    vec![
                        row(3, 11, 0, Value::String("déjà vu".into())),
                        row(
                            4,
                            12,
                            3,
                            Value::Geo(GeoPosition {
                                lat: 52.5,
                                lon: -13.4,
                                alt_m: None,
                                speed_mps: Some(3.0),
                                heading_deg: None,
                                accuracy_m: Some(0.5),
                            }),
                        ),
                    ],
                ),
            ],
        }
    }

    fn encode(record: &Record) -> Vec<u8> {
        let mut w = RecordWriter::new(record.devices.len(), 0);
        for &(d, seq, count) in &record.devices {
            w.device(d, seq, count);
        }
        w.groups(record.groups.len());
        for (d, m, rows) in &record.groups {
            w.group(*d, *m, rows);
        }
        w.finish()
    }

    #[test]
    fn records_read_back_in_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_of(&dir.path().join("fleet.db"));
        assert_eq!(read(&path).unwrap().generation, 0, "no log yet");
        let mut log = TelemetryLog::create(&path, 3, false).unwrap();
        assert!(log.is_empty());
        let first = encode(&sample());
        let second = encode(&Record {
            devices: vec![(7, 13, 41)],
            groups: vec![(7, 1, vec![row(20, 13, 0, Value::Int(4))])],
        });
        log.append(&first).unwrap();
        log.append(&second).unwrap();
        assert!(!log.is_empty());

        let left = read(&path).unwrap();
        assert_eq!((left.generation, left.torn_bytes), (3, 0));
        assert_eq!(left.records, vec![first.clone(), second.clone()]);
        assert_eq!(decode(&left.records[0]).unwrap(), sample());

        // a write torn by a power loss: the second record cut short
        let full = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(full - 2).unwrap();
        let left = read(&path).unwrap();
        assert_eq!(left.records, vec![first.clone()]);
        assert_eq!(left.torn_bytes, 8 + second.len() as u64 - 2);
        // a flipped bit in the first record ends the log there
        let mut byte = [0u8];
        file.read_at(&mut byte, HEADER + 9).unwrap();
        file.write_all_at(&[byte[0] ^ 1], HEADER + 9).unwrap();
        assert!(read(&path).unwrap().records.is_empty());

        // reset empties it and moves to the next generation
        log.reset(4).unwrap();
        let left = read(&path).unwrap();
        assert_eq!((left.generation, left.records.len()), (4, 0));
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_damaged_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x-tlog");
        std::fs::write(&path, b"SQLite format 3\0 and more").unwrap();
        match read(&path) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("not a fleetlink telemetry log")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let whole = encode(&sample());
        for cut in 0..whole.len() {
            assert!(
                decode(&whole[..cut]).is_err(),
                "a record cut to {cut} bytes decodes"
            );
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}
