// Flash for ComfyUI: show the server's "flash.stack_mismatch" event (nodes/stack.py) as a warning toast.
// A Flash LoRA sampled on another stack than the one it was distilled for still runs; this only tells the user.
// Frontends with app.extensionManager.toast (1.x) get a PrimeVue toast; older ones get a plain banner.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "flash.stack_mismatch";
const LIFE_MS = 15000;

function banner(summary, detail) {
  const box = document.createElement("div");
  box.className = "flash-stack-mismatch";
  box.setAttribute("role", "alert");
  box.style.cssText = "position:fixed;right:16px;bottom:16px;max-width:480px;z-index:10000;padding:10px 14px;" +
    "background:#5c4400;color:#fff;border-radius:6px;font:13px sans-serif;box-shadow:0 2px 8px #0008;";
  box.textContent = `${summary}: ${detail}`;
  box.onclick = () => box.remove();
  document.body.appendChild(box);
  setTimeout(() => box.remove(), LIFE_MS);
}

function show(event) {
  const data = event.detail || {};
  const summary = "Flash LoRA on another stack";
  const detail = data.message || `${data.lora}: trained for ${data.trained_for}, applied on ${data.applied_on}`;
  console.warn(`[Flash] ${detail}`);
  const toast = app.extensionManager && app.extensionManager.toast;
  if (toast && typeof toast.add === "function") {
    toast.add({ severity: "warn", summary, detail, life: LIFE_MS });
  } else {
    banner(summary, detail);
  }
}

app.registerExtension({
  name: "flash.stack_mismatch",
  setup() {
    api.addEventListener(EVENT, show);
  },
});
