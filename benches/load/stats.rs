//! Statistics over rounds: the median and range of one figure.

use crate::drive::Sample;

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return 0.0;
    }
    values[values.len() / 2]
}

/// Median and range of one figure over the rounds.
#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(samples: &[Sample], figure: impl Fn(&Sample) -> Option<f64>) -> Option<Stat> {
    let mut values: Vec<f64> = samples.iter().filter_map(figure).collect();
    if values.is_empty() {
        return None;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stat {
        median: median(&mut values),
        min,
        max,
    })
}
