//! `/stats`: the snapshot as a self-contained HTML page, with a chart per backend.

use std::fmt::Write as _;

use crate::admin_state::AdminState;
use crate::health::HealthMode;
use crate::http::percent;
use crate::plural;
use crate::stats::events::rfc3339;

use super::{chart, share, BackendSnapshot, QueueSnapshot, Snapshot};

/// How often the HTML page reloads itself, in seconds.
const REFRESH_SECONDS: u32 = 2;

impl Snapshot {
    /// The HTML page of `/stats`: self-contained (inline style and SVG, no scripts or external
    /// assets), reloading itself every few seconds, and narrow enough for a phone: the table
    /// turns into one card per backend below 1000 px.
    pub fn to_html(&self) -> String {
        let mut page = String::with_capacity(64 * 1024);
        page.push_str(HTML_START);
        let _ = writeln!(
            page,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
        );
        page.push_str(HTML_STYLE);
        let _ = writeln!(
            page,
            "<p class=\"summary\">{} &middot; up {} &middot; {} &middot; {:.1} req/s \
             &middot; {} &middot; {} &middot; {}{}{}</p>",
            escape_html(self.algorithm),
            human_duration(self.uptime_seconds),
            count(self.total_requests, "request"),
            self.requests_per_second,
            count(self.active_connections, "open connection"),
            count(self.tunnels, "tunnel"),
            count(self.retries, "retry"),
            match (self.sessions, self.sticky) {
                (Some((held, max)), _) => format!(" &middot; {held} of {max} sticky sessions"),
                (None, Some(_)) => " &middot; sticky sessions in signed cookies".to_string(),
                (None, None) => String::new(),
            },
            self.queues_note(),
        );
        if !self.unresolved.is_empty() {
            let _ = writeln!(
                page,
                "<p class=\"summary\">waiting for DNS: {} resolve to no address yet; \
                 requests they would take get 503 until they do</p>",
                escape_html(&self.unresolved.join(", "))
            );
        }
        if self.in_panic {
            page.push_str(
                "<p class=\"summary down\">panic: too few backends in rotation \
                 (--panic-threshold), so requests go to all of them as if healthy</p>\n",
            );
        }
        if let Some(last) = &self.last_reload {
            let _ = writeln!(
                page,
                "<p class=\"summary\">last reload: {} ({} applied, {} refused): {}</p>",
                if last.ok { "applied" } else { "refused" },
                self.reloads.0,
                self.reloads.1,
                escape_html(&last.message)
            );
        }
        self.html_table(&mut page);
        self.html_charts(&mut page);
        self.html_events(&mut page);
        page.push_str(
            "<p class=\"links\">Also as <a href=\"/stats.json\">JSON</a> \
             and <a href=\"/metrics\">Prometheus metrics</a>.</p>\n</body>\n</html>\n",
        );
        page
    }

    /// The table of totals, one row per backend. Each cell carries its column's name in
    /// `data-label`, which the narrow layout shows beside the value.
    fn html_table(&self, page: &mut String) {
        page.push_str(
            "<table>\n<thead><tr><th>backend</th><th>state</th><th>health checks</th>\
             <th>weight</th><th>requests</th><th>errors</th><th>active</th>\
             <th>latency p50 / p90 / p99</th><th>share of traffic</th><th>control</th></tr></thead>\n<tbody>\n",
        );
        let reached = self.backend_requests();
        for b in &self.backends {
            let share = share(b.requests, reached) * 100.0;
            let (state, class) = state_cell(b);
            // The counts behind the state, so a learner can watch rise and fall happen.
            let health = match b.health_checks {
                HealthMode::None => String::from("none"),
                _ => escape_html(&b.health),
            };
            let _ = writeln!(
                page,
                "<tr><td class=\"name\" data-label=\"backend\">{}</td>\
                 <td class=\"{class}\">{state}</td>\
                 <td class=\"health\" data-label=\"health checks\">{health}</td>\
                 <td data-label=\"weight\">{}</td><td data-label=\"requests\">{}</td>\
                 <td data-label=\"errors\">{} ({:.1}%)</td><td data-label=\"active\">{}{}{}</td>\
                 <td class=\"latency\" data-label=\"latency p50 / p90 / p99\" title=\"average {:.2} ms\">{} / {} / {} ms</td>\
                 <td class=\"share\" data-label=\"share\"><div class=\"bar\"><div style=\"width:{share:.1}%\"></div></div> {share:.1}%</td>\
                 <td class=\"control\" data-label=\"control\">{}</td></tr>",
                name_cell(b),
                b.weight,
                b.requests,
                b.errors,
                b.error_rate * 100.0,
                b.active_connections,
                tunnels_note(b.tunnels),
                queue_note(&b.queue),
                b.latency_ms_avg,
                milliseconds(b.latency_ms_p50),
                milliseconds(b.latency_ms_p90),
                milliseconds(b.latency_ms_p99),
                self.controls(b),
            );
        }
        page.push_str("</tbody>\n</table>\n");
    }

