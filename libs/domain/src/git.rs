//! A ticket's work on git: the branch it lands on, the refs a client may
//! name, and what one task's attempt committed there.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;

/// Longest ref name accepted (git itself allows more; nobody needs it).
pub const MAX_REF_BYTES: usize = 255;
/// Most patch text kept with a task; the full patch is its commit's.
pub const MAX_PATCH_BYTES: usize = 64 * 1024;
/// Longest title slug in a branch name.
const MAX_SLUG_CHARS: usize = 40;

/// What a task's successful attempt left on the ticket's branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GitChange {
    pub branch: String,
    /// The commit the attempt's workspace started from.
    pub base_commit: String,
    /// The branch's commit after the attempt: its own commit, or the base
    /// when it changed nothing.
    pub commit: String,
    pub files_changed: i32,
    pub insertions: i64,
    pub deletions: i64,
    /// The commit's patch, cut at `MAX_PATCH_BYTES`.
    pub patch: String,
    pub patch_truncated: bool,
    /// The ticket's whole change after it: the branch against its base
    /// branch (None when the base is no branch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_diff: Option<BranchDiff>,
}

/// A branch against where it left its base branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BranchDiff {
    pub merge_base: String,
    pub files_changed: i32,
    pub insertions: i64,
    pub deletions: i64,
    /// Cut at `MAX_PATCH_BYTES`.
    pub patch: String,
    pub patch_truncated: bool,
}

impl GitChange {
    /// Whether the attempt committed anything.
    pub fn committed(&self) -> bool {
        self.commit != self.base_commit
    }

    /// A reported change, checked field by field (`field` names the message
    /// it came in, e.g. `git`).
    pub fn validated(self, field: &str) -> Result<GitChange, DomainError> {
        git_ref(&format!("{field}.branch"), &self.branch)?;
        commit_id(&format!("{field}.base_commit"), &self.base_commit)?;
        commit_id(&format!("{field}.commit"), &self.commit)?;
        let counts = [
            ("files_changed", i64::from(self.files_changed)),
            ("insertions", self.insertions),
            ("deletions", self.deletions),
        ];
        for (name, value) in counts {
            if value < 0 {
                return Err(DomainError::invalid(
                    format!("{field}.{name}"),
                    format!("must not be negative, got {value}"),
                ));
            }
        }
        patch(&format!("{field}.patch"), &self.patch)?;
        if let Some(d) = &self.branch_diff {
            let at = format!("{field}.branch_diff");
            commit_id(&format!("{at}.merge_base"), &d.merge_base)?;
            let counts = [
                ("files_changed", i64::from(d.files_changed)),
                ("insertions", d.insertions),
                ("deletions", d.deletions),
            ];
            for (name, value) in counts {
                if value < 0 {
                    return Err(DomainError::invalid(
                        format!("{at}.{name}"),
                        format!("must not be negative, got {value}"),
                    ));
                }
            }
            patch(&format!("{at}.patch"), &d.patch)?;
        }
        Ok(self)
    }

    /// The change without its patches (what an event carries: the task
    /// keeps them).
    pub fn without_patches(&self) -> GitChange {
        GitChange {
            patch: String::new(),
            patch_truncated: false,
            branch_diff: self.branch_diff.as_ref().map(|d| BranchDiff {
                patch: String::new(),
                patch_truncated: false,
                ..d.clone()
            }),
            ..self.clone()
        }
    }
}

fn patch(field: &str, patch: &str) -> Result<(), DomainError> {
    if patch.len() > MAX_PATCH_BYTES || patch.contains('\0') {
        return Err(DomainError::invalid(
            field,
            format!("must be at most {MAX_PATCH_BYTES} bytes without NUL characters"),
        ));
    }
    Ok(())
}

/// The patch as kept with a task: whole, or cut on a line boundary within
/// `MAX_PATCH_BYTES` (true when cut).
pub fn bounded_patch(patch: &str) -> (String, bool) {
    let patch = patch.replace('\0', "");
    if patch.len() <= MAX_PATCH_BYTES {
        return (patch, false);
    }
    let end = patch.floor_char_boundary(MAX_PATCH_BYTES);
    let end = patch[..end].rfind('\n').map(|i| i + 1).unwrap_or(end);
    (patch[..end].to_owned(), true)
}

