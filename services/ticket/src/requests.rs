//! Every request of TicketService read into what the domain and the store
//! take, in one place. Each request is destructured whole, so a field added
//! to the proto fails the build here until it is read; anything bad is
//! refused with INVALID_ARGUMENT naming the field, before anything is done.

use omoi_base::{ApiError, ApiResult};
use omoi_domain::ticket::{self as rules, PhaseInstructions, PlannedTask, RawTaskSpec};
use omoi_domain::{Phase, TicketStatus, git, validate};
use omoi_proto::common::TicketPriority;
use omoi_proto::domain::WireEnum;
use omoi_proto::ticket as pb;
use omoi_store::tickets::{NewTicket, TicketUpdate};
use uuid::Uuid;

pub const MAX_REQUEST_ID: usize = 128;
pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;

/// CreateTicket: the ticket to store, with a new id (and its branch), and
/// its plan, each task with the id it will have on the queue.
pub fn create(
    req: pb::CreateTicketRequest,
    instructions: &PhaseInstructions,
    default_max_reactions: i32,
) -> ApiResult<(NewTicket, Vec<(Uuid, PlannedTask)>)> {
    let pb::CreateTicketRequest {
        title,
        description,
        priority,
        repository,
        labels,
        plan,
        request_id,
        base_ref,
        pull_request,
        max_cost_usd,
        max_reactions,
        approvals,
        check_command,
        guardian,
    } = req;
    let title = validate::title("title", &title)?;
    let guardian = omoi_proto::domain::guardian_overrides("guardian", guardian.as_ref())?;
    let max_reactions = match max_reactions {
        Some(n) => validate::range("max_reactions", n, 0, MAX_REACTIONS)?,
        None => default_max_reactions,
    };
    let description = validate::text("description", &description, validate::MAX_DESCRIPTION_BYTES)?;
    let priority = match priority {
        0 => TicketPriority::Medium.into(),
        p => ticket_priority("priority", p)?,
    };
    let max_cost_usd = budget("max_cost_usd", max_cost_usd)?;
    validate::repository("repository", &repository)?;
    let repository = repository.trim().to_owned();
    let base_ref = if base_ref.is_empty() {
        String::new()
    } else if repository.is_empty() {
        return Err(ApiError::invalid("base_ref", "needs a repository"));
    } else {
        git::git_ref("base_ref", &base_ref)?
    };
    let check_command = validate::check_command("check_command", &check_command, &repository)?;
    if pull_request && git::forge_repo(&repository).is_none() {
        return Err(ApiError::invalid(
            "pull_request",
            "needs a GitHub repository URL (https://<host>/<owner>/<repo>)",
        ));
    }
    validate::labels("labels", labels.iter())?;
    let request_id = if request_id.is_empty() {
        None
    } else {
        Some(validate::token("request_id", &request_id, MAX_REQUEST_ID, "-_.:")?)
    };
    // Candidates are commits kept apart until one is chosen: a repository's.
    if let Some(i) = plan.iter().position(|s| s.candidates.is_some())
        && repository.is_empty()
    {
        return Err(ApiError::invalid(
            format!("plan[{i}].candidates"),
            "needs a repository: candidates are commits, one of which lands",
        ));
    }
    let plan = if plan.is_empty() {
        rules::default_plan(&title, &description, priority, instructions)
    } else {
        let specs: Vec<RawTaskSpec<'_>> = plan.iter().map(task_spec).collect();
        rules::explicit_plan(&specs, priority)?
    };
    let approvals = omoi_domain::gate::approvals("approvals", approvals.into_iter().map(Phase::given), &plan)?;
    let id = Uuid::now_v7();
    let branch = if repository.is_empty() {
        String::new()
    } else {
        git::branch_name(id, &title)
    };
    // A ticket's tasks share its repository's concurrency key unless the
    // plan names another.
    let plan = plan
        .into_iter()
        .map(|mut p| {
            if p.concurrency_key.is_none() && !repository.is_empty() {
                p.concurrency_key = Some(repository.clone());
            }
            (Uuid::now_v7(), p)
        })
        .collect();
    let ticket = NewTicket {
        id,
        base_ref,
        branch,
        pull_request,
        max_cost_usd,
        max_reactions,
        title,
        description,
        priority,
        repository,
        labels: serde_json::to_value(&labels).unwrap_or_default(),
        request_id,
        source_kind: String::new(),
        source_url: String::new(),
        approvals,
        check_command,
        guardian,
    };
    Ok((ticket, plan))
}

