// The task page's "compare with" input: another run's id, kept in the page's URL (?compare=ID) so a
// reload or a shared link shows the same comparison.

import { api } from "./api.js";
import { h, shortId } from "./dom.js";

export const TRAINING_TYPES = new Set(["sft", "dpo", "grpo", "ppo"]);

function taskUrl(taskId, compareId) {
  return `#/task/${encodeURIComponent(taskId)}${compareId ? `?compare=${encodeURIComponent(compareId)}` : ""}`;
}

/** The form, suggesting recent tasks of the same type (succeeded ones for an eval, which needs scores). */
export function compareForm(task, compareId, signal) {
  const options = h("datalist", { id: "compare-options" });
  const input = h("input", {
    id: "compare-input",
    name: "compare",
    placeholder: `another ${task.task_type} task's id`,
    list: "compare-options",
    value: compareId || "",
    spellcheck: "false",
    size: 38,
  });
  const clear = h("a", { class: "button secondary", id: "compare-clear", href: taskUrl(task.task_id), text: "Clear" });
  const form = h(
    "form",
    { class: "filters compare", id: "compare-form" },
    h("label", {}, "Compare with ", input, options),
    h("button", { type: "submit", text: "Compare" }),
    compareId ? clear : null,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = taskUrl(task.task_id, input.value.trim());
  });
  const state = task.task_type === "eval" ? "succeeded" : undefined;
  api("api/v1/tasks", { params: { task_type: task.task_type, state, page_size: 20 }, signal })
    .then((page) => {
      for (const other of page.items) {
        if (other.task_id !== task.task_id) {
          options.append(h("option", { value: other.task_id, label: `${other.name} (${shortId(other.task_id)}, ${other.state})` }));
        }
      }
    })
    .catch(() => {}); // suggestions only: typing an id still works
  return form;
}
