//! The replicas' Redis channel. A replica announces there every admin change it made and every
//! upstream key a provider refused or rate-limited; every other replica hears it within a
//! round trip. Pub/sub keeps nothing, so a replica that was not listening learns what it missed
//! from the configuration version (see `ConfigSyncActor`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{ArbiterHandle, Message, Recipient};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::actors::config_sync::Entity;
use crate::config::RedisSettings;
use crate::limits::redis_store::{manager_config, query_retrying_once};

/// What replicas tell each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Announcement {
    /// An admin changed record `id` of kind `entity`; `version` is the configuration version
    /// the change was stored as.
    Changed {
        entity: Entity,
        id: String,
        version: i64,
    },
    /// A provider answered 429 for this key: leave it alone until `until_ms` (Unix ms).
    KeyCooling { key_id: String, until_ms: i64 },
    /// A provider refused this key (401/403): it is disabled until an admin re-enables it.
    KeyRejected { key_id: String, status: u16 },
}

/// An announcement as sent: who sent it, so a replica skips its own.
#[derive(Serialize, Deserialize)]
struct Envelope {
    origin: String,
    #[serde(flatten)]
    body: Announcement,
}

/// What the listener hands the config-sync actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum Heard {
    /// Another replica announced this.
    Announcement(Announcement),
    /// The listener (re)subscribed: whatever was announced while it was away is lost, so the
    /// receiver should resync.
    Subscribed,
}

/// The channel, or nothing when no Redis is configured (a lone instance).
pub struct Bus {
    redis: Option<redis::Client>,
    channel: String,
    /// This process's id on the channel.
    origin: String,
    timeout: Duration,
    publisher: OnceCell<ConnectionManager>,
    /// Subscribed now: announcements arrive.
    listening: AtomicBool,
    /// The thread every publication and the listener run on, so the connections' driver tasks
    /// live there and not on an HTTP worker.
    home: ArbiterHandle,
}