fn task_spec(s: &pb::TaskSpec) -> RawTaskSpec<'_> {
    let pb::TaskSpec {
        title,
        description,
        phase,
        priority,
        depends_on,
        max_retries,
        timeout_seconds,
        concurrency_key,
        requires,
        candidates,
    } = s;
    RawTaskSpec {
        title,
        description,
        phase: Phase::given(*phase),
        priority: *priority,
        depends_on,
        max_retries: *max_retries,
        timeout_seconds: *timeout_seconds,
        concurrency_key,
        requires: Some(requires),
        candidates: candidates.as_ref().map(|c| omoi_domain::candidates::RawCandidates {
            count: c.count,
            requires: c.requires.iter().map(|l| &l.labels).collect(),
            judge: Some(&c.judge),
        }),
    }
}

/// GetTicket: the ticket and how much of it to return.
pub fn get(req: pb::GetTicketRequest) -> ApiResult<(Uuid, pb::TicketView)> {
    let pb::GetTicketRequest { ticket_id, view } = req;
    let id = validate::uuid("ticket_id", &ticket_id)?;
    let view = pb::TicketView::try_from(view)
        .map_err(|_| ApiError::invalid("view", format!("{view} is not a ticket view (BASIC, FULL)")))?;
    Ok((id, view))
}

/// ListTickets: a page of the newest tickets of a status, if one is asked.
pub struct Page {
    pub status: Option<TicketStatus>,
    pub size: i64,
    /// The position to continue before (None: the newest).
    pub before: Option<i64>,
}

pub fn list(req: pb::ListTicketsRequest) -> ApiResult<Page> {
    let pb::ListTicketsRequest {
        page_size,
        page_token,
        status,
    } = req;
    let status = validate::optional("status", TicketStatus::given(status), "ticket status")?;
    let size = page_size_of(page_size)?;
    let before = if page_token.is_empty() {
        None
    } else {
        let token = page_token.parse::<i64>().ok().filter(|n| *n > 0);
        Some(token.ok_or_else(|| ApiError::invalid("page_token", "not a token from a previous response"))?)
    };
    Ok(Page { status, size, before })
}

/// CancelTicket: the ticket and why ("ticket cancelled" unless said).
pub fn cancel(req: pb::CancelTicketRequest) -> ApiResult<(Uuid, String)> {
    let pb::CancelTicketRequest { ticket_id, reason } = req;
    Ok((
        validate::uuid("ticket_id", &ticket_id)?,
        reason_or(&reason, "ticket cancelled")?,
    ))
}

/// UpdateTicket: the ticket and the fields its mask names, with their new
/// values.
pub fn update(req: pb::UpdateTicketRequest) -> ApiResult<(Uuid, TicketUpdate)> {
    let pb::UpdateTicketRequest { ticket, update_mask } = req;
    let given = ticket.ok_or_else(|| ApiError::invalid("ticket", "required: the ticket's id and the new values"))?;
    let id = validate::uuid("ticket.id", &given.id)?;
    let paths = update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            "name at least one of priority, labels, max_cost_usd, max_reactions, guardian",
        ));
    }
    let mut update = TicketUpdate::default();
    for path in paths {
        match path.as_str() {
            "priority" => update.priority = Some(ticket_priority("ticket.priority", given.priority)?),
            "labels" => {
                validate::labels("ticket.labels", given.labels.iter())?;
                update.labels = Some(serde_json::to_value(&given.labels).unwrap_or_default());
            }
            "max_cost_usd" => update.max_cost_usd = Some(budget("ticket.max_cost_usd", given.max_cost_usd)?),
            "max_reactions" => {
                update.max_reactions = Some(validate::range(
                    "ticket.max_reactions",
                    given.max_reactions,
                    0,
                    MAX_REACTIONS,
                )?)
            }
            "guardian" => {
                update.guardian = Some(omoi_proto::domain::guardian_overrides(
                    "ticket.guardian",
                    given.guardian.as_ref(),
                )?)
            }
            other => {
                let reason = format!(
                    "{other:?} cannot be updated; name priority, labels, max_cost_usd, max_reactions or guardian"
                );
                return Err(ApiError::invalid("update_mask", reason));
            }
        }
    }
    Ok((id, update))
}

