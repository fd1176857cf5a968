//! Every request of ExecutorService read in one place. Each request is
//! destructured whole, so a field added to the proto fails the build here
//! until it is read; anything bad is refused with INVALID_ARGUMENT naming
//! the field.

use omoi_domain::validate;
use omoi_proto::executor as pb;
use omoi_runtime::status::domain;
use tonic::Status;
use uuid::Uuid;

/// ListExecutions: how many of the newest runs (100 unless said).
pub fn list(req: pb::ListExecutionsRequest) -> Result<usize, Status> {
    let pb::ListExecutionsRequest { limit } = req;
    let limit = match limit {
        0 => 100,
        n => validate::range("limit", n, 1, 1000).map_err(domain)?,
    };
    Ok(limit as usize)
}

/// CancelExecution: the task whose run stops, and why.
pub fn cancel(req: pb::CancelExecutionRequest) -> Result<(Uuid, String), Status> {
    let pb::CancelExecutionRequest { task_id, reason } = req;
    Ok((
        validate::uuid("task_id", &task_id).map_err(domain)?,
        validate::text("reason", &reason, validate::MAX_REASON_BYTES).map_err(domain)?,
    ))
}

/// StreamExecutionOutput: the task whose latest run is followed.
pub fn output(req: pb::StreamExecutionOutputRequest) -> Result<Uuid, Status> {
    let pb::StreamExecutionOutputRequest { task_id } = req;
    validate::uuid("task_id", &task_id).map_err(domain)
}

/// GetExecutorStatus takes nothing (yet).
pub fn status(req: pb::GetExecutorStatusRequest) {
    let pb::GetExecutorStatusRequest {} = req;
}
