//! Telemetry chunks: points of one device and one metric, stored column by column in one blob.
//!
//! A chunk is what makes reading history cheap: one SQLite row and one blob per up to
//! [`MAX_POINTS`] points instead of a B-tree row per point, with delta-encoded clocks (a point
//! every second costs 3 bytes of time) and numbers packed as they are in memory.
//!
//! Layout, version 1 (varints are protobuf's LEB128; "zigzag" ones are signed):
//!
//! ```text
//! u8 format = 1
//! varint n                               points in the chunk, >= 1
//! u8 kind                                a ValueKind code shared by every point,
//!                                        or 0xFF: n kind codes follow, one byte each
//! four sections, each a varint byte length followed by n varints:
//!   time_us          zigzag deltas, the first one from 0
//!   received_us      zigzag deltas, the first one from 0
//!   seq              zigzag deltas, the first one from 0
//!   idx              the point's index in its batch
//!                    (the lengths let a reader that needs only times skip the other clocks)
//! values, in point order:
//!   double  8 bytes, little-endian f64   (a chunk of doubles ends in n * 8 contiguous bytes)
//!   int     8 bytes, little-endian i64
//!   bool    1 byte, 0 or 1
//!   string  varint length, UTF-8 bytes
//!   geo     u8 flags (1 alt, 2 speed, 4 heading, 8 accuracy), lat, lon, then the flagged
//!           fields, each a little-endian f64
//! or, when kind = 0xFE (every point a string, dictionary-coded):
//!   varint d                             distinct strings, 1 <= d <= n
//!   d strings, each a varint length and UTF-8 bytes, in order of first use
//!   a varint byte length, then n varints: each point's index into those d strings
//! ```
//!
//! A chunk of strings is dictionary-coded when that is smaller than writing each string out:
//! string telemetry (states, modes, firmware versions, fault codes) repeats, and a repeated
//! value then costs a byte or two per point instead of its length, in the database, its WAL and
//! every compaction that rewrites the chunk.
//!
//! Points in a chunk are in (time_us, seq, idx) order. Chunks of one metric may overlap in time
//! (a device that sends buffered history late); readers sort what they gather.

use std::borrow::Borrow;
use std::collections::HashMap;

use fleetlink_core::{GeoPosition, TimeUs, Value, ValueKind};
use prost::encoding::{decode_varint, encode_varint};

/// The most points one chunk holds (~10–40 KB for numbers).
pub(crate) const MAX_POINTS: usize = 2_048;

const FORMAT: u8 = 1;
const MIXED: u8 = 0xFF;
/// The kind byte of a chunk of strings stored as a dictionary and an index per point.
const DICT_STRINGS: u8 = 0xFE;

/// One point to encode.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row<V> {
    pub time_us: TimeUs,
    pub received_us: TimeUs,
    pub seq: u64,
    pub idx: u32,
    pub value: V,
}

impl<V> Row<V> {
    pub(crate) fn key(&self) -> (TimeUs, u64, u32) {
        (self.time_us, self.seq, self.idx)
    }
}

impl Row<Value> {
    /// The row with its value borrowed (for [`encode`]).
    pub(crate) fn borrowed(&self) -> Row<&Value> {
        Row {
            time_us: self.time_us,
            received_us: self.received_us,
            seq: self.seq,
            idx: self.idx,
            value: &self.value,
        }
    }
}

impl Row<&Value> {
    /// The row with its value cloned.
    pub(crate) fn owned(&self) -> Row<Value> {
        Row {
            time_us: self.time_us,
            received_us: self.received_us,
            seq: self.seq,
            idx: self.idx,
            value: self.value.clone(),
        }
    }
}

/// Values of decoded points: packed when every point has the same numeric kind.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueColumn {
    /// Doubles.
    Double(Vec<f64>),
    /// Integers.
    Int(Vec<i64>),
    /// Booleans.
    Bool(Vec<bool>),
    /// Strings, positions, or a mix of kinds, point by point.
    Other(Vec<Value>),
}

impl Default for ValueColumn {
    fn default() -> Self {
        ValueColumn::Double(Vec::new())
    }
}

impl ValueColumn {
    /// Points held.
    pub fn len(&self) -> usize {
        match self {
            ValueColumn::Double(v) => v.len(),
            ValueColumn::Int(v) => v.len(),
            ValueColumn::Bool(v) => v.len(),
            ValueColumn::Other(v) => v.len(),
        }
    }

    /// No points.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at `i` (panics past the end, like indexing).
    pub fn get(&self, i: usize) -> Value {
        match self {
            ValueColumn::Double(v) => Value::Double(v[i]),
            ValueColumn::Int(v) => Value::Int(v[i]),
            ValueColumn::Bool(v) => Value::Bool(v[i]),
            ValueColumn::Other(v) => v[i].clone(),
        }
    }

    /// The value at `i` as a number (ints and bools count), `None` for strings and positions.
    pub fn number(&self, i: usize) -> Option<f64> {
        match self {
            ValueColumn::Double(v) => Some(v[i]),
            ValueColumn::Int(v) => Some(v[i] as f64),
            ValueColumn::Bool(v) => Some(if v[i] { 1.0 } else { 0.0 }),
            ValueColumn::Other(v) => match &v[i] {
                Value::Double(x) => Some(*x),
                Value::Int(x) => Some(*x as f64),
                Value::Bool(x) => Some(if *x { 1.0 } else { 0.0 }),
                Value::String(_) | Value::Geo(_) => None,
            },
        }
    }

