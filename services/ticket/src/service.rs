//! TicketService: maps gRPC requests to validation, the domain's plans,
//! the ticket's tasks on the queue and the store.

use std::sync::Arc;

use omoi_base::{ApiError, ApiResult};
use omoi_bus::Topology;
use omoi_domain::routing::{self, Labels};
use omoi_domain::ticket::PhaseInstructions;
use omoi_domain::{TaskStatus, TicketStatus};
use omoi_proto::candidates::Step;
use omoi_proto::domain::WireEnum;
use omoi_proto::events::Event;
use omoi_proto::ticket::{self as pb, ticket_service_server::TicketService};
use omoi_store::Store;
use omoi_store::gates::Decision;
use omoi_store::tickets::{Created, NewReaction, Reacted};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::queue::queue_unavailable;
use crate::reactions::Forge;
use crate::requests;
use crate::tasks::{Enqueued, TicketTasks, planned_tasks};
use crate::{board, watch};

/// How many finished tickets the cost of an agent run is averaged over,
/// for a plan with candidates whose budget may not cover them.
const RECENT_TICKETS: i64 = 100;

pub struct Tickets {
    store: Store,
    tasks: Arc<TicketTasks>,
    nats: async_nats::Client,
    topology: Topology,
    watchers: CancellationToken,
    phase_instructions: PhaseInstructions,
    board: Arc<board::Hub>,
    forge: Forge,
}