/// The branch of a ticket's work: `omoi/<last 12 hex of its id>-<slug>`.
/// The tail, not the head: a UUIDv7 starts with its timestamp, so tickets
/// filed within a minute of each other share their first hex digits.
pub fn branch_name(ticket_id: Uuid, title: &str) -> String {
    let mut slug = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.chars().count() >= MAX_SLUG_CHARS {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    let hex = ticket_id.simple().to_string();
    let tail = &hex[hex.len() - 12..];
    if slug.is_empty() {
        format!("omoi/{tail}")
    } else {
        format!("omoi/{tail}-{slug}")
    }
}

/// A branch, tag or other ref name as `git check-ref-format` accepts it,
/// and never one that reads as an option.
pub fn git_ref(field: &str, value: &str) -> Result<String, DomainError> {
    let bad = |why: &str| {
        Err(DomainError::invalid(
            field,
            format!("{value:?} is not a usable git ref: {why}"),
        ))
    };
    if value.is_empty() {
        return bad("empty");
    }
    if value.len() > MAX_REF_BYTES {
        return bad("too long");
    }
    if value.starts_with('-') {
        return bad("starts with '-'");
    }
    if value == "@" || value.contains("@{") || value.contains("..") || value.contains("//") {
        return bad("contains '@', '@{', '..' or '//'");
    }
    if value
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return bad("contains a space, a control character or one of ~^:?*[\\");
    }
    if value.starts_with('/') || value.ends_with('/') || value.ends_with('.') {
        return bad("starts or ends with '/', or ends with '.'");
    }
    if value
        .split('/')
        .any(|part| part.starts_with('.') || part.ends_with(".lock"))
    {
        return bad("a part starts with '.' or ends with '.lock'");
    }
    Ok(value.to_owned())
}

/// A repository on a forge, as its API names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeRepo {
    pub host: String,
    pub owner: String,
    pub name: String,
}

impl ForgeRepo {
    /// `owner/name`, as the forge's API and webhooks name it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

/// The forge repository a URL names: `https://host/owner/name[.git]` or
/// `ssh://git@host/owner/name[.git]`; None for anything else (a local path,
/// a deeper path, odd characters).
pub fn forge_repo(url: &str) -> Option<ForgeRepo> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("ssh://"))?;
    let (authority, path) = rest.split_once('/')?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next().unwrap_or_default();
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let (owner, name) = path.split_once('/')?;
    let fine = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (!host.is_empty() && fine(owner) && fine(name)).then(|| ForgeRepo {
        host: host.to_owned(),
        owner: owner.to_owned(),
        name: name.to_owned(),
    })
}

