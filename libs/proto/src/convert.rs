//! Conversions between well-known protobuf types and their Rust counterparts:
//! `google.protobuf.Struct` <-> JSON objects, `Timestamp` <-> chrono.

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};
use serde_json::{Map, Number, Value as Json};

/// A JSON value as a protobuf `Value`.
pub fn json_to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(map_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

pub fn map_to_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
    }
}

/// A JSON value as a `Struct`: objects map field by field; anything else is
/// wrapped as `{"value": …}` so that no data is dropped.
pub fn json_to_struct(json: &Json) -> Struct {
    match json {
        Json::Object(map) => map_to_struct(map),
        other => Struct {
            fields: [("value".to_owned(), json_to_value(other))].into(),
        },
    }
}

pub fn value_to_json(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn struct_to_json(s: &Struct) -> Json {
    Json::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

/// Whole numbers stay integers in JSON; NaN and infinities (not JSON) become null.
fn number(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Json::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Json::Null, Json::Number)
    }
}

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// Why a published event could not be read as a domain event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// A type this version does not know (a newer publisher); consumers skip it.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("event {field}: {reason}")]
    Malformed { field: &'static str, reason: String },
}

/// A published event read back as the domain's: its type, entity and
/// typed payload.
impl TryFrom<&crate::events::Event> for omoi_domain::Envelope {
    type Error = EventError;

    fn try_from(e: &crate::events::Event) -> Result<Self, EventError> {
        let event_type = omoi_domain::EventType::parse(&e.event_type)
            .ok_or_else(|| EventError::UnknownType(e.event_type.clone()))?;
        let malformed = |field: &'static str, reason: String| EventError::Malformed { field, reason };
        let entity_id = e
            .entity_id
            .parse()
            .map_err(|err: uuid::Error| malformed("entity_id", err.to_string()))?;
        let ticket_id = match e.ticket_id.as_str() {
            "" => None,
            id => Some(
                id.parse()
                    .map_err(|err: uuid::Error| malformed("ticket_id", err.to_string()))?,
            ),
        };
        let payload = e.payload.as_ref().map(struct_to_json).unwrap_or(Json::Null);
        let event =
            omoi_domain::Event::parse(event_type, payload).map_err(|err| malformed("payload", err.to_string()))?;
        Ok(omoi_domain::Envelope::new(entity_id, ticket_id, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_struct() {
        let v = json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -3}});
        assert_eq!(struct_to_json(&json_to_struct(&v)), v);
    }

    #[test]
    fn non_objects_are_wrapped() {
        assert_eq!(struct_to_json(&json_to_struct(&json!(7))), json!({"value": 7}));
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let v = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(value_to_json(&v), Json::Null);
    }

    #[test]
    fn published_events_read_back_typed() {
        use omoi_domain::event::{Event as Domain, TaskStarted};
        let task = uuid::Uuid::now_v7();
        let agent = uuid::Uuid::now_v7();
        let started = Domain::TaskStarted(TaskStarted {
            attempt: 2,
            agent_id: Some(agent),
        });
        let wire = crate::events::Event {
            id: uuid::Uuid::now_v7().to_string(),
            event_type: "TASK_STARTED".into(),
            entity_type: "task".into(),
            entity_id: task.to_string(),
            ticket_id: String::new(),
            occurred_at: None,
            payload: Some(json_to_struct(&started.payload())),
        };
        let read = omoi_domain::Envelope::try_from(&wire).unwrap();
        assert_eq!(read, omoi_domain::Envelope::new(task, None, started));
        let unknown = crate::events::Event {
            event_type: "TASK_TELEPORTED".into(),
            ..wire.clone()
        };
        assert!(matches!(
            omoi_domain::Envelope::try_from(&unknown),
            Err(EventError::UnknownType(_))
        ));
        let bad = crate::events::Event {
            payload: Some(json_to_struct(&serde_json::json!({"attempt": "x"}))),
            ..wire
        };
        assert!(matches!(
            omoi_domain::Envelope::try_from(&bad),
            Err(EventError::Malformed { field: "payload", .. })
        ));
    }

    #[test]
    fn timestamps_round_trip() {
        let now = Utc::now();
        assert_eq!(from_timestamp(&timestamp(now)), Some(now));
        assert_eq!(from_timestamp(&Timestamp { seconds: 0, nanos: -1 }), None);
    }
}