impl Tickets {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        tasks: Arc<TicketTasks>,
        nats: async_nats::Client,
        topology: Topology,
        watchers: CancellationToken,
        phase_instructions: PhaseInstructions,
        board: Arc<board::Hub>,
        forge: Forge,
    ) -> Self {
        Self {
            store,
            tasks,
            nats,
            topology,
            watchers,
            phase_instructions,
            board,
            forge,
        }
    }

    async fn create(&self, req: pb::CreateTicketRequest) -> ApiResult<pb::CreateTicketResponse> {
        let judges: Vec<(usize, i32, Labels)> = req
            .plan
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let judge = &s.candidates.as_ref()?.judge;
                (!judge.is_empty()).then(|| (i, s.phase, judge.clone().into_iter().collect()))
            })
            .collect();
        let (new, plan) = requests::create(req, &self.phase_instructions, self.forge.max_reactions)?;
        self.judges_exist(&judges).await?;
        if new.max_cost_usd.is_some() && plan.iter().any(|(_, t)| t.candidate.is_some()) {
            let spent = self.store.recent_spend(RECENT_TICKETS).await?;
            let planned: Vec<_> = plan.iter().map(|(_, t)| t.clone()).collect();
            omoi_domain::candidates::cover("max_cost_usd", new.max_cost_usd, &planned, &spent)?;
        }
        self.create_new(new, plan).await
    }

    /// Refuses a plan whose judge no healthy agent (taking its step's
    /// phase) could be: it would never choose.
    async fn judges_exist(&self, judges: &[(usize, i32, Labels)]) -> ApiResult<()> {
        for (i, phase, judge) in judges {
            // The plan was validated: its phases are known.
            let Some(phase) = omoi_domain::Phase::given(*phase).known() else {
                continue;
            };
            if !self.store.can_take(judge, phase).await? {
                return Err(ApiError::invalid(
                    format!("plan[{i}].candidates.judge"),
                    format!("no healthy agent can judge: none carries {}", routing::describe(judge)),
                ));
            }
        }
        Ok(())
    }

    /// Stores a checked ticket and puts its tasks on the queue.
    async fn create_new(
        &self,
        new: omoi_store::tickets::NewTicket,
        plan: Vec<(Uuid, omoi_domain::ticket::PlannedTask)>,
    ) -> ApiResult<pb::CreateTicketResponse> {
        let (t, planned) = match self.store.create_ticket(&new, &plan).await? {
            Created::Existing(t, planned) => {
                let tasks = self.tasks.of(&t, &planned).await?;
                let ticket = Some(pb::Ticket::from(&t));
                return Ok(pb::CreateTicketResponse { ticket, tasks });
            }
            Created::New(t, planned) => (t, planned),
        };
        let tasks = match self.tasks.enqueue(&t, &planned).await? {
            Enqueued::Done(tasks) => tasks,
            Enqueued::Deferred(s) => {
                tracing::warn!(ticket_id = %t.id, error = %s.message(), "task queue unreachable; tasks will be created when it is back");
                planned_tasks(&t, &planned)
            }
            Enqueued::Refused(s) => return Err(s.into()),
        };
        let (t, _) = self.store.get_ticket(t.id).await?;
        Ok(pb::CreateTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
            tasks,
        })
    }

    async fn get(&self, req: pb::GetTicketRequest) -> ApiResult<pb::GetTicketResponse> {
        let (id, view) = requests::get(req)?;
        let (t, planned) = self.store.get_ticket(id).await?;
        let (tasks, reactions) = match view {
            pb::TicketView::Basic => (Vec::new(), Vec::new()),
            pb::TicketView::Unspecified | pb::TicketView::Full => {
                let reactions = match t.reactions {
                    0 => Vec::new(),
                    _ => self.store.reactions_of(id).await?,
                };
                (self.tasks.of(&t, &planned).await?, reactions)
            }
        };
        Ok(pb::GetTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
            tasks,
            reactions: reactions
                .into_iter()
                .map(|(kind, url, task_id, at)| pb::Reaction {
                    kind,
                    url,
                    task_id: task_id.to_string(),
                    created_at: Some(omoi_proto::convert::timestamp(at)),
                })
                .collect(),
        })
    }

    async fn list(&self, req: pb::ListTicketsRequest) -> ApiResult<pb::ListTicketsResponse> {
        let page = requests::list(req)?;
        let (tickets, next) = self.store.list_tickets(page.status, page.size, page.before).await?;
        Ok(pb::ListTicketsResponse {
            tickets: tickets.iter().map(pb::Ticket::from).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn cancel(&self, req: pb::CancelTicketRequest) -> ApiResult<pb::CancelTicketResponse> {
        let (id, reason) = requests::cancel(req)?;
        let (t, _) = self.store.get_ticket(id).await?;
        if t.status.is_final() {
            let already = format!("ticket {id} is already {}", t.status);
            return Err(Status::failed_precondition(already).into());
        }
        if t.tasks_enqueued {
            self.cancel_open_tasks(id, &reason).await?;
        }
        let t = match self.store.cancel_ticket(id, &reason).await {
            Ok(t) => t,
            // Its tasks' events got there first and already ended it.
            Err(omoi_store::StoreError::FailedPrecondition(_)) => self.store.get_ticket(id).await?.0,
            Err(e) => return Err(e.into()),
        };
        // A budget's pause and its gates have nothing left to hold back.
        if let Err(s) = self.tasks.queue.resume(id).await {
            tracing::warn!(ticket_id = %id, error = %s.message(), "the cancelled ticket's dispatch pause stays");
        }
        if t.tasks_enqueued {
            for gate in t.gates.iter().filter(|g| !g.released) {
                self.tasks.release_gate(id, gate.phase).await;
            }
        }
        Ok(pb::CancelTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
        })
    }

    async fn update(&self, req: pb::UpdateTicketRequest) -> ApiResult<pb::UpdateTicketResponse> {
        let (id, update) = requests::update(req)?;
        let pending = self.store.update_ticket(id, &update).await?;
        let applied = &pending.applied;
        // The queue first: should it be out of reach, nothing changes.
        if applied.changed {
            let t = &applied.ticket;
            let held = if t.status == TicketStatus::Paused {
                self.tasks.queue.pause(id, &t.paused_reason).await
            } else {
                self.tasks.queue.resume(id).await
            };
            held.map_err(queue_unavailable)?;
        }
        let t = pending.commit().await?;
        Ok(pb::UpdateTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
        })
    }

    async fn retry(&self, req: pb::RetryTicketRequest) -> ApiResult<pb::RetryTicketResponse> {
        let (id, reason) = requests::retry(req)?;
        let (t, _) = self.store.get_ticket(id).await?;
        let tasks = if t.tasks_enqueued {
            self.tasks.queue.list(id).await.map_err(queue_unavailable)?
        } else {
            Vec::new()
        };
        let ended = |t: &&omoi_proto::taskqueue::Task| {
            TaskStatus::given(t.status)
                .known()
                .is_some_and(TaskStatus::ended_unsuccessfully)
        };
        // Cancelling let go of its gates' holds: held again before
        // anything of it can go out.
        if !t.approvals.is_empty() && tasks.iter().any(|t| ended(&t)) {
            self.tasks.hold_gates(id).await?.map_err(queue_unavailable)?;
        }
        let mut retried = 0;
        // In plan order, so that a dependency goes round before what waits
        // for it; a dependent its retry brought back is refused, and skipped.
        for task in tasks.iter().filter(ended) {
            match self.tasks.queue.retry(&task.id, &reason).await {
                Ok(()) => retried += 1,
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(s) => return Err(queue_unavailable(s).into()),
            }
        }
        if retried == 0 {
            let nothing = format!("ticket {id} has no failed, timed-out or cancelled task to retry");
            return Err(Status::failed_precondition(nothing).into());
        }
        let now = self
            .get(pb::GetTicketRequest {
                ticket_id: id.to_string(),
                view: pb::TicketView::Full.into(),
            })
            .await?;
        Ok(pb::RetryTicketResponse {
            ticket: now.ticket,
            tasks: now.tasks,
        })
    }

    async fn follow_up(&self, req: pb::FollowUpRequest) -> ApiResult<pb::FollowUpResponse> {
        let (id, message, task_id) = requests::follow_up(req)?;
        let (t, _) = self.store.get_ticket(id).await?;
        if t.status == TicketStatus::Cancelled {
            let cancelled = format!("ticket {id} is cancelled: nothing follows up on it");
            return Err(Status::failed_precondition(cancelled).into());
        }
        if !t.tasks_enqueued {
            let waiting = format!("ticket {id}'s tasks are not on the queue yet");
            return Err(Status::failed_precondition(waiting).into());
        }
        let tasks = self.tasks.queue.list(id).await.map_err(queue_unavailable)?;
        let source = follow_up_source(&tasks, task_id)?;
        let planned = follow_up_task(&t, source, &message);
        let follow_up_id = Uuid::new_v4();
        let resumes: Uuid = source
            .id
            .parse()
            .map_err(|_| Status::internal("the queue named a task by no UUID"))?;
        let reason = format!("follow-up: {}", planned.title.trim_start_matches("Follow-up: "));
        let (ticket, row) = self
            .store
            .add_follow_up(id, follow_up_id, &planned, resumes, &reason)
            .await?;
        let task = self.enqueue_follow_up(&ticket, &row, resumes, "the follow-up").await?;
        let (ticket, _) = self.store.get_ticket(id).await?;
        Ok(pb::FollowUpResponse {
            ticket: Some(pb::Ticket::from(&ticket)),
            task,
        })
    }

    async fn choose_candidate(
        &self,
        req: pb::ChooseCandidateRequest,
        by: &str,
    ) -> ApiResult<pb::ChooseCandidateResponse> {
        let (task_id, index, comment) = requests::choose_candidate(req)?;
        let chooser = match self.tasks.queue.get(task_id).await {
            Ok(t) => t,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(Status::not_found(format!("task_id: no task {task_id}")).into());
            }
            Err(s) => return Err(queue_unavailable(s).into()),
        };
        let precondition = |why: String| -> ApiError { Status::failed_precondition(why).into() };
        let ticket_id: Uuid = chooser
            .ticket_id
            .parse()
            .map_err(|_| precondition(format!("task_id: task {task_id} belongs to no ticket")))?;
        let (t, _) = self.store.get_ticket(ticket_id).await?;
        if t.status == TicketStatus::Cancelled {
            return Err(precondition(format!(
                "ticket {ticket_id} is cancelled: nothing lands on it"
            )));
        }
        let tasks = self.tasks.queue.list(ticket_id).await.map_err(queue_unavailable)?;
        let step = Step::of(&tasks, &chooser.id)
            .ok_or_else(|| precondition(format!("task_id: task {task_id} chooses among no candidates")))?;
        let status =
            |t: &omoi_proto::taskqueue::Task| TaskStatus::given(t.status).known().unwrap_or(TaskStatus::Pending);
        let landed = step.landed().map(|(_, n)| n);
        let now = omoi_domain::candidates::StepNow {
            chooser: task_id,
            chooser_status: status(step.chooser),
            under_way: step.under_way().and_then(|t| t.id.parse().ok()),
            candidates: step
                .candidates
                .iter()
                .map(|c| {
                    let result = c.result.as_ref().map(omoi_proto::convert::struct_to_json);
                    let kept = !omoi_domain::candidates::Kept::of(result.as_ref()).commit.is_empty();
                    (c.candidate, status(c), kept)
                })
                .collect(),
            landed,
        };
        omoi_domain::candidates::may_land(&now, index).map_err(precondition)?;
        let candidate = step
            .candidate(index)
            .ok_or_else(|| Status::internal("the candidate may_land found is gone"))?;
        let message = omoi_domain::candidates::choice_description(landed, by, &comment);
        let mut planned = follow_up_task(&t, step.chooser, &message);
        planned.title = omoi_domain::candidates::choice_title(index, &step.chooser.title);
        planned.lands_candidate = true;
        // Landing needs no agent: any executor of the phase does it.
        planned.requires = Labels::new();
        let resumes: Uuid = candidate
            .id
            .parse()
            .map_err(|_| Status::internal("the queue named a task by no UUID"))?;
        let reason = format!("candidate {index} chosen by {by}");
        let (ticket, row) = self
            .store
            .add_follow_up(ticket_id, Uuid::new_v4(), &planned, resumes, &reason)
            .await?;
        tracing::info!(%ticket_id, %task_id, candidate = index, by, choice = %row.task_id, "candidate chosen by a person");
        let task = self.enqueue_follow_up(&ticket, &row, resumes, "the choice").await?;
        let (ticket, _) = self.store.get_ticket(ticket_id).await?;
        Ok(pb::ChooseCandidateResponse {
            ticket: Some(pb::Ticket::from(&ticket)),
            task,
        })
    }

    async fn approve(&self, req: pb::ApproveRequest, by: &str) -> ApiResult<pb::ApproveResponse> {
        let d = requests::approve(req)?;
        let decision = Decision {
            ticket_id: d.ticket_id,
            phase: d.phase,
            by,
            comment: &d.comment,
        };
        let approved = self.store.approve(&decision).await?;
        let t = &approved.ticket;
        let phases: Vec<&str> = approved.phases.iter().map(|p| p.name()).collect();
        tracing::info!(ticket_id = %t.id, phases = ?phases, by, "approved");
        // Before its tasks are on the queue, enqueueing them holds only
        // what is not approved.
        if t.tasks_enqueued {
            for phase in &approved.phases {
                self.tasks.release_gate(t.id, *phase).await;
            }
        }
        let (ticket, _) = self.store.get_ticket(t.id).await?;
        Ok(pb::ApproveResponse {
            ticket: Some(pb::Ticket::from(&ticket)),
        })
    }

    async fn request_changes(&self, req: pb::RequestChangesRequest, by: &str) -> ApiResult<pb::RequestChangesResponse> {
        let d = requests::request_changes(req)?;
        let (t, _) = self.store.get_ticket(d.ticket_id).await?;
        let gate = match omoi_domain::gate::deciding(&t.gates, d.phase)[..] {
            [gate] => gate,
            [] => {
                let not = format!("ticket {} is {}: nothing of it awaits approval", t.id, t.status);
                return Err(Status::failed_precondition(not).into());
            }
            _ => {
                let which = "more than one phase awaits approval: name one in phase";
                return Err(Status::failed_precondition(format!("ticket {}: {which}", t.id)).into());
            }
        };
        let tasks = self.tasks.queue.list(t.id).await.map_err(queue_unavailable)?;
        // The agent that last worked on what is to be approved.
        let reviewed: Vec<String> = gate.review_task_ids.iter().map(ToString::to_string).collect();
        let source = tasks
            .iter()
            .filter(|task| reviewed.contains(&task.id))
            .filter(|task| TaskStatus::given(task.status).known() == Some(TaskStatus::Completed))
            .max_by_key(|task| task.completed_at.as_ref().map(|c| (c.seconds, c.nanos)))
            .ok_or_else(|| {
                let none = format!(
                    "the {} phase builds on no completed task: approve it or cancel the ticket",
                    gate.phase.name()
                );
                Status::failed_precondition(none)
            })?;
        let resumes: Uuid = source
            .id
            .parse()
            .map_err(|_| Status::internal("the queue named a task by no UUID"))?;
        let message = format!(
            "A person reviewing your work before the {phase} phase starts asks for changes:\n\n{comment}\n\n\
             Make them here. The {phase} phase waits until they approve.",
            phase = gate.phase.name(),
            comment = d.comment
        );
        let planned = follow_up_task(&t, source, &message);
        let decision = Decision {
            ticket_id: d.ticket_id,
            phase: Some(gate.phase),
            by,
            comment: &d.comment,
        };
        let (ticket, row) = self
            .store
            .request_changes(&decision, Uuid::new_v4(), &planned, resumes)
            .await?;
        tracing::info!(ticket_id = %ticket.id, phase = gate.phase.name(), by, task_id = %row.task_id, "changes requested");
        let task = self
            .enqueue_follow_up(&ticket, &row, resumes, "the changes' follow-up")
            .await?;
        let (ticket, _) = self.store.get_ticket(ticket.id).await?;
        Ok(pb::RequestChangesResponse {
            ticket: Some(pb::Ticket::from(&ticket)),
            task,
        })
    }

    /// Puts a follow-up (`what`, for the log) on the queue: its task as
    /// the queue has it, or as planned when the queue is out of reach (the
    /// enqueue loop puts it there once it is back).
    async fn enqueue_follow_up(
        &self,
        ticket: &omoi_domain::Ticket,
        row: &omoi_store::tickets::TicketTask,
        resumes: Uuid,
        what: &str,
    ) -> ApiResult<Option<omoi_proto::taskqueue::Task>> {
        match self.tasks.enqueue_follow_up(ticket, row, resumes).await? {
            Enqueued::Done(mut tasks) => Ok(tasks.pop()),
            Enqueued::Deferred(s) => {
                tracing::warn!(ticket_id = %ticket.id, error = %s.message(), "task queue unreachable; {what} will be enqueued when it is back");
                Ok(planned_tasks(ticket, std::slice::from_ref(row)).pop())
            }
            Enqueued::Refused(s) => Err(s.into()),
        }
    }

    /// The store, for the service's background work.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What React does, for what a look at the forge found.
    pub async fn react_to(&self, req: pb::ReactRequest) -> ApiResult<pb::ReactResponse> {
        Tickets::react(self, req).await
    }

    async fn react(&self, req: pb::ReactRequest) -> ApiResult<pb::ReactResponse> {
        let not = |reason: String| {
            // Said to the caller; a poll asks again and again.
            tracing::debug!(%reason, "no reaction");
            Ok(pb::ReactResponse {
                reason,
                ..Default::default()
            })
        };
        if req.kind == i32::from(pb::ReactionKind::Conflict) && req.pull_request_url.is_empty() {
            let (repository, base_ref) = requests::base_moved(&req)?;
            return self.base_moved(&repository, &base_ref).await;
        }
        let reaction = match requests::react(req, &self.forge.mention)? {
            Ok(r) => r,
            Err(why) => return not(why),
        };
        let found = match &reaction.asked {
            requests::Asked::CiFailure { branch, .. } => {
                self.store.ticket_for_forge("", &reaction.repository, branch).await?
            }
            requests::Asked::Mention { pull_request_url, .. }
            | requests::Asked::Review { pull_request_url, .. }
            | requests::Asked::Conflict { pull_request_url, .. } => {
                self.store.ticket_for_forge(pull_request_url, "", "").await?
            }
        };
        let Some(ticket) = found else {
            return not(format!("no ticket owns it ({})", reaction.url));
        };
        if ticket.pull_request_url.is_empty() {
            return not(format!("ticket {} has no pull request yet", ticket.id));
        }
        if !ticket.tasks_enqueued {
            return not(format!("ticket {}'s tasks are not on the queue yet", ticket.id));
        }
        let tasks = self.tasks.queue.list(ticket.id).await.map_err(queue_unavailable)?;
        let ask = self.forge.follow_up(&reaction).await;
        // The agent that last changed the files concerned, else the last.
        let source = match touched_last(&tasks, &ask.paths).map_or_else(|| follow_up_source(&tasks, None), Ok) {
            Ok(s) => s,
            Err(s) => return not(format!("ticket {}: {}", ticket.id, s.message())),
        };
        let resumes: Uuid = source
            .id
            .parse()
            .map_err(|_| Status::internal("the queue named a task by no UUID"))?;
        let kind = ask.kind;
        let planned = follow_up_task(&ticket, source, &ask.message);
        let new = NewReaction {
            ticket_id: ticket.id,
            kind,
            key: &ask.key,
            delivery_id: &reaction.delivery_id,
            url: &reaction.url,
            reply_to: &ask.reply_to,
            pull_number: ask.pull_number,
        };
        let (ticket, row) = match self.store.add_reaction(&new, Uuid::new_v4(), &planned, resumes).await? {
            Reacted::Started(started) => *started,
            Reacted::Again => return not(format!("delivery {} was acted on before", reaction.delivery_id)),
            Reacted::Refused(why) => return not(format!("ticket {}: {why}", ticket.id)),
            Reacted::CapReached(paused) => {
                tracing::warn!(ticket_id = %paused.id, reason = %paused.paused_reason, "ticket paused: no reactions left");
                // Its follow-ups wait with it; task events say it again
                // should the queue be out of reach now.
                if let Err(s) = self.tasks.queue.pause(paused.id, &paused.paused_reason).await {
                    tracing::warn!(ticket_id = %paused.id, error = %s.message(), "could not pause the ticket's dispatch");
                }
                return Ok(pb::ReactResponse {
                    reason: format!("ticket {}: {}", paused.id, paused.paused_reason),
                    ticket: Some(pb::Ticket::from(&*paused)),
                    ..Default::default()
                });
            }
        };
        tracing::info!(ticket_id = %ticket.id, kind, url = %reaction.url, task_id = %row.task_id, "reacting");
        let task = self
            .enqueue_follow_up(&ticket, &row, resumes, "the reaction's follow-up")
            .await?;
        let (ticket, _) = self.store.get_ticket(ticket.id).await?;
        Ok(pb::ReactResponse {
            reacted: true,
            reason: String::new(),
            ticket: Some(pb::Ticket::from(&ticket)),
            task,
        })
    }

    /// A push moved `base_ref` of `repository`: the open pull requests of
    /// its tickets are marked for a look at whether they still merge (the
    /// forge works that out after the push; see `poll::merge_checks`).
    async fn base_moved(&self, repository: &str, base_ref: &str) -> ApiResult<pb::ReactResponse> {
        let ids: Vec<Uuid> = self
            .store
            .tickets_with_pull_requests(crate::poll::PER_PASS)
            .await?
            .into_iter()
            .filter(|t| {
                omoi_domain::git::forge_repo(&t.repository)
                    .is_some_and(|r| r.full_name().eq_ignore_ascii_case(repository))
            })
            .map(|t| t.id)
            .collect();
        self.store.check_mergeable(&ids).await?;
        tracing::info!(%repository, %base_ref, tickets = ids.len(), "a base moved: pull requests to look at");
        Ok(pb::ReactResponse {
            reason: format!(
                "{base_ref} of {repository} moved: the pull requests of {} tickets will be looked at",
                ids.len()
            ),
            ..Default::default()
        })
    }

    async fn intake(&self, req: pb::IntakeRequest) -> ApiResult<pb::IntakeResponse> {
        let issue = requests::intake(req)?;
        let nothing = |outcome: String| {
            tracing::info!(issue = %issue.url, %outcome, "issue not taken");
            Ok(pb::IntakeResponse { ticket: None, outcome })
        };
        if !self.forge.serves(&issue.repository) {
            return nothing(format!(
                "this deployment takes no issues from {} (OMOI_GITHUB_REPOSITORIES)",
                issue.repository
            ));
        }
        let ours = issue.label.eq_ignore_ascii_case(&self.forge.issue_label);
        let existing = self.store.ticket_by_request(&issue.request_id()).await?.map(|(t, _)| t);
        match (issue.action, existing) {
            (pb::IssueAction::Labeled, Some(t)) if ours => Ok(pb::IntakeResponse {
                ticket: Some(pb::Ticket::from(&t)),
                outcome: "the issue has its ticket already".into(),
            }),
            (pb::IssueAction::Labeled, None) if ours => {
                let description = if issue.body.trim().is_empty() {
                    format!("Resolve {}.", issue.url)
                } else {
                    format!("{}\n\n(From {}.)", issue.body.trim(), issue.url)
                };
                let title = if issue.title.is_empty() {
                    format!("Issue #{}", issue.number)
                } else {
                    issue.title.clone()
                };
                let request = pb::CreateTicketRequest {
                    title,
                    description,
                    repository: issue.clone_url.clone(),
                    pull_request: true,
                    request_id: issue.request_id(),
                    ..Default::default()
                };
                let (mut new, plan) = requests::create(request, &self.phase_instructions, self.forge.max_reactions)?;
                new.source_kind = "github_issue".into();
                new.source_url = issue.url.clone();
                let created = self.create_new(new, plan).await?;
                tracing::info!(issue = %issue.url, ticket_id = ?created.ticket.as_ref().map(|t| &t.id), "issue taken on");
                Ok(pb::IntakeResponse {
                    ticket: created.ticket,
                    outcome: "created".into(),
                })
            }
            (pb::IssueAction::Labeled, _) => nothing(format!(
                "the label {:?} is not {:?}",
                issue.label, self.forge.issue_label
            )),
            (pb::IssueAction::Unlabeled, _) if !ours => nothing(format!(
                "the label {:?} is not {:?}",
                issue.label, self.forge.issue_label
            )),
            (_, None) => nothing("the issue has no ticket".into()),
            (_, Some(t)) if t.status.is_final() => Ok(pb::IntakeResponse {
                outcome: format!("its ticket is {} already", t.status),
                ticket: Some(pb::Ticket::from(&t)),
            }),
            (action, Some(t)) => {
                let reason = match action {
                    pb::IssueAction::Closed => "the issue was closed",
                    _ => "the issue's label was removed",
                };
                let cancelled = self
                    .cancel(pb::CancelTicketRequest {
                        ticket_id: t.id.to_string(),
                        reason: reason.into(),
                    })
                    .await?;
                Ok(pb::IntakeResponse {
                    ticket: cancelled.ticket,
                    outcome: "cancelled".into(),
                })
            }
        }
    }

    /// Cancels the ticket's unfinished tasks on the queue.
    async fn cancel_open_tasks(&self, id: Uuid, reason: &str) -> ApiResult<()> {
        let tasks = self.tasks.queue.list(id).await.map_err(queue_unavailable)?;
        let open =
            |t: &&omoi_proto::taskqueue::Task| TaskStatus::given(t.status).known().is_some_and(|s| !s.is_terminal());
        for task in tasks.iter().filter(open) {
            match self.tasks.queue.cancel(&task.id, reason).await {
                Ok(()) => {}
                // Finished meanwhile: nothing left to cancel.
                Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {}
                Err(s) => return Err(queue_unavailable(s).into()),
            }
        }
        Ok(())
    }

    async fn watch(&self, req: pb::WatchTicketRequest) -> ApiResult<EventStream> {
        let id = requests::watch(req)?;
        self.store.get_ticket(id).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::follow(
            self.nats.clone(),
            self.topology.clone(),
            id.to_string(),
            tx,
            self.watchers.clone(),
        ));
        Ok(ReceiverStream::new(rx))
    }

    fn watch_all(&self, req: pb::WatchTicketsRequest) -> ApiResult<BoardStream> {
        let page_size = requests::watch_all(req)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(board::follow(
            Arc::clone(&self.board),
            Arc::clone(&self.tasks),
            page_size,
            tx,
            self.watchers.clone(),
        ));
        Ok(ReceiverStream::new(rx))
    }
}

