//! Figures: printed as one JSON line each when measured, and as a table at the end.

use serde_json::json;

pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    /// e.g. "0.97 of ceiling"
    pub note: String,
}

impl Figure {
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The value below which `q` (0..1) of the sorted samples fall.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[derive(Default)]
pub struct Report {
    figures: Vec<Figure>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(
        &mut self,
        name: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
        note: impl Into<String>,
    ) -> f64 {
        let f = Figure {
            name: name.into(),
            unit,
            samples,
            note: note.into(),
        };
        let (lo, hi) = spread(&f.samples);
        println!(
            "{}",
            json!({
                "figure": f.name,
                "unit": f.unit,
                "median": round(f.median()),
                "min": round(lo),
                "max": round(hi),
                "samples": f.samples.iter().map(|s| round(*s)).collect::<Vec<_>>(),
                "note": f.note,
            })
        );
        let m = f.median();
        self.figures.push(f);
        m
    }

    pub fn print_table(&self) {
        println!();
        println!("| figure | median | spread (min–max) | unit | note |");
        println!("|---|---:|---:|---|---|");
        for f in &self.figures {
            let (lo, hi) = spread(&f.samples);
            println!(
                "| {} | {} | {}–{} | {} | {} |",
                f.name,
                fmt(f.median()),
                fmt(lo),
                fmt(hi),
                f.unit,
                f.note
            );
        }
    }
}

fn spread(s: &[f64]) -> (f64, f64) {
    let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 100.0).round() / 100.0
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