/// RetryTicket: the ticket and why ("ticket retried" unless said).
pub fn retry(req: pb::RetryTicketRequest) -> ApiResult<(Uuid, String)> {
    let pb::RetryTicketRequest { ticket_id, reason } = req;
    Ok((
        validate::uuid("ticket_id", &ticket_id)?,
        reason_or(&reason, "ticket retried")?,
    ))
}

/// Longest follow-up message.
pub const MAX_FOLLOW_UP_BYTES: usize = 64 * 1024;

/// FollowUp: the ticket, the message, and the task whose session it
/// resumes (None: the ticket's last completed task).
pub fn follow_up(req: pb::FollowUpRequest) -> ApiResult<(Uuid, String, Option<Uuid>)> {
    let pb::FollowUpRequest {
        ticket_id,
        message,
        task_id,
    } = req;
    let ticket_id = validate::uuid("ticket_id", &ticket_id)?;
    if message.trim().is_empty() {
        return Err(omoi_base::ApiError::invalid("message", "must not be empty"));
    }
    let message = validate::text("message", &message, MAX_FOLLOW_UP_BYTES)?;
    Ok((ticket_id, message, validate::optional_uuid("task_id", &task_id)?))
}

/// ChooseCandidate: the choosing task, the candidate (1 to 8) and the
/// person's reason (may be empty).
pub fn choose_candidate(req: pb::ChooseCandidateRequest) -> ApiResult<(Uuid, i32, String)> {
    let pb::ChooseCandidateRequest {
        task_id,
        candidate,
        comment,
    } = req;
    let task_id = validate::uuid("task_id", &task_id)?;
    let candidate = validate::range("candidate", candidate, 1, omoi_domain::candidates::MAX_CANDIDATES)?;
    let comment = validate::text("comment", comment.trim(), MAX_FOLLOW_UP_BYTES)?;
    Ok((task_id, candidate, comment))
}

/// A person's decision on a phase awaiting approval: Approve's (the
/// comment may be empty) or RequestChanges' (it may not).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub ticket_id: Uuid,
    pub phase: Option<Phase>,
    pub comment: String,
}

pub fn approve(req: pb::ApproveRequest) -> ApiResult<Decision> {
    let pb::ApproveRequest {
        ticket_id,
        comment,
        phase,
    } = req;
    decision(&ticket_id, comment, phase, false)
}

pub fn request_changes(req: pb::RequestChangesRequest) -> ApiResult<Decision> {
    let pb::RequestChangesRequest {
        ticket_id,
        comment,
        phase,
    } = req;
    decision(&ticket_id, comment, phase, true)
}

fn decision(ticket_id: &str, comment: String, phase: i32, comment_needed: bool) -> ApiResult<Decision> {
    let ticket_id = validate::uuid("ticket_id", ticket_id)?;
    if comment_needed && comment.trim().is_empty() {
        return Err(omoi_base::ApiError::invalid("comment", "must say what to change"));
    }
    let comment = validate::text("comment", comment.trim(), omoi_domain::gate::MAX_COMMENT_BYTES)?;
    let phase = validate::optional("phase", Phase::given(phase), "phase")?;
    Ok(Decision {
        ticket_id,
        phase,
        comment,
    })
}

/// Most reactions a ticket may allow.
pub const MAX_REACTIONS: i32 = 100;

/// What a React request asks, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Reaction {
    pub delivery_id: String,
    /// `owner/name`.
    pub repository: String,
    pub url: String,
    pub asked: Asked,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Asked {
    /// A check suite (`suite_id`), or a commit status (`status`), on
    /// `branch` did not succeed on `head_sha`.
    CiFailure {
        branch: String,
        suite_id: i64,
        status: Option<pb::CommitStatus>,
        head_sha: String,
    },
    /// `author` wrote `body` (which names the mention) on the pull request.
    Mention {
        pull_request_url: String,
        author: String,
        body: String,
        comment_id: i64,
    },
    /// `author`'s review `review_id` of pull request `pull_number` requested
    /// changes, saying `body` (and its comments).
    Review {
        pull_request_url: String,
        pull_number: i64,
        review_id: i64,
        author: String,
        body: String,
    },
    /// The pull request, at `head_sha`, no longer merges cleanly into
    /// `base_ref` at `base_sha`.
    Conflict {
        pull_request_url: String,
        head_sha: String,
        base_ref: String,
        base_sha: String,
    },
}

