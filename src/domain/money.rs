//! Money is held as whole nano-USD (1e-9 USD) so that sums are exact; JSON shows USD numbers.

/// Nano-USD in one USD.
pub const NANOS_PER_USD: f64 = 1e9;

/// Converts a USD amount from JSON to nano-USD, or `None` when it is negative or not finite.
pub fn usd_to_nanos(usd: f64) -> Option<i64> {
    if !usd.is_finite() || usd < 0.0 || usd > (i64::MAX as f64) / NANOS_PER_USD {
        return None;
    }
    Some((usd * NANOS_PER_USD).round() as i64)
}

/// Converts nano-USD to a USD number for JSON.
pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_round_trip_exactly() {
        assert_eq!(usd_to_nanos(0.15), Some(150_000_000));
        assert_eq!(nanos_to_usd(usd_to_nanos(2.5).unwrap()), 2.5);
        assert_eq!(usd_to_nanos(-1.0), None);
        assert_eq!(usd_to_nanos(f64::NAN), None);
    }
}