type EventStream = ReceiverStream<Result<Event, Status>>;
type BoardStream = ReceiverStream<Result<pb::WatchTicketsResponse, Status>>;

#[tonic::async_trait]
impl TicketService for Tickets {
    async fn update_ticket(
        &self,
        request: Request<pb::UpdateTicketRequest>,
    ) -> Result<Response<pb::UpdateTicketResponse>, Status> {
        Ok(Response::new(self.update(request.into_inner()).await?))
    }

    async fn retry_ticket(
        &self,
        request: Request<pb::RetryTicketRequest>,
    ) -> Result<Response<pb::RetryTicketResponse>, Status> {
        Ok(Response::new(self.retry(request.into_inner()).await?))
    }

    async fn create_ticket(
        &self,
        request: Request<pb::CreateTicketRequest>,
    ) -> Result<Response<pb::CreateTicketResponse>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn get_ticket(
        &self,
        request: Request<pb::GetTicketRequest>,
    ) -> Result<Response<pb::GetTicketResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn list_tickets(
        &self,
        request: Request<pb::ListTicketsRequest>,
    ) -> Result<Response<pb::ListTicketsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn cancel_ticket(
        &self,
        request: Request<pb::CancelTicketRequest>,
    ) -> Result<Response<pb::CancelTicketResponse>, Status> {
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    type WatchTicketStream = EventStream;

    async fn follow_up(&self, request: Request<pb::FollowUpRequest>) -> Result<Response<pb::FollowUpResponse>, Status> {
        Ok(Response::new(Tickets::follow_up(self, request.into_inner()).await?))
    }

    async fn choose_candidate(
        &self,
        request: Request<pb::ChooseCandidateRequest>,
    ) -> Result<Response<pb::ChooseCandidateResponse>, Status> {
        let by = caller(&request);
        Ok(Response::new(
            Tickets::choose_candidate(self, request.into_inner(), &by).await?,
        ))
    }

    async fn approve(&self, request: Request<pb::ApproveRequest>) -> Result<Response<pb::ApproveResponse>, Status> {
        let by = caller(&request);
        Ok(Response::new(Tickets::approve(self, request.into_inner(), &by).await?))
    }

    async fn request_changes(
        &self,
        request: Request<pb::RequestChangesRequest>,
    ) -> Result<Response<pb::RequestChangesResponse>, Status> {
        let by = caller(&request);
        Ok(Response::new(
            Tickets::request_changes(self, request.into_inner(), &by).await?,
        ))
    }

    async fn react(&self, request: Request<pb::ReactRequest>) -> Result<Response<pb::ReactResponse>, Status> {
        Ok(Response::new(Tickets::react(self, request.into_inner()).await?))
    }

    async fn intake(&self, request: Request<pb::IntakeRequest>) -> Result<Response<pb::IntakeResponse>, Status> {
        Ok(Response::new(Tickets::intake(self, request.into_inner()).await?))
    }

    async fn watch_ticket(
        &self,
        request: Request<pb::WatchTicketRequest>,
    ) -> Result<Response<Self::WatchTicketStream>, Status> {
        Ok(Response::new(self.watch(request.into_inner()).await?))
    }

    type WatchTicketsStream = BoardStream;

    async fn watch_tickets(
        &self,
        request: Request<pb::WatchTicketsRequest>,
    ) -> Result<Response<Self::WatchTicketsStream>, Status> {
        Ok(Response::new(self.watch_all(request.into_inner())?))
    }
}

/// Who made a request, for the record of a person's decision: the
/// common name of the client certificate it came with (a deployment that
/// requires them, OMOI_TLS_CLIENT_CA), else `operator`.
fn caller<T>(request: &Request<T>) -> String {
    request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| omoi_runtime::tls::common_name(c.as_ref())))
        .unwrap_or_else(|| "operator".to_owned())
}

