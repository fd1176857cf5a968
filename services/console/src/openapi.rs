//! `GET /openapi.json`: an OpenAPI 3 document of the HTTP API, generated
//! from the same descriptors and annotations the transcoder serves (with
//! the protos' comments as descriptions), and `GET /docs`, a page that
//! lists it.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use crate::routes::{Body, Route};

/// The protos' comment at `path` of `file` (its source info).
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?.trim();
    (!text.is_empty()).then(|| text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn schema_name(m: &MessageDescriptor) -> String {
    m.full_name().to_owned()
}

fn reference(m: &MessageDescriptor) -> Value {
    json!({ "$ref": format!("#/components/schemas/{}", schema_name(m)) })
}

/// The JSON schema of one field's value (proto3 JSON mapping), noting the
/// messages it refers to.
fn kind_schema(kind: &Kind, todo: &mut Vec<MessageDescriptor>) -> Value {
    match kind {
        Kind::String => json!({"type": "string"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        // 64-bit integers are strings in the JSON mapping.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(e) => json!({
            "type": "string",
            "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>(),
        }),
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => json!({"type": "string", "example": "1.5s"}),
            "google.protobuf.FieldMask" => json!({"type": "string", "example": "priority,labels"}),
            "google.protobuf.Struct" => json!({"type": "object"}),
            "google.protobuf.Value" => json!({}),
            _ => {
                todo.push(m.clone());
                reference(m)
            }
        },
    }
}

fn field_schema(f: &FieldDescriptor, todo: &mut Vec<MessageDescriptor>) -> Value {
    let mut schema = if f.is_map() {
        let Kind::Message(entry) = f.kind() else {
            return json!({"type": "object"});
        };
        let value = entry.map_entry_value_field();
        json!({"type": "object", "additionalProperties": kind_schema(&value.kind(), todo)})
    } else if f.is_list() {
        json!({"type": "array", "items": kind_schema(&f.kind(), todo)})
    } else {
        kind_schema(&f.kind(), todo)
    };
    if let (Some(text), Value::Object(map)) = (comment(f.parent_file().file_descriptor_proto(), f.path()), &mut schema)
        && !map.contains_key("$ref")
    {
        map.insert("description".into(), Value::String(text));
    }
    schema
}

fn message_schema(m: &MessageDescriptor, todo: &mut Vec<MessageDescriptor>) -> Value {
    let properties: Map<String, Value> = m
        .fields()
        .map(|f| (f.json_name().to_owned(), field_schema(&f, todo)))
        .collect();
    let mut schema = json!({"type": "object", "properties": properties});
    if let Some(text) = comment(m.parent_file().file_descriptor_proto(), m.path()) {
        schema["description"] = Value::String(text);
    }
    schema
}

/// The whole document.
pub fn document(routes: &[Route]) -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut todo: Vec<MessageDescriptor> = Vec::new();
    for r in routes {
        let input = r.rpc.input();
        let path_fields: Vec<String> = r
            .template
            .split(['{', '}'])
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let mut parameters: Vec<Value> = path_fields
            .iter()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if r.body == Body::None {
            for f in input.fields() {
                let top = path_fields.iter().any(|p| p.split('.').next() == Some(f.name()));
                if top || matches!(f.kind(), Kind::Message(_)) {
                    continue;
                }
                parameters.push(json!({"name": f.name(), "in": "query", "schema": field_schema(&f, &mut todo)}));
            }
        }
        let service = r.rpc.parent_service();
        let mut op = json!({
            "operationId": format!("{}_{}", service.name(), r.rpc.name()),
            "tags": [service.name()],
            "parameters": parameters,
            "responses": {
                "default": {
                    "description": "A refusal: google.rpc.Status",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}},
                },
            },
        });
        if let Some(text) = comment(r.rpc.parent_file().file_descriptor_proto(), r.rpc.path()) {
            op["summary"] = Value::String(text);
        }
        let output = r.rpc.output();
        todo.push(output.clone());
        op["responses"]["200"] = if r.rpc.is_server_streaming() {
            json!({
                "description": "Server-Sent Events, one message each; resume with Last-Event-ID",
                "content": {"text/event-stream": {"schema": reference(&output)}},
            })
        } else {
            json!({"description": "OK", "content": {"application/json": {"schema": reference(&output)}}})
        };
        match &r.body {
            Body::None => {}
            Body::All => {
                todo.push(input.clone());
                op["requestBody"] = json!({"content": {"application/json": {"schema": reference(&input)}}});
            }
            Body::Field(name) => {
                if let Some(Kind::Message(m)) = input.get_field_by_name(name).map(|f| f.kind()) {
                    todo.push(m.clone());
                    op["requestBody"] = json!({"content": {"application/json": {"schema": reference(&m)}}});
                }
            }
        }
        paths
            .entry(r.template.clone())
            .or_default()
            .insert(r.method.as_str().to_ascii_lowercase(), op);
    }
    let mut schemas = Map::new();
    schemas.insert(
        "google.rpc.Status".into(),
        json!({"type": "object", "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        }}),
    );
    while let Some(m) = todo.pop() {
        let name = schema_name(&m);
        if schemas.contains_key(&name) {
            continue;
        }
        let schema = message_schema(&m, &mut todo);
        schemas.insert(name, schema);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "omoi", "version": env!("CARGO_PKG_VERSION"),
                 "description": "omoi's API as JSON over HTTP, generated from its protos."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    })
}

/// A page listing the operations, for people.
pub fn page(doc: &Value) -> String {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut rows = String::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, ops) in paths {
            for (method, op) in ops.as_object().into_iter().flatten() {
                rows.push_str(&format!(
                    "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>\n",
                    method.to_ascii_uppercase(),
                    escape(path),
                    escape(op["operationId"].as_str().unwrap_or_default()),
                    escape(op["summary"].as_str().unwrap_or_default()),
                ));
            }
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>omoi API</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:.3em .8em;vertical-align:top}}\
         tr:nth-child(even){{background:#f4f4f4}}</style></head><body>\
         <h1>omoi API</h1><p>JSON over HTTP; the machine-readable document is \
         <a href=\"/openapi.json\">/openapi.json</a>. Send <code>Authorization: Bearer &lt;token&gt;</code> \
         when the mesh has one.</p><table><tr><th>method</th><th>path</th><th>operation</th><th>what</th></tr>\n\
         {rows}</table></body></html>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_every_route_and_its_messages() {
        let routes = crate::routes::all();
        let doc = document(&routes);
        let cancel = &doc["paths"]["/v1/tickets/{ticket_id}:cancel"]["post"];
        assert_eq!(cancel["operationId"], "TicketService_CancelTicket");
        assert!(cancel["summary"].as_str().unwrap().contains("Cancels"), "{cancel}");
        assert_eq!(cancel["parameters"][0]["in"], "path");
        let list = &doc["paths"]["/v1/tasks"]["get"];
        let names: Vec<&str> = list["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            names.contains(&"ticket_id") && names.contains(&"page_size"),
            "{names:?}"
        );
        let task = &doc["components"]["schemas"]["omoi.taskqueue.v1.Task"];
        assert_eq!(task["properties"]["createdAt"]["format"], "date-time");
        assert_eq!(task["properties"]["status"]["type"], "string");
        assert!(doc["components"]["schemas"]["omoi.common.v1.Usage"].is_object());
        assert!(page(&doc).contains("/v1/queue:pause"));
    }
}
