//! The saga's events. Each carries what its consumers need (event-carried
//! state), so no service ever reads another's database.
//!
//! ```text
//! orders     OrderPlaced ───────────▶ payments: charge the balance
//! payments   PaymentCaptured ───────▶ inventory: reserve stock
//!            PaymentDeclined ───────▶ orders: cancel (payment_declined)
//! inventory  StockReserved ─────────▶ orders: confirm
//!            OutOfStock ────────────▶ payments: refund (the compensation)
//! payments   PaymentRefunded ───────▶ orders: cancel (out_of_stock)
//! ```
//!
//! The outbox row's `aggregate_type` and `event_type` make the routing key
//! (outboxd's default template `{aggregate_type}.{event_type}`), e.g.
//! `payment.PaymentCaptured`.

use serde::{Deserialize, Serialize};

use crate::shop::names::Service;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: String,
    pub sku: String,
    pub qty: i32,
    /// Cents.
    pub amount: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub customer: String,
    pub sku: String,
    pub qty: i32,
    pub amount: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: String,
    pub amount: i64,
    /// The balance that was too short.
    pub balance: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: String,
    pub sku: String,
    pub qty: i32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutOfStock {
    pub order_id: String,
    pub sku: String,
    pub qty: i32,
    pub available: i32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: String,
    pub amount: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    OrderPlaced(OrderPlaced),
    PaymentCaptured(PaymentCaptured),
    PaymentDeclined(PaymentDeclined),
    StockReserved(StockReserved),
    OutOfStock(OutOfStock),
    PaymentRefunded(PaymentRefunded),
}

/// Every event type: (AMQP type, aggregate type, the service that consumes it).
pub const ROUTES: [(&str, &str, Service); 6] = [
    ("OrderPlaced", "order", Service::Payments),
    ("PaymentCaptured", "payment", Service::Inventory),
    ("PaymentDeclined", "payment", Service::Orders),
    ("StockReserved", "stock", Service::Orders),
    ("OutOfStock", "stock", Service::Payments),
    ("PaymentRefunded", "payment", Service::Orders),
];

/// The routing keys `service`'s queue is bound with.
pub fn bindings(service: Service) -> Vec<String> {
    ROUTES
        .iter()
        .filter(|(_, _, to)| *to == service)
        .map(|(kind, aggregate, _)| format!("{aggregate}.{kind}"))
        .collect()
}

/// Why a message can never be handled.
#[derive(Debug, thiserror::Error)]
pub enum BadMessage {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("no event type")]
    NoType,
    #[error("body of {kind} is not the expected JSON: {error}")]
    Body {
        kind: &'static str,
        error: serde_json::Error,
    },
}

impl Event {
    /// Reads a message by its AMQP `type` (the outbox row's `event_type`).
    pub fn parse(kind: Option<&str>, body: &[u8]) -> Result<Event, BadMessage> {
        fn json<T: for<'de> Deserialize<'de>>(
            kind: &'static str,
            body: &[u8],
        ) -> Result<T, BadMessage> {
            serde_json::from_slice(body).map_err(|error| BadMessage::Body { kind, error })
        }
        Ok(match kind.ok_or(BadMessage::NoType)? {
            "OrderPlaced" => Event::OrderPlaced(json("OrderPlaced", body)?),
            "PaymentCaptured" => Event::PaymentCaptured(json("PaymentCaptured", body)?),
            "PaymentDeclined" => Event::PaymentDeclined(json("PaymentDeclined", body)?),
            "StockReserved" => Event::StockReserved(json("StockReserved", body)?),
            "OutOfStock" => Event::OutOfStock(json("OutOfStock", body)?),
            "PaymentRefunded" => Event::PaymentRefunded(json("PaymentRefunded", body)?),
            other => return Err(BadMessage::UnknownType(other.to_owned())),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::OrderPlaced(_) => "OrderPlaced",
            Event::PaymentCaptured(_) => "PaymentCaptured",
            Event::PaymentDeclined(_) => "PaymentDeclined",
            Event::StockReserved(_) => "StockReserved",
            Event::OutOfStock(_) => "OutOfStock",
            Event::PaymentRefunded(_) => "PaymentRefunded",
        }
    }

    pub fn order_id(&self) -> &str {
        match self {
            Event::OrderPlaced(e) => &e.order_id,
            Event::PaymentCaptured(e) => &e.order_id,
            Event::PaymentDeclined(e) => &e.order_id,
            Event::StockReserved(e) => &e.order_id,
            Event::OutOfStock(e) => &e.order_id,
            Event::PaymentRefunded(e) => &e.order_id,
        }
    }

    /// The outbox row's `aggregate_type`: who owns the fact.
    pub fn aggregate_type(&self) -> &'static str {
        ROUTES
            .iter()
            .find(|(kind, _, _)| *kind == self.kind())
            .map_or("order", |(_, aggregate, _)| aggregate)
    }

    /// The service whose queue receives this event.
    pub fn consumer(&self) -> Option<Service> {
        ROUTES
            .iter()
            .find(|(kind, _, _)| *kind == self.kind())
            .map(|(_, _, to)| *to)
    }

    pub fn payload(&self) -> serde_json::Value {
        let value = match self {
            Event::OrderPlaced(e) => serde_json::to_value(e),
            Event::PaymentCaptured(e) => serde_json::to_value(e),
            Event::PaymentDeclined(e) => serde_json::to_value(e),
            Event::StockReserved(e) => serde_json::to_value(e),
            Event::OutOfStock(e) => serde_json::to_value(e),
            Event::PaymentRefunded(e) => serde_json::to_value(e),
        };
        // Plain structs of strings and integers always serialize.
        value.unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_reads_back_what_was_written() {
        let events = [
            Event::OrderPlaced(OrderPlaced {
                order_id: "o-1".into(),
                customer: "c-1".into(),
                sku: "widget".into(),
                qty: 2,
                amount: 2400,
            }),
            Event::PaymentDeclined(PaymentDeclined {
                order_id: "o-1".into(),
                amount: 2400,
                balance: 10,
            }),
            Event::OutOfStock(OutOfStock {
                order_id: "o-1".into(),
                sku: "gizmo".into(),
                qty: 3,
                available: 1,
            }),
        ];
        for event in events {
            let body = serde_json::to_vec(&event.payload()).expect("JSON");
            let back = Event::parse(Some(event.kind()), &body).expect("parses");
            assert_eq!(back, event);
        }
    }

    #[test]
    fn every_event_has_a_consumer_and_a_binding() {
        for (kind, aggregate, to) in ROUTES {
            assert!(bindings(to).contains(&format!("{aggregate}.{kind}")));
        }
    }

    #[test]
    fn bad_messages_are_named() {
        // No type: outboxd always sets one, so this is someone else's message.
        assert!(matches!(Event::parse(None, b"{}"), Err(BadMessage::NoType)));
        // A type this shop does not know.
        assert!(matches!(
            Event::parse(Some("Nope"), b"{}"),
            Err(BadMessage::UnknownType(_))
        ));
        // A known type whose body misses a field.
        assert!(matches!(
            Event::parse(Some("StockReserved"), br#"{"order_id": "o-1"}"#),
            Err(BadMessage::Body { .. })
        ));
    }
}
