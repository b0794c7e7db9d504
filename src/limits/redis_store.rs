//! The cluster-wide window: the same buckets as `window.rs`, kept in one Redis hash per counter
//! and checked and charged by one atomic script, on Redis's clock, so replicas agree.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::window::{BUCKETS, BUCKET_MS};
use super::{Counter, Outcome, Used};
use crate::access::rules::Quota;

/// Checks every counter's window and charges the call to all of them only when each has room.
/// Fields are `r<bucket>` (requests) and `t<bucket>` (tokens); buckets that left the window are
/// deleted as they are met. Returns `{admitted, retry_ms, bucket, requests1, tokens1, ...}`.
const ACQUIRE: &str = r#"
local bucket_ms = tonumber(ARGV[1])
local buckets = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_b = math.floor(now_ms / bucket_ms)
local oldest = now_b - buckets + 1

local function wait_for(per_bucket, excess)
  local freed = 0
  for b = oldest, now_b do
    freed = freed + (per_bucket[b] or 0)
    if freed >= excess then
      return (b + buckets) * bucket_ms - now_ms
    end
  end
  return buckets * bucket_ms
end

local admitted = 1
local retry_ms = 0
local used = {}
for i, key in ipairs(KEYS) do
  local rpm = tonumber(ARGV[2 + 2 * i])
  local tpm = tonumber(ARGV[3 + 2 * i])
  local flat = redis.call('HGETALL', key)
  local reqs, toks, stale = {}, {}, {}
  local total_r, total_t = 0, 0
  for j = 1, #flat, 2 do
    local field = flat[j]
    local b = tonumber(string.sub(field, 2))
    local v = tonumber(flat[j + 1])
    if b < oldest then
      stale[#stale + 1] = field
    elseif string.sub(field, 1, 1) == 'r' then
      reqs[b] = v
      total_r = total_r + v
    else
      toks[b] = v
      total_t = total_t + v
    end
  end
  if #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  if total_t < 0 then total_t = 0 end
  if rpm >= 0 and total_r + 1 > rpm then
    admitted = 0
    retry_ms = math.max(retry_ms, wait_for(reqs, total_r + 1 - rpm))
  end
  if tpm >= 0 and total_t + math.max(cost, 1) > tpm then
    admitted = 0
    retry_ms = math.max(retry_ms, wait_for(toks, total_t + math.max(cost, 1) - tpm))
  end
  used[i] = {total_r, total_t}
end
if admitted == 1 then
  for i, key in ipairs(KEYS) do
    redis.call('HINCRBY', key, 'r' .. now_b, 1)
    if cost ~= 0 then
      redis.call('HINCRBY', key, 't' .. now_b, cost)
    end
    redis.call('PEXPIRE', key, (buckets + 1) * bucket_ms)
    used[i][1] = used[i][1] + 1
    used[i][2] = used[i][2] + cost
  end
end
local out = {admitted, retry_ms, now_b}
for i = 1, #used do
  out[#out + 1] = used[i][1]
  out[#out + 1] = used[i][2]
end
return out
"#;

/// Corrects the tokens charged in bucket `ARGV[1]` by `ARGV[2]`, on counters still alive.
const SETTLE: &str = r#"
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 't' .. ARGV[1], ARGV[2])
  end
end
return 0
"#;

/// How Switchyard's Redis connections behave: commands bounded by `timeout`, reconnection
/// retried quickly (a command that fails meanwhile falls back to in-process state).
pub fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(manager_connect_timeout(timeout)))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1))
}

/// How long a connection may take to be made, for commands bounded by `timeout`.
fn manager_connect_timeout(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(500))
}

/// Runs `command`, and once more if it failed: the first command after Redis came back meets
/// the broken connection while the manager reconnects. For writes that must not be lost to that
/// (an announcement, a tombstone); the request path never waits twice.
pub async fn query_retrying_once<T: redis::FromRedisValue>(
    command: &redis::Cmd,
    connection: &mut ConnectionManager,
) -> redis::RedisResult<T> {
    match command.query_async(connection).await {
        Ok(value) => Ok(value),
        Err(_) => command.query_async(connection).await,
    }
}

/// A worker thread's own connection to Redis, made on first use on that thread, so its commands
/// are written and answered without waking another thread (a connection's driver task runs on
/// the runtime that made it).
#[derive(Default)]
pub struct RedisLink(tokio::sync::OnceCell<ConnectionManager>);

/// Redis as the limiter sees it: how to connect, and whether it answers.
pub struct RedisWindows {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// The health check's own connection.
    watch: RedisLink,
    up: AtomicBool,
    acquire: Script,
    settle: Script,
}

