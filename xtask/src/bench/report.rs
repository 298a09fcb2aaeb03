//! Turning runs into medians, ratios and goals, and showing them: a terminal table, Markdown for
//! the README, and an SVG chart written by hand (no plotting dependency for one picture).

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    Path, Run,
    cases::{BackendKill, ELSEWHERE_NOTE, Metric},
    world::HAPROXY_RETRIES,
};

/// Medians per path and metric (the largest value for `RssMib`), the spread of the runs, and
/// each run's value by round, for ratios paired within a round.
#[derive(Serialize, Default)]
pub struct Summary {
    pub medians: BTreeMap<Path, BTreeMap<Metric, f64>>,
    /// The smallest and the largest run.
    pub spread: BTreeMap<Path, BTreeMap<Metric, [f64; 2]>>,
    #[serde(skip)]
    rounds: BTreeMap<(Path, Metric), BTreeMap<usize, f64>>,
}

impl Summary {
    pub fn of(runs: &[Run]) -> Summary {
        let mut s = Summary::default();
        for run in runs {
            for (m, v) in &run.metrics {
                s.rounds
                    .entry((run.path, *m))
                    .or_default()
                    .insert(run.repetition, *v);
            }
        }
        for ((path, metric), by_round) in &s.rounds {
            let mut values: Vec<f64> = by_round.values().copied().collect();
            values.sort_by(f64::total_cmp);
            let v = if *metric == Metric::RssMib {
                values[values.len() - 1]
            } else {
                median(&values)
            };
            s.medians.entry(*path).or_default().insert(*metric, v);
            s.spread
                .entry(*path)
                .or_default()
                .insert(*metric, [values[0], values[values.len() - 1]]);
        }
        s
    }

    pub fn get(&self, path: Path, metric: Metric) -> Option<f64> {
        self.medians.get(&path)?.get(&metric).copied()
    }

    /// `path`'s figure over `reference`'s: the median of the ratios round by round. Both paths
    /// ran seconds apart in each round, so each round's ratio shares the machine's state of
    /// the moment; the ratio of the two medians would mix rounds the machine ran at different
    /// speeds. Without a common round, and for memory (the largest, not the median), the
    /// ratio of the figures.
    pub fn ratio(&self, path: Path, metric: Metric, reference: Path) -> Option<f64> {
        if metric != Metric::RssMib
            && let Some(mut ratios) = self.paired(path, metric, reference)
        {
            ratios.sort_by(f64::total_cmp);
            return Some(median(&ratios));
        }
        let (a, b) = (self.get(path, metric)?, self.get(reference, metric)?);
        (b > 0.0).then(|| a / b)
    }

    /// The ratio round by round, smallest and largest: how far the verdict moved between
    /// rounds.
    pub fn ratio_range(&self, path: Path, metric: Metric, reference: Path) -> Option<[f64; 2]> {
        let ratios = self.paired(path, metric, reference)?;
        let lo = ratios.iter().copied().reduce(f64::min)?;
        let hi = ratios.iter().copied().reduce(f64::max)?;
        Some([lo, hi])
    }

    /// `path`'s figure over `reference`'s in each round both ran; `None` if none.
    fn paired(&self, path: Path, metric: Metric, reference: Path) -> Option<Vec<f64>> {
        let (a, b) = (
            self.rounds.get(&(path, metric))?,
            self.rounds.get(&(reference, metric))?,
        );
        let ratios: Vec<f64> = a
            .iter()
            .filter_map(|(round, x)| Some(x / b.get(round).filter(|y| **y > 0.0)?))
            .collect();
        (!ratios.is_empty()).then_some(ratios)
    }

    /// The widest spread, (max − min) / median, of the ratios the tables and goals show for
    /// `metrics`: above [`NOISE`], the round is worth repeating.
    pub fn worst_spread(&self, metrics: &[Metric]) -> Option<(f64, String)> {
        let mut worst: Option<(f64, String)> = None;
        for m in metrics
            .iter()
            .filter(|m| **m != Metric::RssMib && !m.is_share())
        {
            for (a, b) in RATIOS.into_iter().chain(HTTP_RATIOS) {
                let (Some(r), Some([lo, hi])) = (self.ratio(a, *m, b), self.ratio_range(a, *m, b))
                else {
                    continue;
                };
                let spread = (hi - lo) / r;
                if worst.as_ref().is_none_or(|(w, _)| spread > *w) {
                    let (w, what) = m.row();
                    let label = format!("{w} {what} {} / {}", a.short(), b.short());
                    worst = Some((spread, label.trim().to_owned()));
                }
            }
        }
        worst
    }
}

