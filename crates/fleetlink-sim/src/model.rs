//! Device models: vehicles driving between waypoints around a depot, machines on a shop floor.

use fleetlink_core::{GeoPosition, MetricName, Point, Value};
use rand::Rng;

const EARTH_RADIUS_M: f64 = 6_371_000.0;

fn metric(name: &str) -> MetricName {
    MetricName::new(name).unwrap_or_else(|e| unreachable!("static metric name {name}: {e}"))
}

/// A vehicle: drives to random waypoints within `radius_m` of its depot, stops at each for a while,
/// burns fuel with distance and refuels when low; the engine warms while driving and cools at rest.
#[derive(Debug, Clone)]
pub struct Vehicle {
    depot: (f64, f64),
    radius_m: f64,
    lat: f64,
    lon: f64,
    heading_deg: f64,
    speed_mps: f64,
    cruise_mps: f64,
    target: (f64, f64),
    dwell_s: f64,
    fuel: f64,
    engine_c: f64,
    odometer_m: f64,
}

impl Vehicle {
    /// A vehicle parked at a random spot near `depot` (lat, lon in degrees).
    pub fn new(depot: (f64, f64), radius_m: f64, rng: &mut impl Rng) -> Self {
        let start = random_point(depot, radius_m, rng);
        Self {
            depot,
            radius_m,
            lat: start.0,
            lon: start.1,
            heading_deg: rng.random_range(0.0..360.0),
            speed_mps: 0.0,
            cruise_mps: rng.random_range(8.0..25.0),
            target: random_point(depot, radius_m, rng),
            dwell_s: 0.0,
            fuel: rng.random_range(0.3..1.0),
            engine_c: 20.0,
            odometer_m: rng.random_range(10_000.0..300_000.0) * 1_000.0, // 10k to 300k km
        }
    }

    /// Advances `dt_s` seconds and returns the readings at `now_us`.
    pub fn step(&mut self, dt_s: f64, now_us: i64, rng: &mut impl Rng) -> Vec<Point> {
        if self.dwell_s > 0.0 {
            self.dwell_s -= dt_s;
            self.speed_mps = (self.speed_mps - 3.0 * dt_s).max(0.0);
        } else {
            let remaining = distance_m((self.lat, self.lon), self.target);
            if remaining < 30.0 {
                self.dwell_s = rng.random_range(5.0..60.0);
                self.target = random_point(self.depot, self.radius_m, rng);
                self.cruise_mps = rng.random_range(8.0..25.0);
            } else {
                self.heading_deg = bearing_deg((self.lat, self.lon), self.target);
                let want = self.cruise_mps.min(remaining / 3.0).max(2.0);
                let accel = (want - self.speed_mps).clamp(-4.0 * dt_s, 2.0 * dt_s);
                self.speed_mps = (self.speed_mps + accel + rng.random_range(-0.2..0.2)).max(0.0);
                let d = (self.speed_mps * dt_s).min(remaining);
                (self.lat, self.lon) = destination((self.lat, self.lon), self.heading_deg, d);
                self.odometer_m += d;
                // ~12 l/100 km on an 80 l tank
                self.fuel -= d / 1_000.0 * 0.12 / 80.0 * 10.0;
                if self.fuel < 0.05 {
                    self.fuel = 1.0; // refuelled
                }
            }
        }
        let target_c = if self.speed_mps > 0.5 {
            88.0 + self.speed_mps * 0.3
        } else {
            60.0
        };
        self.engine_c +=
            (target_c - self.engine_c) * (dt_s / 60.0).min(1.0) + rng.random_range(-0.1..0.1);
        let pos = GeoPosition {
            lat: self.lat,
            lon: self.lon,
            alt_m: Some(35.0),
            speed_mps: Some(self.speed_mps),
            heading_deg: Some(self.heading_deg.rem_euclid(360.0)),
            accuracy_m: Some(rng.random_range(2.0..8.0)),
        };
        vec![
            Point {
                metric: metric("position"),
                time_us: now_us,
                value: Value::Geo(pos),
            },
            Point {
                metric: metric("speed_kmh"),
                time_us: now_us,
                value: Value::Double(self.speed_mps * 3.6),
            },
            Point {
                metric: metric("heading_deg"),
                time_us: now_us,
                value: Value::Double(self.heading_deg.rem_euclid(360.0)),
            },
            Point {
                metric: metric("fuel"),
                time_us: now_us,
                value: Value::Double(self.fuel.clamp(0.0, 1.0)),
            },
            Point {
                metric: metric("engine_temp_c"),
                time_us: now_us,
                value: Value::Double(self.engine_c),
            },
            Point {
                metric: metric("odometer_km"),
                time_us: now_us,
                value: Value::Double(self.odometer_m / 1_000.0),
            },
        ]
    }
}

