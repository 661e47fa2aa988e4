//! Direct messages, kept by the target device's actor: stored until they are handed to the
//! device's session, or until their TTL passes (then the sender is told, if it is connected).

use std::time::Duration;

use actix::prelude::*;
use fleetlink_proto::v1::{self, ServerControl, server_control};
use fleetlink_store::{DirectRecord, StoreError};

use crate::actor::DeviceActor;
use crate::now_us;

impl DeviceActor {
    /// Hands every waiting direct message to the device's session, oldest first. Stops at the
    /// first one the session cannot take (not connected, or its queue is full: retried shortly).
    pub(crate) fn deliver_direct(&mut self, ctx: &mut Context<Self>) {
        if self.link.is_none() {
            return;
        }
        while let Some(m) = self.pending_direct.first() {
            let frame = ServerControl {
                msg: Some(server_control::Msg::DirectMessage(v1::DirectMessage {
                    message_id: m.id,
                    from_device: m.from.to_string(),
                    payload: m.payload.clone(),
                    sent_us: m.sent_us,
                })),
            };
            if !self.settings.fleet.bridge.send_to(&self.id, frame) {
                ctx.run_later(Duration::from_millis(100), |actor, ctx| {
                    actor.deliver_direct(ctx);
                });
                return;
            }
            let m = self.pending_direct.remove(0);
            tracing::debug!(device = %self.id, message = m.id, from = %m.from, "direct message delivered");
            let write = self.store.delete_direct(m.id);
            actix::spawn(async move {
                if let Err(error) = write.await {
                    tracing::error!(%error, "cannot forget a delivered direct message");
                }
            });
        }
    }

    /// Arms the expiry of one waiting message.
    pub(crate) fn expire_direct_later(&self, id: u64, expires_us: i64, ctx: &mut Context<Self>) {
        let wait = Duration::from_micros(u64::try_from(expires_us - now_us()).unwrap_or(0));
        ctx.run_later(wait, move |actor, _| {
            let Some(at) = actor.pending_direct.iter().position(|m| m.id == id) else {
                return; // delivered meanwhile
            };
            let m = actor.pending_direct.remove(at);
            tracing::info!(device = %actor.id, message = m.id, from = %m.from, "direct message expired undelivered");
            let write = actor.store.delete_direct(m.id);
            actix::spawn(async move {
                if let Err(error) = write.await {
                    tracing::error!(%error, "cannot forget an expired direct message");
                }
            });
            let frame = ServerControl {
                msg: Some(server_control::Msg::MessageExpired(v1::MessageExpired {
                    message_id: m.id,
                    to_device: actor.id.to_string(),
                })),
            };
            if !actor.settings.fleet.bridge.send_to(&m.from, frame) {
                tracing::info!(sender = %m.from, message = m.id, "the sender of an expired direct message is not connected");
            }
        });
    }
}

/// Store a direct message for this device and deliver it when possible. Answers its id.
#[derive(Message)]
#[rtype(result = "Result<u64, StoreError>")]
pub(crate) struct QueueDirect(pub DirectRecord);

impl Handler<QueueDirect> for DeviceActor {
    type Result = ResponseActFuture<Self, Result<u64, StoreError>>;

    fn handle(&mut self, QueueDirect(record): QueueDirect, _: &mut Self::Context) -> Self::Result {
        let insert = self.store.insert_direct(record.clone());
        Box::pin(insert.into_actor(self).map(move |id, actor, ctx| {
            let id = id?;
            let expires_us = record.expires_us;
            actor.pending_direct.push(DirectRecord { id, ..record });
            actor.expire_direct_later(id, expires_us, ctx);
            actor.deliver_direct(ctx);
            Ok(id)
        }))
    }
}