    /// The summary's word on the queues, when some backend has a connection limit: requests
    /// waiting now in all of them, and those whose wait ran out.
    fn queues_note(&self) -> String {
        if !self.any_limited() {
            return String::new();
        }
        let (length, _, timeouts) = self.queue_totals();
        format!(
            " &middot; {} &middot; {}",
            count(length, "queued request"),
            count(timeouts, "queue timeout")
        )
    }

    /// The buttons that drain a backend, put it in maintenance and make it ready: plain forms
    /// that POST to the admin API (no script), the current state's button disabled. With an
    /// admin token, each form asks for it, since a form cannot send an `Authorization` field.
    fn controls(&self, b: &BackendSnapshot) -> String {
        let name = percent::encode_name(&b.address);
        let token = if self.admin_token_required {
            "<input type=\"password\" name=\"token\" placeholder=\"token\" size=\"6\" required>"
        } else {
            ""
        };
        AdminState::ALL
            .iter()
            .map(|state| {
                let disabled = if *state == b.admin_state {
                    " disabled"
                } else {
                    ""
                };
                format!(
                    "<form method=\"post\" action=\"/backends/{name}/{state}\">{token}\
                     <button{disabled}>{state}</button></form>"
                )
            })
            .collect()
    }

    /// One chart per backend of its last five minutes, all on the same scales.
    fn html_charts(&self, page: &mut String) {
        let busiest = self
            .backends
            .iter()
            .flat_map(|b| b.history.requests.iter().chain(&b.history.errors))
            .copied()
            .max()
            .unwrap_or(0);
        let slowest = self
            .backends
            .iter()
            .flat_map(|b| b.history.latency_ms_avg.iter().flatten())
            .copied()
            .fold(0.0, f64::max);
        let scales = chart::Scales::fitting(busiest, slowest);
        let _ = writeln!(
            page,
            "<h2>Traffic, last 5 minutes <small>until {} UTC</small></h2>\n\
             <p class=\"legend\"><span class=\"key req\"></span>requests/s \
             <span class=\"key err\"></span>errors/s <span class=\"key lat\"></span>mean latency \
             <span class=\"key out\"></span>out of rotation</p>\n<div class=\"charts\">",
            &rfc3339(self.history_last)[11..19]
        );
        for b in &self.backends {
            // The newest second is still running; the one before it is complete.
            let now = b.history.requests.iter().rev().nth(1).copied().unwrap_or(0);
            let series = chart::Seconds {
                requests: &b.history.requests,
                errors: &b.history.errors,
                latency_ms: &b.history.latency_ms_avg,
                down: &b.down,
            };
            let address = escape_html(&b.address);
            let _ = writeln!(
                page,
                "<figure><figcaption><b>{address}</b> {now} req/s in the last second</figcaption>{}</figure>",
                chart::svg(&address, series, scales)
            );
        }
        page.push_str("</div>\n");
    }

    /// The recent events, newest first.
    fn html_events(&self, page: &mut String) {
        page.push_str("<h2>Recent events</h2>\n");
        if self.events.is_empty() {
            page.push_str("<p class=\"links\">None yet.</p>\n");
            return;
        }
        page.push_str("<ol class=\"events\">\n");
        for event in &self.events {
            let time = rfc3339(event.time);
            let _ = writeln!(
                page,
                "<li><time datetime=\"{time}\" title=\"{time}, {:.1} s after start\">{}</time> \
                 <span class=\"kind {kind}\">{kind}</span> {}</li>",
                event.uptime_seconds,
                &time[11..19],
                escape_html(&event.message),
                kind = event.kind,
            );
        }
        page.push_str("</ol>\n");
    }
}

