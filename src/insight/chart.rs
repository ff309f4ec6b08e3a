//! A small inline SVG bar chart of requests per minute over the last hour:
//! no script, no external asset, readable in any browser or mail client.

use std::fmt::Write as _;

const WIDTH: u32 = 240;
const HEIGHT: u32 = 40;

/// The chart of `series` (oldest minute first), with a title for screen
/// readers and each bar's count as its tooltip.
pub fn requests_per_minute(series: &[u64]) -> String {
    let peak = series.iter().copied().max().unwrap_or(0);
    let total: u64 = series.iter().sum();
    let bar = WIDTH as f64 / series.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h}\" \
         viewBox=\"0 0 {WIDTH} {h}\" role=\"img\"><title>{total} requests in the last hour, \
         at most {peak} a minute</title><rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#f4f4f4\"/>",
        h = HEIGHT + 12,
    );
    for (i, count) in series.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        let height = (*count as f64 / peak as f64 * HEIGHT as f64).max(1.0);
        let minutes_ago = series.len() - 1 - i;
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#3a6ea5\">\
             <title>{count} requests, {minutes_ago} min ago</title></rect>",
            i as f64 * bar,
            HEIGHT as f64 - height,
            (bar - 0.5).max(0.5),
        );
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{y}\" font-size=\"9\">−60 min</text>\
         <text x=\"{WIDTH}\" y=\"{y}\" font-size=\"9\" text-anchor=\"end\">now · peak {peak}/min</text></svg>",
        y = HEIGHT + 10,
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_busy_minute_scaled_to_the_peak() {
        let mut series = [0u64; 60];
        series[0] = 5;
        series[59] = 10;
        let svg = requests_per_minute(&series);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("fill=\"#3a6ea5\"").count(), 2);
        assert!(
            svg.contains("height=\"40.0\""),
            "the peak fills the chart: {svg}"
        );
        assert!(
            svg.contains("height=\"20.0\""),
            "half the peak, half the height"
        );
        assert!(svg.contains("<title>15 requests in the last hour, at most 10 a minute</title>"));
        assert!(svg.contains("10 requests, 0 min ago") && svg.contains("5 requests, 59 min ago"));
        assert!(!svg.contains("<script") && !svg.contains("href"));
    }

    #[test]
    fn an_idle_hour_draws_an_empty_chart() {
        let svg = requests_per_minute(&[0; 60]);
        assert!(!svg.contains("#3a6ea5"));
        assert!(svg.contains("0 requests in the last hour"));
    }
}