/// A stationary machine: temperature follows load with inertia, vibration rises with load and
/// wear, power draw follows a duty cycle.
#[derive(Debug, Clone)]
pub struct Machine {
    temperature_c: f64,
    wear: f64,
    phase_s: f64,
    cycle_s: f64,
    rated_kw: f64,
}

impl Machine {
    /// A machine at ambient temperature.
    pub fn new(rng: &mut impl Rng) -> Self {
        Self {
            temperature_c: 21.0,
            wear: rng.random_range(0.0..0.3),
            phase_s: rng.random_range(0.0..600.0),
            cycle_s: rng.random_range(120.0..900.0),
            rated_kw: rng.random_range(5.0..75.0),
        }
    }

    /// Advances `dt_s` seconds and returns the readings at `now_us`.
    pub fn step(&mut self, dt_s: f64, now_us: i64, rng: &mut impl Rng) -> Vec<Point> {
        self.phase_s = (self.phase_s + dt_s) % self.cycle_s;
        let load = if self.phase_s < self.cycle_s * 0.7 {
            0.6 + 0.4
                * (self.phase_s / self.cycle_s * std::f64::consts::TAU)
                    .sin()
                    .abs()
        } else {
            0.05
        };
        let target = 21.0 + 55.0 * load;
        self.temperature_c +=
            (target - self.temperature_c) * (dt_s / 120.0).min(1.0) + rng.random_range(-0.05..0.05);
        self.wear = (self.wear + dt_s * 1e-6).min(1.0);
        let vibration = 0.5 + 3.0 * load * (1.0 + self.wear) + rng.random_range(0.0..0.3);
        let power = self.rated_kw * load + rng.random_range(-0.2..0.2);
        vec![
            Point {
                metric: metric("temperature_c"),
                time_us: now_us,
                value: Value::Double(self.temperature_c),
            },
            Point {
                metric: metric("vibration_mm_s"),
                time_us: now_us,
                value: Value::Double(vibration),
            },
            Point {
                metric: metric("power_kw"),
                time_us: now_us,
                value: Value::Double(power.max(0.0)),
            },
            Point {
                metric: metric("running"),
                time_us: now_us,
                value: Value::Bool(load > 0.1),
            },
        ]
    }
}

fn random_point(center: (f64, f64), radius_m: f64, rng: &mut impl Rng) -> (f64, f64) {
    let d = radius_m * rng.random_range(0.0f64..1.0).sqrt();
    destination(center, rng.random_range(0.0..360.0), d)
}

fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().asin()
}

fn bearing_deg(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let y = (lo2 - lo1).sin() * la2.cos();
    let x = la1.cos() * la2.sin() - la1.sin() * la2.cos() * (lo2 - lo1).cos();
    y.atan2(x).to_degrees().rem_euclid(360.0)
}

fn destination(a: (f64, f64), bearing_deg: f64, d_m: f64) -> (f64, f64) {
    let (la1, lo1, br, ang) = (
        a.0.to_radians(),
        a.1.to_radians(),
        bearing_deg.to_radians(),
        d_m / EARTH_RADIUS_M,
    );
    let la2 = (la1.sin() * ang.cos() + la1.cos() * ang.sin() * br.cos()).asin();
    let lo2 = lo1 + (br.sin() * ang.sin() * la1.cos()).atan2(ang.cos() - la1.sin() * la2.sin());
    (
        la2.to_degrees(),
        (lo2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_vehicle_stays_near_its_depot_moves_and_keeps_valid_readings() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let depot = (52.52, 13.405);
        let mut v = Vehicle::new(depot, 5_000.0, &mut rng);
        let start_odo = v.odometer_m;
        for i in 0..3_600 {
            for p in v.step(1.0, i * 1_000_000, &mut rng) {
                // every reading passes the server's validation
                let wire = p.to_proto();
                fleetlink_core::Point::from_proto(wire, 0).unwrap();
                if let Value::Geo(g) = p.value {
                    assert!(distance_m(depot, (g.lat, g.lon)) < 5_100.0);
                }
            }
        }
        assert!(
            v.odometer_m - start_odo > 1_000.0,
            "drove {} m in an hour",
            v.odometer_m - start_odo
        );
    }

    #[test]
    fn a_machine_heats_up_under_load() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut m = Machine::new(&mut rng);
        let mut max_t: f64 = 0.0;
        for i in 0..1_800 {
            for p in m.step(1.0, i, &mut rng) {
                if let (Value::Double(t), "temperature_c") = (&p.value, p.metric.as_str()) {
                    max_t = max_t.max(*t);
                }
            }
        }
        assert!(max_t > 40.0, "max temperature {max_t}");
    }
}