    /// Turns packed values into [`ValueColumn::Other`] (before appending another kind).
    fn make_other(&mut self) -> &mut Vec<Value> {
        if !matches!(self, ValueColumn::Other(_)) {
            let values = (0..self.len()).map(|i| self.get(i)).collect();
            *self = ValueColumn::Other(values);
        }
        match self {
            ValueColumn::Other(v) => v,
            _ => unreachable!("made Other just above"),
        }
    }

    /// Keeps the values at the positions where `keep` is true.
    pub(crate) fn retain_by(&mut self, keep: &[bool]) {
        fn go<T>(v: &mut Vec<T>, keep: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        match self {
            ValueColumn::Double(v) => go(v, keep),
            ValueColumn::Int(v) => go(v, keep),
            ValueColumn::Bool(v) => go(v, keep),
            ValueColumn::Other(v) => go(v, keep),
        }
    }

    /// Reorders the values: position `i` gets the value that was at `order[i]`.
    pub(crate) fn permute(&mut self, order: &[usize]) {
        fn go<T: Clone>(v: &mut Vec<T>, order: &[usize]) {
            *v = order.iter().map(|&i| v[i].clone()).collect();
        }
        match self {
            ValueColumn::Double(v) => go(v, order),
            ValueColumn::Int(v) => go(v, order),
            ValueColumn::Bool(v) => go(v, order),
            ValueColumn::Other(v) => go(v, order),
        }
    }

    /// The values of `self` with those of `other` inserted: `other[j]` goes before
    /// `self[at[j]]` (`at` ascending). `None` when they hold values differently (one packed, one
    /// not).
    fn insert_at(self, other: ValueColumn, at: &[usize]) -> Option<ValueColumn> {
        fn go<T>(a: Vec<T>, b: Vec<T>, at: &[usize]) -> Vec<T> {
            let mut out = Vec::with_capacity(a.len() + b.len());
            let mut a = a.into_iter();
            let mut done = 0;
            for (x, &p) in b.into_iter().zip(at) {
                out.extend(a.by_ref().take(p - done));
                out.push(x);
                done = p;
            }
            out.extend(a);
            out
        }
        Some(match (self, other) {
            (ValueColumn::Double(a), ValueColumn::Double(b)) => ValueColumn::Double(go(a, b, at)),
            (ValueColumn::Int(a), ValueColumn::Int(b)) => ValueColumn::Int(go(a, b, at)),
            (ValueColumn::Bool(a), ValueColumn::Bool(b)) => ValueColumn::Bool(go(a, b, at)),
            (ValueColumn::Other(a), ValueColumn::Other(b)) => ValueColumn::Other(go(a, b, at)),
            _ => return None,
        })
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        match self {
            ValueColumn::Double(v) => v.truncate(n),
            ValueColumn::Int(v) => v.truncate(n),
            ValueColumn::Bool(v) => v.truncate(n),
            ValueColumn::Other(v) => v.truncate(n),
        }
    }
}

/// Decoded points, column by column.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Columns {
    pub time_us: Vec<TimeUs>,
    pub received_us: Vec<TimeUs>,
    pub seq: Vec<u64>,
    pub idx: Vec<u32>,
    pub values: ValueColumn,
}

impl Columns {
    pub(crate) fn len(&self) -> usize {
        self.time_us.len()
    }

    pub(crate) fn key(&self, i: usize) -> (TimeUs, u64, u32) {
        (self.time_us[i], self.seq[i], self.idx[i])
    }

    /// Room for `n` more points: times and values (held as doubles until a chunk says
    /// otherwise), and with `arrival` the arrival columns too.
    pub(crate) fn reserve(&mut self, n: usize, arrival: bool) {
        self.time_us.reserve(n);
        if arrival {
            self.received_us.reserve(n);
            self.seq.reserve(n);
            self.idx.reserve(n);
        }
        match &mut self.values {
            ValueColumn::Double(v) => v.reserve(n),
            ValueColumn::Int(v) => v.reserve(n),
            ValueColumn::Bool(v) => v.reserve(n),
            ValueColumn::Other(v) => v.reserve(n),
        }
    }

    /// Keeps the points where `keep` is true.
    pub(crate) fn retain_by(&mut self, keep: &[bool]) {
        let mut i = 0;
        self.time_us.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        i = 0;
        self.received_us.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        i = 0;
        self.seq.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        i = 0;
        self.idx.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        self.values.retain_by(keep);
    }

    /// Sorts the points by (time_us, seq, idx).
    pub(crate) fn sort(&mut self) {
        if (1..self.len()).all(|i| self.key(i - 1) <= self.key(i)) {
            return;
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| self.key(i));
        self.time_us = order.iter().map(|&i| self.time_us[i]).collect();
        self.received_us = order.iter().map(|&i| self.received_us[i]).collect();
        self.seq = order.iter().map(|&i| self.seq[i]).collect();
        self.idx = order.iter().map(|&i| self.idx[i]).collect();
        self.values.permute(&order);
    }

    /// Merges the points of `other` (times and values only, in any order; usually a few) into
    /// these (times and values only, in time order), by time: each of `other`'s finds its place
    /// by binary search, and the runs between them are moved as they are. `None` when two points
    /// share a time, or the two hold values differently (the caller then sorts with the arrival
    /// columns).
    pub(crate) fn merge_by_time(self, mut other: Columns) -> Option<Columns> {
        let mut order: Vec<usize> = (0..other.len()).collect();
        order.sort_by_key(|&i| other.time_us[i]);
        let times: Vec<TimeUs> = order.iter().map(|&i| other.time_us[i]).collect();
        if times.windows(2).any(|w| w[0] == w[1]) {
            return None;
        }
        let mut at = Vec::with_capacity(times.len());
        for t in &times {
            at.push(self.time_us.binary_search(t).err()?);
        }
        other.values.permute(&order);
        let mut time_us = Vec::with_capacity(self.len() + times.len());
        let mut done = 0;
        for (t, &p) in times.iter().zip(&at) {
            time_us.extend_from_slice(&self.time_us[done..p]);
            time_us.push(*t);
            done = p;
        }
        time_us.extend_from_slice(&self.time_us[done..]);
        let values = if self.len() == 0 {
            other.values
        } else {
            self.values.insert_at(other.values, &at)?
        };
        Some(Columns {
            time_us,
            values,
            ..Columns::default()
        })
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        self.time_us.truncate(n);
        self.received_us.truncate(n);
        self.seq.truncate(n);
        self.idx.truncate(n);
        self.values.truncate(n);
    }

