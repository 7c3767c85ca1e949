//! The traffic charts of `/stats`: one small inline SVG per backend, drawn on the server, so the
//! page still needs no script and no external asset.
//!
//! Each chart covers the last five minutes, one column per second: requests per second as blue
//! bars, errors per second as red bars over them, mean latency as an orange line on its own
//! scale, and the seconds in which the backend was out of rotation shaded. Every chart of a page
//! shares its scales, so a backend taking half the traffic has bars twice as tall as the others'.

use std::fmt::Write as _;

use crate::stats::history::HISTORY_SECONDS;

/// The scales every chart of one page shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scales {
    /// Requests per second at the top of the chart.
    pub requests: u64,
    /// Milliseconds at the top of the chart, for the latency line.
    pub latency_ms: f64,
}

impl Scales {
    /// Round scales that hold the highest of `requests` and of `latencies` (in ms).
    pub fn fitting(requests: u64, latency_ms: f64) -> Scales {
        Scales {
            requests: nice(requests.max(1) as f64) as u64,
            latency_ms: nice(latency_ms.max(0.001)),
        }
    }
}

/// One backend's second-by-second series, oldest first, [`HISTORY_SECONDS`] long.
#[derive(Debug, Clone, Copy)]
pub struct Seconds<'a> {
    /// Requests sent in each second.
    pub requests: &'a [u64],
    /// Errors in each second.
    pub errors: &'a [u64],
    /// Mean latency of each second, in ms.
    pub latency_ms: &'a [Option<f64>],
    /// Whether the backend was out of rotation during each second.
    pub down: &'a [bool],
}

// The drawing's coordinates: a 300-unit wide plot, one unit per second, with room for the
// labels around it. The SVG scales to the width of its box.
const LEFT: f64 = 40.0;
const RIGHT: f64 = 44.0;
const TOP: f64 = 8.0;
const HEIGHT: f64 = 90.0;
const BOTTOM: f64 = 16.0;
const WIDTH: f64 = HISTORY_SECONDS as f64;

/// The SVG element of one backend's chart; `title` is read by screen readers and shown on hover.
pub fn svg(title: &str, series: Seconds<'_>, scales: Scales) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{title}\">\
         <title>{title}</title>",
        LEFT + WIDTH + RIGHT,
        TOP + HEIGHT + BOTTOM
    );
    shade_outages(&mut out, series.down);
    // Grid: the top and the middle of the rate scale.
    let _ = write!(
        out,
        "<path class=\"grid\" d=\"M{LEFT} {TOP}h{WIDTH}M{LEFT} {}h{WIDTH}\"/>",
        TOP + HEIGHT / 2.0
    );
    let requests = scales.requests as f64;
    bars(&mut out, "req", series.requests, |n| y(n as f64, requests));
    bars(&mut out, "err", series.errors, |n| y(n as f64, requests));
    latency_line(&mut out, series.latency_ms, scales.latency_ms);
    axes(&mut out, scales);
    out.push_str("</svg>");
    out
}

/// The height in the chart of `value` on a scale whose top is `top`.
fn y(value: f64, top: f64) -> f64 {
    TOP + HEIGHT - (value / top).min(1.0) * HEIGHT
}

/// Seconds out of rotation, as shaded runs.
fn shade_outages(out: &mut String, down: &[bool]) {
    let mut second = 0;
    while second < down.len() {
        if !down[second] {
            second += 1;
            continue;
        }
        let start = second;
        while second < down.len() && down[second] {
            second += 1;
        }
        let _ = write!(
            out,
            "<rect class=\"out\" x=\"{}\" y=\"{TOP}\" width=\"{}\" height=\"{HEIGHT}\"/>",
            LEFT + start as f64,
            second - start
        );
    }
}

