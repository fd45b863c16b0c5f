//! Keeps every message in memory: the channel of `nudge simulate` and tests.

use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{Channel, DispatchError, Message, Withdrawal};

#[derive(Default)]
pub struct RecordingChannel {
    sent: Mutex<Vec<Message>>,
    withdrawn: Mutex<Vec<Withdrawal>>,
}

impl RecordingChannel {
    pub fn messages(&self) -> Vec<Message> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The withdrawals taken, in order.
    pub fn withdrawals(&self) -> Vec<Withdrawal> {
        self.withdrawn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Channel for RecordingChannel {
    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), DispatchError>> {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message.clone());
        Box::pin(async { Ok(()) })
    }

    /// Takes every withdrawal (simulate shows them as `withdrawn`).
    fn withdraw<'a>(
        &'a self,
        withdrawal: &'a Withdrawal,
    ) -> BoxFuture<'a, Result<(), DispatchError>> {
        self.withdrawn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(withdrawal.clone());
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recording_channel_conforms() {
        let ch = RecordingChannel::default();
        crate::dispatch::conformance::delivers(&ch).await;
        assert_eq!(
            ch.messages(),
            vec![crate::dispatch::conformance::sample_message()]
        );
    }
}