/// The task a follow-up resumes: `asked` when it is one of the ticket's
/// tasks that ran, else the ticket's last completed task.
fn follow_up_source(
    tasks: &[omoi_proto::taskqueue::Task],
    asked: Option<Uuid>,
) -> Result<&omoi_proto::taskqueue::Task, Status> {
    let ran = |t: &&omoi_proto::taskqueue::Task| t.attempt > 0;
    if let Some(asked) = asked {
        let id = asked.to_string();
        let task = tasks
            .iter()
            .find(|t| t.id == id)
            .ok_or_else(|| Status::not_found(format!("task_id: task {asked} is not a task of this ticket")))?;
        if !task.candidate_of.is_empty() {
            return Err(Status::failed_precondition(format!(
                "task_id: task {asked} is candidate {} of task {}: follow up on that task, \
                 or land this candidate with ChooseCandidate first",
                task.candidate, task.candidate_of
            )));
        }
        return Some(task)
            .filter(ran)
            .ok_or_else(|| Status::failed_precondition(format!("task_id: task {asked} has not run yet")));
    }
    tasks
        .iter()
        // A candidate's work is on the branch only through the task that
        // landed it.
        .filter(|t| t.candidate_of.is_empty())
        .filter(|t| TaskStatus::given(t.status).known() == Some(TaskStatus::Completed))
        .max_by_key(|t| t.completed_at.as_ref().map(|c| (c.seconds, c.nanos)))
        .ok_or_else(|| {
            Status::failed_precondition("the ticket has no completed task to follow up; name one in task_id")
        })
}