/// Mean latency as a line, broken where a second had no finished request.
fn latency_line(out: &mut String, latency_ms: &[Option<f64>], top: f64) {
    let mut line = String::new();
    let mut pen_down = false;
    for (i, ms) in latency_ms.iter().enumerate() {
        match ms {
            Some(ms) => {
                let command = if pen_down { 'L' } else { 'M' };
                let _ = write!(
                    line,
                    "{command}{:.1} {:.1}",
                    LEFT + i as f64 + 0.5,
                    y(*ms, top)
                );
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    if !line.is_empty() {
        let _ = write!(out, "<path class=\"lat\" d=\"{line}\"/>");
    }
}

/// The frame, then rates on the left, latency on the right, minutes along the bottom.
fn axes(out: &mut String, scales: Scales) {
    let base = TOP + HEIGHT;
    let _ = write!(
        out,
        "<path class=\"axis\" d=\"M{LEFT} {TOP}V{base}h{WIDTH}V{TOP}\"/>"
    );
    let _ = write!(
        out,
        "<text class=\"rate\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}/s</text>\
         <text class=\"rate\" x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\
         <text class=\"ms\" x=\"{}\" y=\"{}\">{} ms</text>",
        LEFT - 3.0,
        TOP + 7.0,
        scales.requests,
        LEFT - 3.0,
        base,
        LEFT + WIDTH + 3.0,
        TOP + 7.0,
        number(scales.latency_ms)
    );
    for minutes_ago in 0..=5 {
        let x = LEFT + WIDTH - f64::from(minutes_ago) * 60.0;
        let (label, anchor) = match minutes_ago {
            0 => (String::from("now"), "end"),
            5 => (String::from("\u{2212}5 min"), "start"),
            m => (format!("\u{2212}{m} min"), "middle"),
        };
        let _ = write!(
            out,
            "<path class=\"tick\" d=\"M{x} {base}v3\"/>\
             <text x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\">{label}</text>",
            base + 12.0
        );
    }
}

/// One bar per second with a count, as a single path of vertical strokes.
fn bars(out: &mut String, class: &str, counts: &[u64], top_of: impl Fn(u64) -> f64) {
    let base = TOP + HEIGHT;
    let mut d = String::new();
    for (i, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
        let _ = write!(d, "M{} {base}V{:.1}", LEFT + i as f64 + 0.5, top_of(n));
    }
    if !d.is_empty() {
        let _ = write!(out, "<path class=\"{class}\" d=\"{d}\"/>");
    }
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `value`.
fn nice(value: f64) -> f64 {
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|step| step * power)
        .find(|&top| top >= value * (1.0 - 1e-9))
        .unwrap_or(10.0 * power)
}

/// A scale value without needless decimals: `200`, `0.5`, `0.02`.
fn number(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_round() {
        assert_eq!(nice(1.0), 1.0);
        assert_eq!(nice(3.0), 5.0);
        assert_eq!(nice(51.0), 100.0);
        assert_eq!(nice(200.0), 200.0);
        assert_eq!(nice(0.03), 0.05);
        assert_eq!(Scales::fitting(0, 0.0).requests, 1);
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(200.0), "200");
    }

    #[test]
    fn a_chart_shows_bars_the_outage_and_its_axes() {
        let mut requests = vec![0; HISTORY_SECONDS];
        requests[299] = 10;
        requests[0] = 5;
        let mut down = vec![false; HISTORY_SECONDS];
        down[100..130].iter_mut().for_each(|d| *d = true);
        let latency = vec![Some(1.0); HISTORY_SECONDS];
        let errors = vec![0; HISTORY_SECONDS];
        let series = Seconds {
            requests: &requests,
            errors: &errors,
            latency_ms: &latency,
            down: &down,
        };
        let svg = svg("a:1", series, Scales::fitting(10, 1.0));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("<rect class=\"out\" x=\"140\" y=\"8\" width=\"30\""));
        assert!(svg.contains("M339.5 98V8.0"), "{svg}");
        assert!(svg.contains(">10/s</text>") && svg.contains(">1 ms</text>"));
        assert!(svg.contains(">now</text>") && svg.contains(">\u{2212}5 min</text>"));
        assert!(!svg.contains("class=\"err\""), "no errors, no error bars");
    }
}
