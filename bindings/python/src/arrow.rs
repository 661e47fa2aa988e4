//! Telemetry as Arrow record batches, built column by column in Rust and handed to Python through
//! the Arrow PyCapsule interface (`__arrow_c_stream__`): pyarrow, polars and pandas take the
//! buffers as they are, with no Python object per row.

use std::sync::{Arc, Mutex};

use arrow_array::builder::{Float64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{
    Array as _, ArrayRef, Float64Array, RecordBatch, RecordBatchIterator, StringArray,
    TimestampMicrosecondArray,
};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use fleetlink_client::{ColumnValues, StoredPoint, TelemetryColumns, Value};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// Rows per record batch.
const BATCH_ROWS: usize = 65_536;

/// The schema of `Client.telemetry`: one row per point.
pub(crate) fn telemetry_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        // numbers, ints and bools (1.0 / 0.0); null for strings and positions
        Field::new("value", DataType::Float64, true),
        // string values
        Field::new("text", DataType::Utf8, true),
        // positions
        Field::new("lat", DataType::Float64, true),
        Field::new("lon", DataType::Float64, true),
    ]))
}

/// Builds the telemetry batches, `BATCH_ROWS` rows each.
#[derive(Debug)]
pub(crate) struct TelemetryBuilder {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    device: StringBuilder,
    metric: StringBuilder,
    time: TimestampMicrosecondBuilder,
    value: Float64Builder,
    text: StringBuilder,
    lat: Float64Builder,
    lon: Float64Builder,
    rows: usize,
    /// Columns that repeat one value down a page (device, metric) or are all null, built once
    /// at the longest page length seen and sliced for each page: slices share the buffers, so
    /// a page of numbers costs no per-row work for them.
    repeats: std::collections::HashMap<String, StringArray>,
    null_text: StringArray,
    null_f64: Float64Array,
}

impl TelemetryBuilder {
    pub(crate) fn new() -> Self {
        Self {
            schema: telemetry_schema(),
            batches: Vec::new(),
            device: StringBuilder::new(),
            metric: StringBuilder::new(),
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            value: Float64Builder::new(),
            text: StringBuilder::new(),
            lat: Float64Builder::new(),
            lon: Float64Builder::new(),
            rows: 0,
            repeats: std::collections::HashMap::new(),
            null_text: StringArray::new_null(0),
            null_f64: Float64Array::new_null(0),
        }
    }

    /// `n` copies of `s`, a slice of a shared array.
    fn repeated(&mut self, s: &str, n: usize) -> StringArray {
        match self.repeats.get(s) {
            Some(a) if a.len() >= n => a.slice(0, n),
            _ => {
                let a = repeated(s, n);
                self.repeats.insert(s.to_owned(), a.clone());
                a
            }
        }
    }

    /// `n` nulls, slices of shared arrays: (text, float).
    fn nulls(&mut self, n: usize) -> (StringArray, Float64Array) {
        if self.null_f64.len() < n {
            self.null_text = StringArray::new_null(n);
            self.null_f64 = Float64Array::new_null(n);
        }
        (self.null_text.slice(0, n), self.null_f64.slice(0, n))
    }

    pub(crate) fn push(&mut self, device: &str, p: &StoredPoint) -> Result<(), ArrowError> {
        self.push_value(device, p.metric.as_str(), p.time_us, &p.value)
    }

