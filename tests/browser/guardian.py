"""The guardian in the console: a looping agent's ticket shows, on its
task's row, how often the guardian stepped in; the task's facts list each
intervention (attempt, action, signal, why), and its agent events mark the
guardian's lines. Run by the browser tests against a real mesh:
OMOI_CONSOLE_URL, OMOI_TICKET, OMOI_TASK."""

import os

from selenium.webdriver.common.by import By

from common import run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
TICKET = os.environ["OMOI_TICKET"]
TASK = os.environ["OMOI_TASK"]


def interventions_on_the_task(d):
    d.get(URL + "/tickets/" + TICKET)
    # Read whole inside `until`: the page redraws on every event.
    def badge():
        found = d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task="{TASK}"] .badge.guardian')
        return found and {"text": found[0].text, "title": found[0].get_attribute("title")}

    b = until("the guardian's badge on the task's row", lambda: (got := badge()) and got["text"] == "guardian ×4" and got)
    assert b["title"].startswith("guardian: stop — the same"), b

    def open_task():
        rows = d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task="{TASK}"]')
        if rows:
            rows[0].click()
        return d.find_elements(By.ID, "task-guardian")

    until("the task's facts", open_task)

    def listed():
        items = d.find_elements(By.CSS_SELECTOR, "#task-guardian .intervention")
        return [(i.get_attribute("data-action"), i.text) for i in items]

    items = until("four interventions listed", lambda: (got := listed()) and len(got) == 4 and got)
    assert [a for a, _ in items] == ["nudge", "stop", "nudge", "stop"], items
    assert "attempt 1, repeated call: the same Bash call 3 times" in items[0][1], items
    assert "attempt 2" in items[3][1], items

    def marked():
        lines = d.find_elements(By.CSS_SELECTOR, '#events div[data-kind="guardian"]')
        return [line.text for line in lines]

    lines = until("the guardian's lines in the agent events", lambda: (got := marked()) and len(got) >= 4 and got)
    assert any("guardian: nudge" in line for line in lines), lines
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "task-guardian"))
    shot(d, "guardian")


if __name__ == "__main__":
    run_steps([interventions_on_the_task])
