//! The status page: one server-rendered HTML document with inline CSS and inline SVG loss
//! curves, so it works on a center with no Internet access. Every string a participant
//! supplied (names, languages) goes through [`escape`].

use std::fmt::Write;

use super::report::{LossCurve, StatusReport};

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}\
.mono{font-family:ui-monospace,monospace;font-size:.9em}.off{color:#a00;font-weight:bold}.left{color:#666;font-style:italic}\
.dim{color:#777}.legend span{margin-right:1.2em}svg{border:1px solid #ddd;background:#fff}";

/// Line colours of the loss curves, one per language.
const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Renders the whole page.
pub fn render(s: &StatusReport) -> String {
    let mut h = String::new();
    let federation = escape(&s.federation);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>Mekong aggregator — {federation}</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>Federation <span id=\"federation\">{federation}</span></h1>\
         <p>plan sha256 <span class=\"mono\" id=\"plan\">{}</span><br>",
        escape(&s.plan_sha256)
    );
    let secure = if s.secure_aggregation {
        "secure aggregation on".to_string()
    } else {
        "<span class=\"off\">SECURE AGGREGATION OFF</span>".to_string()
    };
    let _ = write!(
        h,
        "<span id=\"stage\">{}</span>, round <span id=\"round\">{}</span> of {}, {secure}, \
         up {:.0} s (started at Unix time {})",
        escape(&s.stage),
        s.round,
        s.rounds_total,
        s.uptime_s,
        s.started_unix_s
    );
    if let (Some(stage), Some(attempt)) = (&s.secure_stage, s.secure_attempt) {
        let _ = write!(
            h,
            "<br>open round: secure stage {}, attempt {attempt}, {} in cohort",
            escape(stage),
            s.cohort_size
        );
    }
    if let Some(note) = s.operator_note() {
        let _ = write!(h, "<br><strong id=\"operator\">{}</strong>", escape(&note));
    }
    let _ = write!(
        h,
        "<br>global adapter <span class=\"mono\">{}</span></p>",
        escape(short(&s.global_adapter_sha256))
    );

    participants(&mut h, s);
    rounds(&mut h, s);
    loss_curves(&mut h, &s.loss_curves);
    timings(&mut h, s);
    traffic(&mut h, s);
    h.push_str(
        "<p class=\"dim\">Refreshes every 10 s. JSON: <a href=\"/api/status\">/api/status</a>, \
         Prometheus: <a href=\"/metrics\">/metrics</a>.</p></body></html>\n",
    );
    h
}

fn participants(h: &mut String, s: &StatusReport) {
    let _ = write!(
        h,
        "<h2>Participants ({} joined, {} needed, {} left)</h2>",
        s.participants.len(),
        s.participants_needed,
        s.participants_left
    );
    if s.participants.is_empty() {
        h.push_str("<p class=\"dim\">No participant has joined yet.</p>");
        return;
    }
    h.push_str(
        "<table id=\"participants\"><tr><th>name</th><th>language</th><th>joined</th>\
         <th>last seen</th><th>rounds contributed</th><th>loss reports</th>\
         <th title=\"mean per round by the lab's own clock, when its policy shares round_timing\">round time (train · wait)</th></tr>",
    );
    for p in &s.participants {
        let seen = if let Some(left) = &p.left {
            // A lab that left is not a lab that went missing.
            format!("<span class=\"left\">{}</span>", escape(left))
        } else if p.connected {
            format!("{:.0} s ago", p.last_seen_s_ago)
        } else {
            format!("<span class=\"off\">{:.0} s ago</span>", p.last_seen_s_ago)
        };
        // Whether a slow round is the lab's hardware (train) or the center (wait).
        let timing = p.round_timing.as_ref().map_or_else(
            || "<span class=\"dim\">not shared</span>".to_string(),
            |t| {
                let phase = |name: &str| {
                    t.mean_phases
                        .iter()
                        .find(|p| p.phase == name)
                        .map_or(0.0, |p| p.seconds)
                };
                format!(
                    "{:.1} s ({:.1} · {:.1})",
                    t.mean_wall_s,
                    phase("train"),
                    phase("wait")
                )
            },
        );
        let _ = write!(
            h,
            "<tr class=\"participant\"><td>{}</td><td>{}</td><td class=\"num\">+{:.1} s</td>\
             <td class=\"num\">{seen}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{timing}</td></tr>",
            escape(&p.name),
            escape(&p.language),
            p.joined_at_s,
            p.rounds_contributed,
            p.metric_reports
        );
    }
    h.push_str("</table>");
}

fn rounds(h: &mut String, s: &StatusReport) {
    let _ = write!(
        h,
        "<h2>Rounds ({} closed; {} secure attempts failed, {} participants dropped)</h2>",
        s.rounds.len(),
        s.secure_attempts_failed,
        s.participants_dropped
    );
    if s.rounds.is_empty() {
        h.push_str("<p class=\"dim\">No round has closed yet.</p>");
        return;
    }
    h.push_str(
        "<table id=\"rounds\"><tr><th>round</th><th>contributors</th><th>dropped</th>\
         <th>left</th><th>samples</th><th>attempt</th><th>quantisation bound</th>\
         <th>ε round / spent</th><th>duration</th><th>adapter</th></tr>",
    );
    // Newest first: the last round is what an operator looks for.
    for r in s.rounds.iter().rev() {
        let names = |v: &[String]| {
            if v.is_empty() {
                "—".to_string()
            } else {
                v.iter().map(|n| escape(n)).collect::<Vec<_>>().join(", ")
            }
        };
        let _ = write!(
            h,
            "<tr class=\"round\" id=\"round-{}\"><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{:.2} s</td><td class=\"mono\">{}</td></tr>",
            r.round,
            r.round,
            names(&r.contributors),
            names(&r.dropped),
            names(&r.left),
            r.total_samples,
            r.secure_attempt
                .map_or("plaintext".into(), |a| a.to_string()),
            r.quantisation_bound
                .map_or("—".into(), |b| format!("{b:.3e}")),
            match (r.epsilon_round, r.epsilon_spent) {
                (Some(round), Some(spent)) => format!("{round:.2} / {spent:.2}"),
                _ => "—".into(),
            },
            r.duration_s,
            escape(short(&r.adapter_sha256))
        );
    }
    h.push_str("</table>");
}

fn timings(h: &mut String, s: &StatusReport) {
    h.push_str("<h2>Stage timings</h2>");
    if s.stage_timings.is_empty() {
        h.push_str("<p class=\"dim\">No stage has closed yet.</p>");
        return;
    }
    h.push_str(
        "<table id=\"timings\"><tr><th>stage</th><th>count</th><th>mean</th><th>max</th>\
         <th>last</th></tr>",
    );
    for t in &s.stage_timings {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.2} s</td>\
             <td class=\"num\">{:.2} s</td><td class=\"num\">{:.2} s</td></tr>",
            escape(&t.stage),
            t.count,
            t.mean_s,
            t.max_s,
            t.last_s
        );
    }
    h.push_str("</table>");
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn traffic(h: &mut String, s: &StatusReport) {
    let received: u64 = s.traffic.iter().map(|t| t.received_bytes).sum();
    let sent: u64 = s.traffic.iter().map(|t| t.sent_bytes).sum();
    let _ = write!(
        h,
        "<h2>Traffic ({} received, {} sent)</h2>",
        bytes(received),
        bytes(sent)
    );
    if s.traffic.is_empty() {
        return;
    }
    h.push_str(
        "<table id=\"traffic\"><tr><th>gRPC method</th><th>calls</th><th>received</th>\
         <th>sent</th></tr>",
    );
    for t in &s.traffic {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td></tr>",
            escape(&t.rpc),
            t.calls,
            bytes(t.received_bytes),
            bytes(t.sent_bytes)
        );
    }
    h.push_str("</table>");
}