/// The state column: the operator's drain or maint first (they hold the backend out whatever
/// its health), else health. Without checks, "up" beside a 100 % error rate would claim a
/// verdict nothing made.
fn state_cell(b: &BackendSnapshot) -> (String, &'static str) {
    let health = match (b.health_checks, b.healthy) {
        (HealthMode::None, _) => ("not checked", "unchecked"),
        (_, true) => ("up", "up"),
        (_, false) => ("down", "down"),
    };
    match b.admin_state {
        AdminState::Ready if b.weight == 0 => (format!("{}, weight 0", health.0), "drain"),
        AdminState::Ready => match b.slow_start_percent {
            Some(percent) => (format!("{}, slow start {percent:.0} %", health.0), health.1),
            None => (health.0.to_string(), health.1),
        },
        AdminState::Drain => (format!("drain ({})", health.0), "drain"),
        AdminState::Maint => ("maint".to_string(), "maint"),
    }
}

/// The backend's name, and whether it is a backup.
fn name_cell(b: &BackendSnapshot) -> String {
    let backup = if b.backup {
        " <small>(backup)</small>"
    } else {
        ""
    };
    format!("{}{backup}", escape_html(&b.address))
}

/// A latency for the page: three significant digits, `0.102`, `1.05`, `12.4`, `250`.
fn milliseconds(ms: f64) -> String {
    match ms {
        ms if ms >= 100.0 => format!("{ms:.0}"),
        ms if ms >= 10.0 => format!("{ms:.1}"),
        ms if ms >= 1.0 => format!("{ms:.2}"),
        ms => format!("{ms:.3}"),
    }
}

/// The start of the HTML page, before the refresh line.
const HTML_START: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";

