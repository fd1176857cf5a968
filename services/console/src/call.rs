//! One HTTP request as one gRPC call: the request message built from the
//! path, the query string and the JSON body (proto3 JSON mapping), sent to
//! the service with a codec for messages known only by their descriptors.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::routes::{Body, Route};

/// Encodes dynamic requests, decodes responses of one message type.
#[derive(Clone)]
pub struct DynamicCodec {
    pub output: MessageDescriptor,
}

pub struct DynamicEncoder;
pub struct DynamicDecoder(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.output.clone())
    }
}

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the response: {e}")))
    }
}

/// The request message of `route` from what the HTTP request carried.
/// Refusals are INVALID_ARGUMENT naming the field, like the services'.
pub fn request(
    route: &Route,
    vars: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Status> {
    let input = route.rpc.input();
    let mut msg = match &route.body {
        Body::All => json_message(input.clone(), body, "body")?,
        Body::Field(field) => {
            let mut msg = DynamicMessage::new(input.clone());
            let f = field_of(&input, field)?;
            let value = match f.kind() {
                Kind::Message(m) => Value::Message(json_message(m, body, field)?),
                _ => return Err(Status::internal(format!("body field {field} is not a message"))),
            };
            msg.set_field(&f, value);
            msg
        }
        Body::None => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                return Err(Status::invalid_argument("this request takes no body"));
            }
            DynamicMessage::new(input.clone())
        }
    };
    // The query string fills what neither the path nor the body does.
    if route.body != Body::All {
        for (name, value) in query_pairs(query.unwrap_or_default())? {
            set_path(&mut msg, &name, &value, true)?;
        }
    }
    for (name, value) in vars {
        set_path(&mut msg, name, value, false)?;
    }
    Ok(msg)
}

fn json_message(desc: MessageDescriptor, body: &[u8], what: &str) -> Result<DynamicMessage, Status> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let msg =
        DynamicMessage::deserialize(desc, &mut de).map_err(|e| Status::invalid_argument(format!("{what}: {e}")))?;
    de.end().map_err(|e| Status::invalid_argument(format!("{what}: {e}")))?;
    Ok(msg)
}

fn query_pairs(query: &str) -> Result<Vec<(String, String)>, Status> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                crate::routes::percent_decode(&s.replace('+', " "))
                    .ok_or_else(|| Status::invalid_argument(format!("query parameter {k:?} is not valid UTF-8")))
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// A field by its proto name or its JSON name.
fn field_of(desc: &MessageDescriptor, name: &str) -> Result<FieldDescriptor, Status> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
        .ok_or_else(|| Status::invalid_argument(format!("{name}: no such field in {}", desc.name())))
}

/// Sets the (dotted) field `path` of `msg` from its text form; a repeated
/// field from the query string gains one element per occurrence.
fn set_path(msg: &mut DynamicMessage, path: &str, text: &str, from_query: bool) -> Result<(), Status> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let field = field_of(&msg.descriptor(), head)?;
    if let Some(rest) = rest {
        let Kind::Message(_) = field.kind() else {
            return Err(Status::invalid_argument(format!("{head}: not a message")));
        };
        let Value::Message(inner) = msg.get_field_mut(&field) else {
            return Err(Status::invalid_argument(format!("{head}: not a message")));
        };
        return set_path(inner, rest, text, from_query);
    }
    let value = scalar(&field, text).map_err(|why| Status::invalid_argument(format!("{path}: {why}")))?;
    if field.is_list() {
        if !from_query {
            return Err(Status::invalid_argument(format!(
                "{path}: a list cannot be bound by the path"
            )));
        }
        if let Value::List(items) = msg.get_field_mut(&field) {
            items.push(value);
        }
    } else {
        msg.set_field(&field, value);
    }
    Ok(())
}