/// Per-language held-out loss over rounds as one inline SVG: solid lines after local
/// training, dashed before it (the global each round started from).
fn loss_curves(h: &mut String, curves: &[LossCurve]) {
    h.push_str("<h2>Held-out loss per language</h2>");
    let points: Vec<_> = curves.iter().flat_map(|c| c.points.iter()).collect();
    if points.is_empty() {
        h.push_str(
            "<p class=\"dim\">No lab has reported held-out losses (labs opt in with \
             <code>share_metrics = [\"heldout_loss\"]</code> under <code>[policy]</code> in participant.toml).</p>",
        );
        return;
    }
    const W: f64 = 640.0;
    const HT: f64 = 260.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 32.0;
    let first = points.iter().map(|p| p.round).min().unwrap_or(1);
    let last = points
        .iter()
        .map(|p| p.round)
        .max()
        .unwrap_or(1)
        .max(first + 1);
    let (mut lo, mut hi) = points
        .iter()
        .flat_map(|p| [p.before, p.after])
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let x = |round: u64| LEFT + (round - first) as f64 / (last - first) as f64 * (W - LEFT - RIGHT);
    let y = |loss: f64| TOP + (hi - loss) / (hi - lo) * (HT - TOP - BOTTOM);
    let _ = write!(
        h,
        "<svg id=\"loss-curves\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{HT}\" \
         viewBox=\"0 0 {W} {HT}\" role=\"img\" aria-label=\"held-out loss per language\">"
    );
    // Axes with the extreme values.
    let _ = write!(
        h,
        "<g stroke=\"#999\" fill=\"none\"><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{y0}\"/>\
         <line x1=\"{LEFT}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\"/></g>\
         <g font-size=\"11\" fill=\"#555\"><text x=\"{tx}\" y=\"{ty_hi}\" text-anchor=\"end\">{hi:.3}</text>\
         <text x=\"{tx}\" y=\"{ty_lo}\" text-anchor=\"end\">{lo:.3}</text>\
         <text x=\"{LEFT}\" y=\"{ry}\" text-anchor=\"middle\">round {first}</text>\
         <text x=\"{x1}\" y=\"{ry}\" text-anchor=\"end\">round {last}</text></g>",
        y0 = HT - BOTTOM,
        x1 = W - RIGHT,
        tx = LEFT - 6.0,
        ty_hi = TOP + 10.0,
        ty_lo = HT - BOTTOM,
        ry = HT - 10.0,
    );
    for (i, curve) in curves.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let line = |f: &dyn Fn(&super::report::LossPoint) -> f64| {
            curve
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.round), y(f(p))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let language = escape(&curve.language);
        let _ = write!(
            h,
            "<g class=\"curve\" data-language=\"{language}\"><title>{language}</title>\
             <polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" stroke-dasharray=\"5 4\" points=\"{}\"/>\
             <polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" points=\"{}\"/>",
            line(&|p| p.before),
            line(&|p| p.after)
        );
        for p in &curve.points {
            let _ = write!(
                h,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{language} round {}: {:.4} → {:.4} ({} labs, {} tokens)</title></circle>",
                x(p.round),
                y(p.after),
                p.round,
                p.before,
                p.after,
                p.labs,
                p.tokens
            );
        }
        h.push_str("</g>");
    }
    h.push_str("</svg><p class=\"legend\">");
    for (i, curve) in curves.iter().enumerate() {
        let last = curve.points.last();
        let _ = write!(
            h,
            "<span><b style=\"color:{}\">■</b> {}{}</span>",
            PALETTE[i % PALETTE.len()],
            escape(&curve.language),
            last.map_or(String::new(), |p| format!(
                " — round {}: {:.4} → {:.4}",
                p.round, p.before, p.after
            ))
        );
    }
    h.push_str(
        "<br><span class=\"dim\">solid: after the round's local training; dashed: the model \
         the round started from. Token-weighted mean over the labs of each language that \
         opted in.</span></p>",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::report::{LossPoint, ParticipantStatus, RoundRow};

    fn report() -> StatusReport {
        StatusReport {
            federation: "fed<&>".into(),
            plan_sha256: "ab".repeat(32),
            secure_aggregation: true,
            uptime_s: 3.0,
            started_unix_s: 0,
            stage: "training".into(),
            paused: true,
            stop_requested: false,
            round: 2,
            rounds_total: 3,
            secure_stage: None,
            secure_attempt: None,
            participants_needed: 1,
            participants_left: 0,
            cohort_size: 1,
            updates_received: 0,
            global_adapter_sha256: "cd".repeat(32),
            participants: vec![ParticipantStatus {
                name: "<script>alert(1)</script>".into(),
                language: "km\"'".into(),
                joined_at_s: 0.1,
                last_seen_s_ago: 0.5,
                connected: true,
                rounds_contributed: 1,
                metric_reports: 1,
                left: None,
                round_timing: None,
            }],
            rounds: Vec::new(),
            traffic: Vec::new(),
            stage_timings: Vec::new(),
            secure_attempts_failed: 0,
            participants_dropped: 0,
            loss_curves: vec![LossCurve {
                language: "<km>".into(),
                points: vec![LossPoint {
                    round: 1,
                    before: 5.0,
                    after: 4.0,
                    tokens: 10,
                    labs: 1,
                }],
            }],
        }
    }

    #[test]
    fn participant_strings_are_escaped() {
        let html = render(&report());
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("km&quot;&#39;"));
        assert!(html.contains("fed&lt;&amp;&gt;"));
        assert!(html.contains("data-language=\"&lt;km&gt;\""));
        assert!(!html.contains("<km>"));
        // Offline by construction: nothing is fetched from elsewhere.
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("<link"));
    }

    #[test]
    fn the_operators_pause_and_stop_show() {
        let html = render(&report());
        assert!(
            html.contains("pause requested: no new round opens once round 2 closes"),
            "{html}"
        );
        let mut r = report();
        r.stage = "paused".into();
        assert!(render(&r).contains("paused after round 2"));
        assert!(r.summary().contains("operator: paused after round 2"));
        r.stop_requested = true;
        assert!(render(&r).contains("stop requested: the run finishes when round 2 closes"));
        r.paused = false;
        r.stop_requested = false;
        assert!(!render(&r).contains("id=\"operator\""));
    }

    #[test]
    fn a_labs_shared_round_timing_shows_train_and_wait() {
        let html = render(&report());
        assert!(html.contains("not shared"), "{html}");
        let mut r = report();
        r.participants[0].round_timing = Some(crate::admin::report::LabRoundTimes {
            rounds: 2,
            mean_wall_s: 12.04,
            mean_phases: vec![
                crate::admin::report::PhaseSpan {
                    phase: "train".into(),
                    seconds: 10.0,
                },
                crate::admin::report::PhaseSpan {
                    phase: "wait".into(),
                    seconds: 1.46,
                },
            ],
            last_round: 2,
            last_wall_s: 11.0,
        });
        let html = render(&r);
        assert!(html.contains("12.0 s (10.0 · 1.5)"), "{html}");
        assert!(!html.contains("not shared"));
    }

    #[test]
    fn a_lab_that_left_shows_as_left_not_as_missing() {
        let mut r = report();
        r.participants[0].left = Some("left after round 1 (<policy>)".into());
        r.rounds.push(RoundRow {
            round: 2,
            contributors: vec!["lab-lo".into()],
            dropped: Vec::new(),
            left: vec!["lab-km".into()],
            total_samples: 1,
            secure_attempt: None,
            quantisation_bound: None,
            epsilon_round: None,
            epsilon_spent: None,
            duration_s: 1.0,
            adapter_sha256: "ab".repeat(32),
            stages: Vec::new(),
        });
        let html = render(&r);
        assert!(
            html.contains("<span class=\"left\">left after round 1 (&lt;policy&gt;)</span>"),
            "{html}"
        );
        assert!(
            html.contains("<td>lab-lo</td><td>—</td><td>lab-km</td>"),
            "{html}"
        );
    }

    #[test]
    fn a_single_round_curve_draws_within_the_chart() {
        let html = render(&report());
        let svg = &html[html.find("<svg").unwrap()..html.find("</svg>").unwrap()];
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
