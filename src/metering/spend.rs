//! Each user's spend as the budget check reads it: what the database (or, across replicas,
//! Redis) last confirmed, plus what this replica has metered and not written yet. The request
//! path only reads it, and only for users with a spend limit.

use std::time::Duration;

use foldhash::HashMap;
use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

#[derive(Debug, Default, Clone, Copy)]
struct Spend {
    /// The total stored, as last seen.
    confirmed: i64,
    /// Metered here, not yet written.
    pending: i64,
    /// A budget check read it: kept, and kept current from the other replicas.
    watched: bool,
}

/// Spend per user, in nano-USD.
#[derive(Default)]
pub struct SpendBook {
    users: RwLock<HashMap<String, Spend>>,
}

impl SpendBook {
    /// The user's spend for the budget check. `stored` is what the user's record said when it
    /// was loaded; the first check of a user adds it to the users this replica keeps current.
    pub fn spent(&self, user_id: &str, stored: i64) -> i64 {
        if let Some(spend) = self.users.read().get(user_id).filter(|s| s.watched) {
            return spend.confirmed.max(stored) + spend.pending;
        }
        let mut users = self.users.write();
        let spend = users.entry(user_id.to_owned()).or_default();
        spend.watched = true;
        spend.confirmed = spend.confirmed.max(stored);
        spend.confirmed + spend.pending
    }

    /// A call was metered here.
    pub fn add_pending(&self, user_id: &str, nanos: i64) {
        if nanos == 0 {
            return;
        }
        let mut users = self.users.write();
        users.entry(user_id.to_owned()).or_default().pending += nanos;
    }

    /// Metered spend that will never be written (its call was dropped) leaves the pending part.
    pub fn release(&self, user_id: &str, nanos: i64) {
        if nanos == 0 {
            return;
        }
        let mut users = self.users.write();
        if let Some(spend) = users.get_mut(user_id) {
            spend.pending = (spend.pending - nanos).max(0);
            if !spend.watched && spend.pending == 0 {
                users.remove(user_id);
            }
        }
    }

    /// Metered spend was written: `written` leaves the pending part, and the stored total is
    /// now `total`.
    pub fn confirm(&self, user_id: &str, written: i64, total: i64) {
        let mut users = self.users.write();
        let spend = users.entry(user_id.to_owned()).or_default();
        spend.pending = (spend.pending - written).max(0);
        spend.confirmed = spend.confirmed.max(total);
        // Users without a budget check are only held while they have spend in flight.
        if !spend.watched && spend.pending == 0 {
            users.remove(user_id);
        }
    }

    /// The stored total as another replica (or the database) reports it.
    pub fn refresh(&self, user_id: &str, total: i64) {
        if let Some(spend) = self.users.write().get_mut(user_id) {
            spend.confirmed = spend.confirmed.max(total);
        }
    }

    /// The users whose budget this replica checks, to be kept current.
    pub fn watched(&self) -> Vec<String> {
        let users = self.users.read();
        users
            .iter()
            .filter(|(_, s)| s.watched)
            .map(|(u, _)| u.clone())
            .collect()
    }
}

/// Raises a user's shared total, never lowers it: replicas publish totals read after their own
/// writes, and a slower replica's older total must not win.
const RAISE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 0
"#;

/// How long a shared total outlives its user's last call (it is reloaded from the database
/// whenever that user spends again).
const SHARED_TTL_SECS: u64 = 7 * 24 * 3600;

/// Spend totals shared across replicas through Redis.
pub struct SharedSpend {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    connection: tokio::sync::OnceCell<ConnectionManager>,
    raise: Script,
}

impl SharedSpend {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> redis::RedisResult<Self> {
        Ok(SharedSpend {
            client: redis::Client::open(url)?,
            prefix: format!("{prefix}spend:"),
            timeout,
            connection: tokio::sync::OnceCell::new(),
            raise: Script::new(RAISE),
        })
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(0);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
    }

    /// Publishes totals just written to the database.
    pub async fn publish(&self, totals: &[(String, i64)]) -> redis::RedisResult<()> {
        let mut conn = self.connection().await?;
        for (user, total) in totals {
            self.raise
                .key(format!("{}{user}", self.prefix))
                .arg(*total)
                .arg(SHARED_TTL_SECS)
                .invoke_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// The shared totals of `users` (absent ones are left out).
    pub async fn read(&self, users: &[String]) -> redis::RedisResult<Vec<(String, i64)>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        let keys: Vec<String> = users
            .iter()
            .map(|u| format!("{}{u}", self.prefix))
            .collect();
        let values: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(users
            .iter()
            .zip(values)
            .filter_map(|(u, v)| v.map(|v| (u.clone(), v)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_spend_counts_until_it_is_written() {
        let book = SpendBook::default();
        assert_eq!(book.spent("u", 100), 100);
        book.add_pending("u", 50);
        assert_eq!(book.spent("u", 100), 150);
        book.confirm("u", 50, 150);
        assert_eq!(book.spent("u", 100), 150);
        book.refresh("u", 400);
        assert_eq!(book.spent("u", 100), 400);
        book.refresh("u", 10);
        assert_eq!(book.spent("u", 100), 400);
        assert_eq!(book.watched(), ["u"]);
    }

    #[test]
    fn users_without_a_budget_check_are_not_kept() {
        let book = SpendBook::default();
        book.add_pending("v", 50);
        book.confirm("v", 50, 50);
        assert!(book.watched().is_empty());
        assert!(book.users.read().is_empty());
    }
}