/// The rest of the HTML page's head, up to the summary line. Below 1000 px the table becomes
/// one card per backend, each value under its column's name; the health details wrap instead of
/// widening the table; colours follow the reader's light or dark preference.
const HTML_STYLE: &str = concat!(
    "<title>Load balancer statistics</title>\n<style>\n",
    ":root { color-scheme: light dark; --fg: #222; --muted: #555; --line: #ddd; --bg: #fff;\n",
    "  --up: #17803d; --down: #c0262d; --req: #3b7dd8; --lat: #d97706; --track: #eee; }\n",
    "@media (prefers-color-scheme: dark) { :root { --fg: #e4e4e4; --muted: #a8a8a8;\n",
    "  --line: #3a3a3a; --bg: #161616; --up: #4ade80; --down: #f87171; --req: #60a5fa;\n",
    "  --lat: #fbbf24; --track: #333; } }\n",
    "body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: var(--fg);\n",
    "  background: var(--bg); overflow-wrap: anywhere; }\n",
    "h1 { font-size: 1.6em; margin: 0.3em 0; } h2 { font-size: 1.2em; margin: 1.2em 0 0.3em; }\n",
    "h2 small { font-weight: normal; color: var(--muted); font-size: 0.75em; }\n",
    "table { border-collapse: collapse; width: 100%; }\n",
    "th, td { padding: 0.35em 0.5em; border-bottom: 1px solid var(--line); text-align: right;\n",
    "  vertical-align: top; }\n",
    "th { font-size: 0.85em; color: var(--muted); font-weight: 600; white-space: nowrap; }\n",
    "th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }\n",
    "td { white-space: nowrap; } td.name { font-family: monospace; font-size: 1.1em; }\n",
    "td.health { white-space: normal; font-size: 0.85em; color: var(--muted); min-width: 10em;\n",
    "  max-width: 22em; }\n",
    ".up { color: var(--up); font-weight: bold; } .down { color: var(--down); font-weight: bold; }\n",
    ".unchecked { color: var(--muted); }\n",
    ".queue { font-size: 0.85em; color: var(--muted); white-space: normal; }\n",
    ".drain { color: var(--lat); font-weight: bold; } .maint { color: var(--req); font-weight: bold; }\n",
    "td.control form { margin: 0 0 0.15em; } td.control button, td.control input {\n",
    "  font-size: 0.8em; width: 4.8em; padding: 0.1em 0; }\n",
    ".bar { display: inline-block; width: 6em; height: 0.8em; background: var(--track);\n",
    "  vertical-align: middle; }\n",
    ".bar div { height: 100%; background: var(--req); }\n",
    ".summary, .links, .legend { color: var(--muted); }\n",
    ".charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 20em), 1fr));\n",
    "  gap: 0.5em 1.5em; }\n",
    "figure { margin: 0; } figcaption { font-size: 0.9em; color: var(--muted); }\n",
    "figcaption b { font-family: monospace; color: var(--fg); font-size: 1.1em; }\n",
    "svg.chart { width: 100%; height: auto; display: block; }\n",
    "svg text { font-size: 9px; fill: var(--muted); }\n",
    ".chart .req { stroke: var(--req); stroke-width: 1; }\n",
    ".chart .err { stroke: var(--down); stroke-width: 1; }\n",
    ".chart .lat { stroke: var(--lat); stroke-width: 1.2; fill: none; }\n",
    ".chart .out { fill: var(--down); opacity: 0.18; }\n",
    ".chart .axis, .chart .tick { stroke: var(--muted); fill: none; stroke-width: 0.6; }\n",
    ".chart .grid { stroke: var(--line); stroke-width: 0.6; }\n",
    ".key { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em;\n",
    "  vertical-align: -0.1em; }\n",
    ".key.req { background: var(--req); } .key.err { background: var(--down); }\n",
    ".key.lat { background: var(--lat); height: 0.2em; vertical-align: 0.25em; }\n",
    ".key.out { background: var(--down); opacity: 0.25; }\n",
    ".events { list-style: none; padding: 0; margin: 0; font-size: 0.9em; }\n",
    ".events li { padding: 0.25em 0; border-bottom: 1px solid var(--line); }\n",
    ".events time { font-family: monospace; color: var(--muted); }\n",
    ".kind { display: inline-block; min-width: 4.5em; font-weight: bold; }\n",
    ".kind.down, .kind.ejected, .kind.trial { color: var(--down); } .kind.up { color: var(--up); }\n",
    ".kind.admin { color: var(--lat); }\n",
    ".kind.start, .kind.stop { color: var(--muted); }\n",
    "@media (max-width: 1000px) {\n",
    "  body { margin: 0.6em; }\n",
    "  thead { display: none; }\n",
    "  table, tr, td { display: block; width: auto; }\n",
    "  tbody { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 21em), 1fr));\n",
    "    gap: 0.8em; }\n",
    "  tr { display: grid; grid-template-columns: 1fr 1fr; column-gap: 1em;\n",
    "    border: 1px solid var(--line); border-radius: 6px; padding: 0.4em; }\n",
    "  td { border: none; text-align: left; padding: 0.2em 0.3em; white-space: normal; }\n",
    "  td.health, td.latency, td.share, td.control { grid-column: 1 / -1; max-width: none;\n",
    "    min-width: 0; }\n",
    "  td.control form { display: inline-block; margin-right: 0.3em; }\n",
    "  td[data-label]::before { content: attr(data-label); display: block; font-size: 0.75em;\n",
    "    color: var(--muted); font-family: system-ui, sans-serif; }\n",
    "}\n",
    "</style>\n</head>\n<body>\n<h1>Load balancer statistics</h1>\n",
);

/// How many of a backend's requests in flight are tunnels, when any are.
fn tunnels_note(tunnels: u64) -> String {
    match tunnels {
        0 => String::new(),
        n => format!(" ({})", count(n, "tunnel")),
    }
}

/// `n` and `noun` for the page, plural unless `n` is 1: "1 tunnel", "2 tunnels", "3 retries".
/// A no-break space keeps the number and its noun on one line on a narrow screen.
fn count(n: u64, noun: &str) -> String {
    plural::count(n, noun).replacen(' ', "&nbsp;", 1)
}

/// A backend's connection limit for its active cell (`2 of 4`) and, once requests have waited,
/// its queue: how many wait now, how long they waited (p50 / p90 / p99), how many ran out.
fn queue_note(queue: &QueueSnapshot) -> String {
    let Some(max) = queue.max_conns else {
        return String::new();
    };
    if queue.queued == 0 {
        return format!(" of {max}");
    }
    let [p50, p90, p99] = queue.wait_ms.map(milliseconds);
    format!(
        " of {max}<div class=\"queue\">queue {} &middot; waited {p50} / {p90} / {p99} ms \
         &middot; {}</div>",
        queue.length,
        count(queue.timeouts, "timeout")
    )
}

