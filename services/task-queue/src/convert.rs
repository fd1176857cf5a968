//! Stored tasks as protobuf messages.

use omoi_proto::convert::{json_to_struct, timestamp};
use omoi_proto::taskqueue as pb;
use omoi_store::Task;

pub fn task(t: &Task) -> pb::Task {
    pb::Task {
        id: t.id.to_string(),
        ticket_id: t.ticket_id.map(|id| id.to_string()).unwrap_or_default(),
        title: t.title.clone(),
        description: t.description.clone(),
        phase: t.phase.to_proto(),
        priority: t.priority,
        status: t.status.to_proto(),
        depends_on: t.depends_on.iter().map(ToString::to_string).collect(),
        retry_count: t.retry_count,
        max_retries: t.max_retries,
        timeout_seconds: t.timeout_seconds,
        attempt: t.attempt,
        assigned_agent_id: t.assigned_agent_id.map(|id| id.to_string()).unwrap_or_default(),
        result: t.result.as_ref().map(json_to_struct),
        error_message: t.error_message.clone().unwrap_or_default(),
        error_class: t.error_class.map_or(0, |c| c.to_proto()),
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
        started_at: t.started_at.map(timestamp),
        completed_at: t.completed_at.map(timestamp),
        next_attempt_at: Some(timestamp(t.next_attempt_at)),
        unmet_dependencies: t.unmet_deps,
    }
}
