//! Typed telemetry values and their validation against the wire form.

use fleetlink_proto::v1;

use crate::{MetricName, TimeUs, id::IdError};

/// A position on Earth (WGS84).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoPosition {
    /// Degrees, -90..=90.
    pub lat: f64,
    /// Degrees, -180..=180.
    pub lon: f64,
    /// Metres above the ellipsoid.
    pub alt_m: Option<f64>,
    /// Metres per second, >= 0.
    pub speed_mps: Option<f64>,
    /// Degrees clockwise from north, 0..360.
    pub heading_deg: Option<f64>,
    /// Horizontal accuracy in metres, >= 0.
    pub accuracy_m: Option<f64>,
}

/// One typed value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A finite floating-point number.
    Double(f64),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// UTF-8 text, at most [`Value::MAX_STRING_BYTES`].
    String(String),
    /// A position.
    Geo(GeoPosition),
}

/// The type of a [`Value`]; a metric keeps the type of its first value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    /// [`Value::Double`].
    Double,
    /// [`Value::Int`].
    Int,
    /// [`Value::Bool`].
    Bool,
    /// [`Value::String`].
    String,
    /// [`Value::Geo`].
    Geo,
}

impl ValueKind {
    /// Stable small integer used by storage.
    pub fn code(self) -> i64 {
        match self {
            ValueKind::Double => 1,
            ValueKind::Int => 2,
            ValueKind::Bool => 3,
            ValueKind::String => 4,
            ValueKind::Geo => 5,
        }
    }

    /// Inverse of [`ValueKind::code`].
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => ValueKind::Double,
            2 => ValueKind::Int,
            3 => ValueKind::Bool,
            4 => ValueKind::String,
            5 => ValueKind::Geo,
            _ => return None,
        })
    }

    /// Lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ValueKind::Double => "double",
            ValueKind::Int => "int",
            ValueKind::Bool => "bool",
            ValueKind::String => "string",
            ValueKind::Geo => "geo",
        }
    }
}

impl std::fmt::Display for ValueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One measurement of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock, microseconds since the Unix epoch.
    pub time_us: TimeUs,
    /// The value.
    pub value: Value,
}

/// Why a value or point was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// The point's metric name is invalid.
    #[error(transparent)]
    Metric(#[from] IdError),
    /// The value has no type set.
    #[error(
        "point {index} ({metric}) has no value: set exactly one of double, int, bool, string, geo"
    )]
    Missing {
        /// Index of the point in its batch.
        index: usize,
        /// Its metric.
        metric: String,
    },
    /// A double is NaN or infinite.
    #[error("point {index} ({metric}) is not a finite number ({value})")]
    NotFinite {
        /// Index of the point in its batch.
        index: usize,
        /// Its metric.
        metric: String,
        /// The value.
        value: f64,
    },
    /// A geo position is out of range.
    #[error("point {index} ({metric}) has an invalid position: {reason}")]
    BadPosition {
        /// Index of the point in its batch.
        index: usize,
        /// Its metric.
        metric: String,
        /// What is out of range.
        reason: String,
    },
    /// A string value is too long.
    #[error("point {index} ({metric}) has a string of {len} bytes; the maximum is {max}")]
    StringTooLong {
        /// Index of the point in its batch.
        index: usize,
        /// Its metric.
        metric: String,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The metric had another type before.
    #[error(
        "point {index}: metric {metric} holds {expected} values, got {got}; use a new metric name for another type"
    )]
    WrongType {
        /// Index of the point in its batch.
        index: usize,
        /// Its metric.
        metric: String,
        /// The metric's type.
        expected: ValueKind,
        /// The type received.
        got: ValueKind,
    },
    /// Too many points in one batch.
    #[error("batch has {len} points; the maximum is {max}: split it")]
    TooManyPoints {
        /// Points in the batch.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A batch without points.
    #[error("batch {seq} has no points")]
    EmptyBatch {
        /// The batch's sequence number.
        seq: u64,
    },
    /// Sequence 0 is not a valid batch number.
    #[error("batch sequence numbers start at 1, got 0")]
    ZeroSeq,
}

impl Value {
    /// Longest string value accepted, in bytes.
    pub const MAX_STRING_BYTES: usize = 4096;

    /// This value's type.
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Double(_) => ValueKind::Double,
            Value::Int(_) => ValueKind::Int,
            Value::Bool(_) => ValueKind::Bool,
            Value::String(_) => ValueKind::String,
            Value::Geo(_) => ValueKind::Geo,
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::Value {
        use v1::value::Kind;
        let kind = match self {
            Value::Double(v) => Kind::DoubleValue(*v),
            Value::Int(v) => Kind::IntValue(*v),
            Value::Bool(v) => Kind::BoolValue(*v),
            Value::String(v) => Kind::StringValue(v.clone()),
            Value::Geo(g) => Kind::GeoValue(v1::GeoPosition {
                lat: g.lat,
                lon: g.lon,
                alt_m: g.alt_m,
                speed_mps: g.speed_mps,
                heading_deg: g.heading_deg,
                accuracy_m: g.accuracy_m,
            }),
        };
        v1::Value { kind: Some(kind) }
    }