/// Text made safe to place inside HTML elements and attribute values.
fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An uptime such as `3h 04m 05s`.
fn human_duration(seconds: f64) -> String {
    let total = seconds as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::snapshot;

    #[test]
    fn html_escapes_backend_names() {
        let page = snapshot().to_html();
        assert!(page.contains("&lt;b&quot;\\&gt;:2"));
        assert!(!page.contains("<b\""));
        assert!(page.contains("width:60.0%"));
    }

    #[test]
    fn html_shows_the_operators_state_with_buttons_that_post() {
        let mut snapshot = snapshot();
        snapshot.backends[1].admin_state = AdminState::Drain;
        let page = snapshot.to_html();
        assert!(
            page.contains("<td class=\"drain\">drain (down)</td>"),
            "{page}"
        );
        // The name as a path segment: `<b"\>:2`.
        assert!(page.contains(
            "<form method=\"post\" action=\"/backends/%3Cb%22%5C%3E:2/maint\"><button>maint</button>"
        ));
        assert!(page.contains(
            "action=\"/backends/%3Cb%22%5C%3E:2/drain\"><button disabled>drain</button>"
        ));
        assert!(!page.contains("name=\"token\""));
        snapshot.admin_token_required = true;
        assert!(snapshot
            .to_html()
            .contains("<input type=\"password\" name=\"token\""));
        snapshot.backends[0].weight = 0;
        assert!(snapshot
            .to_html()
            .contains("<td class=\"drain\">up, weight 0</td>"));
    }

    #[test]
    fn html_summary_counts_in_plural_only_when_not_one() {
        let page = snapshot().to_html();
        assert!(page.contains(" &middot; 2&nbsp;retries"), "{page}");
        assert_eq!(count(1, "tunnel"), "1&nbsp;tunnel");
        assert_eq!(count(0, "open connection"), "0&nbsp;open connections");
        assert_eq!(count(1, "retry"), "1&nbsp;retry");
        assert_eq!(count(3, "retry"), "3&nbsp;retries");
    }

    #[test]
    fn html_draws_a_chart_per_backend_and_lists_events() {
        let page = snapshot().to_html();
        assert_eq!(page.matches("<svg").count(), 2, "{page}");
        assert_eq!(page.matches("</svg>").count(), 2);
        assert!(page.contains("<rect class=\"out\""), "the outage is shaded");
        // The newest second (299 % 7 = 5) is still running: the caption gives the one before.
        assert!(page.contains("</b> 4 req/s in the last second"), "{page}");
        assert!(page.contains("<span class=\"kind down\">down</span>"));
        assert!(page.contains(">23:06:30</time>"));
        assert!(page.contains("is down: 3 checks failed"));
        assert!(page.contains("0.300 / 0.500 / 1.00 ms"), "{page}");
        assert!(page.contains("prefers-color-scheme: dark"));
        assert!(page.contains("max-width: 1000px"));
        for external in ["<script", "<link", "src=", "url("] {
            assert!(!page.contains(external), "{external}");
        }
    }

    #[test]
    fn html_shows_each_limit_and_queue() {
        let page = snapshot().to_html();
        assert!(
            page.contains(
                "<td data-label=\"active\">0 (1&nbsp;tunnel) of 2<div class=\"queue\">queue 18 \
                 &middot; waited 1200 / 4000 / 4900 ms &middot; 3&nbsp;timeouts</div></td>"
            ),
            "{page}"
        );
        assert!(
            page.contains("&middot; 18&nbsp;queued requests &middot; 3&nbsp;queue timeouts</p>")
        );
        let mut unlimited = snapshot();
        unlimited.backends[0].queue = QueueSnapshot::default();
        let page = unlimited.to_html();
        assert!(!page.contains("<div class=\"queue\">") && !page.contains("queued requests"));
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(65.0), "1m 05s");
        assert_eq!(human_duration(3725.0), "1h 02m 05s");
    }
}
