"""A person's inbox in the console: a ticket whose implementation phase
awaits approval shows what is to be approved (the planning task's summary
and its diff, a block per file with its +/- counts and coloured lines);
the ticket's page shows its gate and each task's change; the person subscribes a receiver to ticket
events on the notifications page, approves from the inbox with a comment
and the ticket leaves it; the subscription's delivery log shows the
completion delivered after a refused first try. Run by the browser tests
against a real mesh: OMOI_CONSOLE_URL, OMOI_TICKET, OMOI_COMMENT,
OMOI_RECEIVER_URL, OMOI_RECEIVER_SECRET."""

import os

from selenium.webdriver.common.by import By

from common import click, run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
TICKET = os.environ["OMOI_TICKET"]
COMMENT = os.environ["OMOI_COMMENT"]
RECEIVER = os.environ["OMOI_RECEIVER_URL"]
SECRET = os.environ["OMOI_RECEIVER_SECRET"]


def item(d):
    items = d.find_elements(By.CSS_SELECTOR, f'.inbox-item[data-ticket="{TICKET}"]')
    return items[0] if items else None


def ticket_gate(d):
    d.get(URL + "/tickets/" + TICKET)
    # Read whole inside `until`: the page redraws on every event.
    gate = until("the gate on the ticket's page", lambda: [g.text for g in d.find_elements(By.CSS_SELECTOR, '#gates .gate[data-phase="implementation"]')])
    assert "awaiting approval" in gate[0], gate
    until("the ticket's status", lambda: d.find_element(By.ID, "ticket-status").text == "awaiting approval")
    shot(d, "ticket-gate")
    # A task's own change, under its facts.
    click(d, "a task's row", "#tasks tr.clickable")
    files = until("the task's diff", lambda: d.find_elements(By.CSS_SELECTOR, "#task-diff details.diff"))
    assert any(f.get_attribute("data-file") == "PLAN.md" for f in files), [f.get_attribute("data-file") for f in files]
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "task-diff"))
    shot(d, "task-diff")
    # The ticket's whole change against its base, so far.
    whole = until("the branch's diff", lambda: d.find_elements(By.CSS_SELECTOR, "#branch-diff details.diff"))
    assert any(f.get_attribute("data-file") == "PLAN.md" for f in whole), [f.get_attribute("data-file") for f in whole]


def inbox_shows_the_work(d):
    d.get(URL + "/inbox")
    # Read whole inside `until`: the inbox redraws as events come.
    def work():
        it = item(d)
        if it is None:
            return None
        reviewed = [r.text for r in it.find_elements(By.CSS_SELECTOR, ".reviewed")]
        files = it.find_elements(By.CSS_SELECTOR, "details.diff")
        if not reviewed or not files:
            return None
        added = files[0].find_elements(By.CSS_SELECTOR, "pre span.l-add")
        return {
            "text": it.text,
            "reviewed": reviewed,
            "summary": files[0].find_element(By.TAG_NAME, "summary").text,
            "colour": added[0].value_of_css_property("background-color") if added else None,
        }
    seen = until("the ticket in the inbox with the work to approve", work)
    assert "awaiting approval" in seen["text"], seen
    assert "Set up: Greet people" in seen["reviewed"][0], seen
    assert "+" in seen["summary"] and "−" in seen["summary"], seen
    assert seen["colour"] not in (None, "rgba(0, 0, 0, 0)", "transparent"), seen
    shot(d, "inbox")


def subscribe(d):
    d.get(URL + "/subscriptions")
    until("no subscriptions yet", lambda: d.find_elements(By.ID, "no-subscriptions"))
    form = d.find_element(By.ID, "subscribe")
    form.find_element(By.NAME, "url").send_keys(RECEIVER + "/hook")
    form.find_element(By.NAME, "secret").send_keys(SECRET)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    row = until("the subscription listed", lambda: [r.text for r in d.find_elements(By.CSS_SELECTOR, "#subscriptions tr[data-subscription]")])
    assert RECEIVER in row[0] and "TICKET_COMPLETED" in row[0], row
    assert SECRET not in d.page_source
    shot(d, "subscriptions")


def approve_from_the_inbox(d):
    d.get(URL + "/inbox")
    it = until("the ticket in the inbox", lambda: item(d))
    form = it.find_element(By.CSS_SELECTOR, "form.decide")
    form.find_element(By.NAME, "comment").send_keys(COMMENT)
    form.find_element(By.CSS_SELECTOR, 'button[data-action="approve"]').click()
    until("the ticket gone from the inbox", lambda: item(d) is None and d.find_elements(By.ID, "inbox"))
    shot(d, "inbox-approved")


def delivery_log(d):
    d.get(URL + "/subscriptions")
    click(d, "the subscription listed", "#subscriptions tr[data-subscription]")

    def completed_delivered():
        for row in d.find_elements(By.CSS_SELECTOR, "#delivery-log tr[data-event]"):
            if "TICKET_COMPLETED" in row.text and "delivered" in row.text:
                return row.find_element(By.CSS_SELECTOR, "td.tries").text
        return None

    tries = until("the completion delivered", completed_delivered)
    assert tries.startswith("503") and "200" in tries, tries
    shot(d, "delivery-log")


if __name__ == "__main__":
    run_steps((ticket_gate, inbox_shows_the_work, subscribe, approve_from_the_inbox, delivery_log))