/// A scalar value of `field`'s kind from its text form (enums by name or
/// number, well-known wrappers and timestamps are not bound here).
fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{text:?} is not valid: {e}");
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => Value::Bool(text.parse().map_err(|e| bad(&e))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(text.parse().map_err(|e| bad(&e))?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(text.parse().map_err(|e| bad(&e))?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(text.parse().map_err(|e| bad(&e))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(text.parse().map_err(|e| bad(&e))?),
        Kind::Double => Value::F64(text.parse().map_err(|e| bad(&e))?),
        Kind::Float => Value::F32(text.parse().map_err(|e| bad(&e))?),
        Kind::Enum(e) => match text.parse::<i32>() {
            Ok(n) => Value::EnumNumber(n),
            Err(_) => Value::EnumNumber(
                e.get_value_by_name(text)
                    .map(|v| v.number())
                    .ok_or_else(|| format!("{text:?} is not a value of {}", e.name()))?,
            ),
        },
        Kind::Bytes | Kind::Message(_) => return Err("cannot be given in a path or query".to_owned()),
    })
}

/// The HTTP status of a gRPC code, as the transcoding convention maps them.
pub fn http_status(code: tonic::Code) -> http::StatusCode {
    use http::StatusCode as H;
    use tonic::Code as C;
    match code {
        C::Ok => H::OK,
        C::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => H::BAD_REQUEST,
        C::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        C::NotFound => H::NOT_FOUND,
        C::AlreadyExists | C::Aborted => H::CONFLICT,
        C::PermissionDenied => H::FORBIDDEN,
        C::Unauthenticated => H::UNAUTHORIZED,
        C::ResourceExhausted => H::TOO_MANY_REQUESTS,
        C::Unimplemented => H::NOT_IMPLEMENTED,
        C::Unavailable => H::SERVICE_UNAVAILABLE,
        C::Unknown | C::Internal | C::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// A refusal as `google.rpc.Status` JSON.
pub fn status_json(status: &Status) -> serde_json::Value {
    serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn route(method: Method, path: &str) -> (Route, Vec<(String, String)>) {
        let routes = crate::routes::all();
        match crate::routes::find(&routes, &method, path) {
            crate::routes::Found::Route(r, vars) => (r.clone(), vars),
            _ => panic!("no route for {path}"),
        }
    }

    #[test]
    fn path_query_and_body_fill_the_request() {
        let (r, vars) = route(Method::GET, "/v1/tasks");
        let msg = request(
            &r,
            &vars,
            Some("ticket_id=t1&status=TASK_STATUS_FAILED&pageSize=5"),
            b"",
        )
        .unwrap();
        assert_eq!(msg.get_field_by_name("ticket_id").unwrap().as_str(), Some("t1"));
        assert_eq!(msg.get_field_by_name("status").unwrap().as_enum_number(), Some(5));
        assert_eq!(msg.get_field_by_name("page_size").unwrap().as_i32(), Some(5));

        let (r, vars) = route(Method::POST, "/v1/tickets/abc:cancel");
        let msg = request(&r, &vars, None, br#"{"reason": "dup"}"#).unwrap();
        assert_eq!(msg.get_field_by_name("ticket_id").unwrap().as_str(), Some("abc"));
        assert_eq!(msg.get_field_by_name("reason").unwrap().as_str(), Some("dup"));

        let (r, vars) = route(Method::PATCH, "/v1/tickets/abc");
        let msg = request(
            &r,
            &vars,
            None,
            br#"{"ticket": {"priority": 2}, "updateMask": "priority"}"#,
        )
        .unwrap();
        let ticket = msg.get_field_by_name("ticket").unwrap();
        assert_eq!(
            ticket.as_message().unwrap().get_field_by_name("id").unwrap().as_str(),
            Some("abc")
        );
    }

    #[test]
    fn bad_input_names_what_is_wrong() {
        let (r, vars) = route(Method::GET, "/v1/tasks");
        let e = request(&r, &vars, Some("page_size=many"), b"").unwrap_err();
        assert!(e.message().contains("page_size"), "{}", e.message());
        let e = request(&r, &vars, Some("colour=red"), b"").unwrap_err();
        assert!(e.message().contains("colour"), "{}", e.message());
        let (r, vars) = route(Method::POST, "/v1/tickets");
        let e = request(&r, &vars, None, br#"{"title": 5}"#).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = request(&r, &vars, None, b"{not json").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(http_status(tonic::Code::NotFound), http::StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::FailedPrecondition),
            http::StatusCode::BAD_REQUEST
        );
    }
}
