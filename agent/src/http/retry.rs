//! When a request may go to another backend, and how long it may take: idempotent methods,
//! the retriable status codes (502, 503, 504; gRPC `UNAVAILABLE`), and the client's
//! `grpc-timeout` deadline.

use std::time::Duration;

use hyper::{HeaderMap, Method, StatusCode};

/// RFC 9110's idempotent methods: repeating them is safe even once the backend saw them.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Responses that ask for another backend: a route rule's own `codes` (GEP-1731
/// `retry.codes`) where it has them, else 502, 503 and 504 (Envoy's `retriable-status-codes`
/// default set, the ones GEP-1731 requires); and either way gRPC's `UNAVAILABLE` in a
/// trailers-only response, which is not an HTTP status a rule could list.
pub fn retriable(status: StatusCode, headers: &HeaderMap, codes: Option<&[u16]>) -> bool {
    let listed = match codes {
        Some(codes) => codes.contains(&status.as_u16()),
        None => matches!(status.as_u16(), 502..=504),
    };
    listed || grpc_status(headers) == Some(14)
}

/// `grpc-status` in a header block (a trailers-only response carries it in the headers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `grpc-timeout` (`1..=8 digits` then a unit: H, M, S, m, u, n), as gRPC's HTTP/2 protocol
/// defines it. A malformed value is ignored, as gRPC servers do.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, v.parse().unwrap());
        h
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let t = |v| grpc_timeout(&headers("grpc-timeout", v));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("S"), None);
        assert_eq!(t("123456789S"), None, "nine digits is too many");
        assert_eq!(t("10x"), None);
    }

    #[test]
    fn retriable_statuses() {
        let none = HeaderMap::new();
        assert!(retriable(StatusCode::BAD_GATEWAY, &none, None));
        assert!(retriable(StatusCode::GATEWAY_TIMEOUT, &none, None));
        assert!(!retriable(StatusCode::INTERNAL_SERVER_ERROR, &none, None));
        assert!(retriable(
            StatusCode::OK,
            &headers("grpc-status", "14"),
            None
        ));
        assert!(!retriable(
            StatusCode::OK,
            &headers("grpc-status", "0"),
            None
        ));
        // A rule's codes replace the default set.
        let codes: &[u16] = &[500, 429];
        assert!(retriable(
            StatusCode::INTERNAL_SERVER_ERROR,
            &none,
            Some(codes)
        ));
        assert!(retriable(StatusCode::TOO_MANY_REQUESTS, &none, Some(codes)));
        assert!(!retriable(StatusCode::BAD_GATEWAY, &none, Some(codes)));
        assert!(retriable(
            StatusCode::OK,
            &headers("grpc-status", "14"),
            Some(codes)
        ));
        assert!(idempotent(&Method::PUT) && !idempotent(&Method::POST));
    }
}
