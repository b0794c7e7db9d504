//! Model mapping: a user's own mapping wins over a system-wide one; an exact `from` wins over
//! a glob; among globs the oldest wins. Read lock-free from a snapshot the config sync replaces.

use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use globset::{Glob, GlobMatcher};

use crate::db::{repo, Db, DbError};
use crate::domain::ModelMapping;

struct Rule {
    from: String,
    matcher: Option<GlobMatcher>,
    to: Arc<str>,
}

#[derive(Default)]
struct Rules(Vec<Rule>);

impl Rules {
    fn resolve(&self, model: &str) -> Option<&Arc<str>> {
        self.0
            .iter()
            .find(|r| r.matcher.is_none() && r.from == model)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|r| r.matcher.as_ref().is_some_and(|m| m.is_match(model)))
            })
            .map(|r| &r.to)
    }
}

#[derive(Default)]
struct Table {
    system: Rules,
    per_user: HashMap<String, Rules>,
}

/// The current mappings.
pub struct ModelMapper {
    table: ArcSwap<Table>,
}

impl Default for ModelMapper {
    fn default() -> Self {
        ModelMapper {
            table: ArcSwap::from_pointee(Table::default()),
        }
    }
}

impl ModelMapper {
    /// The model to send upstream for `model` asked by `user_id`, if a mapping applies.
    pub fn resolve(&self, user_id: &str, model: &str) -> Option<Arc<str>> {
        let table = self.table.load();
        table
            .per_user
            .get(user_id)
            .and_then(|rules| rules.resolve(model))
            .or_else(|| table.system.resolve(model))
            .cloned()
    }

    /// Replaces the table with what the database holds.
    pub async fn reload(&self, db: &Db) -> Result<(), DbError> {
        let mappings = repo::mappings::all(db).await?;
        self.replace(mappings);
        Ok(())
    }

    fn replace(&self, mappings: Vec<ModelMapping>) {
        let mut table = Table::default();
        for m in mappings {
            let is_glob = m.from.contains(['*', '?', '[', '{']);
            let rule = Rule {
                matcher: is_glob
                    .then(|| Glob::new(&m.from).ok().map(|g| g.compile_matcher()))
                    .flatten(),
                from: m.from,
                to: m.to.into(),
            };
            match m.user_id {
                Some(user) => table.per_user.entry(user).or_default().0.push(rule),
                None => table.system.0.push(rule),
            }
        }
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(from: &str, to: &str, user: Option<&str>) -> ModelMapping {
        ModelMapping {
            id: String::new(),
            from: from.into(),
            to: to.into(),
            user_id: user.map(Into::into),
            created_at: crate::domain::now(),
        }
    }

    #[test]
    fn user_mapping_wins_and_exact_beats_glob() {
        let mapper = ModelMapper::default();
        mapper.replace(vec![
            mapping("gpt-4*", "sys-glob", None),
            mapping("gpt-4o", "sys-exact", None),
            mapping("gpt-4*", "alice-glob", Some("alice")),
        ]);
        assert_eq!(
            mapper.resolve("bob", "gpt-4o").as_deref(),
            Some("sys-exact")
        );
        assert_eq!(
            mapper.resolve("bob", "gpt-4-turbo").as_deref(),
            Some("sys-glob")
        );
        assert_eq!(
            mapper.resolve("alice", "gpt-4o").as_deref(),
            Some("alice-glob")
        );
        assert_eq!(mapper.resolve("alice", "claude"), None);
    }
}