    /// Validates a wire value: a type set, finite numbers, positions in range, bounded strings.
    /// `index` and `metric` only label the error.
    pub fn from_proto(
        v: Option<v1::Value>,
        index: usize,
        metric: &str,
    ) -> Result<Self, ValueError> {
        use v1::value::Kind;
        let metric_s = || metric.to_owned();
        let Some(kind) = v.and_then(|v| v.kind) else {
            return Err(ValueError::Missing {
                index,
                metric: metric_s(),
            });
        };
        Ok(match kind {
            Kind::DoubleValue(x) => {
                if !x.is_finite() {
                    return Err(ValueError::NotFinite {
                        index,
                        metric: metric_s(),
                        value: x,
                    });
                }
                Value::Double(x)
            }
            Kind::IntValue(x) => Value::Int(x),
            Kind::BoolValue(x) => Value::Bool(x),
            Kind::StringValue(s) => {
                if s.len() > Self::MAX_STRING_BYTES {
                    return Err(ValueError::StringTooLong {
                        index,
                        metric: metric_s(),
                        len: s.len(),
                        max: Self::MAX_STRING_BYTES,
                    });
                }
                Value::String(s)
            }
            Kind::GeoValue(g) => {
                let bad = |reason: String| ValueError::BadPosition {
                    index,
                    metric: metric_s(),
                    reason,
                };
                let geo = GeoPosition {
                    lat: g.lat,
                    lon: g.lon,
                    alt_m: g.alt_m,
                    speed_mps: g.speed_mps,
                    heading_deg: g.heading_deg,
                    accuracy_m: g.accuracy_m,
                };
                check_geo(&geo).map_err(bad)?;
                Value::Geo(geo)
            }
        })
    }
}

fn check_geo(g: &GeoPosition) -> Result<(), String> {
    if !(g.lat.is_finite() && (-90.0..=90.0).contains(&g.lat)) {
        return Err(format!("latitude {} is outside -90..=90", g.lat));
    }
    if !(g.lon.is_finite() && (-180.0..=180.0).contains(&g.lon)) {
        return Err(format!("longitude {} is outside -180..=180", g.lon));
    }
    let optional = [
        ("altitude", g.alt_m, f64::MIN, f64::MAX),
        ("speed", g.speed_mps, 0.0, f64::MAX),
        ("heading", g.heading_deg, 0.0, 360.0),
        ("accuracy", g.accuracy_m, 0.0, f64::MAX),
    ];
    for (name, v, lo, hi) in optional {
        if let Some(v) = v
            && !(v.is_finite() && v >= lo && v <= hi)
        {
            return Err(format!("{name} {v} is not a finite number in {lo}..={hi}"));
        }
    }
    Ok(())
}

impl Point {
    /// The wire form.
    pub fn to_proto(&self) -> v1::TelemetryPoint {
        v1::TelemetryPoint {
            metric: self.metric.as_str().to_owned(),
            time_us: self.time_us,
            value: Some(self.value.to_proto()),
        }
    }

    /// Validates one wire point.
    pub fn from_proto(p: v1::TelemetryPoint, index: usize) -> Result<Self, ValueError> {
        let value = Value::from_proto(p.value, index, &p.metric)?;
        let metric = MetricName::new(p.metric)?;
        Ok(Point {
            metric,
            time_us: p.time_us,
            value,
        })
    }
}

/// A validated telemetry batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Per-device sequence number, >= 1.
    pub seq: u64,
    /// The points, at least one.
    pub points: Vec<Point>,
}

impl Batch {
    /// Validates a wire batch: a sequence number, 1 to `max_points` valid points.
    pub fn from_proto(b: v1::TelemetryBatch, max_points: usize) -> Result<Self, ValueError> {
        if b.seq == 0 {
            return Err(ValueError::ZeroSeq);
        }
        if b.points.is_empty() {
            return Err(ValueError::EmptyBatch { seq: b.seq });
        }
        if b.points.len() > max_points {
            return Err(ValueError::TooManyPoints {
                len: b.points.len(),
                max: max_points,
            });
        }
        let points = b
            .points
            .into_iter()
            .enumerate()
            .map(|(i, p)| Point::from_proto(p, i))
            .collect::<Result<_, _>>()?;
        Ok(Batch { seq: b.seq, points })
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::TelemetryBatch {
        v1::TelemetryBatch {
            ack_now: false,
            seq: self.seq,
            points: self.points.iter().map(Point::to_proto).collect(),
        }
    }
}

/// The type each metric of one device holds, fixed by its first value.
#[derive(Debug, Clone, Default)]
pub struct MetricTypes {
    kinds: std::collections::HashMap<MetricName, ValueKind>,
}

impl MetricTypes {
    /// Records a known metric type (loaded from storage).
    pub fn insert(&mut self, metric: MetricName, kind: ValueKind) {
        self.kinds.insert(metric, kind);
    }