/// A push to a branch (React CONFLICT without a pull request): the
/// repository (`owner/name`) and the branch, whose pull requests may
/// conflict now.
pub fn base_moved(req: &pb::ReactRequest) -> ApiResult<(String, String)> {
    validate::token("delivery_id", &req.delivery_id, 100, "-")?;
    Ok((
        repository("repository", &req.repository)?,
        git::git_ref("base_ref", &req.base_ref)?,
    ))
}

/// `owner/name`.
fn repository(field: &str, value: &str) -> ApiResult<String> {
    match value.split_once('/') {
        Some((owner, name)) if git::forge_repo(&format!("https://github.com/{owner}/{name}")).is_some() => {
            Ok(value.to_owned())
        }
        _ => Err(ApiError::invalid(field, "must be owner/name")),
    }
}

/// React: the reaction, or (Err of Ok) why the delivery asks for none:
/// checks that passed, a comment without the mention or from someone
/// without write access.
pub fn react(req: pb::ReactRequest, mention: &str) -> ApiResult<Result<Reaction, String>> {
    let pb::ReactRequest {
        delivery_id,
        kind,
        repository,
        pull_request_url,
        branch,
        url,
        author,
        author_association,
        body,
        check_suite_id,
        head_sha,
        conclusion,
        comment_id,
        review_id,
        pull_number,
        status,
        base_ref,
        base_sha,
    } = req;
    let delivery_id = validate::token("delivery_id", &delivery_id, 100, "-")?;
    let repository = self::repository("repository", &repository)?;
    let url = validate::text("url", &url, validate::MAX_REPOSITORY_BYTES)?;
    let asked = match pb::ReactionKind::try_from(kind) {
        Ok(pb::ReactionKind::CiFailure) => {
            if !matches!(
                conclusion.as_str(),
                "failure" | "timed_out" | "action_required" | "startup_failure" | "error"
            ) {
                return Ok(Err(format!("the checks concluded {conclusion:?}: nothing to fix")));
            }
            let status = status
                .map(|s| -> ApiResult<pb::CommitStatus> {
                    Ok(pb::CommitStatus {
                        context: validate::text("status.context", &s.context, 255)?,
                        description: validate::text("status.description", &s.description, validate::MAX_REASON_BYTES)?,
                        target_url: validate::text("status.target_url", &s.target_url, validate::MAX_REPOSITORY_BYTES)?,
                    })
                })
                .transpose()?;
            if check_suite_id <= 0 && status.is_none() {
                return Err(ApiError::invalid(
                    "check_suite_id",
                    "must be a check suite's id (or give a status)",
                ));
            }
            Asked::CiFailure {
                branch: git::git_ref("branch", &branch)?,
                suite_id: check_suite_id,
                status,
                head_sha: git::commit_id("head_sha", &head_sha)?,
            }
        }
        Ok(pb::ReactionKind::Mention) => {
            let body = validate::text("body", &body, MAX_FOLLOW_UP_BYTES)?;
            if !mentions(&body, mention) {
                return Ok(Err(format!("the comment does not mention {mention}")));
            }
            if let Some(refused) = may_not_ask(&author, &author_association) {
                return Ok(Err(refused));
            }
            if comment_id <= 0 {
                return Err(ApiError::invalid("comment_id", "must be the comment's id"));
            }
            Asked::Mention {
                pull_request_url: pull_request("pull_request_url", &pull_request_url)?,
                author: validate::text("author", &author, 100)?,
                body,
                comment_id,
            }
        }
        Ok(pb::ReactionKind::Review) => {
            if let Some(refused) = may_not_ask(&author, &author_association) {
                return Ok(Err(refused));
            }
            if review_id <= 0 {
                return Err(ApiError::invalid("review_id", "must be the review's id"));
            }
            if pull_number <= 0 {
                return Err(ApiError::invalid("pull_number", "must be the pull request's number"));
            }
            Asked::Review {
                pull_request_url: pull_request("pull_request_url", &pull_request_url)?,
                pull_number,
                review_id,
                author: validate::text("author", &author, 100)?,
                body: validate::text("body", &body, MAX_FOLLOW_UP_BYTES)?,
            }
        }
        Ok(pb::ReactionKind::Conflict) => Asked::Conflict {
            pull_request_url: pull_request("pull_request_url", &pull_request_url)?,
            head_sha: git::commit_id("head_sha", &head_sha)?,
            base_ref: git::git_ref("base_ref", &base_ref)?,
            base_sha: git::commit_id("base_sha", &base_sha)?,
        },
        _ => {
            return Err(ApiError::invalid(
                "kind",
                "must be CI_FAILURE, MENTION, REVIEW or CONFLICT",
            ));
        }
    };
    Ok(Ok(Reaction {
        delivery_id,
        repository,
        url,
        asked,
    }))
}