    /// Adds a page of column-wise points. Numbers become one record batch built from the page's
    /// vectors as they are (no per-row work but the int/bool to float conversion).
    pub(crate) fn push_columns(
        &mut self,
        device: &str,
        page: TelemetryColumns,
    ) -> Result<(), ArrowError> {
        let n = page.time_us.len();
        let value: Vec<f64> = match page.values {
            ColumnValues::Double(v) => v,
            ColumnValues::Int(v) => v.into_iter().map(|x| x as f64).collect(),
            ColumnValues::Bool(v) => v.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect(),
            ColumnValues::Other(values) => {
                for (t, v) in page.time_us.iter().zip(&values) {
                    self.push_value(device, page.metric.as_str(), *t, v)?;
                }
                return Ok(());
            }
        };
        self.seal()?; // keep row order: what was pushed row by row comes first
        let (null_text, null_f64) = self.nulls(n);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.repeated(device, n)),
            Arc::new(self.repeated(page.metric.as_str(), n)),
            Arc::new(
                TimestampMicrosecondArray::new(ScalarBuffer::from(page.time_us), None)
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::new(ScalarBuffer::from(value), None)),
            Arc::new(null_text),
            Arc::new(null_f64.clone()),
            Arc::new(null_f64),
        ];
        self.batches
            .push(RecordBatch::try_new(self.schema.clone(), columns)?);
        Ok(())
    }

    fn push_value(
        &mut self,
        device: &str,
        metric: &str,
        time_us: i64,
        value: &Value,
    ) -> Result<(), ArrowError> {
        self.device.append_value(device);
        self.metric.append_value(metric);
        self.time.append_value(time_us);
        let (value, text, pos) = match value {
            Value::Double(x) => (Some(*x), None, None),
            Value::Int(x) => (Some(*x as f64), None, None),
            Value::Bool(x) => (Some(if *x { 1.0 } else { 0.0 }), None, None),
            Value::String(s) => (None, Some(s.as_str()), None),
            Value::Geo(g) => (None, None, Some((g.lat, g.lon))),
        };
        self.value.append_option(value);
        self.text.append_option(text);
        self.lat.append_option(pos.map(|p| p.0));
        self.lon.append_option(pos.map(|p| p.1));
        self.rows += 1;
        if self.rows >= BATCH_ROWS {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<(), ArrowError> {
        if self.rows == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.device.finish()),
            Arc::new(self.metric.finish()),
            Arc::new(self.time.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.text.finish()),
            Arc::new(self.lat.finish()),
            Arc::new(self.lon.finish()),
        ];
        self.batches
            .push(RecordBatch::try_new(self.schema.clone(), columns)?);
        self.rows = 0;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<ArrowStream, ArrowError> {
        self.seal()?;
        Ok(ArrowStream {
            inner: Mutex::new(Some((self.schema, self.batches))),
        })
    }
}

/// `n` copies of `s`, built as two buffers rather than value by value.
fn repeated(s: &str, n: usize) -> StringArray {
    StringArray::new(
        OffsetBuffer::from_lengths(std::iter::repeat_n(s.len(), n)),
        Buffer::from_vec(s.repeat(n).into_bytes()),
        None,
    )
}

/// Record batches that Python takes once through `__arrow_c_stream__`
/// (`pyarrow.RecordBatchReader.from_stream(s)`, `pyarrow.table(s)`, `polars.from_arrow(...)`).
#[pyclass(module = "fleetlink._fleetlink", frozen)]
#[derive(Debug)]
pub struct ArrowStream {
    inner: Mutex<Option<(SchemaRef, Vec<RecordBatch>)>>,
}

#[pymethods]
impl ArrowStream {
    /// The Arrow C stream interface: a PyCapsule named "arrow_array_stream". The batches move
    /// into it; a second call raises.
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema; // we offer our own schema; the consumer casts if it wants
        let taken = self
            .inner
            .lock()
            .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("poisoned"))?
            .take();
        let Some((schema, batches)) = taken else {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "this telemetry stream was already consumed; call Client.telemetry again",
            ));
        };
        let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        PyCapsule::new_with_value(py, stream, c"arrow_array_stream")
    }

    /// Rows in all (before consumption).
    fn __len__(&self) -> usize {
        self.inner
            .lock()
            .ok()
            .and_then(|g| {
                g.as_ref()
                    .map(|(_, b)| b.iter().map(RecordBatch::num_rows).sum())
            })
            .unwrap_or(0)
    }
}