/// The completed task that last changed one of `paths` (as its stored
/// patch says), if one did.
fn touched_last<'a>(
    tasks: &'a [omoi_proto::taskqueue::Task],
    paths: &[String],
) -> Option<&'a omoi_proto::taskqueue::Task> {
    if paths.is_empty() {
        return None;
    }
    let touched = |t: &&omoi_proto::taskqueue::Task| {
        let patch = t.git.as_ref().map_or("", |g| g.patch.as_str());
        patch.lines().any(|l| {
            let file = l.strip_prefix("+++ b/").or_else(|| l.strip_prefix("--- a/"));
            file.is_some_and(|f| paths.iter().any(|p| p == f))
        })
    };
    tasks
        .iter()
        .filter(|t| TaskStatus::given(t.status).known() == Some(TaskStatus::Completed))
        .filter(touched)
        .max_by_key(|t| t.completed_at.as_ref().map(|c| (c.seconds, c.nanos)))
}

/// The follow-up as the ticket's plan keeps it: the followed task's phase,
/// timeout and required labels, the default retries (a person's new request, whatever the
/// plan allowed the task it follows), the message as its description.
fn follow_up_task(
    ticket: &omoi_domain::Ticket,
    source: &omoi_proto::taskqueue::Task,
    message: &str,
) -> omoi_domain::ticket::PlannedTask {
    let first_line: String = message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .chars()
        .take(80)
        .collect();
    omoi_domain::ticket::PlannedTask {
        title: format!("Follow-up: {first_line}"),
        description: message.to_owned(),
        phase: omoi_domain::Phase::given(source.phase)
            .known()
            .unwrap_or(omoi_domain::Phase::Implementation),
        priority: omoi_domain::ticket::task_priority(ticket.priority),
        depends_on: Vec::new(),
        max_retries: omoi_domain::backoff::DEFAULT_MAX_RETRIES,
        timeout_seconds: source.timeout_seconds,
        concurrency_key: (!source.concurrency_key.is_empty()).then(|| source.concurrency_key.clone()),
        // Where the followed task could run, so can its follow-up.
        requires: source.requires.clone().into_iter().collect(),
        candidate: None,
        lands_candidate: false,
    }
}