/// Seconds between two pings of a quiet subscription, to notice a connection that died silently.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Pause before subscribing again after the connection broke.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Bus {
    /// A bus on Redis when `settings.url` is set. Call from the thread that should own its
    /// connections (the actix system's).
    pub fn new(settings: &RedisSettings) -> anyhow::Result<Arc<Self>> {
        let redis = if settings.url.is_empty() {
            None
        } else {
            Some(redis::Client::open(settings.url.as_str()).map_err(|e| {
                anyhow::anyhow!("redis.url is not a valid Redis URL: {}", e.category())
            })?)
        };
        Ok(Arc::new(Bus {
            redis,
            channel: format!("{}config", settings.key_prefix),
            origin: uuid::Uuid::new_v4().simple().to_string(),
            timeout: Duration::from_millis(settings.timeout_ms),
            publisher: OnceCell::new(),
            listening: AtomicBool::new(false),
            home: actix::Arbiter::current(),
        }))
    }

    /// Whether announcements reach other replicas.
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Whether this replica is subscribed now (false without Redis).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Sends `announcement` to every other replica and waits until Redis took it. A failure is
    /// logged: replicas then learn of a change from the configuration version instead.
    pub async fn publish(self: &Arc<Self>, announcement: Announcement) {
        let Some(client) = self.redis.clone() else {
            return;
        };
        let bus = self.clone();
        let (done, wait) = tokio::sync::oneshot::channel();
        self.home.spawn(async move {
            let _ = done.send(bus.send(&client, &announcement).await);
        });
        match wait.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                error = %crate::limits::describe(&err),
                "could not announce a change on redis; other replicas will find it by the configuration version"
            ),
            Err(_) => tracing::warn!("the announcing thread is gone"),
        }
    }

    /// [`Bus::publish`] without waiting: for announcements made on the request path.
    pub fn publish_later(self: &Arc<Self>, announcement: Announcement) {
        if self.redis.is_none() {
            return;
        }
        let bus = self.clone();
        actix::spawn(async move { bus.publish(announcement).await });
    }

    async fn send(&self, client: &redis::Client, body: &Announcement) -> redis::RedisResult<()> {
        let envelope = Envelope {
            origin: self.origin.clone(),
            body: body.clone(),
        };
        let payload = serde_json::to_string(&envelope).expect("announcements serialize");
        let mut conn = self
            .publisher
            .get_or_try_init(|| {
                client.get_connection_manager_with_config(manager_config(self.timeout))
            })
            .await?
            .clone();
        let publish = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .to_owned();
        query_retrying_once::<i64>(&publish, &mut conn)
            .await
            .map(drop)
    }

    /// Listens on the channel for as long as the process lives, resubscribing after any
    /// break, and hands every other replica's announcement to `to`.
    pub fn listen(self: &Arc<Self>, to: Recipient<Heard>) {
        let Some(client) = self.redis.clone() else {
            return;
        };
        let bus = self.clone();
        self.home.spawn(async move {
            let mut was_up = true;
            loop {
                let err = bus.subscribe(&client, &to, &mut was_up).await;
                bus.listening.store(false, Ordering::Release);
                if was_up {
                    tracing::warn!(
                        error = %crate::limits::describe(&err),
                        "lost the redis configuration channel; changes are found by the configuration version until it is back"
                    );
                    was_up = false;
                }
                actix::clock::sleep(RETRY_AFTER).await;
            }
        });
    }

    /// One subscription, until it breaks.
    async fn subscribe(
        &self,
        client: &redis::Client,
        to: &Recipient<Heard>,
        was_up: &mut bool,
    ) -> redis::RedisError {
        let connect = async {
            let pubsub = tokio::time::timeout(self.timeout * 4, client.get_async_pubsub())
                .await
                .map_err(|_| timed_out("connecting"))??;
            let (mut sink, stream) = pubsub.split();
            // The connection may go silent right after it is made: without a bound the
            // listener would wait for the subscription until TCP gives up.
            tokio::time::timeout(self.timeout * 4, sink.subscribe(&self.channel))
                .await
                .map_err(|_| timed_out("subscribing"))??;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let (mut sink, mut stream) = match connect.await {
            Ok(pair) => pair,
            Err(err) => return err,
        };
        if !*was_up {
            tracing::info!("redis configuration channel is back");
        }
        *was_up = true;
        self.listening.store(true, Ordering::Release);
        to.do_send(Heard::Subscribed);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.deliver(message.get_payload_bytes(), to),
                    None => return timed_out("the connection closed"),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(self.timeout * 4, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return err,
                        Err(_) => return timed_out("ping"),
                    }
                }
            }
        }
    }

    fn deliver(&self, payload: &[u8], to: &Recipient<Heard>) {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) if envelope.origin == self.origin => {}
            Ok(envelope) => to.do_send(Heard::Announcement(envelope.body)),
            // A newer replica's announcement this one does not know: the version check
            // catches up with whatever it was.
            Err(err) => tracing::debug!(error = %err, "ignored an unknown announcement"),
        }
    }
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "redis channel", what.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_travel_as_tagged_json() {
        let envelope = Envelope {
            origin: "a".into(),
            body: Announcement::KeyCooling {
                key_id: "k1".into(),
                until_ms: 5,
            },
        };
        let text = serde_json::to_string(&envelope).unwrap();
        assert_eq!(
            text,
            r#"{"origin":"a","kind":"key_cooling","key_id":"k1","until_ms":5}"#
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.body, envelope.body);
        let changed = r#"{"origin":"b","kind":"changed","entity":"user_key","id":"x","version":7}"#;
        let back: Envelope = serde_json::from_str(changed).unwrap();
        assert_eq!(
            back.body,
            Announcement::Changed {
                entity: Entity::UserKey,
                id: "x".into(),
                version: 7
            }
        );
    }
}
