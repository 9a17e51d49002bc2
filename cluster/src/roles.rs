//! Seed 000's roles on etcd: one manager, a pre-selected backup that every node knows, and
//! clients. The election is not a protocol of ours: it is one etcd transaction that creates
//! the `manager` key under the claimant's lease only if no such key exists, so at most one
//! node holds it, and it vanishes when that node's lease ends.
//!
//! Who may claim, so that the backup is the one that takes over (seed 000: "a pre-selected
//! backup to assume this responsibility"): the backup named in the `backup` key claims at
//! once; another node may claim only when no backup is named, or the named backup is no
//! member any more (both conditions are compares of the claim's transaction, so a stale
//! view cannot make a node jump the queue). Nodes with `may_manage = false` never claim and
//! are never chosen. The manager chooses the backup: the eligible live member with the
//! lowest node number (seed 000: "if all the nodes are equal then the manager criteria is
//! the lowest IP address"); it keeps a backup that is still eligible rather than moving the
//! role to every newcomer with a lower number.

use crate::record::{MemberState, View};

/// Whether this node should try to claim the manager's role now.
pub fn should_claim(view: &View, me: &str, may_manage: bool, leaving: bool) -> bool {
    if view.manager.is_some() || !may_manage || !view.members.contains_key(me) {
        return false;
    }
    match view.backup_node() {
        // The backup claims even while it leaves: were it to wait, nobody could (the others
        // wait for it), and its own leave would never be carried out.
        Some(b) if b == me => true,
        _ if leaving => false,
        Some(b) => !view.members.contains_key(b),
        None => true,
    }
}

fn eligible(view: &View, node: &str, manager: &str) -> bool {
    node != manager
        && view
            .members
            .get(node)
            .is_some_and(|m| m.value.may_manage && m.value.state == MemberState::Up)
}

/// The manager's view of the backup: `None` when the published one is right; `Some(new)`
/// when it must change (`Some(None)`: no node may be backup now).
pub fn backup_choice(view: &View, manager: &str) -> Option<Option<String>> {
    if let Some(b) = view.backup_node()
        && eligible(view, b, manager)
    {
        return None;
    }
    let best = view
        .members
        .values()
        .filter(|m| eligible(view, &m.value.name, manager))
        .min_by_key(|m| (m.value.number, m.value.name.clone()))
        .map(|m| m.value.name.clone());
    match (best, view.backup_node()) {
        (None, None) => None,
        (best, _) => Some(best),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Keys, Member};
    use std::collections::BTreeMap;

    fn view(members: &[(&str, u32, bool)], backup: Option<&str>, manager: Option<&str>) -> View {
        let keys = Keys::new("t");
        let mut v = View::default();
        for (i, (name, number, may)) in members.iter().enumerate() {
            let m = Member {
                name: (*name).into(),
                number: *number,
                address: "a".into(),
                may_manage: *may,
                state: MemberState::Up,
                group: None,
                distances: BTreeMap::new(),
                lease: i as i64 + 1,
                joined_unix_ms: 0,
                local_generation: 0,
            };
            v.apply(
                &keys,
                &keys.member(name),
                Some(&serde_json::to_vec(&m).unwrap()),
                1,
                1,
            );
        }
        if let Some(b) = backup {
            v.apply(&keys, &keys.backup(), Some(b.as_bytes()), 1, 1);
        }
        if let Some(m) = manager {
            let r = crate::record::ManagerRecord {
                node: m.into(),
                lease: 1,
                since_unix_ms: 0,
            };
            v.apply(
                &keys,
                &keys.manager(),
                Some(&serde_json::to_vec(&r).unwrap()),
                1,
                1,
            );
        }
        v
    }

    #[test]
    fn only_the_backup_claims_while_it_lives() {
        let v = view(
            &[("a", 0, true), ("b", 1, true), ("c", 2, true)],
            Some("b"),
            None,
        );
        assert!(should_claim(&v, "b", true, false));
        assert!(!should_claim(&v, "a", true, false));
        assert!(!should_claim(&v, "c", true, false));
        let v = view(&[("a", 0, true), ("c", 2, true)], Some("b"), None);
        assert!(should_claim(&v, "a", true, false));
        assert!(!should_claim(&v, "a", false, false));
    }

    #[test]
    fn the_backup_is_the_lowest_numbered_eligible_member_and_is_kept() {
        let v = view(
            &[
                ("m", 5, true),
                ("x", 0, false),
                ("y", 3, true),
                ("z", 2, true),
            ],
            None,
            Some("m"),
        );
        assert_eq!(backup_choice(&v, "m"), Some(Some("z".into())));
        let v = view(
            &[("m", 5, true), ("y", 3, true), ("z", 2, true)],
            Some("y"),
            Some("m"),
        );
        assert_eq!(backup_choice(&v, "m"), None);
        let v = view(&[("m", 5, true), ("x", 0, false)], Some("y"), Some("m"));
        assert_eq!(backup_choice(&v, "m"), Some(None));
    }
}