/// What an Intake request says happened to an issue, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub action: pb::IssueAction,
    /// `owner/name`.
    pub repository: String,
    pub clone_url: String,
    pub number: i64,
    pub url: String,
    pub title: String,
    pub body: String,
    pub label: String,
}

impl Issue {
    /// The request id of the issue's ticket: one ticket per issue.
    pub fn request_id(&self) -> String {
        format!("github-issue:{}:{}", self.repository.replace('/', ":"), self.number).to_lowercase()
    }
}

/// Intake: the issue and what happened to it.
pub fn intake(req: pb::IntakeRequest) -> ApiResult<Issue> {
    let pb::IntakeRequest {
        delivery_id,
        action,
        repository,
        clone_url,
        issue_number,
        issue_url,
        title,
        body,
        label,
    } = req;
    validate::token("delivery_id", &delivery_id, 100, "-")?;
    let action = match pb::IssueAction::try_from(action) {
        Ok(pb::IssueAction::Unspecified) | Err(_) => {
            return Err(ApiError::invalid("action", "must be LABELED, UNLABELED or CLOSED"));
        }
        Ok(a) => a,
    };
    let repository = match repository.split_once('/') {
        Some((owner, name)) if git::forge_repo(&format!("https://github.com/{owner}/{name}")).is_some() => repository,
        _ => return Err(ApiError::invalid("repository", "must be owner/name")),
    };
    if git::forge_repo(&clone_url).is_none() {
        return Err(ApiError::invalid(
            "clone_url",
            "must be the repository's https clone URL",
        ));
    }
    if issue_number <= 0 {
        return Err(ApiError::invalid("issue_number", "must be the issue's number"));
    }
    // GitHub's titles run to 256 characters, a ticket's to 200.
    let title: String = title.trim().chars().take(validate::MAX_TITLE_CHARS).collect();
    let mut body = body;
    body.truncate(body.floor_char_boundary(MAX_FOLLOW_UP_BYTES));
    Ok(Issue {
        action,
        repository,
        clone_url,
        number: issue_number,
        url: pull_request("issue_url", &issue_url)?,
        title,
        body,
        label,
    })
}

/// Why `author` may not ask for work (only a repository's owners, members
/// and collaborators may), or None.
fn may_not_ask(author: &str, association: &str) -> Option<String> {
    (!matches!(association, "OWNER" | "MEMBER" | "COLLABORATOR"))
        .then(|| format!("{author} may not ask ({association}: only owners, members and collaborators may)"))
}

/// A pull request's web address.
fn pull_request(field: &str, url: &str) -> ApiResult<String> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(ApiError::invalid(field, "must be the pull request's web address"));
    }
    Ok(validate::text(field, url, validate::MAX_REPOSITORY_BYTES)?)
}

/// Whether `body` names `mention` as a word of its own (`@omoi`, not
/// `@omoi-bot` or `me@omoi.dev`).
pub fn mentions(body: &str, mention: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '-' || c == '_' || c == '.' || c == '@';
    let lower = body.to_lowercase();
    let mention = mention.to_lowercase();
    lower.match_indices(&mention).any(|(i, m)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + m.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(|c| word(c) && c != '.')
    })
}

/// WatchTicket: the ticket.
pub fn watch(req: pb::WatchTicketRequest) -> ApiResult<Uuid> {
    let pb::WatchTicketRequest { ticket_id } = req;
    Ok(validate::uuid("ticket_id", &ticket_id)?)
}

/// WatchTickets: how many of the newest tickets the snapshot holds.
pub fn watch_all(req: pb::WatchTicketsRequest) -> ApiResult<i64> {
    let pb::WatchTicketsRequest { page_size } = req;
    page_size_of(page_size)
}

fn page_size_of(given: i32) -> ApiResult<i64> {
    Ok(i64::from(match given {
        0 => DEFAULT_PAGE_SIZE,
        n => validate::range("page_size", n, 1, MAX_PAGE_SIZE)?,
    }))
}

/// A reason given, or `default` for none.
fn reason_or(given: &str, default: &str) -> ApiResult<String> {
    let reason = validate::text("reason", given, validate::MAX_REASON_BYTES)?;
    Ok(if reason.is_empty() { default.to_owned() } else { reason })
}

