// What the user started and how it goes: a message line, and each task (backup,
// restore, flatten...) with its progress, polled until it ends.

import {badge, fill, h, progress} from "./dom.js";

const TASK_POLL_MS = 1000;
const KEEP_FINISHED_MS = 15000; // a finished task's row stays this long (the message stays)
const KEEP_MESSAGE_MS = 10000; // a message that is no error goes after this long

/** The activity panel: messages and the tasks started from this page. */
export class Activity {
  constructor(api) {
    this.api = api;
    this.message = h("div", {class: "message", role: "status", "aria-live": "polite"});
    this.list = h("ul", {class: "tasks", "aria-label": "Tasks started here"});
    this.el = h("section", {class: "activity", "aria-label": "Activity"}, this.message, this.list);
    this.onChange = () => {};
  }

  /** Say something (kind: info, ok or error); errors stay until the next message. */
  say(text, kind = "info") {
    const close = h("button", {type: "button", class: "link", "aria-label": "Dismiss message"},
      "×");
    close.addEventListener("click", () => fill(this.message));
    fill(this.message, h("p", {class: `msg msg-${kind}`}, h("span", {}, text), " ", close));
    this.message.setAttribute("role", kind === "error" ? "alert" : "status");
    clearTimeout(this.clearing);
    if (kind !== "error") {
      const shown = this.message.firstChild;
      this.clearing = setTimeout(() => {
        if (this.message.firstChild === shown) fill(this.message);
      }, KEEP_MESSAGE_MS);
    }
  }

  /**
   * Run an action (an async function calling the API), saying what happens; a Task it
   * returns is followed until done. Resolves the action's answer (null when it failed).
   */
  async run(label, action) {
    this.say(`${label}…`);
    try {
      const answer = await action();
      const task = answer?.task && typeof answer.task === "object" ? answer.task
        : (answer?.id?.startsWith?.("task-") ? answer : null);
      if (task) {
        this.say(`${label}: started`, "ok");
        this.follow(label, task);
      } else {
        this.say(`${label}: done`, "ok");
      }
      this.onChange();
      return answer;
    } catch (err) {
      this.say(`${label} failed: ${err.message}`, "error");
      this.onChange();
      return null;
    }
  }

  /** Show a task's progress until it ends. */
  follow(label, task) {
    const row = h("li", {class: "task", "data-task": task.id});
    this.list.prepend(row);
    const render = (t) => fill(row,
      h("strong", {}, label), " ", badge(t.state), " ",
      t.progress?.total ? progress(t.progress.done, t.progress.total, `${label} progress`) : null,
      t.message ? h("span", {class: "muted"}, ` ${t.message}`) : null,
      t.error ? h("span", {class: "error"}, ` ${t.error}`) : null);
    render(task);
    const poll = async () => {
      let t;
      try {
        t = await this.api.get(`/v1/tasks/${encodeURIComponent(task.id)}`);
      } catch (err) {
        render({...task, state: "unknown", error: err.message});
        return;
      }
      render(t);
      if (t.state === "running") {
        setTimeout(poll, TASK_POLL_MS);
        return;
      }
      this.say(`${label}: ${t.state}${t.error ? ` (${t.error})` : ""}`,
        t.state === "succeeded" ? "ok" : "error");
      this.onChange();
      setTimeout(() => row.remove(), KEEP_FINISHED_MS);
    };
    setTimeout(poll, TASK_POLL_MS);
  }
}