impl RedisWindows {
    /// Not connected yet: [`RedisWindows::check`] and the first command on each thread connect.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> redis::RedisResult<Self> {
        Ok(RedisWindows {
            client: redis::Client::open(url)?,
            prefix: prefix.to_owned(),
            timeout,
            watch: RedisLink::default(),
            up: AtomicBool::new(false),
            acquire: Script::new(ACQUIRE),
            settle: Script::new(SETTLE),
        })
    }

    /// Whether the last command (or health check) got an answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A command failed: Redis counts as away until a health check gets an answer. Said in
    /// the log once per outage.
    pub fn failed(&self, err: &redis::RedisError) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                error = %super::describe(err),
                "redis unavailable: rate limits are held in process until it answers again"
            );
        }
    }

    /// Runs the limit script on a counter of its own (connecting first if needed). Answers
    /// whether Redis came back (was down, answers now). Not a `PING`: a Redis that answers one
    /// but refuses scripts or writes (a read-only replica, out of memory, a failed save, an
    /// ACL) would be taken back at every check and fail the next call again, and each switch
    /// would start the in-process windows afresh.
    pub async fn check(&self) -> redis::RedisResult<bool> {
        let probe = [Counter {
            key: "health".to_owned(),
            quota: Quota::default(),
        }];
        self.acquire(&self.watch, &probe, 0).await?;
        Ok(!self.up.swap(true, Ordering::AcqRel))
    }

    fn key(&self, counter_key: &str) -> String {
        format!("{}rl:{}", self.prefix, counter_key)
    }

    /// The link's connection, made now if it has none. The manager reconnects by itself
    /// after a failure.
    async fn connection(&self, link: &RedisLink) -> redis::RedisResult<ConnectionManager> {
        let config = manager_config(self.timeout);
        link.0
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
    }

    /// The cluster-wide check-and-charge.
    pub async fn acquire(
        &self,
        link: &RedisLink,
        counters: &[Counter],
        tokens: i64,
    ) -> redis::RedisResult<Outcome> {
        let mut invocation = self.acquire.prepare_invoke();
        invocation.arg(BUCKET_MS).arg(BUCKETS).arg(tokens);
        for counter in counters {
            invocation
                .key(self.key(&counter.key))
                .arg(counter.quota.rpm.unwrap_or(-1))
                .arg(counter.quota.tpm.unwrap_or(-1));
        }
        let reply: Vec<i64> = self.run(link, &invocation).await?;
        if reply.len() != 3 + 2 * counters.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from the limit script",
            )));
        }
        Ok(Outcome {
            admitted: reply[0] == 1,
            retry_ms: reply[1],
            bucket: reply[2],
            used: reply[3..]
                .chunks(2)
                .map(|pair| Used {
                    requests: pair[0],
                    tokens: pair[1],
                })
                .collect(),
        })
    }

    /// Applies a token correction to the bucket a call was charged in.
    pub async fn settle(
        &self,
        link: &RedisLink,
        keys: &[String],
        bucket: i64,
        delta: i64,
    ) -> redis::RedisResult<()> {
        let mut invocation = self.settle.prepare_invoke();
        for key in keys {
            invocation.key(self.key(key));
        }
        invocation.arg(bucket).arg(delta);
        self.run::<i64>(link, &invocation).await.map(|_| ())
    }

    /// Runs a script on the link's connection. A connection that broke while Redis was away
    /// fails its first command once Redis is back, and reconnects: one immediate retry on an
    /// I/O error spares that call the in-process fallback. A timeout is not retried.
    async fn run<T: redis::FromRedisValue>(
        &self,
        link: &RedisLink,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        // Connecting is bounded as the manager bounds it (a TLS handshake may well take longer
        // than a command may), or a slow connect would fail every call of a new thread.
        let connect_bound = manager_connect_timeout(self.timeout) * 2;
        let mut connection = self
            .bounded_by(connect_bound, self.connection(link))
            .await?;
        match self.bounded(invocation.invoke_async(&mut connection)).await {
            Err(err) if err.is_io_error() && !err.is_timeout() => {
                self.bounded(invocation.invoke_async(&mut connection)).await
            }
            other => other,
        }
    }

    /// A command that takes longer than the configured timeout counts as Redis being away.
    async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        self.bounded_by(self.timeout, command).await
    }

    async fn bounded_by<T>(
        &self,
        bound: Duration,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(bound, command).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis command timed out",
            ))),
        }
    }
}