/// A spread above this, (max − min) / median, is more than the noise the verdicts allow.
pub const NOISE: f64 = 0.05;

/// Whether `threshold` lies within the runs' range: the verdict could go either way.
pub fn inside_noise(range: Option<[f64; 2]>, threshold: f64) -> bool {
    range.is_some_and(|[lo, hi]| lo <= threshold && threshold <= hi)
}

/// Of sorted, non-empty values.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Rows of cells, the first row the header; the first two columns are labels.
pub struct Table(pub Vec<Vec<String>>);

const DASH: &str = "–";

/// The medians of `metrics` (rows) over `paths` (columns), each with its runs' range.
pub fn values(s: &Summary, paths: &[Path], metrics: &[Metric]) -> Table {
    let mut rows = vec![
        ["workload", "figure"]
            .into_iter()
            .map(String::from)
            .chain(paths.iter().map(|p| p.label().to_owned()))
            .collect::<Vec<_>>(),
    ];
    for &m in metrics {
        let (w, what) = m.row();
        let mut row = vec![w.to_owned(), what.to_owned()];
        row.extend(paths.iter().map(|p| {
            let Some(v) = s.get(*p, m) else {
                return DASH.into();
            };
            match s.spread.get(p).and_then(|x| x.get(&m)) {
                Some([lo, hi]) if m != Metric::RssMib && lo < hi => {
                    format!("{} ({}–{})", m.format(v), m.format(*lo), m.format(*hi))
                }
                _ => m.format(v),
            }
        }));
        rows.push(row);
    }
    Table(rows)
}

/// The ratios people ask for of the L4 cases: every path to the physical reference, and the
/// proxies in userspace (the forwarder on both byte paths, nginx) to HAProxy.
pub const RATIOS: [(Path, Path); 9] = [
    (Path::Kernel, Path::Direct),
    (Path::KernelLeastConn, Path::Direct),
    (Path::KernelPeakEwma, Path::Direct),
    (Path::Proxy, Path::Direct),
    (Path::Haproxy, Path::Direct),
    (Path::Nginx, Path::Direct),
    (Path::Proxy, Path::Haproxy),
    (Path::ProxyCopy, Path::Haproxy),
    (Path::Nginx, Path::Haproxy),
];

/// Of the HTTP cases: each HTTP proxy to direct, HTTP mode to each peer, and HTTP mode to the
/// agent's own L4 path (what parsing and per-request balancing cost or gain).
pub const HTTP_RATIOS: [(Path, Path); 7] = [
    (Path::Http, Path::Direct),
    (Path::HaproxyHttp, Path::Direct),
    (Path::NginxHttp, Path::Direct),
    (Path::Http, Path::HaproxyHttp),
    (Path::Http, Path::NginxHttp),
    (Path::Http, Path::Proxy),
    (Path::NginxHttp, Path::HaproxyHttp),
];

/// The ratios `pairs` of `metrics`; shares are left out (a ratio of shares says nothing), and
/// rows without a figure.
pub fn ratios(s: &Summary, pairs: &[(Path, Path)], metrics: &[Metric]) -> Table {
    let mut head = vec!["workload".to_owned(), "figure".to_owned()];
    head.extend(
        pairs
            .iter()
            .map(|(a, b)| format!("{} / {}", a.short(), b.short())),
    );
    let mut rows = vec![head];
    for &m in metrics.iter().filter(|m| !m.is_share()) {
        let cells: Vec<String> = pairs
            .iter()
            .map(|(a, b)| {
                let Some(r) = s.ratio(*a, m, *b) else {
                    return DASH.into();
                };
                match s.ratio_range(*a, m, *b) {
                    // ≈: the rounds put it on both sides of 1, a tie.
                    Some([lo, hi]) if lo < hi => {
                        let tie = if inside_noise(Some([lo, hi]), 1.0) {
                            " ≈"
                        } else {
                            ""
                        };
                        format!("{r:.2}× ({lo:.2}–{hi:.2}){tie}")
                    }
                    _ => format!("{r:.2}×"),
                }
            })
            .collect();
        if cells.iter().all(|c| c == DASH) {
            continue;
        }
        // The workload's name goes with its first row shown.
        let w = metric_workload(metrics, m);
        let shown_before = rows.iter().skip(1).any(|r| r[0] == w);
        let (_, what) = m.row();
        let arrow = if m.higher_is_better() { "↑" } else { "↓" };
        let mut row = vec![
            if shown_before { "" } else { w }.to_owned(),
            format!("{what} {arrow}"),
        ];
        row.extend(cells);
        rows.push(row);
    }
    Table(rows)
}

