"""Drives the web console in Debian's headless Chromium over WebDriver, as a
person would: create a ticket from the board's form and watch its card move,
follow its task graph turning green and a running task's agent events
arriving, all without a reload; retry a failed task with its button; pause
and resume dispatch; log in to a console that asks for a token. Run by
tests/tests/integration/browser.rs against a real mesh, which passes the addresses in
the environment. Screenshots of each page go to OMOI_ARTEFACTS."""

import os

from selenium.webdriver.common.by import By

from common import WAIT, click, run_steps, shot, until

URL = os.environ["OMOI_CONSOLE_URL"]
AUTH_URL = os.environ["OMOI_CONSOLE_AUTH_URL"]
TOKEN = os.environ["OMOI_CONSOLE_TOKEN"]
FAILED_TICKET = os.environ["OMOI_FAILED_TICKET"]


def marked(d):
    """True while the page has not been reloaded since mark()."""
    return d.execute_script("return window.__omoiMark === 42")


def mark(d):
    d.execute_script("window.__omoiMark = 42")


def column_of(d, title):
    for card in d.find_elements(By.CSS_SELECTOR, ".column .card"):
        if card.find_element(By.CSS_SELECTOR, ".title").text == title:
            return card.find_element(By.XPATH, "ancestor::section").get_attribute("data-column")
    return None


def node_statuses(d):
    return [n.get_attribute("data-status") for n in d.find_elements(By.CSS_SELECTOR, "#dag g.node")]


def board_and_ticket(d):
    d.get(URL + "/")
    until("the board", lambda: d.find_element(By.ID, "create-ticket"))
    mark(d)
    title = "Browser ticket: add a greeting"
    form = d.find_element(By.ID, "create-ticket")
    form.find_element(By.NAME, "title").send_keys(title)
    form.find_element(By.NAME, "description").send_keys("filed from the console's form")
    form.find_element(By.NAME, "max_cost_usd").send_keys("5")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The card appears and moves on while its tasks run.
    first = until("the new card on the board", lambda: column_of(d, title))
    assert first in ("open", "in_progress"), first
    until("the card in progress", lambda: column_of(d, title) == "in_progress")
    shot(d, "board-in-progress")
    # Its page: the graph goes green as the phases complete, and a running
    # task's agent events arrive as the agent works.
    def open_card():
        for c in d.find_elements(By.CSS_SELECTOR, ".column .card"):
            if c.find_element(By.CSS_SELECTOR, ".title").text == title:
                c.click()
                return True
        return False
    until("a click on the card", open_card)
    until("the ticket page", lambda: d.find_element(By.CSS_SELECTOR, "#dag svg"))
    assert d.current_url.startswith(URL + "/tickets/"), d.current_url
    until("four tasks in the graph", lambda: len(node_statuses(d)) == 4)
    # The page redraws as events arrive: read the budget until it holds.
    until("the ticket's $5.00 budget", lambda: d.find_element(By.ID, "budget").text == "$5.00")
    click(d, "a running task in the graph", "#dag g.node[data-status=running]")
    seen_live = until(
        "agent events of a running task",
        lambda: d.find_elements(By.CSS_SELECTOR, "#events div")
        and d.find_element(By.ID, "task-status").text == "running",
    )
    assert seen_live
    shot(d, "ticket-running")
    until("every task completed", lambda: node_statuses(d) == ["completed"] * 4, within=WAIT * 2)
    until("the ticket completed", lambda: d.find_element(By.ID, "ticket-status").text == "completed")
    until("the selected task's stream ended", lambda: d.find_element(By.ID, "events-end").text)
    kinds = {e.get_attribute("data-kind") for e in d.find_elements(By.CSS_SELECTOR, "#events div")}
    assert "output" in kinds or "result" in kinds, kinds
    shot(d, "ticket-completed")
    # Back on the board (no reload: the page was never left).
    d.find_element(By.ID, "nav-board").click()
    until("the card in the completed column", lambda: column_of(d, title) == "completed")
    assert marked(d), "the page was reloaded"
    shot(d, "board-completed")


