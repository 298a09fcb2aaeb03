//! Plain-text tables and numbers for people (scripts take `--json`).

use std::fmt::Write as _;

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<pad$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes with a binary unit: `512`, `1.5Ki`, `3.2Mi`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1}{unit}")
}

/// Seconds as people read them: `0.4s`, `12s`, `3m05s`, `2h10m`.
pub fn seconds(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    match t {
        0..60 => format!("{t}s"),
        60..3600 => format!("{}m{:02}s", t / 60, t % 60),
        _ => format!("{}h{:02}m", t / 3600, t % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let t = render(
            &["NAME", "VIP"],
            &[
                vec!["web".into(), "10.96.0.10:80".into()],
                vec!["a".into(), "b".into()],
            ],
        );
        assert_eq!(t, "NAME  VIP\nweb   10.96.0.10:80\na     b\n");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(1536), "1.5Ki");
        assert_eq!(bytes(5 << 20), "5.0Mi");
        assert_eq!(seconds(0.42), "0.4s");
        assert_eq!(seconds(185.0), "3m05s");
        assert_eq!(seconds(7800.0), "2h10m");
    }
}
