// The dashboard shell: token entry, messages, and a hash router that mounts one view at a time.

import { getToken, setToken } from "./api.js";
import { tasksView, taskView } from "./tasks.js";
import { clearError, showError } from "./ui.js";
import { usageView } from "./usage.js";
import { workersView } from "./workers.js";

const routes = {
  tasks: tasksView,
  task: taskView,
  workers: workersView,
  usage: usageView,
};

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const [name, ...rest] = path.split("/").filter(Boolean);
  return {
    name: name || "tasks",
    arg: rest.length ? decodeURIComponent(rest.join("/")) : null,
    params: new URLSearchParams(query),
  };
}

let current = null;

function mount() {
  if (current) current.abort();
  current = new AbortController();
  const route = parseHash();
  const view = routes[route.name] || tasksView;
  for (const link of document.querySelectorAll("[data-nav]")) {
    const active = link.dataset.nav === route.name || (route.name === "task" && link.dataset.nav === "tasks");
    link.classList.toggle("active", active);
  }
  clearError();
  const root = document.getElementById("view");
  while (root.firstChild) root.firstChild.remove();
  try {
    view(root, { arg: route.arg, params: route.params, signal: current.signal });
  } catch (err) {
    showError(err);
  }
}

function setupToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const state = document.getElementById("token-state");
  const describe = () => {
    state.textContent = getToken() ? "token saved in this browser" : "no token";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    describe();
    mount();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    setToken("");
    input.value = "";
    describe();
    mount();
  });
  describe();
}

setupToken();
window.addEventListener("hashchange", mount);
mount();
