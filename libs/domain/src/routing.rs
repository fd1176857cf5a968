//! Routing by capability: agents carry labels (what runner and model they
//! run, and anything a deployment adds); a task may require labels, and is
//! handed only to an agent carrying every one of them with the same value
//! (the claim and the queue's statistics ask PostgreSQL: jsonb containment).

use std::collections::{BTreeMap, HashMap};

use crate::error::DomainError;
use crate::validate;

/// Labels an agent carries, or a task requires; ordered, so that equal sets
/// read (and store) the same.
pub type Labels = BTreeMap<String, String>;

/// The labels every executor sets on itself from its configuration.
pub const RUNNER_LABEL: &str = "runner";
pub const MODEL_LABEL: &str = "model";

/// A request's required labels, validated as labels are (at most 64; keys
/// of letters, digits and `- _ . /`; short values without control
/// characters): INVALID_ARGUMENT naming `field` otherwise. A required
/// value may not be empty: no agent's label would be asked for by it.
pub fn requires(field: &str, given: &HashMap<String, String>) -> Result<Labels, DomainError> {
    validate::labels(field, given.iter())?;
    if let Some((k, _)) = given.iter().find(|(_, v)| v.trim().is_empty()) {
        return Err(DomainError::invalid(format!("{field}[{k}]"), "must not be empty"));
    }
    Ok(given.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The labels an executor registers with: `runner=<runner>`, and
/// `model=<model>` when one is configured, plus the deployment's own
/// (`OMOI_AGENT_LABELS`), which may not contradict the first two.
pub fn agent_labels(runner: &str, model: Option<&str>, extra: Labels) -> Result<Labels, DomainError> {
    let mut labels = Labels::new();
    labels.insert(RUNNER_LABEL.to_owned(), runner.to_owned());
    if let Some(model) = model.filter(|m| !m.is_empty()) {
        labels.insert(MODEL_LABEL.to_owned(), model.to_owned());
    }
    for (k, v) in extra {
        match labels.get(&k) {
            Some(own) if *own != v => {
                return Err(DomainError::invalid(
                    format!("labels[{k}]"),
                    format!("is {own:?} from the executor's configuration, not {v:?}"),
                ));
            }
            _ => {
                labels.insert(k, v);
            }
        }
    }
    let as_map: HashMap<String, String> = labels.clone().into_iter().collect();
    validate::labels("labels", as_map.iter())?;
    Ok(labels)
}

/// `runner=codex, gpu=true`: how requirements are shown to people.
pub fn describe(requires: &Labels) -> String {
    requires
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn requirements_are_validated_naming_the_field() {
        let ok: HashMap<String, String> = [("runner".to_string(), "codex".to_string())].into();
        assert_eq!(
            requires("plan[0].requires", &ok).unwrap(),
            labels(&[("runner", "codex")])
        );
        let empty: HashMap<String, String> = [("runner".to_string(), " ".to_string())].into();
        let e = requires("plan[0].requires", &empty).unwrap_err();
        assert!(e.to_string().contains("plan[0].requires[runner]"), "{e}");
        let bad_key: HashMap<String, String> = [("run ner".to_string(), "x".to_string())].into();
        assert!(
            requires("tasks[2].requires", &bad_key)
                .unwrap_err()
                .to_string()
                .contains("tasks[2].requires")
        );
    }

    #[test]
    fn an_executor_labels_itself_with_its_runner_and_model_and_may_add_but_not_contradict() {
        let l = agent_labels("codex", Some("gpt-5"), labels(&[("gpu", "true"), ("runner", "codex")])).unwrap();
        assert_eq!(l, labels(&[("runner", "codex"), ("model", "gpt-5"), ("gpu", "true")]));
        assert_eq!(
            agent_labels("demo", None, Labels::new()).unwrap(),
            labels(&[("runner", "demo")])
        );
        let e = agent_labels("codex", None, labels(&[("runner", "claude-code")])).unwrap_err();
        assert!(e.to_string().contains("labels[runner]"), "{e}");
        assert_eq!(
            describe(&labels(&[("runner", "codex"), ("gpu", "true")])),
            "gpu=true, runner=codex"
        );
    }
}