/// A known ticket priority (LOW 1 .. CRITICAL 4).
fn ticket_priority(field: &str, value: i32) -> ApiResult<i32> {
    match TicketPriority::try_from(value) {
        Ok(TicketPriority::Unspecified) | Err(_) => Err(ApiError::invalid(
            field,
            format!("{value} is not a known ticket priority (LOW, MEDIUM, HIGH, CRITICAL)"),
        )),
        Ok(p) => Ok(i32::from(p)),
    }
}

/// A budget: more than 0 USD, or none.
fn budget(field: &str, value: Option<f64>) -> ApiResult<Option<f64>> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(ApiError::invalid(field, format!("must be more than 0 USD, got {v}")))
        }
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mention_is_the_word_itself() {
        assert!(mentions("@omoi please", "@omoi"));
        assert!(mentions("Thanks! @OMOI, also the empty case.", "@omoi"));
        assert!(mentions("(@omoi)", "@omoi"));
        assert!(!mentions("@omoi-bot please", "@omoi"));
        assert!(!mentions("mail me@omoi.dev", "@omoi"));
        assert!(!mentions("nothing here", "@omoi"));
    }

    fn mention(association: &str) -> pb::ReactRequest {
        pb::ReactRequest {
            delivery_id: "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            kind: pb::ReactionKind::Mention.into(),
            repository: "acme/r".into(),
            pull_request_url: "https://github.com/acme/r/pull/1".into(),
            url: "https://github.com/acme/r/pull/1#issuecomment-5".into(),
            author: "octo".into(),
            author_association: association.into(),
            body: "@omoi go".into(),
            comment_id: 5,
            ..Default::default()
        }
    }

    #[test]
    fn reactions_are_read_or_refused_naming_the_field() {
        let asked = react(mention("MEMBER"), "@omoi").unwrap().unwrap();
        assert!(matches!(asked.asked, Asked::Mention { comment_id: 5, .. }));
        assert!(react(mention("CONTRIBUTOR"), "@omoi").unwrap().is_err());
        // The field the refusal names (INVALID_ARGUMENT, "invalid argument <field>: why").
        let field = |req: pb::ReactRequest| {
            let status = tonic::Status::from(react(req, "@omoi").unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            let named = status.message().trim_start_matches("invalid argument ");
            named.split(':').next().unwrap().to_owned()
        };
        let mut bad = mention("OWNER");
        bad.delivery_id = String::new();
        assert_eq!(field(bad), "delivery_id");
        let mut bad = mention("OWNER");
        bad.repository = "no-slash".into();
        assert_eq!(field(bad), "repository");
        let mut bad = mention("OWNER");
        bad.kind = 0;
        assert_eq!(field(bad), "kind");
        let ci = pb::ReactRequest {
            kind: pb::ReactionKind::CiFailure.into(),
            branch: "omoi/x".into(),
            check_suite_id: 3,
            head_sha: "not-a-sha".into(),
            conclusion: "failure".into(),
            ..mention("OWNER")
        };
        assert_eq!(field(ci.clone()), "head_sha");
        let review = pb::ReactRequest {
            kind: pb::ReactionKind::Review.into(),
            pull_number: 1,
            ..mention("MEMBER")
        };
        assert_eq!(field(review), "review_id");
        let passed = pb::ReactRequest {
            conclusion: "success".into(),
            ..ci
        };
        assert!(react(passed, "@omoi").unwrap().is_err());
        let conflict = pb::ReactRequest {
            kind: pb::ReactionKind::Conflict.into(),
            head_sha: "a".repeat(40),
            base_ref: "main".into(),
            base_sha: "b".repeat(39),
            ..mention("NONE")
        };
        assert_eq!(field(conflict.clone()), "base_sha");
        let fine = pb::ReactRequest {
            base_sha: "b".repeat(40),
            ..conflict.clone()
        };
        assert!(matches!(
            react(fine, "@omoi").unwrap().unwrap().asked,
            Asked::Conflict { ref base_ref, .. } if base_ref == "main"
        ));
        let pushed = pb::ReactRequest {
            pull_request_url: String::new(),
            base_ref: "-bad".into(),
            ..conflict
        };
        let status = tonic::Status::from(base_moved(&pushed).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("invalid argument base_ref:"),
            "{}",
            status.message()
        );
    }
}