/// A full commit id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
pub fn commit_id(field: &str, value: &str) -> Result<String, DomainError> {
    let hex = value.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !hex || !(value.len() == 40 || value.len() == 64) {
        return Err(DomainError::invalid(
            field,
            "must be a full commit id (40 or 64 lowercase hex digits)",
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_carries_a_change_without_its_patches() {
        let g = GitChange {
            commit: "b".repeat(40),
            patch: "diff --git a/x b/x".into(),
            branch_diff: Some(BranchDiff {
                merge_base: "c".repeat(40),
                files_changed: 2,
                patch: "diff --git a/y b/y".into(),
                patch_truncated: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bare = g.without_patches();
        assert!(!serde_json::to_string(&bare).unwrap().contains("diff --git"));
        let d = bare.branch_diff.unwrap();
        assert_eq!((d.files_changed, d.merge_base.len(), d.patch_truncated), (2, 40, false));
    }

    fn field_of(e: DomainError) -> String {
        match e {
            DomainError::InvalidArgument(f) => f.field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn branch_names_are_short_lowercase_slugs_after_the_ticket_id() {
        let id: Uuid = "0192a3b4-c5d6-7e8f-9a0b-1c2d3e4f5a6b".parse().unwrap();
        assert_eq!(
            branch_name(id, "Add a /health endpoint!"),
            "omoi/1c2d3e4f5a6b-add-a-health-endpoint"
        );
        assert_eq!(branch_name(id, "日本語"), "omoi/1c2d3e4f5a6b");
        let long = branch_name(id, &"word ".repeat(30));
        assert!(long.len() <= "omoi/1c2d3e4f5a6b-".len() + 40, "{long}");
        // Filed in the same millisecond, told apart.
        let twin: Uuid = "0192a3b4-c5d6-7e8f-9a0b-ffeeddccbbaa".parse().unwrap();
        assert_ne!(branch_name(id, "Same"), branch_name(twin, "Same"));
        assert!(!long.ends_with('-'));
        for title in ["x", "..", "a..b", "-x-", "a.lock"] {
            let b = branch_name(id, title);
            assert_eq!(git_ref("b", &b), Ok(b.clone()));
        }
    }

    #[test]
    fn refs_follow_git_check_ref_format_and_never_read_as_options() {
        for good in ["main", "release/1.2", "refs/heads/main", "v1.0.0", "feature_x-y"] {
            assert_eq!(git_ref("base_ref", good), Ok(good.to_owned()));
        }
        for bad in [
            "",
            "-main",
            "--upload-pack=x",
            "a..b",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "/a",
            "a/",
            "a.",
            ".a",
            "a/.b",
            "a.lock",
            "@",
            "a@{1}",
            "a//b",
            "a\nb",
        ] {
            assert_eq!(field_of(git_ref("base_ref", bad).unwrap_err()), "base_ref", "{bad:?}");
        }
    }

    #[test]
    fn a_reported_change_is_checked_field_by_field() {
        let good = GitChange {
            branch: "omoi/0192a3b4-x".into(),
            base_commit: "a".repeat(40),
            commit: "b".repeat(40),
            files_changed: 1,
            insertions: 2,
            deletions: 0,
            patch: "diff --git a/x b/x\n".into(),
            patch_truncated: false,
            branch_diff: Some(BranchDiff {
                merge_base: "c".repeat(40),
                files_changed: 1,
                ..Default::default()
            }),
        };
        assert!(good.clone().validated("git").unwrap().committed());
        type Spoil = fn(&mut GitChange);
        let cases: [(&str, Spoil); 9] = [
            ("git.branch", |g| g.branch = "-x".into()),
            ("git.base_commit", |g| g.base_commit = "abc".into()),
            ("git.commit", |g| g.commit = "B".repeat(40)),
            ("git.files_changed", |g| g.files_changed = -1),
            ("git.deletions", |g| g.deletions = -1),
            ("git.patch", |g| g.patch = "x".repeat(MAX_PATCH_BYTES + 1)),
            ("git.branch_diff.merge_base", |g| {
                g.branch_diff.as_mut().unwrap().merge_base = "main".into()
            }),
            ("git.branch_diff.insertions", |g| {
                g.branch_diff.as_mut().unwrap().insertions = -3
            }),
            ("git.branch_diff.patch", |g| {
                g.branch_diff.as_mut().unwrap().patch = "\0".into()
            }),
        ];
        for (field, spoil) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            assert_eq!(field_of(bad.validated("git").unwrap_err()), field);
        }
    }

    #[test]
    fn forge_repositories_are_owner_and_name_on_a_host() {
        let acme = |host: &str| {
            Some(ForgeRepo {
                host: host.into(),
                owner: "acme".into(),
                name: "greeter".into(),
            })
        };
        assert_eq!(forge_repo("https://github.com/acme/greeter.git"), acme("github.com"));
        assert_eq!(forge_repo("https://github.com/acme/greeter"), acme("github.com"));
        assert_eq!(
            forge_repo("ssh://git@ghe.example.com:2222/acme/greeter.git"),
            acme("ghe.example.com")
        );
        for bad in [
            "/srv/greeter.git",
            "https://github.com/acme",
            "https://github.com/a/b/c",
            "file:///a/b",
            "https://h/../x",
        ] {
            assert_eq!(forge_repo(bad), None, "{bad}");
        }
    }

    #[test]
    fn long_patches_are_cut_on_a_line_boundary() {
        let (p, cut) = bounded_patch("a\nb\n");
        assert_eq!((p.as_str(), cut), ("a\nb\n", false));
        let long = "line é\n".repeat(MAX_PATCH_BYTES / 4);
        let (p, cut) = bounded_patch(&long);
        assert!(cut && p.len() <= MAX_PATCH_BYTES && p.ends_with('\n'));
    }
}
