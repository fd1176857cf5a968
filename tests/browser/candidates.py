"""Best-of-N in the console: the ticket's page lists a step's candidates
as tasks of their own; the step's task shows them side by side — a row
each with its runner, check, change, cost and the reason it was or was not
chosen, the chosen one marked — and each one's kept diff; a person lands
the other candidate instead, with a reason, and the rows follow; a
candidate's own page shows its kept (not pushed) change. Run by the browser tests against a
real mesh: OMOI_CONSOLE_URL, OMOI_TICKET, OMOI_CHOOSER, OMOI_CANDIDATE."""

import os

from selenium.webdriver.common.by import By

from common import click, run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
TICKET = os.environ["OMOI_TICKET"]
CHOOSER = os.environ["OMOI_CHOOSER"]
CANDIDATE = os.environ["OMOI_CANDIDATE"]


def side_by_side(d):
    d.get(URL + "/tickets/" + TICKET)
    click(d, "the choosing task's row", f'#tasks tr[data-task="{CHOOSER}"]')
    # Read whole inside `until`: a row read across a redraw is stale.
    def table():
        rows = d.find_elements(By.CSS_SELECTOR, "#candidates tr[data-candidate]")
        if len(rows) != 2:
            return None
        return [{
            "index": r.get_attribute("data-candidate"),
            "chosen": "chosen" in (r.get_attribute("class") or ""),
            "text": r.text,
            "check": r.find_element(By.CSS_SELECTOR, "td.check").text,
            "reason": r.find_element(By.CSS_SELECTOR, "td.reason").text,
        } for r in rows]

    rows = until("a row per candidate", table)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["index"] == "1", rows
    assert "chosen: the smallest change" in chosen[0]["text"], chosen[0]
    for r in rows:
        assert r["check"] == "passed", r
        assert "command" in r["text"], r
    other = [r for r in rows if not r["chosen"]][0]
    assert "candidate 1 tied and comes first" in other["reason"], other

    def diffs():
        blocks = d.find_elements(By.CSS_SELECTOR, ".side-by-side .candidate-diff")
        if len(blocks) != 2:
            return None
        return [{
            "files": [f.get_attribute("data-file") for f in b.find_elements(By.CSS_SELECTOR, "details.diff")],
            "y": b.location["y"],
        } for b in blocks]

    blocks = until("each candidate's diff", diffs)
    for block in blocks:
        assert "src/feature.rs" in block["files"], blocks
    # Side by side: the two diffs share a line of the page.
    assert blocks[0]["y"] == blocks[1]["y"], blocks
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "task-candidates"))
    shot(d, "candidates")


def rows_now(d):
    """The candidates' rows as they are, read whole (call it inside
    `until`: a row read across a redraw is stale)."""
    return [{
        "index": r.get_attribute("data-candidate"),
        "chosen": "chosen" in (r.get_attribute("class") or ""),
        "reason": r.find_element(By.CSS_SELECTOR, "td.reason .why").text,
        "can_land": bool(r.find_elements(By.CSS_SELECTOR, "button.choose")),
    } for r in d.find_elements(By.CSS_SELECTOR, "#candidates tr[data-candidate]")]


def a_person_lands_the_other(d):
    rows = until("candidate 2 offered in 1's place", lambda: (r := rows_now(d)) and len(r) == 2 and r[1]["can_land"] and r)
    assert not rows[0]["can_land"], rows
    d.find_element(By.ID, "choice-comment").send_keys("the second reads better")
    click(d, "candidate 2's land button", '#candidates tr[data-candidate="2"] button.choose')

    def landed():
        r = rows_now(d)
        if not r or len(r) != 2 or not r[1]["chosen"]:
            return None
        return r
    rows = until("candidate 2 on the branch", landed)
    assert not rows[0]["chosen"] and rows[0]["reason"] == "replaced by candidate 2", rows
    assert rows[1]["reason"].endswith("in place of candidate 1: the second reads better"), rows
    assert [r["can_land"] for r in rows] == [True, False], rows
    since = until("where the choice is", lambda: [e.text for e in d.find_elements(By.ID, "chosen-by")])
    assert "Choose candidate 2: Build it" in since[0], since
    shot(d, "candidate-chosen")


def a_candidates_own_page(d):
    click(d, "candidate 2's link", '#candidates tr[data-candidate="2"] a')
    heading = until("its kept change", lambda: [h.text for h in d.find_elements(By.CSS_SELECTOR, "#task-diff h2")])
    assert "kept for the choice, not pushed" in heading[0], heading
    files = until("its kept diff", lambda: [f.get_attribute("data-file") for f in d.find_elements(By.CSS_SELECTOR, "#task-diff details.diff")])
    assert "src/feature.rs" in files, files
    assert until("the candidate's task", lambda: d.find_elements(By.CSS_SELECTOR, f'#tasks tr.selected[data-task="{CANDIDATE}"]'))
    shot(d, "candidate")


if __name__ == "__main__":
    run_steps([side_by_side, a_person_lands_the_other, a_candidates_own_page])