    /// The points as rows (for merging chunks).
    pub(crate) fn into_rows(self) -> Vec<Row<Value>> {
        (0..self.len())
            .map(|i| Row {
                time_us: self.time_us[i],
                received_us: self.received_us[i],
                seq: self.seq[i],
                idx: self.idx[i],
                value: self.values.get(i),
            })
            .collect()
    }
}

/// A chunk that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("telemetry chunk: {0}")]
pub(crate) struct ChunkError(String);

pub(crate) fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

pub(crate) fn unzigzag(x: u64) -> i64 {
    ((x >> 1) as i64) ^ -((x & 1) as i64)
}

fn varint_len(x: u64) -> usize {
    prost::encoding::encoded_len_varint(x)
}

/// The value bytes of a chunk whose points are all strings, and its kind byte: the strings as
/// they are (the String kind) or, when smaller, as a dictionary and an index per point
/// ([`DICT_STRINGS`]).
fn string_values<'a>(strings: impl Iterator<Item = &'a [u8]> + Clone) -> (u8, Vec<u8>) {
    let mut index: HashMap<&[u8], u64, foldhash::fast::RandomState> = HashMap::default();
    let mut dict: Vec<&[u8]> = Vec::new();
    // each point's index into `dict`, so that the coded form needs no second lookup
    let mut at: Vec<u64> = Vec::new();
    let (mut plain, mut indexes) = (0usize, 0usize);
    for s in strings.clone() {
        plain += varint_len(s.len() as u64) + s.len();
        let next = dict.len() as u64;
        let i = *index.entry(s).or_insert_with(|| {
            dict.push(s);
            next
        });
        indexes += varint_len(i);
        at.push(i);
    }
    let dict_bytes: usize = dict
        .iter()
        .map(|s| varint_len(s.len() as u64) + s.len())
        .sum();
    let coded = varint_len(dict.len() as u64) + dict_bytes + varint_len(indexes as u64) + indexes;
    if coded >= plain {
        let mut out = Vec::with_capacity(plain);
        for s in strings {
            encode_varint(s.len() as u64, &mut out);
            out.extend_from_slice(s);
        }
        return (ValueKind::String.code() as u8, out);
    }
    let mut out = Vec::with_capacity(coded);
    encode_varint(dict.len() as u64, &mut out);
    for s in &dict {
        encode_varint(s.len() as u64, &mut out);
        out.extend_from_slice(s);
    }
    encode_varint(indexes as u64, &mut out);
    for i in at {
        encode_varint(i, &mut out);
    }
    (DICT_STRINGS, out)
}

/// The values of a [`DICT_STRINGS`] chunk of `n` points: its strings (bytes, not yet checked as
/// UTF-8) and each point's index into them (checked).
fn dict_strings<'a>(r: &mut Reader<'a>, n: usize) -> Result<(Vec<&'a [u8]>, Vec<u32>), ChunkError> {
    let d = usize::try_from(r.varint()?).map_err(|_| ChunkError("dictionary too long".into()))?;
    if d == 0 || d > n {
        return Err(ChunkError(format!(
            "{d} strings in the dictionary of {n} points"
        )));
    }
    let mut dict = Vec::with_capacity(d);
    for _ in 0..d {
        dict.push(r.string()?);
    }
    let mut section = r.section()?;
    let mut indexes = Vec::with_capacity(n);
    for _ in 0..n {
        let i = section.varint()?;
        if i >= d as u64 {
            return Err(ChunkError(format!("string {i} of a {d}-string dictionary")));
        }
        indexes.push(i as u32);
    }
    finish(section)?;
    Ok((dict, indexes))
}

