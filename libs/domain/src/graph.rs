//! Dependency graphs: cycle detection and validation of a batch of new tasks.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::error::DomainError;

/// A cycle in a graph given as, for each node, the indexes it depends on.
/// Returns the members in dependency order (each depends on the next, the last
/// on the first), or `None` for a DAG. Out-of-range indexes are ignored; check
/// them before.
pub fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; deps.len()];
    // Iterative DFS so that a long chain cannot overflow the stack.
    for root in 0..deps.len() {
        if mark[root] != Mark::New {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            let edges = &deps[node];
            if *next < edges.len() {
                let to = edges[*next];
                *next += 1;
                if to >= deps.len() {
                    continue;
                }
                match mark[to] {
                    Mark::New => {
                        mark[to] = Mark::OnPath;
                        path.push((to, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|&(n, _)| n == to).unwrap_or(0);
                        return Some(path[start..].iter().map(|&(n, _)| n).collect());
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                path.pop();
            }
        }
    }
    None
}

/// A task of a batch, as far as dependencies go.
#[derive(Debug, Clone)]
pub struct BatchNode {
    pub id: Uuid,
    pub depends_on: Vec<Uuid>,
}

/// The ids a batch depends on that are not in the batch itself (to be looked
/// up in storage).
pub fn external_dependencies(nodes: &[BatchNode]) -> Vec<Uuid> {
    let ids: HashSet<Uuid> = nodes.iter().map(|n| n.id).collect();
    let mut out: Vec<Uuid> = nodes
        .iter()
        .flat_map(|n| n.depends_on.iter().copied())
        .filter(|d| !ids.contains(d))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Validates the dependencies of a batch: ids unique, no self-dependency, no
/// duplicate edge, every dependency either in the batch or `known` (existing
/// tasks), and no cycle. Existing tasks never depend on new ones, so a cycle
/// can only run through the batch. `field` names the request list, e.g. "tasks".
pub fn validate_batch(field: &str, nodes: &[BatchNode], known: &HashSet<Uuid>) -> Result<(), DomainError> {
    let mut index: HashMap<Uuid, usize> = HashMap::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        if index.insert(node.id, i).is_some() {
            return Err(DomainError::invalid(
                format!("{field}[{i}].id"),
                format!("duplicate task id {}", node.id),
            ));
        }
    }
    let mut graph = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let mut edges = Vec::new();
        let mut seen = HashSet::new();
        for (j, dep) in node.depends_on.iter().enumerate() {
            let at = format!("{field}[{i}].depends_on[{j}]");
            if *dep == node.id {
                return Err(DomainError::invalid(at, "a task cannot depend on itself"));
            }
            if !seen.insert(*dep) {
                return Err(DomainError::invalid(at, format!("duplicate dependency {dep}")));
            }
            match index.get(dep) {
                Some(&to) => edges.push(to),
                None if known.contains(dep) => {}
                None => return Err(DomainError::invalid(at, format!("unknown task id {dep}"))),
            }
        }
        graph.push(edges);
    }
    if let Some(cycle) = find_cycle(&graph) {
        return Err(DomainError::Cycle {
            field: format!("{field}[{}].depends_on", cycle[0]),
            members: cycle.iter().map(|&i| nodes[i].id).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|i| Uuid::from_u128(i as u128 + 1)).collect()
    }

    fn node(id: Uuid, deps: &[Uuid]) -> BatchNode {
        BatchNode {
            id,
            depends_on: deps.to_vec(),
        }
    }

    #[test]
    fn dags_have_no_cycle() {
        assert_eq!(find_cycle(&[]), None);
        assert_eq!(find_cycle(&[vec![], vec![0], vec![1], vec![2]]), None);
        // Diamond.
        assert_eq!(find_cycle(&[vec![], vec![0], vec![0], vec![1, 2]]), None);
    }

    #[test]
    fn cycles_are_reported_with_their_members() {
        assert_eq!(find_cycle(&[vec![0]]), Some(vec![0]));
        assert_eq!(find_cycle(&[vec![1], vec![0]]), Some(vec![0, 1]));
        // 0 -> 1 -> 2 -> 3 -> 1: node 0 leads into the cycle but is not in it.
        let cycle = find_cycle(&[vec![1], vec![2], vec![3], vec![1]]).unwrap();
        assert_eq!(cycle, vec![1, 2, 3]);
    }

    #[test]
    fn long_chains_do_not_overflow() {
        let n = 200_000;
        let chain: Vec<Vec<usize>> = (0..n).map(|i| if i == 0 { vec![] } else { vec![i - 1] }).collect();
        assert_eq!(find_cycle(&chain), None);
        let mut ring = chain;
        ring[0] = vec![n - 1];
        assert_eq!(find_cycle(&ring).map(|c| c.len()), Some(n));
    }

    #[test]
    fn batch_accepts_in_batch_and_known_dependencies() {
        let id = ids(4);
        let known: HashSet<Uuid> = [id[3]].into();
        let nodes = [
            node(id[0], &[id[3]]),
            node(id[1], &[id[0]]),
            node(id[2], &[id[0], id[1]]),
        ];
        assert_eq!(validate_batch("tasks", &nodes, &known), Ok(()));
        assert_eq!(external_dependencies(&nodes), vec![id[3]]);
    }

    #[test]
    fn batch_refusals_name_the_field() {
        let id = ids(4);
        let none = HashSet::new();
        let field_of = |r: Result<(), DomainError>| match r {
            Err(DomainError::InvalidArgument(e)) => e.field,
            Err(DomainError::Cycle { field, .. }) => field,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            field_of(validate_batch("tasks", &[node(id[0], &[]), node(id[0], &[])], &none)),
            "tasks[1].id"
        );
        assert_eq!(
            field_of(validate_batch(
                "tasks",
                &[node(id[0], &[]), node(id[1], &[id[1]])],
                &none
            )),
            "tasks[1].depends_on[0]"
        );
        assert_eq!(
            field_of(validate_batch("tasks", &[node(id[0], &[id[2]])], &none)),
            "tasks[0].depends_on[0]"
        );
        assert_eq!(
            field_of(validate_batch(
                "tasks",
                &[node(id[0], &[]), node(id[1], &[id[0], id[0]])],
                &none
            )),
            "tasks[1].depends_on[1]"
        );
    }

    #[test]
    fn batch_cycle_lists_members() {
        let id = ids(3);
        let nodes = [node(id[0], &[id[2]]), node(id[1], &[id[0]]), node(id[2], &[id[1]])];
        match validate_batch("tasks", &nodes, &HashSet::new()) {
            Err(DomainError::Cycle { field, members }) => {
                assert_eq!(field, "tasks[0].depends_on");
                assert_eq!(members, vec![id[0], id[2], id[1]]);
            }
            other => panic!("expected a cycle, got {other:?}"),
        }
    }
}
