//! A broker that is slow, or refuses, on demand (`faults.broker_delay_ms`,
//! `faults.broker_fail_user_prefix`): to rehearse what a broker across the network does to the
//! registry, which must neither wait for it nor reorder a user's events because of it.

use std::time::Duration;

use super::{Attached, Broker, BrokerError, Call, NewEvent, ResumeRequest, SeenMessage, Submitted};
use crate::base::ConnectionId;

pub struct Faulty {
    inner: Box<dyn Broker>,
    delay: Duration,
    fail_user_prefix: String,
}

impl Faulty {
    pub fn new(inner: Box<dyn Broker>, delay: Duration, fail_user_prefix: String) -> Faulty {
        Faulty { inner, delay, fail_user_prefix }
    }

    /// The call refused outright for a matching user (nothing takes effect), else the inner
    /// broker's answer after a random part of the delay, so later calls' answers overtake
    /// earlier ones, as they may across a network.
    fn wrap<T: 'static>(&mut self, user: &str, call: impl FnOnce(&mut dyn Broker) -> Call<T>) -> Call<T> {
        if !self.fail_user_prefix.is_empty() && user.starts_with(&self.fail_user_prefix) {
            return Box::pin(std::future::ready(Err(BrokerError::Injected)));
        }
        let answer = call(self.inner.as_mut());
        let delay = self.delay.mul_f64(rand::random::<f64>());
        Box::pin(async move {
            actix_web::rt::time::sleep(delay).await;
            answer.await
        })
    }
}

impl Broker for Faulty {
    fn append(&mut self, user: &str, events: &[NewEvent<'_>]) -> Call<Vec<super::Stored>> {
        self.wrap(user, |b| b.append(user, events))
    }

    fn publish_once(&mut self, user: &str, key: &str, events: &[NewEvent<'_>]) -> Call<super::Published> {
        self.wrap(user, |b| b.publish_once(user, key, events))
    }

    fn submit(
        &mut self,
        user: &str,
        client_msg_id: Option<&str>,
        ids: super::SubmitIds<'_>,
        echo: &NewEvent<'_>,
    ) -> Call<Submitted> {
        self.wrap(user, |b| b.submit(user, client_msg_id, ids, echo))
    }

    fn seen(&mut self, user: &str, client_msg_id: &str) -> Call<Option<SeenMessage>> {
        self.wrap(user, |b| b.seen(user, client_msg_id))
    }

    fn attach(&mut self, user: &str, resume: Option<&ResumeRequest>) -> Call<Attached> {
        self.wrap(user, |b| b.attach(user, resume))
    }

    fn range(&mut self, user: &str, from_seq: u64) -> Call<Vec<super::Stored>> {
        self.wrap(user, |b| b.range(user, from_seq))
    }

    fn admit(&mut self, user: &str, connection: ConnectionId, cap: usize) -> Call<bool> {
        self.wrap(user, |b| b.admit(user, connection, cap))
    }

    fn leave(&mut self, user: &str, connection: ConnectionId) -> Call<()> {
        self.wrap(user, |b| b.leave(user, connection))
    }

    fn interest(&mut self, user: &str, present: bool) {
        self.inner.interest(user, present);
    }

    fn remote_events(&mut self) -> Option<futures_channel::mpsc::Receiver<super::RemoteBatch>> {
        self.inner.remote_events()
    }

    fn sessions(&mut self, user: &str) -> Call<Vec<super::SessionRecord>> {
        self.wrap(user, |b| b.sessions(user))
    }

    fn run_started(&mut self, user: &str, run_id: &str, thread_id: &str) {
        self.inner.run_started(user, run_id, thread_id);
    }

    fn run_ended(&mut self, user: &str, run_id: &str) {
        self.inner.run_ended(user, run_id);
    }

    fn claim_thread(&mut self, user: &str, thread_id: &str, run_id: &str) -> Call<Option<String>> {
        self.wrap(user, |b| b.claim_thread(user, thread_id, run_id))
    }

    fn cancel_elsewhere(&mut self, user: &str, run_id: &str) -> Call<bool> {
        self.wrap(user, |b| b.cancel_elsewhere(user, run_id))
    }

    fn ping(&mut self) -> Call<()> {
        self.inner.ping()
    }

    fn upkeep(&mut self) -> bool {
        self.inner.upkeep()
    }

    fn gauges(&self) -> (usize, usize) {
        self.inner.gauges()
    }
}
