//! A user's access rules compiled once per cache fill: globs become matchers, so a call pays
//! only the matching.

use std::net::IpAddr;

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use crate::domain::{ModelLimit, User};

/// Requests and tokens per minute; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
}

impl Quota {
    /// Whether either dimension is limited.
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// One entry of `model_limits`: the pattern names the counter, so every model a glob matches
/// shares that glob's limit.
#[derive(Debug)]
pub struct ModelRule {
    pub pattern: String,
    matcher: Option<GlobMatcher>,
    pub quota: Quota,
}

/// What a user may do, ready to check.
#[derive(Debug)]
pub struct AccessRules {
    ip_allowlist: Vec<IpNet>,
    models: Option<GlobSet>,
    endpoints: Option<GlobSet>,
    /// `rpm`/`tpm` over all models.
    pub quota: Quota,
    /// `model_limits`, exact names before globs.
    model_rules: Vec<ModelRule>,
}

impl AccessRules {
    /// Compiles a user's rules. Globs were checked when the admin wrote them; one that no longer
    /// compiles matches nothing rather than everything.
    pub fn compile(user: &User) -> Self {
        let mut model_rules: Vec<ModelRule> = user
            .model_limits
            .iter()
            .map(|(pattern, limit)| ModelRule {
                pattern: pattern.clone(),
                matcher: is_glob(pattern)
                    .then(|| Glob::new(pattern).ok().map(|g| g.compile_matcher()))
                    .flatten(),
                quota: quota_of(limit),
            })
            .collect();
        model_rules.sort_by_key(|rule| rule.matcher.is_some());
        AccessRules {
            ip_allowlist: user.ip_allowlist.clone(),
            models: glob_set(&user.allowed_models),
            endpoints: glob_set(&user.allowed_endpoints),
            quota: Quota {
                rpm: user.rpm,
                tpm: user.tpm,
            },
            model_rules,
        }
    }

    /// Whether a call from `ip` may pass the allowlist (empty: any address).
    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        self.ip_allowlist.is_empty()
            || ip.is_some_and(|ip| self.ip_allowlist.iter().any(|net| net.contains(&ip)))
    }

    /// Whether `model` (as the caller named it) is allowed.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|set| set.is_match(model))
    }

    /// Whether the route at `path` is allowed.
    pub fn allows_endpoint(&self, path: &str) -> bool {
        self.endpoints.as_ref().is_none_or(|set| set.is_match(path))
    }

    /// The `model_limits` entry that applies to `model`: an exact name first, then the first
    /// glob in name order.
    pub fn model_rule(&self, model: &str) -> Option<&ModelRule> {
        self.model_rules.iter().find(|rule| match &rule.matcher {
            None => rule.pattern == model,
            Some(matcher) => matcher.is_match(model),
        })
    }

    /// Whether any rate limit could apply to a call of this user.
    pub fn has_limits(&self) -> bool {
        self.quota.is_limited() || !self.model_rules.is_empty()
    }
}

fn quota_of(limit: &ModelLimit) -> Quota {
    Quota {
        rpm: limit.rpm,
        tpm: limit.tpm,
    }
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// `None` for an empty list, which allows everything.
fn glob_set(patterns: &[String]) -> Option<GlobSet> {
    if patterns.is_empty() {
        return None;
    }
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        if let Ok(glob) = Glob::new(pattern) {
            builder.add(glob);
        }
    }
    // A set that fails to build allows nothing, never everything.
    Some(builder.build().unwrap_or_else(|_| GlobSet::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn user() -> User {
        let now = crate::domain::now();
        User {
            id: "usr_1".into(),
            name: "u".into(),
            status: crate::domain::UserStatus::Active,
            level: 1,
            fallback_levels: vec![],
            ip_allowlist: vec![],
            allowed_models: vec![],
            allowed_endpoints: vec![],
            spend_limit_nanos: None,
            spent_nanos: 0,
            rpm: None,
            tpm: None,
            model_limits: BTreeMap::new(),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn empty_lists_allow_everything() {
        let rules = AccessRules::compile(&user());
        assert!(rules.allows_ip(None));
        assert!(rules.allows_model("anything"));
        assert!(rules.allows_endpoint("/v1/embeddings"));
        assert!(!rules.has_limits());
    }

    #[test]
    fn globs_and_cidrs_restrict() {
        let mut u = user();
        u.ip_allowlist = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        u.allowed_models = vec!["gpt-4o*".into()];
        u.allowed_endpoints = vec!["/v1/chat/*".into()];
        let rules = AccessRules::compile(&u);
        assert!(rules.allows_ip(Some("10.2.3.4".parse().unwrap())));
        assert!(rules.allows_ip(Some("2001:db8::9".parse().unwrap())));
        assert!(!rules.allows_ip(Some("192.168.1.1".parse().unwrap())));
        assert!(!rules.allows_ip(None));
        assert!(rules.allows_model("gpt-4o-mini"));
        assert!(!rules.allows_model("o3"));
        assert!(rules.allows_endpoint("/v1/chat/completions"));
        assert!(!rules.allows_endpoint("/v1/embeddings"));
    }

    #[test]
    fn an_exact_model_limit_wins_over_a_glob() {
        let mut u = user();
        let limit = |rpm| ModelLimit {
            rpm: Some(rpm),
            tpm: None,
        };
        u.model_limits.insert("gpt-*".into(), limit(10));
        u.model_limits.insert("gpt-4o".into(), limit(2));
        let rules = AccessRules::compile(&u);
        assert_eq!(rules.model_rule("gpt-4o").unwrap().quota.rpm, Some(2));
        assert_eq!(rules.model_rule("gpt-4.1").unwrap().pattern, "gpt-*");
        assert!(rules.model_rule("o3").is_none());
        assert!(rules.has_limits());
    }
}
