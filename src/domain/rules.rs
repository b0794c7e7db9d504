//! Checks for the values admins write into users' rules and upstream keys.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Highest level (tier) number accepted; levels are small integers naming key pools.
pub const MAX_LEVEL: i32 = 1_000;

/// Per-model limits of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
}

/// Reads a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (taken as a single host). An
/// IPv4-mapped block (`::ffff:10.0.0.0/104`) is read as the IPv4 block it maps, as a caller's
/// mapped address is read as IPv4.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => text
            .parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("`{text}` is not a CIDR block or IP address"))?,
    };
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let mapped = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("96 to 128 less 96");
            return Ok(IpNet::V4(mapped));
        }
    }
    Ok(net)
}

/// Checks a model-name glob such as `gpt-4o*`.
pub fn check_model_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 256 {
        return Err("model globs must be 1 to 256 characters".into());
    }
    if has_control(pattern) {
        return Err("model globs must not contain control characters".into());
    }
    globset::Glob::new(pattern)
        .map(|_| ())
        .map_err(|e| format!("`{pattern}` is not a valid glob: {}", e.kind()))
}

/// Whether a name holds a control character: none belongs in a name, and PostgreSQL cannot
/// store a NUL.
pub fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// Checks a path glob such as `/v1/chat/*`.
pub fn check_path_glob(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!("endpoint glob `{pattern}` must start with `/`"));
    }
    check_model_glob(pattern)
}

/// Checks a level number.
pub fn check_level(level: i32) -> Result<(), String> {
    if (1..=MAX_LEVEL).contains(&level) {
        Ok(())
    } else {
        Err(format!(
            "level must be between 1 and {MAX_LEVEL}, got {level}"
        ))
    }
}

/// Checks a user's fallback levels: valid, distinct and not the user's own level.
pub fn check_fallback_levels(level: i32, fallbacks: &[i32]) -> Result<(), String> {
    for (i, l) in fallbacks.iter().enumerate() {
        check_level(*l)?;
        if *l == level {
            return Err(format!(
                "fallback_levels must not repeat the user's level {level}"
            ));
        }
        if fallbacks[..i].contains(l) {
            return Err(format!("fallback level {l} is listed twice"));
        }
    }
    Ok(())
}

/// Checks an upstream base URL: absolute http(s), no query or fragment, no credentials.
pub fn check_base_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| format!("base_url is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("base_url must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("base_url must name a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("base_url must not have a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("base_url must not carry credentials; put the key in `secret`".into());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// Checks a non-negative limit (rpm, tpm).
pub fn check_limit(name: &str, value: i64) -> Result<(), String> {
    if value < 0 {
        Err(format!("{name} must not be negative"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_bare_addresses_parse_and_garbage_does_not() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_cidr("::ffff:10.0.0.1").unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(
            parse_cidr("::ffff:10.1.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_cidr("192.168.1.1").unwrap().to_string(),
            "192.168.1.1/32"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("not-an-ip").is_err());
    }

    #[test]
    fn globs_are_checked() {
        assert!(check_model_glob("gpt-4o*").is_ok());
        assert!(check_model_glob("gpt-[").is_err());
        assert!(check_path_glob("/v1/chat/*").is_ok());
        assert!(check_path_glob("v1/chat").is_err());
    }

    #[test]
    fn fallback_levels_must_be_distinct_and_differ_from_level() {
        assert!(check_fallback_levels(1, &[2, 3]).is_ok());
        assert!(check_fallback_levels(1, &[1]).is_err());
        assert!(check_fallback_levels(1, &[2, 2]).is_err());
        assert!(check_fallback_levels(1, &[0]).is_err());
    }

    #[test]
    fn base_urls_are_checked() {
        assert_eq!(
            check_base_url("https://api.openai.com/v1/").unwrap(),
            "https://api.openai.com/v1"
        );
        assert!(check_base_url("ftp://x").is_err());
        assert!(check_base_url("https://u:p@x/v1").is_err());
        assert!(check_base_url("nonsense").is_err());
    }
}
