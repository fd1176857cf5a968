"""Best-of-N in the console: the ticket's page lists a step's candidates
as tasks of their own; the step's task shows them side by side — a row
each with its runner, check, change, cost and the reason it was or was not
chosen, the chosen one marked — and each one's kept diff; a candidate's own
page shows its kept (not pushed) change. Run by the browser tests against a
real mesh: OMOI_CONSOLE_URL, OMOI_TICKET, OMOI_CHOOSER, OMOI_CANDIDATE."""

import os

from selenium.webdriver.common.by import By

from common import run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
TICKET = os.environ["OMOI_TICKET"]
CHOOSER = os.environ["OMOI_CHOOSER"]
CANDIDATE = os.environ["OMOI_CANDIDATE"]


def click(d, what, selector):
    """Clicks the first element `selector` finds, again if the page redrew
    it meanwhile (it redraws on every event)."""
    def go():
        found = d.find_elements(By.CSS_SELECTOR, selector)
        if found:
            found[0].click()
        return bool(found)
    until(what, go)


def side_by_side(d):
    d.get(URL + "/tickets/" + TICKET)
    click(d, "the choosing task's row", f'#tasks tr[data-task="{CHOOSER}"]')
    rows = until("a row per candidate", lambda: d.find_elements(By.CSS_SELECTOR, "#candidates tr[data-candidate]"))
    assert len(rows) == 2, [r.text for r in rows]
    chosen = [r for r in rows if "chosen" in (r.get_attribute("class") or "")]
    assert len(chosen) == 1 and chosen[0].get_attribute("data-candidate") == "1", [r.text for r in rows]
    assert "chosen: the smallest change" in chosen[0].text, chosen[0].text
    for r in rows:
        assert r.find_element(By.CSS_SELECTOR, "td.check").text == "passed", r.text
        assert "command" in r.text, r.text
    other = [r for r in rows if r not in chosen][0]
    assert "candidate 1 tied and comes first" in other.find_element(By.CSS_SELECTOR, "td.reason").text, other.text
    diffs = until("each candidate's diff", lambda: d.find_elements(By.CSS_SELECTOR, ".side-by-side .candidate-diff"))
    assert len(diffs) == 2, len(diffs)
    for block in diffs:
        files = [f.get_attribute("data-file") for f in block.find_elements(By.CSS_SELECTOR, "details.diff")]
        assert "src/feature.rs" in files, files
    # Side by side: the two diffs share a line of the page.
    assert diffs[0].location["y"] == diffs[1].location["y"], (diffs[0].location, diffs[1].location)
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "task-candidates"))
    shot(d, "candidates")


def a_candidates_own_page(d):
    click(d, "candidate 2's link", '#candidates tr[data-candidate="2"] a')
    heading = until("its kept change", lambda: d.find_elements(By.CSS_SELECTOR, "#task-diff h2"))
    assert "kept for the choice, not pushed" in heading[0].text, heading[0].text
    files = [f.get_attribute("data-file") for f in d.find_elements(By.CSS_SELECTOR, "#task-diff details.diff")]
    assert "src/feature.rs" in files, files
    assert until("the candidate's task", lambda: d.find_elements(By.CSS_SELECTOR, f'#tasks tr.selected[data-task="{CANDIDATE}"]'))
    shot(d, "candidate")


if __name__ == "__main__":
    run_steps([side_by_side, a_candidates_own_page])
