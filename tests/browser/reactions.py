"""A ticket's page in the console, as a person reads its pull request's
life: the reactions it used of its cap and a row for each (kind, what
caused it, the task it made, that task's status). Run by the forge tests
against a real mesh: OMOI_CONSOLE_URL, OMOI_TICKET, and OMOI_EXPECT (the
reaction kinds, comma-separated, oldest first) and OMOI_EXPECT_USED (e.g.
"4 of 4 used")."""

import os

from selenium.webdriver.common.by import By

from common import click, run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
TICKET = os.environ["OMOI_TICKET"]
EXPECT = os.environ["OMOI_EXPECT"].split(",")
EXPECT_USED = os.environ["OMOI_EXPECT_USED"]


def reactions(d):
    d.get(URL + "/tickets/" + TICKET)
    until("the reactions used", lambda: d.find_element(By.ID, "reactions").text == EXPECT_USED)
    # Read whole inside `until`: the page redraws on every event, and a row
    # read across a redraw is stale.
    def table():
        rows = d.find_elements(By.CSS_SELECTOR, "#reactions-made tr.clickable")
        if len(rows) != len(EXPECT) or not all(r.text for r in rows):
            return None
        return [[c.text for c in r.find_elements(By.TAG_NAME, "td")] for r in rows]

    cells = until("a row for each reaction", table)
    assert [c[0] for c in cells] == [k.replace("_", " ") for k in EXPECT], cells
    for kind, caused_by, task, status, _usage in cells:
        assert caused_by.startswith("https://"), cells
        assert task.startswith("Follow-up:"), cells
        assert status == "completed", cells

    # A row opens its task.
    click(d, "the first reaction's row clicked", "#reactions-made tr.clickable")
    until("the reaction's task selected", lambda: d.find_elements(By.CSS_SELECTOR, "#tasks tr.selected"))
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "reactions-made"))
    shot(d, "ticket-reactions")


if __name__ == "__main__":
    run_steps((reactions,))
