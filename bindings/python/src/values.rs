//! Conversions between Python objects and fleetlink values: JSON documents (twins, command
//! arguments and results) go through Python's `json` module, telemetry values are typed one by one.

use fleetlink_core::{GeoPosition, Value};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString, PyTuple};

use crate::errors::invalid;

/// A Python object (dicts, lists, str, int, float, bool, None) as JSON.
pub(crate) fn to_json(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (obj,))
        .map_err(|e| invalid(py, format!("not JSON-serialisable: {e}")))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| invalid(py, format!("not valid JSON: {e}")))
}

/// JSON as Python objects.
pub(crate) fn from_json(py: Python<'_>, value: &serde_json::Value) -> PyResult<Py<PyAny>> {
    Ok(py
        .import("json")?
        .call_method1("loads", (value.to_string(),))?
        .unbind())
}

/// A telemetry value from Python: bool, int, float, str, or a position as a `(lat, lon)` tuple
/// or a dict with `lat`, `lon` and optionally `alt_m`, `speed_mps`, `heading_deg`, `accuracy_m`.
pub(crate) fn point_value(py: Python<'_>, metric: &str, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(obj.extract()?));
    }
    if obj.is_instance_of::<PyInt>() {
        return obj.extract::<i64>().map(Value::Int).map_err(|_| {
            invalid(
                py,
                format!("metric {metric:?}: the integer does not fit in 64 bits"),
            )
        });
    }
    if obj.is_instance_of::<PyFloat>() {
        return Ok(Value::Double(obj.extract()?));
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(Value::String(obj.extract()?));
    }
    if let Ok(t) = obj.cast::<PyTuple>()
        && t.len() == 2
    {
        let (lat, lon): (f64, f64) = t.extract()?;
        return Ok(Value::Geo(GeoPosition {
            lat,
            lon,
            alt_m: None,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        }));
    }
    if let Ok(d) = obj.cast::<PyDict>()
        && d.contains("lat")?
        && d.contains("lon")?
    {
        let get = |k: &str| -> PyResult<Option<f64>> {
            match d.get_item(k)? {
                Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
                _ => Ok(None),
            }
        };
        return Ok(Value::Geo(GeoPosition {
            lat: get("lat")?.unwrap_or_default(),
            lon: get("lon")?.unwrap_or_default(),
            alt_m: get("alt_m")?,
            speed_mps: get("speed_mps")?,
            heading_deg: get("heading_deg")?,
            accuracy_m: get("accuracy_m")?,
        }));
    }
    Err(invalid(
        py,
        format!(
            "metric {metric:?}: {} is not a telemetry value; send a bool, int, float, str, a (lat, lon) tuple or a dict with lat and lon",
            obj.get_type().name()?
        ),
    ))
}

/// A telemetry value as a Python object.
pub(crate) fn value_to_py(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        Value::Double(x) => x.into_pyobject(py)?.into_any().unbind(),
        Value::Int(x) => x.into_pyobject(py)?.into_any().unbind(),
        Value::Bool(x) => x.into_pyobject(py)?.to_owned().into_any().unbind(),
        Value::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        Value::Geo(g) => {
            let d = PyDict::new(py);
            d.set_item("lat", g.lat)?;
            d.set_item("lon", g.lon)?;
            d.set_item("alt_m", g.alt_m)?;
            d.set_item("speed_mps", g.speed_mps)?;
            d.set_item("heading_deg", g.heading_deg)?;
            d.set_item("accuracy_m", g.accuracy_m)?;
            d.into_any().unbind()
        }
    })
}