def retry_failed(d):
    d.get(URL + "/tickets/" + FAILED_TICKET)
    until("the failed ticket", lambda: d.find_element(By.ID, "ticket-status").text == "failed")
    mark(d)
    click(d, "the failed task", "#dag g.node[data-status=failed]")
    until("an enabled retry button", lambda: d.find_element(By.ID, "retry-task").is_enabled())
    shot(d, "ticket-failed")
    click(d, "the retry button", "#retry-task:enabled")
    until("the retried task completed", lambda: node_statuses(d) == ["completed"])
    until("the ticket completed after the retry", lambda: d.find_element(By.ID, "ticket-status").text == "completed")
    assert marked(d), "the page was reloaded"
    shot(d, "ticket-retried")
    # The retried task's session: its first attempt's checkpoint, taken up.
    until("the task's session", lambda: "checkpoint" in d.find_element(By.ID, "task-facts").text)


def follow_up(d):
    # On the retried ticket's page, completed: ask for more.
    until("the follow-up form", lambda: d.find_element(By.ID, "follow-up"))
    mark(d)
    form = d.find_element(By.ID, "follow-up")
    form.find_element(By.NAME, "message").send_keys("Also log the greeting")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until("the follow-up in the graph", lambda: len(node_statuses(d)) == 2)
    until("the ticket reopened or done again", lambda: d.find_element(By.ID, "ticket-status").text in ("in progress", "in_progress", "completed"))
    until("the follow-up completed", lambda: node_statuses(d) == ["completed", "completed"], within=WAIT * 2)
    until("the ticket completed again", lambda: d.find_element(By.ID, "ticket-status").text == "completed")
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#tasks tr[data-task]")]
    assert any("Follow-up: Also log the greeting" in r for r in rows), rows
    # The follow-up's events follow those of the task whose session it
    # continues: one conversation.
    click(d, "the follow-up's row", "#tasks tr[data-task]:nth-of-type(3)")
    until("the conversation's earlier part", lambda: d.find_elements(By.CSS_SELECTOR, "#events .conversation-part"))
    until("the follow-up's own events", lambda: "this task" in d.find_element(By.ID, "events").text)
    assert marked(d), "the page was reloaded"
    shot(d, "ticket-followed-up")


def agents_and_queue(d):
    d.find_element(By.ID, "nav-agents").click()
    rows = until("two agents", lambda: len(d.find_elements(By.CSS_SELECTOR, "#agents tr[data-agent]")) >= 2 and
                 d.find_elements(By.CSS_SELECTOR, "#agents tr[data-agent]"))
    assert "healthy" in rows[0].text, rows[0].text
    shot(d, "agents")
    d.find_element(By.ID, "nav-queue").click()
    form = until("the pause form", lambda: d.find_element(By.ID, "pause"))
    until("the depth table", lambda: d.find_element(By.ID, "depth"))
    form.find_element(By.NAME, "reason").send_keys("lunch break")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until("the pause listed", lambda: "lunch break" in d.find_element(By.ID, "pauses").text)
    shot(d, "queue-paused")
    click(d, "the resume button", "#pauses button.resume")
    until("nothing paused", lambda: d.find_element(By.ID, "no-pauses"))
    assert marked(d), "the page was reloaded"


def login(d):
    d.get(AUTH_URL + "/agents")
    form = until("the login form", lambda: d.find_element(By.ID, "login"))
    form.find_element(By.NAME, "token").send_keys("not the token")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until("the login form again after a wrong token", lambda: d.find_element(By.ID, "login"))
    assert TOKEN not in d.current_url
    form = d.find_element(By.ID, "login")
    form.find_element(By.NAME, "token").send_keys(TOKEN)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until("the agents behind the login", lambda: d.find_elements(By.CSS_SELECTOR, "#agents tr[data-agent]"))
    assert TOKEN not in d.current_url
    shot(d, "login-agents")


def main():
    run_steps((board_and_ticket, retry_failed, follow_up, agents_and_queue, login))


if __name__ == "__main__":
    main()