/// Encodes `rows` (at least one, in (time_us, seq, idx) order) as one chunk.
pub(crate) fn encode<V: Borrow<Value>>(rows: &[Row<V>]) -> Vec<u8> {
    debug_assert!(!rows.is_empty());
    debug_assert!(rows.windows(2).all(|w| w[0].key() <= w[1].key()));
    let mut out = Vec::with_capacity(8 + rows.len() * 12);
    out.push(FORMAT);
    encode_varint(rows.len() as u64, &mut out);
    let first = rows[0].value.borrow().kind();
    let uniform = rows.iter().all(|r| r.value.borrow().kind() == first);
    // A chunk of strings: dictionary-coded when that is smaller.
    let strings = (uniform && first == ValueKind::String).then(|| {
        string_values(rows.iter().map(|r| match r.value.borrow() {
            Value::String(s) => s.as_bytes(),
            _ => unreachable!("every value is a string"),
        }))
    });
    if let Some((kind, _)) = &strings {
        out.push(*kind);
    } else if uniform {
        out.push(first.code() as u8);
    } else {
        out.push(MIXED);
        out.extend(rows.iter().map(|r| r.value.borrow().kind().code() as u8));
    }
    let mut section = Vec::with_capacity(rows.len() * 3);
    let put = |section: &mut Vec<u8>, out: &mut Vec<u8>| {
        encode_varint(section.len() as u64, out);
        out.extend_from_slice(section);
        section.clear();
    };
    let mut previous = 0i64;
    for r in rows {
        encode_varint(zigzag(r.time_us.wrapping_sub(previous)), &mut section);
        previous = r.time_us;
    }
    put(&mut section, &mut out);
    previous = 0;
    for r in rows {
        encode_varint(zigzag(r.received_us.wrapping_sub(previous)), &mut section);
        previous = r.received_us;
    }
    put(&mut section, &mut out);
    previous = 0;
    for r in rows {
        let seq = r.seq as i64;
        encode_varint(zigzag(seq.wrapping_sub(previous)), &mut section);
        previous = seq;
    }
    put(&mut section, &mut out);
    for r in rows {
        encode_varint(u64::from(r.idx), &mut section);
    }
    put(&mut section, &mut out);
    if let Some((_, values)) = strings {
        out.extend_from_slice(&values);
        return out;
    }
    for r in rows {
        match r.value.borrow() {
            Value::Double(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Int(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => {
                encode_varint(s.len() as u64, &mut out);
                out.extend_from_slice(s.as_bytes());
            }
            Value::Geo(g) => {
                let optional = [g.alt_m, g.speed_mps, g.heading_deg, g.accuracy_m];
                let flags = optional
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_some())
                    .fold(0u8, |f, (i, _)| f | (1 << i));
                out.push(flags);
                out.extend_from_slice(&g.lat.to_le_bytes());
                out.extend_from_slice(&g.lon.to_le_bytes());
                for v in optional.into_iter().flatten() {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline]
    fn varint(&mut self) -> Result<u64, ChunkError> {
        // one- and two-byte varints (most clock deltas) without the general decoder
        match *self.buf {
            [a, ..] if a < 0x80 => {
                self.buf = &self.buf[1..];
                Ok(u64::from(a))
            }
            [a, b, ..] if b < 0x80 => {
                self.buf = &self.buf[2..];
                Ok(u64::from(a & 0x7F) | (u64::from(b) << 7))
            }
            _ => decode_varint(&mut self.buf).map_err(|e| ChunkError(e.to_string())),
        }
    }

    /// The next section: a varint byte length, then that many bytes.
    fn section(&mut self) -> Result<Reader<'a>, ChunkError> {
        let len =
            usize::try_from(self.varint()?).map_err(|_| ChunkError("section too long".into()))?;
        Ok(Reader {
            buf: self.bytes(len)?,
        })
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ChunkError> {
        if self.buf.len() < n {
            return Err(ChunkError(format!(
                "{n} bytes needed, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A string's bytes: a varint length, then that many bytes (not checked as UTF-8).
    fn string(&mut self) -> Result<&'a [u8], ChunkError> {
        let len =
            usize::try_from(self.varint()?).map_err(|_| ChunkError("string too long".into()))?;
        self.bytes(len)
    }

    fn u8(&mut self) -> Result<u8, ChunkError> {
        Ok(self.bytes(1)?[0])
    }

    fn f64(&mut self) -> Result<f64, ChunkError> {
        let b = self.bytes(8)?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A section of `n` zigzag deltas, appended to `out` as values.
    fn deltas(&mut self, n: usize, out: &mut Vec<i64>) -> Result<(), ChunkError> {
        let mut section = self.section()?;
        out.reserve(n);
        let mut value = 0i64;
        for _ in 0..n {
            value = value.wrapping_add(unzigzag(section.varint()?));
            out.push(value);
        }
        finish(section)
    }
}

fn kind_of(code: u8) -> Result<ValueKind, ChunkError> {
    ValueKind::from_code(i64::from(code))
        .ok_or_else(|| ChunkError(format!("unknown value kind {code}")))
}

/// A chunk's format byte, point count and kind code (checked): (points, kind code).
fn header(r: &mut Reader<'_>) -> Result<(usize, u8), ChunkError> {
    let size = r.buf.len();
    let format = r.u8()?;
    if format != FORMAT {
        return Err(ChunkError(format!("unknown chunk format {format}")));
    }
    let n = usize::try_from(r.varint()?).map_err(|_| ChunkError("too many points".into()))?;
    if n == 0 || n > size {
        return Err(ChunkError(format!("{n} points in a {size} byte chunk")));
    }
    Ok((n, r.u8()?))
}

/// Appends the points of chunk `data` to `out`: every column, or (`arrival` false) only times and
/// values, leaving `received_us`, `seq` and `idx` as they are.
pub(crate) fn decode_into(data: &[u8], out: &mut Columns, arrival: bool) -> Result<(), ChunkError> {
    let mut r = Reader { buf: data };
    let (n, kind_code) = header(&mut r)?;
    let kinds: Option<Vec<ValueKind>> = if kind_code == MIXED {
        Some(
            r.bytes(n)?
                .iter()
                .map(|&k| kind_of(k))
                .collect::<Result<_, _>>()?,
        )
    } else {
        None
    };
    let uniform = match kinds {
        None if kind_code == DICT_STRINGS => Some(ValueKind::String),
        None => Some(kind_of(kind_code)?),
        Some(_) => None,
    };
    if out.values.is_empty()
        && !matches!(
            (uniform, &out.values),
            (Some(ValueKind::Double), ValueColumn::Double(_))
        )
    {
        // the first chunk decides how values are held (empty columns hold doubles, with the
        // room `Columns::reserve` made)
        let room = match &out.values {
            ValueColumn::Double(v) => v.capacity(),
            _ => 0,
        }
        .max(n);
        out.values = match uniform {
            Some(ValueKind::Int) => ValueColumn::Int(Vec::with_capacity(room)),
            Some(ValueKind::Bool) => ValueColumn::Bool(Vec::with_capacity(room)),
            Some(ValueKind::Double) => ValueColumn::Double(Vec::with_capacity(room)),
            _ => ValueColumn::Other(Vec::with_capacity(room)),
        };
    }
    r.deltas(n, &mut out.time_us)?;
    if arrival {
        r.deltas(n, &mut out.received_us)?;
        let mut seqs = Vec::with_capacity(n);
        r.deltas(n, &mut seqs)?;
        out.seq.extend(seqs.into_iter().map(|s| s as u64));
        let mut idx = r.section()?;
        out.idx.reserve(n);
        for _ in 0..n {
            let i = u32::try_from(idx.varint()?).map_err(|_| ChunkError("idx above u32".into()))?;
            out.idx.push(i);
        }
        finish(idx)?;
    } else {
        for _ in 0..3 {
            r.section()?;
        }
    }
    if kind_code == DICT_STRINGS {
        let (dict, indexes) = dict_strings(&mut r, n)?;
        let dict = dict
            .into_iter()
            .map(std::str::from_utf8)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ChunkError(format!("string: {e}")))?;
        let values = out.values.make_other();
        values.extend(
            indexes
                .into_iter()
                .map(|i| Value::String(dict[i as usize].to_owned())),
        );
        return finish(r);
    }
    // Packed fast paths: a chunk of one numeric kind appended to values of the same kind.
    match (uniform, &mut out.values) {
        (Some(ValueKind::Double), ValueColumn::Double(v)) => {
            let b = r.bytes(n * 8)?;
            v.extend(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
            return finish(r);
        }
        (Some(ValueKind::Int), ValueColumn::Int(v)) => {
            let b = r.bytes(n * 8)?;
            v.extend(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
            return finish(r);
        }
        (Some(ValueKind::Bool), ValueColumn::Bool(v)) => {
            v.extend(r.bytes(n)?.iter().map(|&b| b != 0));
            return finish(r);
        }
        _ => {}
    }
    let values = out.values.make_other();
    values.reserve(n);
    for i in 0..n {
        let kind = match (&kinds, uniform) {
            (Some(k), _) => k[i],
            (None, Some(k)) => k,
            (None, None) => unreachable!("either one kind or a kind per point"),
        };
        values.push(match kind {
            ValueKind::Double => Value::Double(r.f64()?),
            ValueKind::Int => {
                Value::Int(i64::from_le_bytes(r.bytes(8)?.try_into().expect("8 bytes")))
            }
            ValueKind::Bool => Value::Bool(r.u8()? != 0),
            ValueKind::String => {
                let s = std::str::from_utf8(r.string()?)
                    .map_err(|e| ChunkError(format!("string: {e}")))?;
                Value::String(s.to_owned())
            }
            ValueKind::Geo => {
                let flags = r.u8()?;
                let lat = r.f64()?;
                let lon = r.f64()?;
                let mut opt = [None; 4];
                for (bit, slot) in opt.iter_mut().enumerate() {
                    if flags & (1 << bit) != 0 {
                        *slot = Some(r.f64()?);
                    }
                }
                Value::Geo(GeoPosition {
                    lat,
                    lon,
                    alt_m: opt[0],
                    speed_mps: opt[1],
                    heading_deg: opt[2],
                    accuracy_m: opt[3],
                })
            }
        });
    }
    finish(r)
}

fn finish(r: Reader<'_>) -> Result<(), ChunkError> {
    if r.buf.is_empty() {
        Ok(())
    } else {
        Err(ChunkError(format!(
            "{} bytes after the last value",
            r.buf.len()
        )))
    }
}

/// A chunk made by [`concat`].
#[derive(Debug)]
pub(crate) struct Joined {
    pub data: Vec<u8>,
    pub points: usize,
    pub start_us: TimeUs,
    pub end_us: TimeUs,
}

/// The clocks of one chunk and where its values start, for [`concat`].
struct Parts<'a> {
    kind: u8,
    time_us: Vec<i64>,
    received_us: Vec<i64>,
    seq: Vec<i64>,
    idx: Vec<u64>,
    values: &'a [u8],
}

fn parts(data: &[u8]) -> Result<Parts<'_>, ChunkError> {
    let mut r = Reader { buf: data };
    let (n, kind) = header(&mut r)?;
    if kind == MIXED {
        r.bytes(n)?;
    }
    let mut p = Parts {
        kind,
        time_us: Vec::new(),
        received_us: Vec::new(),
        seq: Vec::new(),
        idx: Vec::with_capacity(n),
        values: &[],
    };
    r.deltas(n, &mut p.time_us)?;
    r.deltas(n, &mut p.received_us)?;
    r.deltas(n, &mut p.seq)?;
    let mut idx = r.section()?;
    for _ in 0..n {
        p.idx.push(idx.varint()?);
    }
    finish(idx)?;
    p.values = r.buf;
    if kind == DICT_STRINGS {
        dict_strings(&mut r, n)?;
        finish(r)?;
    } else if kind != MIXED {
        // walk the values, so that a damaged chunk is refused rather than copied on
        let kind = kind_of(kind)?;
        for _ in 0..n {
            match kind {
                ValueKind::Double | ValueKind::Int => {
                    r.bytes(8)?;
                }
                ValueKind::Bool => {
                    r.u8()?;
                }
                ValueKind::String => {
                    // lengths only: readers check the UTF-8 when they decode
                    r.string()?;
                }
                ValueKind::Geo => {
                    let flags = r.u8()?;
                    r.bytes(8 * (2 + (flags & 0x0F).count_ones() as usize))?;
                }
            }
        }
        finish(r)?;
    }
    Ok(p)
}

/// Chunks of strings, plain or dictionary-coded, join as one family ([`DICT_STRINGS`]); every
/// other kind byte is its own.
fn family(kind: u8) -> u8 {
    if kind == ValueKind::String.code() as u8 {
        DICT_STRINGS
    } else {
        kind
    }
}

/// Joins chunks whose points follow one another (each chunk's first point at or after the
/// previous chunk's last, in (time_us, seq, idx) order) and share one value kind (strings,
/// plain or dictionary-coded, count as one) into one chunk, without decoding the values: the
/// clocks are re-encoded, the value bytes copied (strings are coded again, as [`encode`] would). `None` when
/// the chunks do not qualify (a mix of kinds, or points that interleave); merge them by decoding.
pub(crate) fn concat(chunks: &[&[u8]]) -> Result<Option<Joined>, ChunkError> {
    let mut all: Vec<Parts<'_>> = Vec::with_capacity(chunks.len());
    for data in chunks {
        let p = parts(data)?;
        if p.kind == MIXED {
            return Ok(None);
        }
        if let Some(prev) = all.last() {
            let last = prev.time_us.len() - 1;
            let before = (prev.time_us[last], prev.seq[last] as u64, prev.idx[last]);
            let after = (p.time_us[0], p.seq[0] as u64, p.idx[0]);
            if family(p.kind) != family(prev.kind) || after < before {
                return Ok(None);
            }
        }
        all.push(p);
    }
    let Some(first) = all.first() else {
        return Ok(None);
    };
    let points: usize = all.iter().map(|p| p.time_us.len()).sum();
    // Strings are coded again over the joined points (one dictionary, if that is smaller);
    // other values are copied as they are.
    let strings = if family(first.kind) == DICT_STRINGS {
        let mut all_strings: Vec<&[u8]> = Vec::with_capacity(points);
        for p in &all {
            let mut r = Reader { buf: p.values };
            if p.kind == DICT_STRINGS {
                let (dict, indexes) = dict_strings(&mut r, p.time_us.len())?;
                all_strings.extend(indexes.into_iter().map(|i| dict[i as usize]));
            } else {
                for _ in 0..p.time_us.len() {
                    all_strings.push(r.string()?);
                }
            }
        }
        Some(string_values(all_strings.into_iter()))
    } else {
        None
    };
    let value_bytes: usize = match &strings {
        Some((_, v)) => v.len(),
        None => all.iter().map(|p| p.values.len()).sum(),
    };
    let mut out = Vec::with_capacity(16 + points * 6 + value_bytes);
    out.push(FORMAT);
    encode_varint(points as u64, &mut out);
    out.push(strings.as_ref().map_or(first.kind, |(kind, _)| *kind));
    let mut section = Vec::with_capacity(points * 3);
    for column in 0..3 {
        let mut previous = 0i64;
        for p in &all {
            let values = match column {
                0 => &p.time_us,
                1 => &p.received_us,
                _ => &p.seq,
            };
            for &v in values {
                encode_varint(zigzag(v.wrapping_sub(previous)), &mut section);
                previous = v;
            }
        }
        encode_varint(section.len() as u64, &mut out);
        out.extend_from_slice(&section);
        section.clear();
    }
    for p in &all {
        for &i in &p.idx {
            encode_varint(i, &mut section);
        }
    }
    encode_varint(section.len() as u64, &mut out);
    out.extend_from_slice(&section);
    match &strings {
        Some((_, values)) => out.extend_from_slice(values),
        None => {
            for p in &all {
                out.extend_from_slice(p.values);
            }
        }
    }
    let start_us = first.time_us[0];
    let end_us = all
        .last()
        .and_then(|p| p.time_us.last())
        .copied()
        .unwrap_or(start_us);
    Ok(Some(Joined {
        data: out,
        points,
        start_us,
        end_us,
    }))
}

/// Decodes one chunk.
#[cfg(test)]
pub(crate) fn decode(data: &[u8]) -> Result<Columns, ChunkError> {
    let mut out = Columns::default();
    decode_into(data, &mut out, true)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(time_us: i64, seq: u64, idx: u32, value: Value) -> Row<Value> {
        Row {
            time_us,
            received_us: 1_700_000_000_000_000 + seq as i64,
            seq,
            idx,
            value,
        }
    }

    fn roundtrip(rows: &[Row<Value>]) -> Vec<Row<Value>> {
        decode(&encode(rows)).expect("decodes").into_rows()
    }

    fn same(a: &[Row<Value>], b: &[Row<Value>]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.key() == y.key() && x.received_us == y.received_us && x.value == y.value
            })
    }

    #[test]
    fn doubles_decode_packed_and_cost_a_few_bytes_of_clock_each() {
        let rows: Vec<_> = (0..1000)
            .map(|i| {
                row(
                    1_700_000_000_000_000 + i * 1_000_000,
                    7,
                    i as u32,
                    Value::Double(i as f64 / 3.0),
                )
            })
            .collect();
        let data = encode(&rows);
        // 8 bytes of value, 3 of time delta, 1 each of received, seq and idx (2 for idx >= 128)
        assert!(data.len() < rows.len() * 16, "{} bytes", data.len());
        let decoded = decode(&data).unwrap();
        assert!(matches!(decoded.values, ValueColumn::Double(_)));
        assert!(same(&decoded.into_rows(), &rows));
    }

    #[test]
    fn every_kind_and_a_mix_of_kinds_roundtrip() {
        let geo = Value::Geo(GeoPosition {
            lat: 52.5,
            lon: 13.4,
            alt_m: None,
            speed_mps: Some(12.5),
            heading_deg: None,
            accuracy_m: Some(3.0),
        });
        for values in [
            vec![Value::Int(-5), Value::Int(i64::MAX), Value::Int(i64::MIN)],
            vec![Value::Bool(true), Value::Bool(false)],
            vec![Value::String("héllo".into()), Value::String(String::new())],
            vec![geo.clone(), geo.clone()],
            vec![
                Value::Double(1.5),
                Value::Int(2),
                Value::String("x".into()),
                geo,
                Value::Bool(true),
            ],
        ] {
            let rows: Vec<_> = values
                .into_iter()
                .enumerate()
                .map(|(i, v)| row(-3 + i as i64, u64::MAX - 10 + i as u64, 0, v))
                .collect();
            assert!(same(&roundtrip(&rows), &rows));
        }
    }

    #[test]
    fn chunks_of_one_kind_append_packed_and_a_second_kind_unpacks() {
        let mut out = Columns::default();
        decode_into(&encode(&[row(1, 1, 0, Value::Int(1))]), &mut out, true).unwrap();
        decode_into(&encode(&[row(2, 2, 0, Value::Int(2))]), &mut out, true).unwrap();
        assert_eq!(out.values, ValueColumn::Int(vec![1, 2]));
        decode_into(&encode(&[row(3, 3, 0, Value::Double(3.5))]), &mut out, true).unwrap();
        assert_eq!(
            out.values,
            ValueColumn::Other(vec![Value::Int(1), Value::Int(2), Value::Double(3.5)])
        );
        assert_eq!(out.time_us, [1, 2, 3]);
    }

    #[test]
    fn damaged_chunks_are_errors_not_panics() {
        let data = encode(&[
            row(1, 1, 0, Value::String("abc".into())),
            row(2, 1, 1, Value::Double(1.0)),
        ]);
        for cut in 0..data.len() {
            assert!(
                decode(&data[..cut]).is_err(),
                "a chunk cut at {cut} decoded"
            );
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        let mut other_format = data;
        other_format[0] = 9;
        let e = decode(&other_format).unwrap_err();
        assert!(e.to_string().contains("unknown chunk format 9"), "{e}");
    }

    #[test]
    fn concat_joins_consecutive_chunks_of_one_kind_as_decoding_would() {
        for values in [
            vec![Value::Double(1.5), Value::Double(-2.0), Value::Double(3.0)],
            vec![Value::Int(1), Value::Int(-2), Value::Int(3)],
            vec![Value::Bool(true), Value::Bool(false), Value::Bool(true)],
            vec![
                Value::String("a".into()),
                Value::String(String::new()),
                Value::String("ccc".into()),
            ],
        ] {
            let rows: Vec<_> = values
                .into_iter()
                .enumerate()
                .map(|(i, v)| row(10 + i as i64, 100 + i as u64, 0, v))
                .collect();
            let (a, b) = (encode(&rows[..1]), encode(&rows[1..]));
            let joined = concat(&[&a, &b]).unwrap().expect("joins");
            assert_eq!(joined.points, 3);
            assert_eq!((joined.start_us, joined.end_us), (10, 12));
            assert_eq!(
                joined.data,
                encode(&rows),
                "the same bytes as one chunk of all the points"
            );
        }
    }

    #[test]
    fn concat_leaves_interleaved_or_mixed_chunks_to_the_decoding_merge() {
        let a = encode(&[row(5, 1, 0, Value::Int(1))]);
        let b = encode(&[row(4, 2, 0, Value::Int(2))]);
        assert!(
            concat(&[&a, &b]).unwrap().is_none(),
            "b's point is older than a's"
        );
        let c = encode(&[row(6, 2, 0, Value::Double(2.0))]);
        assert!(concat(&[&a, &c]).unwrap().is_none(), "two kinds");
        let mixed = encode(&[row(7, 3, 0, Value::Int(1)), row(8, 3, 1, Value::Bool(true))]);
        assert!(concat(&[&a, &mixed]).unwrap().is_none());
        let mut damaged = encode(&[row(9, 4, 0, Value::String("abc".into()))]);
        damaged.pop();
        assert!(
            concat(&[&a, &damaged]).is_err(),
            "a damaged chunk is an error, not copied"
        );
    }

    fn strings(values: &[&str]) -> Vec<Row<Value>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| row(i as i64, 1, i as u32, Value::String((*v).to_owned())))
            .collect()
    }

    /// The kind byte of an encoded chunk (after the format byte and a one-byte point count).
    fn kind_byte(data: &[u8]) -> u8 {
        data[2]
    }

    #[test]
    fn repeated_strings_are_stored_once_per_chunk_and_unique_ones_as_they_are() {
        let state = "x".repeat(84);
        let repeated: Vec<&str> = (0..100)
            .map(|i| if i % 10 == 9 { "fault" } else { state.as_str() })
            .collect();
        let rows = strings(&repeated);
        let data = encode(&rows);
        assert_eq!(kind_byte(&data), DICT_STRINGS);
        // the two strings once, then an index byte per point (and a byte each of clocks)
        assert!(data.len() < 84 + 16 + 100 * 6, "{} bytes", data.len());
        let decoded = decode(&data).unwrap();
        assert!(same(&decoded.into_rows(), &rows));

        let unique: Vec<String> = (0..100).map(|i| format!("reading {i}")).collect();
        let unique: Vec<&str> = unique.iter().map(String::as_str).collect();
        let rows = strings(&unique);
        let data = encode(&rows);
        assert_eq!(kind_byte(&data), ValueKind::String.code() as u8);
        assert!(same(&roundtrip(&rows), &rows));
    }

    #[test]
    fn dictionary_coded_chunks_append_after_other_values_and_join_with_plain_ones() {
        let mut out = Columns::default();
        decode_into(&encode(&[row(1, 1, 0, Value::Int(1))]), &mut out, true).unwrap();
        let rows = strings(&["running", "running", "running", "stopped"]);
        let dict = encode(&rows[1..]);
        assert_eq!(kind_byte(&dict), DICT_STRINGS);
        decode_into(&dict, &mut out, true).unwrap();
        assert_eq!(
            out.values,
            ValueColumn::Other(vec![
                Value::Int(1),
                Value::String("running".into()),
                Value::String("running".into()),
                Value::String("stopped".into()),
            ])
        );
        // a plain chunk (one point) joined to a dictionary-coded one: one dictionary for all
        let plain = encode(&rows[..1]);
        assert_eq!(kind_byte(&plain), ValueKind::String.code() as u8);
        let joined = concat(&[&plain, &dict]).unwrap().expect("joins");
        assert_eq!(joined.data, encode(&rows));
        assert!(same(&decode(&joined.data).unwrap().into_rows(), &rows));
        // strings do not join other kinds
        let ints = encode(&[row(9, 1, 9, Value::Int(3))]);
        assert!(concat(&[&dict, &ints]).unwrap().is_none());
    }

    #[test]
    fn damaged_dictionary_chunks_are_errors_not_panics() {
        let rows = strings(&["running", "running", "stopped", "running"]);
        let data = encode(&rows);
        assert_eq!(kind_byte(&data), DICT_STRINGS);
        for cut in 0..data.len() {
            assert!(
                decode(&data[..cut]).is_err(),
                "a chunk cut at {cut} decoded"
            );
            assert!(
                concat(&[&data[..cut]]).is_err(),
                "a chunk cut at {cut} joined"
            );
        }
        // the values: d = 2, "running", "stopped", then 4 one-byte indexes in a 4-byte section
        let values = data.len() - (1 + 8 + 8 + 1 + 4);
        let mut expected = vec![2, 7];
        expected.extend_from_slice(b"running");
        expected.push(7);
        expected.extend_from_slice(b"stopped");
        expected.extend_from_slice(&[4, 0, 0, 1, 0]);
        assert_eq!(data[values..], expected[..]);
        let mut out_of_range = data.clone();
        *out_of_range.last_mut().unwrap() = 2;
        let e = decode(&out_of_range).unwrap_err();
        assert!(
            e.to_string().contains("string 2 of a 2-string dictionary"),
            "{e}"
        );
        assert!(concat(&[&out_of_range]).is_err());
        let mut empty_dict = data.clone();
        empty_dict[values] = 0;
        assert!(decode(&empty_dict).is_err());
        let mut bad_utf8 = data;
        bad_utf8[values + 2] = 0xFF;
        let e = decode(&bad_utf8).unwrap_err();
        assert!(e.to_string().contains("string"), "{e}");
    }

    proptest! {
        /// Chunks of strings, however often they repeat, read back as they were written, and
        /// joining a cut run of them gives the chunk of the whole run.
        #[test]
        fn string_chunks_roundtrip_and_join_whatever_they_repeat(
            values in prop::collection::vec(prop_oneof![
                prop::sample::select(vec!["idle", "running", "fault", ""]).prop_map(str::to_owned),
                ".{0,12}",
            ], 2..200),
            cut in any::<prop::sample::Index>(),
        ) {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let rows = strings(&values);
            prop_assert!(same(&roundtrip(&rows), &rows));
            let at = 1 + cut.index(rows.len() - 1);
            let (a, b) = (encode(&rows[..at]), encode(&rows[at..]));
            let joined = concat(&[&a, &b]).unwrap().expect("a sorted run joins");
            prop_assert_eq!(joined.data, encode(&rows));
        }

        #[test]
        fn any_sorted_rows_roundtrip(
            mut points in prop::collection::vec(
                (any::<i64>(), any::<i64>(), any::<u64>(), 0u32..10_000, prop_oneof![
                    any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Value::Double),
                    any::<i64>().prop_map(Value::Int),
                    any::<bool>().prop_map(Value::Bool),
                    ".{0,20}".prop_map(Value::String),
                ]),
                1..200,
            )
        ) {
            points.sort_by_key(|p| (p.0, p.2, p.3));
            let rows: Vec<_> = points
                .into_iter()
                .map(|(time_us, received_us, seq, idx, value)| Row { time_us, received_us, seq, idx, value })
                .collect();
            prop_assert!(same(&roundtrip(&rows), &rows));
        }

        /// Joining a run of chunks cut from sorted points gives the chunk of all the points.
        #[test]
        fn concat_of_a_cut_run_is_the_chunk_of_the_whole_run(
            mut points in prop::collection::vec((any::<i64>(), any::<i64>(), any::<u64>(), 0u32..10_000, any::<i64>()), 2..200),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..5),
        ) {
            points.sort_by_key(|p| (p.0, p.2, p.3));
            let rows: Vec<_> = points
                .into_iter()
                .map(|(time_us, received_us, seq, idx, v)| Row { time_us, received_us, seq, idx, value: Value::Int(v) })
                .collect();
            let mut at: Vec<usize> = cuts.iter().map(|c| 1 + c.index(rows.len() - 1)).collect();
            at.push(0);
            at.push(rows.len());
            at.sort_unstable();
            at.dedup();
            let encoded: Vec<Vec<u8>> = at.windows(2).map(|w| encode(&rows[w[0]..w[1]])).collect();
            let parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
            let joined = concat(&parts).unwrap().expect("a sorted run joins");
            prop_assert_eq!(joined.data, encode(&rows));
            prop_assert_eq!(joined.points, rows.len());
        }
    }
}