    /// The type of `metric`, if known.
    pub fn get(&self, metric: &MetricName) -> Option<ValueKind> {
        self.kinds.get(metric).copied()
    }

    /// Checks every point of `batch` against the known types (and against earlier points of the same
    /// batch); records the new metrics only if the whole batch is valid.
    pub fn check(&mut self, batch: &Batch) -> Result<(), ValueError> {
        self.check_points(&batch.points)
    }

    /// [`MetricTypes::check`] for a slice of points.
    pub fn check_points(&mut self, points: &[Point]) -> Result<(), ValueError> {
        let mut new: Vec<(&MetricName, ValueKind)> = Vec::new();
        for (index, p) in points.iter().enumerate() {
            let got = p.value.kind();
            let expected = self
                .kinds
                .get(&p.metric)
                .copied()
                .or_else(|| new.iter().find(|(m, _)| *m == &p.metric).map(|(_, k)| *k));
            match expected {
                Some(expected) if expected != got => {
                    return Err(ValueError::WrongType {
                        index,
                        metric: p.metric.to_string(),
                        expected,
                        got,
                    });
                }
                Some(_) => {}
                None => new.push((&p.metric, got)),
            }
        }
        for (m, k) in new {
            self.kinds.insert(m.clone(), k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(metric: &str, kind: v1::value::Kind) -> v1::TelemetryPoint {
        v1::TelemetryPoint {
            metric: metric.into(),
            time_us: 1,
            value: Some(v1::Value { kind: Some(kind) }),
        }
    }

    #[test]
    fn wrong_type_names_both_types() {
        use v1::value::Kind;
        let b1 = Batch::from_proto(
            v1::TelemetryBatch {
                ack_now: false,
                seq: 1,
                points: vec![wire("fuel", Kind::DoubleValue(0.5))],
            },
            10,
        )
        .unwrap();
        let b2 = Batch::from_proto(
            v1::TelemetryBatch {
                ack_now: false,
                seq: 2,
                points: vec![wire("fuel", Kind::StringValue("full".into()))],
            },
            10,
        )
        .unwrap();
        let mut types = MetricTypes::default();
        types.check(&b1).unwrap();
        let e = types.check(&b2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "point 0: metric fuel holds double values, got string; use a new metric name for another type"
        );
    }

    #[test]
    fn a_rejected_batch_records_nothing() {
        use v1::value::Kind;
        let b = Batch::from_proto(
            v1::TelemetryBatch {
                ack_now: false,
                seq: 1,
                points: vec![
                    wire("a", Kind::IntValue(1)),
                    wire("a", Kind::BoolValue(true)),
                ],
            },
            10,
        )
        .unwrap();
        let mut types = MetricTypes::default();
        assert!(types.check(&b).is_err());
        assert_eq!(types.get(&MetricName::new("a").unwrap()), None);
    }

    #[test]
    fn missing_and_non_finite_values_are_refused() {
        let p = v1::TelemetryPoint {
            metric: "x".into(),
            time_us: 0,
            value: None,
        };
        assert!(matches!(
            Point::from_proto(p, 3),
            Err(ValueError::Missing { index: 3, .. })
        ));
        let p = wire("x", v1::value::Kind::DoubleValue(f64::NAN));
        assert!(matches!(
            Point::from_proto(p, 0),
            Err(ValueError::NotFinite { .. })
        ));
        let geo = v1::GeoPosition {
            lat: 91.0,
            lon: 0.0,
            ..Default::default()
        };
        let p = wire("pos", v1::value::Kind::GeoValue(geo));
        assert!(
            Point::from_proto(p, 0)
                .unwrap_err()
                .to_string()
                .contains("latitude 91")
        );
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-1e12f64..1e12).prop_map(Value::Double),
            any::<i64>().prop_map(Value::Int),
            any::<bool>().prop_map(Value::Bool),
            ".{0,40}".prop_map(Value::String),
            (
                -90.0f64..=90.0,
                -180.0f64..=180.0,
                proptest::option::of(0.0f64..50.0),
                proptest::option::of(0.0f64..360.0)
            )
                .prop_map(|(lat, lon, speed_mps, heading_deg)| Value::Geo(
                    GeoPosition {
                        lat,
                        lon,
                        alt_m: None,
                        speed_mps,
                        heading_deg: heading_deg.map(|h| h.min(359.9)),
                        accuracy_m: Some(3.0),
                    }
                )),
        ]
    }

    proptest! {
        /// Every valid value survives the trip to the wire and back unchanged.
        #[test]
        fn values_roundtrip_through_the_wire(v in arb_value()) {
            let back = Value::from_proto(Some(v.to_proto()), 0, "m").unwrap();
            prop_assert_eq!(back, v);
        }
    }
}
