//! Publishes the dead-letter outbox to the dead-letter topic: the original
//! bytes and key, with the reason and origin in headers. At least once: a
//! crash between produce and mark may publish a letter twice.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{watch, Notify};

use crate::clock::Clock;
use crate::config::KafkaConfig;
use crate::store::{AsyncStore, DeadLetter, Store};
use crate::telemetry::events::{
    DeadLetterOutboxUnreadable, DeadLetterPublishFailed, DeadLettersNotMarked, DeadLettersPublished,
};

pub struct DeadLetterPublisher {
    producer: FutureProducer,
    topic: String,
    store: AsyncStore,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
}

impl DeadLetterPublisher {
    pub fn new(
        config: &KafkaConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let mut cc = super::kafka::client_config(config)?;
        cc.set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000");
        let producer: FutureProducer = cc.create()?;
        Ok(Self {
            producer,
            topic: config.dead_letter_topic.clone(),
            store: AsyncStore::new(store),
            clock,
            wake: Arc::new(Notify::new()),
        })
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let published = self.publish_pending().await;
            if *shutdown.borrow() {
                break;
            }
            if published == 0 {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }

    /// Publishes what the outbox holds; returns how many were published.
    pub async fn publish_pending(&self) -> usize {
        let now = self.clock.now();
        // Another replica on the same store takes a letter this one failed to
        // publish once the claim runs out.
        let until = now + chrono::Duration::seconds(60);
        let pending = match self
            .store
            .call(move |s| s.claim_dead_letters(500, now, until))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                DeadLetterOutboxUnreadable { error: &e }.emit();
                return 0;
            }
        };
        let mut done = Vec::with_capacity(pending.len());
        for (id, letter) in &pending {
            match self.send(letter).await {
                Ok(()) => done.push(*id),
                Err(e) => {
                    DeadLetterPublishFailed {
                        topic: &self.topic,
                        error: &e,
                    }
                    .emit();
                    break;
                }
            }
        }
        if !done.is_empty() {
            DeadLettersPublished {
                count: done.len() as u64,
            }
            .emit();
            let (ids, now) = (done.clone(), self.clock.now());
            if let Err(e) = self
                .store
                .call(move |s| s.mark_dead_letters_published(&ids, now))
                .await
            {
                DeadLettersNotMarked {
                    count: done.len(),
                    error: &e,
                }
                .emit();
            }
        }
        done.len()
    }

    async fn send(&self, l: &DeadLetter) -> Result<(), String> {
        let partition = l.partition.to_string();
        let offset = l.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "nudge.reason",
                value: Some(l.reason.as_str()),
            })
            .insert(Header {
                key: "nudge.source.topic",
                value: Some(l.topic.as_str()),
            })
            .insert(Header {
                key: "nudge.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "nudge.source.offset",
                value: Some(offset.as_str()),
            });
        if let Some(j) = &l.journey {
            headers = headers.insert(Header {
                key: "nudge.journey",
                value: Some(j.as_str()),
            });
        }
        if let Some(id) = &l.event_id {
            headers = headers.insert(Header {
                key: "nudge.event_id",
                value: Some(id.as_str()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(&l.payload[..])
            .headers(headers);
        if let Some(k) = &l.key {
            record = record.key(&k[..]);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }
}
