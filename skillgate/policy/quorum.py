"""When an approval's quorum is met: shared by the policy service (which decides) and the ingress
(which tells an approver whether their decision ends the approval)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def quorum_met(
    quorum: int, groups: Sequence[str], each_group: bool, approvals: Iterable[tuple[str, Sequence[str]]]
) -> bool:
    """Whether ``approvals`` ((approver subject, approver groups) of each approval) satisfy the rule.

    Distinct people count toward ``quorum``; with ``each_group``, every group of ``groups`` also
    needs an approver of its own (one person never covers two groups): a bipartite matching of
    groups to approvers, found by augmenting paths (groups are few, so this is instant).
    """
    people: dict[str, set[str]] = {}
    for subject, member_of in approvals:
        people.setdefault(subject, set()).update(member_of)
    if len(people) < quorum:
        return False
    if not each_group:
        return True
    match: dict[str, str] = {}  # approver → group

    def assign(group: str, seen: set[str]) -> bool:
        for subject, member_of in people.items():
            if group not in member_of or subject in seen:
                continue
            seen.add(subject)
            if subject not in match or assign(match[subject], seen):
                match[subject] = group
                return True
        return False

    return all(assign(g, set()) for g in groups)