/// The workload a metric's row belongs to: its own name, or that of the nearest row above it
/// in `metrics` that names one (continuation rows leave it empty).
fn metric_workload(metrics: &[Metric], m: Metric) -> &'static str {
    let (w, _) = m.row();
    if !w.is_empty() {
        return w;
    }
    metrics
        .iter()
        .take_while(|x| **x != m)
        .filter(|x| !x.row().0.is_empty())
        .last()
        .map_or("", |x| x.row().0)
}

impl Table {
    /// Aligned columns for a terminal: labels left, figures right.
    pub fn terminal(&self) -> String {
        let cols = self.0.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.0
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.0 {
            let mut line = String::from(" ");
            for (c, cell) in row.iter().enumerate() {
                let pad = width[c].saturating_sub(cell.chars().count());
                if c < 2 {
                    let _ = write!(line, " {cell}{}", " ".repeat(pad));
                } else {
                    let _ = write!(line, "  {}{cell}", " ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (i, row) in self.0.iter().enumerate() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
            if i == 0 {
                let align: Vec<&str> = (0..row.len())
                    .map(|c| if c < 2 { "---" } else { "---:" })
                    .collect();
                let _ = writeln!(out, "| {} |", align.join(" | "));
            }
        }
        out
    }
}

/// One of the benchmark's goals (docs/benchmarks.md), judged (never asserted: a benchmark
/// reports).
#[derive(Serialize)]
pub struct Goal {
    pub goal: String,
    pub pass: bool,
    pub figure: String,
    /// The rounds put the figure on both sides of the goal's threshold: the verdict is
    /// inside the noise and could go either way on another run.
    pub inside_noise: bool,
}

/// How a ratio is judged against its threshold.
#[derive(Clone, Copy)]
pub enum Cmp {
    AtLeast,
    AtMost,
    /// Strictly above: "beats", "ahead of".
    Above,
}

/// A goal on the ratio of `a` to `b` in `m`.
pub fn ratio_goal(
    s: &Summary,
    goal: &str,
    (a, m, b): (Path, Metric, Path),
    threshold: f64,
    cmp: Cmp,
) -> Goal {
    let r = s.ratio(a, m, b);
    let range = s.ratio_range(a, m, b);
    Goal {
        goal: goal.to_owned(),
        pass: r.is_some_and(|r| match cmp {
            Cmp::AtLeast => r >= threshold,
            Cmp::AtMost => r <= threshold,
            Cmp::Above => r > threshold,
        }),
        figure: match (r, range) {
            (Some(r), Some([lo, hi])) if lo < hi => format!("{r:.2}× ({lo:.2}–{hi:.2})"),
            (Some(r), _) => format!("{r:.2}×"),
            _ => "no figure".into(),
        },
        inside_noise: inside_noise(range, threshold),
    }
}

/// The L4 cases' goals.
pub fn goals(s: &Summary) -> Vec<Goal> {
    let one = |goal: &str, t: (Path, Metric, Path), threshold: f64, above: bool| {
        let cmp = if above { Cmp::AtLeast } else { Cmp::AtMost };
        ratio_goal(s, goal, t, threshold, cmp)
    };
    let mut g = vec![
        one(
            "kernel mode keep-alive req/s ≥ 0.98× direct",
            (Path::Kernel, Metric::KeepAliveRps, Path::Direct),
            0.98,
            true,
        ),
        one(
            "kernel mode new connections/s ≥ 0.95× direct",
            (Path::Kernel, Metric::CloseCps, Path::Direct),
            0.95,
            true,
        ),
        one(
            "kernel least_connections keep-alive req/s ≥ 0.97× direct",
            (Path::KernelLeastConn, Metric::KeepAliveRps, Path::Direct),
            0.97,
            true,
        ),
        one(
            "kernel least_connections new connections/s ≥ 0.97× direct",
            (Path::KernelLeastConn, Metric::CloseCps, Path::Direct),
            0.97,
            true,
        ),
        one(
            "kernel peak_ewma keep-alive req/s ≥ 0.97× direct",
            (Path::KernelPeakEwma, Metric::KeepAliveRps, Path::Direct),
            0.97,
            true,
        ),
        one(
            "kernel peak_ewma new connections/s ≥ 0.97× direct",
            (Path::KernelPeakEwma, Metric::CloseCps, Path::Direct),
            0.97,
            true,
        ),
        one(
            "proxy mode keep-alive req/s ≥ 1.3× HAProxy",
            (Path::Proxy, Metric::KeepAliveRps, Path::Haproxy),
            1.3,
            true,
        ),
        one(
            "proxy mode iperf3 1 stream ≥ 2× HAProxy",
            (Path::Proxy, Metric::Iperf1Gbps, Path::Haproxy),
            2.0,
            true,
        ),
        one(
            "proxy mode iperf3 4 streams ≥ 2× HAProxy",
            (Path::Proxy, Metric::Iperf4Gbps, Path::Haproxy),
            2.0,
            true,
        ),
    ];
    let vs_h = one(
        "",
        (Path::Proxy, Metric::CloseCps, Path::Haproxy),
        1.0,
        true,
    );
    let vs_n = one("", (Path::Proxy, Metric::CloseCps, Path::Nginx), 1.0, true);
    let ahead = |r: Option<f64>| r.is_some_and(|r| r > 1.0);
    g.push(Goal {
        goal: "proxy mode new connections/s ahead of HAProxy and nginx".into(),
        pass: ahead(s.ratio(Path::Proxy, Metric::CloseCps, Path::Haproxy))
            && ahead(s.ratio(Path::Proxy, Metric::CloseCps, Path::Nginx)),
        figure: format!("{} HAProxy, {} nginx", vs_h.figure, vs_n.figure),
        inside_noise: vs_h.inside_noise || vs_n.inside_noise,
    });
    g.push(one(
        "proxy mode CPU per request ≤ 0.8× HAProxy (wrk keep-alive)",
        (Path::Proxy, Metric::KeepAliveCpuUs, Path::Haproxy),
        0.8,
        false,
    ));
    g
}

/// How far from even a backend's share of the gRPC calls may be, in percent of even.
pub const GRPC_EVEN_WITHIN: f64 = 10.0;

/// The HTTP cases' goals.
pub fn http_goals(s: &Summary) -> Vec<Goal> {
    let mut g = vec![
        ratio_goal(
            s,
            "HTTP mode keep-alive req/s ≥ HAProxy mode http",
            (Path::Http, Metric::KeepAliveRps, Path::HaproxyHttp),
            1.0,
            Cmp::AtLeast,
        ),
        ratio_goal(
            s,
            "HTTP mode keep-alive proxy CPU per request ≤ HAProxy mode http",
            (Path::Http, Metric::KeepAliveCpuUs, Path::HaproxyHttp),
            1.0,
            Cmp::AtMost,
        ),
        ratio_goal(
            s,
            "HTTP mode keep-alive p99 latency ≤ HAProxy mode http",
            (Path::Http, Metric::KeepAliveP99Ms, Path::HaproxyHttp),
            1.0,
            Cmp::AtMost,
        ),
        ratio_goal(
            s,
            "HTTP mode beats L4 proxy mode with a new client connection per request",
            (Path::Http, Metric::CloseCps, Path::Proxy),
            1.0,
            Cmp::Above,
        ),
    ];
    let off = s.get(Path::Http, Metric::GrpcOffEven);
    let range = s
        .spread
        .get(&Path::Http)
        .and_then(|x| x.get(&Metric::GrpcOffEven))
        .copied();
    let pct = |p: Path, m: Metric| s.get(p, m).map_or("–".into(), |v| format!("{v:.1} %"));
    g.push(Goal {
        goal: format!(
            "HTTP mode gRPC on one connection: 3 backends each within ±{GRPC_EVEN_WITHIN:.0} % of even"
        ),
        pass: off.is_some_and(|v| v <= GRPC_EVEN_WITHIN),
        figure: match off {
            Some(v) => format!(
                "{} to {} per backend, {v:.1} % off even at most; L4 proxy mode: {} to {}",
                pct(Path::Http, Metric::GrpcMinShare),
                pct(Path::Http, Metric::GrpcMaxShare),
                pct(Path::Proxy, Metric::GrpcMinShare),
                pct(Path::Proxy, Metric::GrpcMaxShare),
            ),
            None => "no figure".into(),
        },
        inside_noise: inside_noise(range, GRPC_EVEN_WITHIN),
    });
    g
}

/// Each backend's share of `counts`, or `None` if nothing was counted.
pub fn shares(counts: &[u64]) -> Option<Vec<f64>> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts.iter().map(|c| *c as f64 / total as f64).collect())
}

/// `33.4 % / 33.3 % / 33.3 %`.
pub fn shares_text(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|s| format!("{:.1} %", s * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The calls each gRPC backend served, run by run: the share each got, as the case asks.
pub fn grpc_text(runs: &[Run]) -> String {
    let mut out = String::new();
    for r in runs.iter().filter(|r| !r.backend_requests.is_empty()) {
        if out.is_empty() {
            out.push_str(
                "\ngRPC on one connection, calls each backend served (backends 1 / 2 / 3):\n\n",
            );
        }
        let counts: Vec<String> = r.backend_requests.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "- {} round {}: {} ({})",
            r.path.label(),
            r.repetition,
            counts.join(" / "),
            shares(&r.backend_requests).map_or_else(String::new, |s| shares_text(&s))
        );
    }
    out
}

/// The backend-kill case's goal, on HTTP mode's count of failed requests (HAProxy's beside
/// it). A count, not a ratio: one failed request is a miss however many succeeded.
pub fn kill_goal(kills: &[BackendKill]) -> Goal {
    let figure: Vec<String> = kills
        .iter()
        .map(|k| {
            let what = match &k.error {
                Some(e) => format!("did not run: {}", e.lines().next().unwrap_or_default()),
                None => format!("{} requests, {} failed", k.requests, k.failed),
            };
            format!("{} {what}", k.path.short())
        })
        .collect();
    Goal {
        goal: "HTTP mode: a backend killed under load costs no failed idempotent request".into(),
        pass: kills.iter().any(|k| k.path == Path::Http && k.pass),
        figure: if figure.is_empty() {
            "no figure".into()
        } else {
            figure.join("; ")
        },
        inside_noise: false,
    }
}

/// The backend-kill case, a line per path with wrk's counts and the verdict.
pub fn kill_text(kills: &[BackendKill]) -> String {
    let Some(first) = kills.first() else {
        return String::new();
    };
    let mut out = format!(
        "\nA backend killed under wrk keep-alive load (once per run, {} s; backend {} of 3 \
         killed by its PID; HAProxy http with {}):\n\n",
        first.seconds,
        first.backend,
        HAPROXY_RETRIES.join(", ")
    );
    for k in kills {
        let verdict = if k.pass { "PASS" } else { "MISS" };
        let busy = if k.elsewhere > ELSEWHERE_NOTE {
            format!(" [{:.0}% of the CPU elsewhere]", k.elsewhere * 100.0)
        } else {
            String::new()
        };
        let e = &k.errors;
        let counts = format!(
            "{} requests, {} failed (socket errors: connect {}, read {}, write {}, timeout {}; \
             non-2xx or 3xx {})",
            k.requests, k.failed, e.connect, e.read, e.write, e.timeout, e.non_2xx
        );
        let killed = match k.pid {
            Some(pid) => format!(
                ", killed at {:.1} s (pid {pid}{})",
                k.killed_at,
                if k.refused { ", then refused" } else { "" }
            ),
            None => String::new(),
        };
        let error = match &k.error {
            Some(e) => format!(", did not run: {}", e.lines().next().unwrap_or_default()),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "- {}: {counts}{killed}{error}: {verdict}{busy}",
            k.path.label()
        );
    }
    out
}

pub fn goals_text(goals: &[Goal], markdown: bool) -> String {
    let mut out = String::new();
    // The figures in one column, unless a goal's words are very long.
    let width = goals
        .iter()
        .map(|g| g.goal.chars().count())
        .filter(|n| *n <= 80)
        .max()
        .unwrap_or(58);
    for g in goals {
        let verdict = if g.pass { "PASS" } else { "MISS" };
        let noise = if g.inside_noise {
            ", inside the noise: the rounds fell on both sides"
        } else {
            ""
        };
        if markdown {
            let _ = writeln!(out, "- **{verdict}** {} ({}{noise})", g.goal, g.figure);
        } else {
            let _ = writeln!(out, "  {verdict}  {:<width$} {}{noise}", g.goal, g.figure);
        }
    }
    out
}

/// The throughput figures, each path as a fraction of direct, as grouped bars.
pub fn svg(s: &Summary, paths: &[Path], metrics: &[Metric], subtitle: &str) -> String {
    const W: f64 = 980.0;
    const H: f64 = 460.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 80.0;
    const BOTTOM: f64 = 70.0;
    let ratio = |p: Path, m: Metric| s.ratio(p, m, Path::Direct);
    // Throughput with a direct figure to compare to (the gRPC case has none).
    let all = metrics;
    let metrics: Vec<Metric> = all
        .iter()
        .copied()
        .filter(|m| m.higher_is_better() && paths.iter().any(|p| ratio(*p, *m).is_some()))
        .collect();
    let top = metrics
        .iter()
        .flat_map(|m| paths.iter().filter_map(|p| ratio(*p, *m)))
        .fold(1.0f64, f64::max);
    let y_max = ((top * 1.1) / 0.25).ceil() * 0.25;
    let plot_h = H - TOP - BOTTOM;
    let plot_w = W - LEFT - RIGHT;
    let y = |v: f64| TOP + plot_h * (1.0 - v / y_max);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(o, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        o,
        "<text x=\"{LEFT}\" y=\"24\" font-size=\"16\" font-weight=\"bold\">Throughput relative \
         to a direct connection (higher is better)</text>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{LEFT}\" y=\"42\" fill=\"#555\">{}</text>",
        escape(subtitle)
    );
    // The legend in one row across the plot's width.
    let step = (plot_w / paths.len().max(1) as f64).min(150.0);
    for (i, p) in paths.iter().enumerate() {
        let x = LEFT + i as f64 * step;
        let _ = writeln!(
            o,
            "<rect x=\"{x}\" y=\"54\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"64\">{}</text>",
            p.color(),
            x + 16.0,
            p.label()
        );
    }
    let mut v = 0.0;
    while v <= y_max + 1e-9 {
        let yy = y(v);
        let (stroke, width) = if (v - 1.0).abs() < 1e-9 {
            ("#333", 1.5)
        } else {
            ("#ddd", 1.0)
        };
        let _ = writeln!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"{stroke}\" \
             stroke-width=\"{width}\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" \
             fill=\"#555\">{v:.2}×</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
        v += 0.25;
    }
    let group = plot_w / metrics.len() as f64;
    let bar = group * 0.8 / paths.len() as f64;
    for (g, m) in metrics.iter().enumerate() {
        let x0 = LEFT + g as f64 * group + group * 0.1;
        for (i, p) in paths.iter().enumerate() {
            let x = x0 + i as f64 * bar;
            let cx = x + bar / 2.0;
            match ratio(*p, *m) {
                Some(r) => {
                    let yy = y(r.min(y_max));
                    let _ = writeln!(
                        o,
                        "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" \
                         fill=\"{}\"><title>{}: {}</title></rect>\
                         <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                         font-size=\"10\">{r:.2}</text>",
                        bar - 2.0,
                        TOP + plot_h - yy,
                        p.color(),
                        p.label(),
                        s.get(*p, *m).map(|v| m.format(v)).unwrap_or_default(),
                        yy - 3.0
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                         font-size=\"10\">{DASH}</text>",
                        TOP + plot_h - 3.0
                    );
                }
            }
        }
        let (w, what) = m.row();
        let w = if w.is_empty() {
            // Continuation rows (redis SET) take their workload from the row above.
            all.iter()
                .take_while(|x| *x != m)
                .filter(|x| !x.row().0.is_empty())
                .last()
                .map_or("", |x| x.row().0)
        } else {
            w
        };
        let cx = x0 + group * 0.4;
        let _ = writeln!(
            o,
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            TOP + plot_h + 20.0,
            escape(w),
            TOP + plot_h + 36.0,
            escape(what)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

/// The README with `section` between the markers; the markers (and a `## Benchmark` heading,
/// if there is none) are added at the end when absent. Nothing outside them changes.
pub fn splice_readme(readme: &str, section: &str) -> String {
    let section = format!("{BEGIN}\n{}\n{END}", section.trim_end());
    if let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END))
        && b < e
    {
        return format!("{}{section}{}", &readme[..b], &readme[e + END.len()..]);
    }
    let heading = "## Benchmark";
    if let Some(at) = readme.find(&format!("\n{heading}\n")) {
        let after = at + heading.len() + 2;
        return format!("{}\n{section}\n{}", &readme[..after], &readme[after..]);
    }
    let sep = if readme.ends_with("\n\n") {
        ""
    } else if readme.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    format!("{readme}{sep}{heading}\n\n{section}\n")
}

#[cfg(test)]
mod tests {
    use super::super::cases::WrkErrors;
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    #[test]
    fn readme_gets_heading_and_markers_once() {
        let first = splice_readme("# X\n\ntext\n", "table 1");
        assert_eq!(
            first,
            format!("# X\n\ntext\n\n## Benchmark\n\n{BEGIN}\ntable 1\n{END}\n")
        );
        let second = splice_readme(&first, "table 2\n");
        assert_eq!(
            second,
            format!("# X\n\ntext\n\n## Benchmark\n\n{BEGIN}\ntable 2\n{END}\n")
        );
    }

    #[test]
    fn readme_heading_without_markers_gets_them_under_it() {
        let r = splice_readme("# X\n\n## Benchmark\n\nold words\n", "t");
        assert_eq!(
            r,
            format!("# X\n\n## Benchmark\n\n{BEGIN}\nt\n{END}\n\nold words\n")
        );
    }

    fn run(repetition: usize, path: Path, metric: Metric, v: f64) -> Run {
        Run {
            repetition,
            workload: super::super::cases::Workload::Close,
            path,
            seconds: 1.0,
            error: None,
            metrics: [(metric, v)].into(),
            notes: Vec::new(),
            elsewhere: 0.0,
            backend_requests: Vec::new(),
        }
    }

    #[test]
    fn spread_is_kept_and_ratios_pair_within_a_round() {
        let m = Metric::CloseCps;
        // Both paths slower in round 2 (a busy machine): the ratio holds within each round.
        let runs = [
            run(1, Path::Proxy, m, 100.0),
            run(1, Path::Haproxy, m, 98.0),
            run(2, Path::Proxy, m, 80.0),
            run(2, Path::Haproxy, m, 79.0),
            run(3, Path::Proxy, m, 101.0),
            run(3, Path::Haproxy, m, 97.0),
        ];
        let s = Summary::of(&runs);
        assert_eq!(s.get(Path::Proxy, m), Some(100.0));
        assert_eq!(s.spread[&Path::Proxy][&m], [80.0, 101.0]);
        let [lo, hi] = s.ratio_range(Path::Proxy, m, Path::Haproxy).unwrap();
        assert!(lo > 1.0 && hi < 1.05, "{lo} {hi}");
        let (spread, what) = s.worst_spread(&[m]).unwrap();
        assert!(spread < NOISE, "{spread} {what}");
        let g = goals(&s);
        let ahead = g.iter().find(|g| g.goal.contains("ahead")).unwrap();
        assert!(!ahead.inside_noise, "every round ahead: not noise");
        let t = ratios(&s, &RATIOS, &Metric::L4).terminal();
        // The median of 1.02, 1.01 and 1.04, round by round (100 / 97 over the medians).
        assert!(t.contains("1.02× (1.01–1.04)"), "{t}");
    }

    #[test]
    fn a_verdict_whose_rounds_disagree_is_inside_the_noise() {
        let m = Metric::KeepAliveRps;
        let runs = [
            run(1, Path::Proxy, m, 105.0),
            run(1, Path::Haproxy, m, 100.0),
            run(2, Path::Proxy, m, 95.0),
            run(2, Path::Haproxy, m, 100.0),
        ];
        let s = Summary::of(&runs);
        assert!(inside_noise(
            s.ratio_range(Path::Proxy, m, Path::Haproxy),
            1.0
        ));
        let (spread, _) = s.worst_spread(&[m]).unwrap();
        assert!(spread > NOISE, "{spread}");
        assert!(ratios(&s, &RATIOS, &Metric::L4).terminal().contains("≈"));
    }

    #[test]
    fn ratios_skip_rows_without_reference() {
        let mut s = Summary::default();
        s.medians
            .entry(Path::Direct)
            .or_default()
            .insert(Metric::KeepAliveRps, 100.0);
        s.medians
            .entry(Path::Kernel)
            .or_default()
            .insert(Metric::KeepAliveRps, 99.0);
        let t = ratios(&s, &RATIOS, &Metric::L4);
        assert_eq!(t.0.len(), 2);
        assert_eq!(t.0[1][2], "0.99×");
        let g = goals(&s);
        assert!(g[0].pass);
        assert!(!g[2].pass);
        assert!(svg(&s, &Path::L4, &Metric::L4, "x").contains("0.99"));
    }

    fn kill(path: Path, requests: u64, errors: WrkErrors, error: Option<&str>) -> BackendKill {
        let failed = errors.total();
        BackendKill {
            path,
            seconds: 10,
            killed_at: 3.34,
            backend: "10.77.0.12:82".into(),
            pid: Some(4242),
            refused: true,
            requests,
            errors,
            failed,
            pass: error.is_none() && failed == 0,
            elsewhere: 0.0,
            error: error.map(String::from),
        }
    }

    #[test]
    fn a_backend_kill_is_judged_on_http_modes_count_alone() {
        let haproxy = kill(
            Path::HaproxyHttp,
            380_000,
            WrkErrors {
                read: 3,
                non_2xx: 2,
                ..WrkErrors::default()
            },
            None,
        );
        let clean = [
            kill(Path::Http, 410_000, WrkErrors::default(), None),
            haproxy,
        ];
        let g = kill_goal(&clean);
        assert!(g.pass && !g.inside_noise);
        assert_eq!(
            g.figure,
            "HTTP 410000 requests, 0 failed; HAProxy http 380000 requests, 5 failed"
        );
        let text = kill_text(&clean);
        assert!(text.contains("retries 3, option redispatch"), "{text}");
        assert!(
            text.contains(
                "- HTTP mode: 410000 requests, 0 failed (socket errors: connect 0, read 0, \
                 write 0, timeout 0; non-2xx or 3xx 0), killed at 3.3 s (pid 4242, then \
                 refused): PASS"
            ),
            "{text}"
        );
        assert!(
            text.contains("5 failed (socket errors: connect 0, read 3"),
            "{text}"
        );
        assert!(text.contains("non-2xx or 3xx 2), killed"), "{text}");
        // One failed request is a miss, and so is a case that did not run.
        let one = [kill(
            Path::Http,
            410_000,
            WrkErrors {
                timeout: 1,
                ..WrkErrors::default()
            },
            None,
        )];
        assert!(!kill_goal(&one).pass);
        let broken = [kill(
            Path::Http,
            0,
            WrkErrors::default(),
            Some("wrk failed\nmore"),
        )];
        let g = kill_goal(&broken);
        assert!(
            !g.pass && g.figure == "HTTP did not run: wrk failed",
            "{}",
            g.figure
        );
        assert!(!kill_goal(&[]).pass);
        assert!(kill_text(&[]).is_empty());
    }

    #[test]
    fn http_goals_judge_http_mode_against_haproxy_and_l4_and_the_grpc_shares() {
        let mut runs = Vec::new();
        for round in 1..=3 {
            for (path, rps, cpu, p99, close) in [
                (Path::Http, 40_000.0, 18.0, 1.9, 9_000.0),
                (Path::HaproxyHttp, 38_000.0, 20.0, 2.0, 8_000.0),
                (Path::Proxy, 41_000.0, 17.0, 1.8, 7_000.0),
            ] {
                let mut r = run(round, path, Metric::KeepAliveRps, rps);
                r.metrics.insert(Metric::KeepAliveCpuUs, cpu);
                r.metrics.insert(Metric::KeepAliveP99Ms, p99);
                r.metrics.insert(Metric::CloseCps, close);
                runs.push(r);
            }
            // Round robin per request against one backend for the one connection.
            for (path, counts) in [
                (Path::Http, vec![3334, 3333, 3333]),
                (Path::Proxy, vec![0, 10_000, 0]),
            ] {
                let sh = shares(&counts).unwrap();
                let max = sh.iter().copied().fold(0.0, f64::max);
                let min = sh.iter().copied().fold(1.0, f64::min);
                let mut r = run(round, path, Metric::GrpcMaxShare, max * 100.0);
                r.metrics.insert(Metric::GrpcMinShare, min * 100.0);
                r.metrics.insert(
                    Metric::GrpcOffEven,
                    (max - 1.0 / 3.0).max(1.0 / 3.0 - min) * 300.0,
                );
                r.backend_requests = counts;
                runs.push(r);
            }
        }
        let s = Summary::of(&runs);
        let g = http_goals(&s);
        let verdicts: Vec<bool> = g.iter().map(|g| g.pass).collect();
        assert_eq!(
            verdicts,
            [true, true, true, true, true],
            "{}",
            goals_text(&g, false)
        );
        assert!(g[4].figure.contains("33.3 % to 33.3 %"), "{}", g[4].figure);
        assert!(g[4].figure.contains("0.0 % to 100.0 %"), "{}", g[4].figure);
        // Shares are judged, never shown as ratios.
        let t = ratios(&s, &HTTP_RATIOS, &Metric::HTTP).terminal();
        assert!(!t.contains("share"), "{t}");
        assert!(t.contains("1.05×"), "{t}");
        let text = grpc_text(&runs);
        assert!(
            text.contains("proxy mode round 2: 0 / 10000 / 0 (0.0 % / 100.0 % / 0.0 %)"),
            "{text}"
        );
        assert!(svg(&s, &Path::HTTP, &Metric::HTTP, "x").contains("</svg>"));
        // The HTTP ratios count for more rounds too; every round alike here.
        let (spread, what) = s.worst_spread(&[Metric::KeepAliveRps]).unwrap();
        assert!(spread < NOISE && what.contains("HTTP"), "{spread} {what}");
    }
}
